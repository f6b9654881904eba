import json

import pytest
import torch

from lowbit.data import DataError, calibration_windows, eval_windows, hf_text, load_text


def test_text_file_folder_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    assert load_text(str(tmp_path / "a.txt")) == "alpha"
    assert load_text(str(tmp_path)) == "alpha\n\nbeta"
    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(str(j)) == "one\n\ntwo"


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="unknown corpus"):
        load_text("no-such-corpus")
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        load_text(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt"):
        load_text(str(tmp_path / "empty"))


def test_datasets_loader_on_local_fixture(tmp_path):
    pytest.importorskip("datasets")
    # the same code path as WikiText-2 / C4, on a local JSON file instead of the hub
    f = tmp_path / "shard.json"
    f.write_text("\n".join(json.dumps({"text": t}) for t in ["first doc", "second doc", "third doc"]))
    assert hf_text("json", None, "train", data_files=str(f)) == "first doc\n\nsecond doc\n\nthird doc"
    assert hf_text("json", None, "train", data_files=str(f), limit=2) == "first doc\n\nsecond doc"


def test_windows():
    ids = torch.arange(10_000)
    w = eval_windows(ids, 64, 512)
    assert w.shape == (19, 512) and torch.equal(w[1], torch.arange(512, 1024))
    c1, c2 = calibration_windows(ids, 16, 100, seed=0), calibration_windows(ids, 16, 100, seed=0)
    assert torch.equal(c1, c2) and c1.shape == (16, 100)
    assert torch.all(c1[:, 1:] - c1[:, :-1] == 1)  # contiguous windows
    assert not torch.equal(c1, calibration_windows(ids, 16, 100, seed=1))
    with pytest.raises(DataError):
        calibration_windows(torch.arange(50), 4, 100)
    with pytest.raises(DataError):
        eval_windows(torch.arange(50), 4, 100)
