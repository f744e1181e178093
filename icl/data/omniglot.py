"""Omniglot on disk: find a source, decode it once into a verified cache, load it as a tensor.

Sources, tried in this order under the data root:
1. the npz pair ``images_background.npz`` + ``images_evaluation.npz`` (bool ``[n, 20, 105, 105]``,
   ``True`` = background; the offline copy in ``../shared/data/omniglot``), checked against
   ``SHA256SUMS`` when that file is present;
2. torchvision's layout ``omniglot-py/images_{background,evaluation}/<alphabet>/<char>/NNNN_DD.png``
   (what ``torchvision.datasets.Omniglot(download=True)`` leaves behind).
``icl-data prepare`` downloads (2) with torchvision on a machine with internet.

Either way characters come out in global id order 0..1622 (background then evaluation, as
the file names number them), drawers 0..19, as uint8 ink intensity (0 = paper, 255 = ink),
resized to ``image_size``. Ink-as-signal keeps the tensors sparse and the embedders' input
centred near zero.

The decoded, resized array is cached as ``<cache>/omniglot-<source key>-<size>px.npy`` with a
JSON sidecar holding the source fingerprint, shape and SHA-256 of the array bytes. The
sidecar is written last (it commits the entry), both atomically; on load the checksum is
recomputed, and a cache that does not match is reported and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from icl.config import N_DRAWERS
from icl.errors import UserError
from icl.inputs import read_text
from icl.io import atomic_write

NPZ_FILES = ("images_background.npz", "images_evaluation.npz")
TV_DIR = "omniglot-py"
TV_SPLITS = ("images_background", "images_evaluation")
CACHE_FORMAT = 1
RAW_SIZE = 105
_PNG_NAME = re.compile(r"^(\d{4})_(\d{2})\.png$")


@dataclass(frozen=True)
class Source:
    """Where the raw images are and a fingerprint of exactly what they are."""

    kind: str  # "npz" | "torchvision"
    root: Path
    fingerprint: str  # hex digest over the source's contents (npz) or file list (png)

    def describe(self) -> str:
        what = {"npz": "npz pair", "torchvision": "torchvision omniglot-py folder"}[self.kind]
        return f"{what} in {self.root}"


def how_to_provide(root: Path) -> str:
    return (
        f"no Omniglot data under {root}: put images_background.npz + images_evaluation.npz "
        f"(or torchvision's omniglot-py folder) there, point ICL_DATA_DIR or data.root at such a folder, "
        f"or run `icl-data prepare` on a machine with internet to download it"
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_source(root: Path) -> Source:
    """The first usable source under ``root``; UserError saying how to provide one if none."""
    if all((root / name).is_file() for name in NPZ_FILES):
        return Source("npz", root, _npz_fingerprint(root))
    tv = root / TV_DIR
    if all((tv / split).is_dir() for split in TV_SPLITS):
        return Source("torchvision", root, _png_fingerprint(tv))
    raise UserError(how_to_provide(root))


def _npz_fingerprint(root: Path) -> str:
    digests = {name: sha256_file(root / name) for name in NPZ_FILES}
    sums = root / "SHA256SUMS"
    if sums.is_file():
        expected = {}
        for line in read_text(sums, "checksum file").splitlines():
            parts = line.split()
            if len(parts) == 2:
                expected[parts[1].lstrip("*")] = parts[0]
        for name, digest in digests.items():
            if name in expected and expected[name] != digest:
                raise UserError(
                    f"{root / name} is corrupt (SHA-256 does not match {sums}): replace it with a good copy"
                )
    return hashlib.sha256("".join(digests[n] for n in NPZ_FILES).encode()).hexdigest()


def _png_files(tv: Path) -> list[Path]:
    return sorted(p for split in TV_SPLITS for p in (tv / split).glob("*/*/*.png"))


def _png_fingerprint(tv: Path) -> str:
    h = hashlib.sha256()
    for p in _png_files(tv):
        h.update(f"{p.relative_to(tv)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- decoding


def read_raw(source: Source) -> np.ndarray:
    """Ink mask, bool ``[n_chars, 20, 105, 105]`` (True = ink), characters in global id order."""
    if source.kind == "npz":
        return _read_npz(source.root)
    return _read_pngs(source.root / TV_DIR)


def _read_npz(root: Path) -> np.ndarray:
    parts = []
    for name in NPZ_FILES:
        path = root / name
        try:
            with np.load(path) as z:
                images = z["images"]
        except Exception as e:  # zipfile/pickle/KeyError: a damaged or foreign file
            raise UserError(f"cannot read {path} ({type(e).__name__}: {e}): replace it with a good copy") from None
        if images.ndim != 4 or images.shape[1:] != (N_DRAWERS, RAW_SIZE, RAW_SIZE):
            raise UserError(f"{path}: array 'images' has shape {images.shape}, expected [n, 20, 105, 105]")
        parts.append(~images.astype(bool))
    return np.concatenate(parts)


def _read_pngs(tv: Path) -> np.ndarray:
    from PIL import Image

    by_char: dict[int, dict[int, Path]] = {}
    for p in _png_files(tv):
        m = _PNG_NAME.match(p.name)
        if m:
            by_char.setdefault(int(m.group(1)) - 1, {})[int(m.group(2)) - 1] = p
    if not by_char:
        raise UserError(f"{tv} holds no Omniglot PNG files (NNNN_DD.png): " + how_to_provide(tv.parent))
    chars = sorted(by_char)
    if chars != list(range(len(chars))):
        raise UserError(f"{tv}: character ids are not contiguous from 0001; the folder is incomplete")
    out = np.zeros((len(chars), N_DRAWERS, RAW_SIZE, RAW_SIZE), dtype=bool)
    for c in chars:
        if sorted(by_char[c]) != list(range(N_DRAWERS)):
            raise UserError(f"{tv}: character {c + 1:04d} does not have 20 drawers; the folder is incomplete")
        for d, path in by_char[c].items():
            try:
                img = np.asarray(Image.open(path).convert("L"))
            except Exception as e:
                raise UserError(f"cannot decode {path} ({e}): replace the file") from None
            if img.shape != (RAW_SIZE, RAW_SIZE):
                raise UserError(f"{path} is {img.shape}, expected 105x105")
            out[c, d] = img < 128
    return out


def resize(ink: np.ndarray, image_size: int) -> np.ndarray:
    """Bool ink ``[..., 105, 105]`` -> uint8 ``[..., S, S]`` (area averaging keeps thin strokes)."""
    if image_size == RAW_SIZE:
        return ink.astype(np.uint8) * 255
    x = torch.from_numpy(ink).float().flatten(0, -3).unsqueeze(1)
    out = []
    for chunk in x.split(4096):
        out.append(F.interpolate(chunk, size=(image_size, image_size), mode="area"))
    y = torch.cat(out).squeeze(1).mul(255).round().to(torch.uint8)
    return y.reshape(*ink.shape[:-2], image_size, image_size).numpy()


# --------------------------------------------------------------------------- cache


def cache_paths(cache: Path, source: Source, image_size: int) -> tuple[Path, Path]:
    stem = f"omniglot-{source.fingerprint[:16]}-{image_size}px"
    return cache / f"{stem}.npy", cache / f"{stem}.json"


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


def _read_cache(npy: Path, meta_path: Path, source: Source, image_size: int) -> np.ndarray | None:
    """The cached array if present and intact; None if absent; reports and returns None if bad."""
    if not meta_path.exists():
        return None
    problem = None
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):  # valid JSON but not our sidecar: damaged
            raise ValueError("the sidecar is not a JSON object")
        array = np.load(npy, allow_pickle=False)
        if meta.get("format") != CACHE_FORMAT or meta.get("source") != source.fingerprint:
            problem = "was made from other data"
        elif meta.get("image_size") != image_size or list(array.shape) != meta.get("shape"):
            problem = "has the wrong shape"
        elif _digest(array) != meta.get("sha256"):
            problem = "fails its checksum"
        else:
            return array
    except (OSError, ValueError, EOFError) as e:
        problem = f"cannot be read ({type(e).__name__})"
    print(f"warning: Omniglot cache {npy} {problem}; rebuilding it", file=sys.stderr)
    return None


def load_images(root: Path, cache: Path, image_size: int) -> tuple[np.ndarray, Source]:
    """uint8 ``[n_chars, 20, S, S]`` ink images, from the verified cache or built into it."""
    source = find_source(root)
    npy, meta_path = cache_paths(cache, source, image_size)
    array = _read_cache(npy, meta_path, source, image_size)
    if array is not None:
        return array, source
    array = resize(read_raw(source), image_size)
    meta = {
        "format": CACHE_FORMAT,
        "source": source.fingerprint,
        "source_kind": source.kind,
        "source_root": str(source.root),
        "image_size": image_size,
        "shape": list(array.shape),
        "sha256": _digest(array),
    }
    try:
        atomic_write(npy, lambda f: np.save(f, array, allow_pickle=False))
        atomic_write(meta_path, json.dumps(meta, indent=1))
    except OSError as e:
        raise UserError(
            f"cannot write the Omniglot cache in {cache} ({e.strerror}): set ICL_CACHE_DIR or data.cache_dir "
            "to a writable folder"
        ) from None
    return array, source


def download(root: Path) -> Source:
    """Fetch Omniglot (background + evaluation) with torchvision into ``root``."""
    try:
        import torchvision
    except ImportError as e:  # pragma: no cover - torchvision is a dependency
        raise UserError(f"torchvision cannot be imported ({e}); install the project's dependencies") from None
    root.mkdir(parents=True, exist_ok=True)
    for background in (True, False):
        try:
            torchvision.datasets.Omniglot(str(root), background=background, download=True)
        except Exception as e:
            raise UserError(f"downloading Omniglot into {root} failed ({type(e).__name__}: {e}); "
                            + how_to_provide(root)) from None
    return find_source(root)
