"""The output boundary: the one way every part of the project puts a file on disk.

- :func:`atomic_write`: the payload goes to a temporary file in the destination folder
  (``.NAME.XXXXXXXX.tmp``, locked while it is written), is flushed and fsync'd, then renamed
  over the destination: a reader (or a crash) sees the old file or the new one, never half
  of one. Any ``OSError`` (a full disk, a read-only or missing folder, no permission) comes
  out as :class:`~icl.errors.OutputError` naming the destination, with the temporary file
  removed; ``cli_entry`` turns it into one ``error:`` line saying what to do.
- :func:`all_or_nothing`: the files written inside it appear together when it ends, or none
  of them does (a report of many files, an npz with its PNG); :func:`staged` finds what such
  a block has written before it ends.
- Temporaries left by a killed writer are stale: nobody holds their lock. Every
  :func:`atomic_write` removes the stale ones of its own destination first, and
  :func:`remove_stale_temporaries` clears a whole folder when a run starts. A temporary a
  live process is writing (on this machine or, with NFS locks, another) is never touched.
- :func:`check_writable`: before work starts, whether a file or folder can be written there.
- :func:`refuse_inputs`: before work starts, that an output is not one of the command's inputs
  (the dataset, its checksums, the config, a checkpoint) and does not land inside them.
- :func:`writing_to`: the same error for writes that are not atomic (appends, lock files).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from icl.errors import OutputError, UserError, os_error_advice

_UMASK = os.umask(0o022)
os.umask(_UMASK)

Payload = bytes | str | Callable[[BinaryIO], None]
# mkstemp's names: ".<destination name>." + 8 characters + ".tmp"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


@dataclass
class _Staged:
    """Temporaries written inside :func:`all_or_nothing`, renamed when it ends."""

    files: list[tuple[int, Path, Path]] = field(default_factory=list)  # (locked fd, temporary, destination)


_staging: contextvars.ContextVar[_Staged | None] = contextvars.ContextVar("icl_io_staging", default=None)


def _output_error(e: OSError, path: Path) -> OutputError:
    if isinstance(e, OutputError):
        return e
    return OutputError(e.errno or errno.EIO, e.strerror or str(e), str(path))


def _locked_temporary(folder: Path, name: str) -> tuple[int, Path]:
    """A new temporary for ``name`` in ``folder``, created and locked (``flock``). The lock
    marks it live; re-checked after locking, as a cleaner may remove it in between."""
    while True:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: write unlocked
            return fd, Path(tmp)
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, Path(tmp)
        except FileNotFoundError:
            pass
        os.close(fd)  # removed by a cleaner before the lock was ours: make another


def _write_payload(fd: int, tmp: Path, data: Payload) -> None:
    with os.fdopen(os.dup(fd), "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared


@contextlib.contextmanager
def writing_to(path: Path | str) -> Iterator[None]:
    """For writes that cannot go through :func:`atomic_write` (a file appended to, a lock
    file, a checkpoint folder built in place): an ``OSError`` inside comes out as
    :class:`OutputError` naming ``path``, so ``cli_entry`` reports it like any other."""
    try:
        yield
    except OSError as e:
        raise _output_error(e, Path(path)) from e


def _refuse_special(path: Path) -> None:
    """A folder, device, pipe or socket is never replaced by a file (``--out /dev/null`` as root)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISDIR(mode):
        raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise OSError(errno.EEXIST, "exists and is not a regular file")


def atomic_write(path: Path | str, data: Payload) -> None:
    """Write ``data`` (bytes, text, or a function writing to a binary file) to ``path``,
    creating its folder if needed. Raises :class:`OutputError` (an ``OSError``) naming
    ``path`` if the file system refuses; nothing half-written is left either way."""
    path = Path(path)
    fd, tmp = -1, None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # the folder's name is taken by a file
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
        _refuse_special(path)
        remove_stale_temporaries(path.parent, only=path.name)
        fd, tmp = _locked_temporary(path.parent, path.name)
        _write_payload(fd, tmp, data)
        staged = _staging.get()
        if staged is not None:  # renamed with the others when all_or_nothing ends
            staged.files.append((fd, tmp, path))
            return
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if fd >= 0:
            os.close(fd)
        if isinstance(e, OSError):
            raise _output_error(e, path) from e
        raise
    os.close(fd)


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Every :func:`atomic_write` inside appears when the block ends without an error; if it
    raises, none does (their temporaries are removed) and existing files keep their old
    content. Nested blocks join the outermost one."""
    if _staging.get() is not None:
        yield
        return
    staged = _Staged()
    token = _staging.set(staged)
    renamed = 0
    try:
        try:
            yield
        finally:
            _staging.reset(token)
        for _, tmp, dest in staged.files:
            try:
                os.replace(tmp, dest)  # a rename within a folder needs no space: not expected to fail
            except OSError as e:
                raise _output_error(e, dest) from e
            renamed += 1
    except BaseException:
        for _, tmp, _ in staged.files[renamed:]:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        for fd, _, _ in staged.files:
            os.close(fd)


def staged(path: Path | str) -> Path:
    """Where the content of ``path`` is now: inside an :func:`all_or_nothing` block that has
    written it, its temporary (``path`` itself appears only when the block ends); else
    ``path``. For a file of a group that embeds another (a report that inlines its plots)."""
    path = Path(path)
    group = _staging.get()
    for _, tmp, dest in reversed(group.files if group is not None else []):
        if os.path.abspath(dest) == os.path.abspath(path):
            return tmp
    return path


def _remove_if_stale(path: Path) -> bool:
    """Remove temporary ``path`` if nobody holds its lock (its writer is gone). The removal
    happens under our lock, so a writer that just created the file sees it vanish when it
    gets the lock, and makes another."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a live writer holds it
        if os.stat(path).st_ino != os.fstat(fd).st_ino:  # replaced meanwhile: not ours to judge
            return False
        path.unlink()
        return True
    except OSError:  # locked, gone, or no locks on this file system: leave it
        return False
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path | str, *, only: str | None = None) -> list[Path]:
    """Remove the temporaries in ``folder`` whose writer is gone (``only``: those of the
    destination with that name); returns what was removed. Best effort: a folder that
    cannot be listed, or a file that cannot be removed, is left as it is."""
    folder = Path(folder)
    removed: list[Path] = []
    prefix = "." if only is None else f".{only}."
    try:
        names = [e.name for e in os.scandir(folder) if e.name.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        m = _TEMPORARY.match(name)
        if m is None or (only is not None and m.group("name") != only):
            continue
        if _remove_if_stale(folder / name):
            removed.append(folder / name)
    return removed


def check_writable(path: Path | str, what: str, *, folder: bool = False) -> Path:
    """Before work starts: :class:`UserError` unless ``path`` (a file; ``folder``: a folder,
    created later if missing) can be written. Probes with a real temporary file, so a
    read-only, missing or special location (``/proc``) is caught, not guessed."""
    path = Path(path)
    if folder:
        if path.exists() and not path.is_dir():
            raise UserError(f"{what} {path} exists and is not a folder; choose a folder")
        probe_in = path
        while not probe_in.exists():  # the nearest existing folder: mkdir creates the rest
            probe_in = probe_in.parent
        if not probe_in.is_dir():
            raise UserError(f"{what} {path}: {probe_in} is a file, not a folder; correct the path")
    else:
        if path.is_dir():
            raise UserError(f"{what} {path} is a folder; give a file name")
        if path.exists() and not path.is_file():
            raise UserError(f"{what} {path} is not a regular file (a device, pipe or socket); give a file name")
        probe_in = path.parent
        if not probe_in.is_dir():
            raise UserError(f"{what} folder {probe_in} does not exist: create it first")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_in, prefix=f".{path.name or 'probe'}.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"cannot write {what} {path}: {e.strerror or e}; {os_error_advice(e)}") from None
    return path


def refuse_inputs(path: Path | str, what: str, inputs: dict[str, Path | str | None]) -> None:
    """Before work starts: :class:`UserError` if writing ``path`` would overwrite an input of
    the same command: ``path`` is one (the same file, also through a link), or lies inside an
    input folder (``inputs``: description -> path; None is skipped)."""
    target = Path(os.path.realpath(path))
    for name, given in inputs.items():
        if given is None:
            continue
        source = Path(os.path.realpath(given))
        same = target == source
        if not same:
            try:
                same = os.path.samefile(target, source)
            except OSError:  # one of them does not exist: not the same file
                pass
        if same or (not source.is_file() and source in target.parents):  # a folder (or one to be made)
            where = "is" if same else "is inside"
            raise UserError(f"{what} {path} {where} {name} {given}, which this command reads; "
                            "write the output elsewhere")


__all__ = ["atomic_write", "all_or_nothing", "staged", "remove_stale_temporaries", "check_writable", "writing_to",
           "refuse_inputs"]
