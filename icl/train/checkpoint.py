"""Checkpoints: one directory per saved step, written atomically, verified on load.

``DIR/checkpoints/step_000012000/`` holds ``state.pt`` (model, optimiser, every RNG state,
step, elapsed time), ``metrics.csv`` and ``attention.npz`` (everything logged up to that
step, so a checkpoint alone restores a run — Ray moves them between nodes) and
``manifest.json`` (step and SHA-256 of each file). It is built in a hidden temporary
directory and renamed into place, so a crash leaves either the whole checkpoint or none.
A checkpoint whose files do not match its manifest is reported and skipped, and the run
falls back to the previous one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icl.errors import UserError

PREFIX = "step_"
MANIFEST = "manifest.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:09d}"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ckpt_root: Path, step: int, state: dict[str, Any], files: dict[str, bytes], keep: int) -> Path:
    """Write ``state`` (torch-saved) and extra ``files`` as checkpoint ``step``; keep the
    newest ``keep`` checkpoints. Returns the checkpoint directory."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = {"state.pt": buf.getvalue(), **files}
    final = ckpt_root / checkpoint_name(step)
    tmp = ckpt_root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, data in payload.items():
        with open(tmp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    manifest = {"step": step, "files": {name: sha256_bytes(data) for name, data in payload.items()}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if final.exists():  # same step saved again (a resumed run re-reaching it): replace
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories, oldest first (hidden temporaries excluded)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def remove_temporaries(ckpt_root: Path) -> None:
    """Half-written checkpoints from a crash are never valid: delete them."""
    if ckpt_root.is_dir():
        for p in ckpt_root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class Loaded:
    path: Path
    step: int
    state: dict[str, Any]
    files: dict[str, bytes]


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


def load_latest(ckpt_root: Path) -> Loaded | None:
    """The newest intact checkpoint; corrupt ones are reported on stderr and skipped.
    None if there are none; UserError if there are some but none is intact."""
    found = list_checkpoints(ckpt_root)
    problems = []
    for path in reversed(found):
        try:
            files = verify(path)
            state = torch.load(io.BytesIO(files.pop("state.pt")), map_location="cpu", weights_only=False)
        except Exception as e:  # verify's ValueError, or torch failing on bytes that pass
            problems.append(f"{path.name}: {e}")
            print(f"warning: checkpoint {path} is corrupt ({e}); trying the previous one", file=sys.stderr)
            continue
        return Loaded(path, int(state["step"]), state, files)
    if found:
        raise UserError(
            f"no intact checkpoint in {ckpt_root} ({'; '.join(problems)}); move the run directory "
            "away to start over"
        )
    return None


def install_checkpoint(src: Path, out_dir: Path) -> Path:
    """Copy a checkpoint directory (e.g. one Ray restored) into ``out_dir/checkpoints/`` so
    that :func:`icl.train.train` resumes from it."""
    src = Path(src)
    try:
        step = int(json.loads((src / MANIFEST).read_text())["step"])
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{src} is not a checkpoint directory ({type(e).__name__}: {e})") from None
    ckpt_root = Path(out_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    dest = ckpt_root / checkpoint_name(step)
    if dest.exists():
        return dest
    tmp = ckpt_root / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, dest)
    return dest
