"""Omniglot on disk: find a source, decode it once into a verified cache, load it as a tensor.

Sources, tried in this order under the data root:
1. the npz pair ``images_background.npz`` + ``images_evaluation.npz`` (bool ``[n, 20, 105, 105]``,
   ``True`` = background; the offline copy in ``../shared/data/omniglot``), checked against
   ``SHA256SUMS`` when that file is present;
2. torchvision's layout ``omniglot-py/images_{background,evaluation}/<alphabet>/<char>/NNNN_DD.png``
   (what ``torchvision.datasets.Omniglot(download=True)`` leaves behind).
The data root is the configured one, else the first of ``data/``, ``shared/data/omniglot`` and
``../shared/data/omniglot`` by the checkout that holds a source (:func:`locate_root`); with none,
(2) is downloaded with torchvision where the machine is online (``icl-data prepare`` too).

The data must be what Omniglot is (:func:`check_dataset`, before the cache is consulted):
964 + 659 characters x 20 drawers of 105 x 105 binary images, with the npz files' labels
numbering the characters. Anything else is refused with what was found, unless the config
says ``data.custom: true``: then any number of characters is accepted (labels optional), but
the images must still be bool ``[n, 20, 105, 105]``, the only form the loader reads.

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

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from icl.config import N_DRAWERS, Config, configured_data_root, data_roots
from icl.errors import UserError
from icl.inputs import read_text
from icl.io import atomic_write

NPZ_FILES = ("images_background.npz", "images_evaluation.npz")
TV_DIR = "omniglot-py"
TV_SPLITS = ("images_background", "images_evaluation")
OMNIGLOT_CHARACTERS = (964, 659)  # background, evaluation: 1623 in all
CUSTOM_HINT = "if this is meant to be a custom dataset, set data.custom=true"
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


def source_kind(root: Path) -> str | None:
    """Which layout ``root`` holds ("npz" first, then "torchvision"), by its files' presence
    alone; None if neither."""
    if all((root / name).is_file() for name in NPZ_FILES):
        return "npz"
    if all((root / TV_DIR / split).is_dir() for split in TV_SPLITS):
        return "torchvision"
    return None


def find_source(root: Path) -> Source:
    """The first usable source under ``root``; UserError saying how to provide one if none."""
    kind = source_kind(root)
    if kind == "npz":
        return Source("npz", root, _npz_fingerprint(root))
    if kind == "torchvision":
        return Source("torchvision", root, _png_fingerprint(root / TV_DIR))
    raise UserError(how_to_provide(root))


DOWNLOAD_HOST = "raw.githubusercontent.com"  # torchvision's Omniglot URL (datasets.Omniglot.download_url_prefix)


def can_download(host: str = DOWNLOAD_HOST) -> bool:
    """Whether the download host's name resolves: an offline machine (a compute node, a
    sandbox) answers at once, without a connection being tried."""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def locate_root(cfg: Config, fetch: Callable[[Path], Source] | None = None) -> Path:
    """The data root of ``cfg``: the first of :func:`icl.config.data_roots` that holds a
    source. With none, and no root configured, Omniglot is downloaded into the default root
    where the machine is online (``fetch``, default :func:`download`); otherwise the
    UserError saying how to provide it. A configured root is never downloaded into
    unasked (``icl-data prepare`` does that)."""
    roots = data_roots(cfg)
    for root in roots:
        if source_kind(root):
            return root
    if configured_data_root(cfg) is not None or not can_download():
        raise UserError(how_to_provide(roots[0]))
    print(f"no Omniglot in {', '.join(map(str, roots))}; downloading it with torchvision into {roots[0]} ...",
          file=sys.stderr, flush=True)
    return (fetch or download)(roots[0]).root


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


# --------------------------------------------------------------------------- is it Omniglot?


@dataclass(frozen=True)
class NpzLayout:
    """What an npz file of the pair holds, read from its array headers (and its small labels)."""

    path: Path
    shape: tuple[int, ...]  # of 'images'
    dtype: np.dtype
    labels: np.ndarray | None  # None if the file has no 'labels'


def _header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with zf.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        if version not in readers:
            raise ValueError(f"npy format version {version} is not supported")
        shape, _, dtype = readers[version](fh)  # the header only, not the data
    return tuple(shape), np.dtype(dtype)


def npz_layout(path: Path) -> NpzLayout:
    """The layout of one npz file without decompressing its images; UserError if unreadable."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "images.npy" not in names:
                raise UserError(f"{path} holds no array 'images' (it has {', '.join(sorted(names)) or 'nothing'}); "
                                "replace it with a good copy")
            shape, dtype = _header(zf, "images.npy")
            labels = None
            if "labels.npy" in names:
                with zf.open("labels.npy") as fh:
                    labels = np.lib.format.read_array(fh, allow_pickle=False)
    except UserError:
        raise
    except Exception as e:  # zipfile, zlib, numpy's header parser: a damaged or foreign file
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}): replace it with a good copy") from None
    return NpzLayout(path, shape, dtype, labels)


def check_npz_format(layout: NpzLayout) -> None:
    """The form the loader reads: bool images ``[n, 20, 105, 105]`` (True = paper)."""
    if layout.dtype != np.bool_ or len(layout.shape) != 4 or layout.shape[1:] != (N_DRAWERS, RAW_SIZE, RAW_SIZE):
        raise UserError(
            f"{layout.path}: array 'images' is {layout.dtype} with shape {list(layout.shape)}, expected bool "
            f"[n, 20, 105, 105] (True = paper)"
        )


def _check_npz_identity(layout: NpzLayout, expected: int, custom: bool) -> None:
    n, labels = layout.shape[0], layout.labels
    if labels is not None and (labels.shape != (n, N_DRAWERS) or labels.dtype.kind not in "iu"):
        raise UserError(f"{layout.path}: array 'labels' is {labels.dtype} with shape {list(labels.shape)}, "
                        f"expected integers [{n}, 20] (the character of each image)")
    if custom:
        return
    problem = None
    if n != expected:
        problem = f"holds {n} characters, but Omniglot's {layout.path.stem.split('_')[-1]} set has {expected}"
    elif labels is None:
        problem = "has no array 'labels'"
    elif not np.array_equal(labels, np.repeat(np.arange(n), N_DRAWERS).reshape(n, N_DRAWERS)):
        row = int(np.flatnonzero((labels != np.arange(n)[:, None]).any(axis=1))[0])
        problem = f"labels character {row} as {sorted(set(labels[row].tolist()))[:3]}, not {row}"
    if problem:
        raise UserError(f"{layout.path} {problem}; {CUSTOM_HINT}")


def check_dataset(source: Source, custom: bool = False) -> None:
    """Refuse data that is readable but not Omniglot (964 + 659 characters x 20 drawers of
    105 x 105 binary images), saying what was found; ``custom`` accepts other character counts."""
    if source.kind == "npz":
        for name, expected in zip(NPZ_FILES, OMNIGLOT_CHARACTERS):
            layout = npz_layout(source.root / name)
            check_npz_format(layout)
            _check_npz_identity(layout, expected, custom)
        return
    if custom:
        return
    tv = source.root / TV_DIR
    for split, expected in zip(TV_SPLITS, OMNIGLOT_CHARACTERS):
        ids = {m.group(1) for p in (tv / split).glob("*/*/*.png") if (m := _PNG_NAME.match(p.name))}
        if len(ids) != expected:
            raise UserError(f"{tv / split} holds {len(ids)} characters, but Omniglot's has {expected}; {CUSTOM_HINT}")


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
        check_npz_format(npz_layout(path))
        try:
            with np.load(path, allow_pickle=False) as z:
                images = z["images"]
        except Exception as e:  # zipfile/zlib: a damaged file whose header was intact
            raise UserError(f"cannot read {path} ({type(e).__name__}: {e}): replace it with a good copy") from None
        parts.append(~images)
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


def load_images(root: Path, cache: Path, image_size: int, custom: bool = False) -> tuple[np.ndarray, Source]:
    """uint8 ``[n_chars, 20, S, S]`` ink images, from the verified cache or built into it;
    the data is checked to be Omniglot first (``custom``: any number of characters)."""
    source = find_source(root)
    check_dataset(source, custom)
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
    """Fetch Omniglot (background + evaluation) with torchvision into ``root``, all or nothing:
    into a hidden folder beside, moved into place once both halves are there, so a failed
    download (offline, a full disk) leaves the data root as it was (not even created)."""
    try:
        import torchvision
    except ImportError as e:  # pragma: no cover - torchvision is a dependency
        raise UserError(f"torchvision cannot be imported ({e}); install the project's dependencies") from None
    if (root / TV_DIR).exists():  # find_source found no complete dataset in it
        raise UserError(f"{root / TV_DIR} exists but is not a complete Omniglot download; move it away and run "
                        "`icl-data prepare` again")
    made = [p for p in (root, *root.parents) if not p.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".omniglot-download-", dir=root))
    except OSError as e:
        raise UserError(f"cannot write to the data root {root} ({e.strerror}); choose a writable data.root "
                        "or ICL_DATA_DIR") from None
    try:
        for background in (True, False):
            torchvision.datasets.Omniglot(str(staging), background=background, download=True)
        final = root / TV_DIR
        if final.exists():
            raise UserError(f"{final} exists but is not a complete Omniglot download; move it away and run "
                            "`icl-data prepare` again")
        os.replace(staging / TV_DIR, final)
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:  # the folders this call made, innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(e, UserError):
            raise
        raise UserError(f"downloading Omniglot into {root} failed ({type(e).__name__}: {e}); "
                        + how_to_provide(root)) from None
    shutil.rmtree(staging, ignore_errors=True)
    return find_source(root)
