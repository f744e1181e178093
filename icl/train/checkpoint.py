"""One checkpoint directory: written atomically, verified on load.

A checkpoint is a directory holding ``state.pt`` (model and optimiser ``state_dict``, step,
elapsed time, the science config), the run's logs up to that step (``metrics.csv``,
``attention.npz``: a checkpoint alone restores a run — Ray moves them between nodes) and
``manifest.json`` (step and SHA-256 of each file). It is built in a hidden temporary
directory and renamed into place, so a crash leaves either the whole checkpoint or none.
Where checkpoints live and what they are called is :mod:`icl.layout`'s business.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from icl.io import writing_to

STATE = "state.pt"
MANIFEST = "manifest.json"
TEMP_PREFIX = ".tmp-"  # a checkpoint being built (or a crash's leftover: never valid)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Loaded:
    """A verified checkpoint: its ``state.pt`` dict and its other files' bytes."""

    path: Path
    step: int
    state: dict[str, Any]
    files: dict[str, bytes]


def write(final: Path, step: int, state: dict[str, Any], files: dict[str, bytes]) -> Path:
    """Write checkpoint ``final`` (replacing one of the same name) from ``state`` (torch-saved)
    and ``files``; atomic: built beside it under a hidden name, then renamed."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = {STATE: buf.getvalue(), **files}
    tmp = final.parent / f"{TEMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing_to(final):  # a full disk names the checkpoint, and leaves no half of one
            tmp.mkdir(parents=True)
            for name, data in payload.items():
                with open(tmp / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            manifest = {"step": step, "files": {name: sha256_bytes(data) for name, data in payload.items()}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if final.exists():  # the same step saved again (a resumed run re-reaching it): replace
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)
    return final


def copy(src: Path, final: Path) -> Path:
    """Copy checkpoint directory ``src`` (e.g. one Ray restored) to ``final``, atomically."""
    tmp = final.parent / f"{TEMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, final)
    return final


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_of(path: Path) -> int | None:
    """The step a checkpoint directory's manifest names (None: no readable manifest)."""
    try:
        step = json.loads((path / MANIFEST).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def verify(path: Path) -> dict[str, bytes]:
    """The checkpoint's files, checked against its manifest; ValueError says what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        expected = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"manifest unreadable ({type(e).__name__})") from None
    files = {}
    for name, digest in expected.items():
        try:
            data = (path / name).read_bytes()
        except OSError:
            raise ValueError(f"{name} is missing") from None
        if sha256_bytes(data) != digest:
            raise ValueError(f"{name} fails its checksum")
        files[name] = data
    return files


def load(path: Path) -> Loaded:
    """A verified checkpoint; ValueError (or torch's own error on bytes that pass) if not."""
    files = verify(path)
    state = torch.load(io.BytesIO(files.pop(STATE)), map_location="cpu", weights_only=False)
    return Loaded(path, int(state["step"]), state, files)
