"""One checkpoint directory: written atomically, verified on load.

A checkpoint is a directory holding ``state.pt`` (model and optimiser ``state_dict``, step,
elapsed time, the science config), the run's logs up to that step (``metrics.csv``,
``attention.npz``: a checkpoint alone restores a run — Ray moves them between nodes) and
``manifest.json`` (step and SHA-256 of each file). It is built in a hidden temporary
directory and renamed into place, so a crash leaves either the whole checkpoint or none.
Where checkpoints live and what they are called is :mod:`icl.layout`'s business.

Reading one never runs code from it: ``state.pt`` is a pickle, and a pickle can name any
function to call, so it is read with ``torch.load(weights_only=True)`` (tensors, numbers,
text, lists and dicts only) under an allow-list of the few numpy types that checkpoints of
older versions held (their ``np.random`` state); anything else the file asks for is refused
as a damaged checkpoint. A checksum proves only that the manifest and the files agree: whoever
wrote one can re-hash the other, so the manifest is no reason to trust a pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from icl.io import writing_to
from icl.layout import CHECKPOINT_TEMP_PREFIX as TEMP_PREFIX, MANIFEST, STATE


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
    shutil.copytree(src, tmp, symlinks=True)  # a link stays a link, which verify() refuses
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


_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


def verify(path: Path, required: Sequence[str] = ()) -> dict[str, bytes]:
    """The checkpoint's files, checked against its manifest, which must list ``state.pt`` and
    ``required``; ValueError says what is wrong. Only plain files directly inside the
    checkpoint are read (a manifest naming ``../x`` or a symbolic link is damaged)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        expected = manifest["files"]
        if not isinstance(expected, dict):
            raise TypeError("files is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"manifest unreadable ({type(e).__name__})") from None
    for name in (STATE, *required):
        if name not in expected:
            raise ValueError(f"its manifest lists no {name}")
    files = {}
    for name, digest in expected.items():
        if not isinstance(name, str) or not _PLAIN_NAME.match(name) or name in (".", "..") or not isinstance(digest, str):
            raise ValueError(f"its manifest names {name!r}, not a file of the checkpoint")
        try:
            if not stat.S_ISREG(os.lstat(path / name).st_mode):
                raise ValueError(f"{name} is not a regular file")
            data = (path / name).read_bytes()
        except OSError:
            raise ValueError(f"{name} is missing") from None
        if sha256_bytes(data) != digest:
            raise ValueError(f"{name} fails its checksum")
        files[name] = data
    return files


# What a state.pt may hold besides tensors and plain Python values: numpy arrays and their
# dtypes, which checkpoints of older versions used for the saved np.random state.
_RECONSTRUCT = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
SAFE_NUMPY = [np.ndarray, np.dtype, _RECONSTRUCT, (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
              *{type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)}]


def read_state(data: bytes) -> dict[str, Any]:
    """``state.pt``'s dict, unpickled without running code (see the module docstring);
    ValueError if the file asks for anything but tensors, plain values and numpy arrays."""
    try:
        with torch.serialization.safe_globals(SAFE_NUMPY):
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the bytes make torch raise: not a checkpoint
        why = _refusal(str(e)) or type(e).__name__
        raise ValueError(f"{STATE} is not a plain tensor checkpoint ({why}); it was not loaded") from None
    if not isinstance(state, dict):
        raise ValueError(f"{STATE} holds a {type(state).__name__}, not a checkpoint's dict")
    return state


def _refusal(text: str) -> str:
    """What torch's weights-only unpickler refused, in a few words (its message is a page)."""
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it asks for {found.group(1)}"
    lines = [line.strip() for line in text.splitlines() if line.strip() and "Weights only load failed" not in line]
    return lines[0][:160] if lines else ""


def check_state(state: dict[str, Any], step: int | None) -> int:
    """The step of a trainer's checkpoint dict; ValueError if a part is missing or of the wrong
    kind (so that a damaged checkpoint is reported as such, not as a traceback later)."""
    saved = state.get("step")
    if not isinstance(saved, int) or isinstance(saved, bool) or saved < 0:
        raise ValueError(f"{STATE} has no valid step ({saved!r})")
    if step is not None and saved != step:
        raise ValueError(f"{STATE} is of step {saved} but its manifest says {step}")
    model = state.get("model")
    if not isinstance(model, dict) or not model or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise ValueError(f"{STATE} holds no model weights (a name -> tensor mapping)")
    opt = state.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise ValueError(f"{STATE} holds no optimiser state")
    wall = state.get("wall_s", 0.0)
    if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not math.isfinite(wall) or wall < 0:
        raise ValueError(f"{STATE} has an invalid wall_s ({wall!r})")
    if not isinstance(state.get("science", {}), dict):
        raise ValueError(f"{STATE} has an invalid science config")
    return saved


def load(path: Path, required: Sequence[str] = ()) -> Loaded:
    """A verified checkpoint (its manifest listing ``required`` files too); ValueError saying
    what is wrong if it is not one."""
    files = verify(path, required)
    state = read_state(files.pop(STATE))
    return Loaded(path, check_state(state, step_of(path)), state, files)
