"""One way to report bad input: a single ``error:`` line on stderr and exit status 2.

Every command-line entry point in the project (``icl-data``, ``icl-train``, ``icl-sweep``,
``icl-analyze``) wraps its ``main`` with :func:`cli_entry`, and every check of user input
raises :class:`UserError`. What the machine refuses is reported the same way: an
``OSError`` from the file system (a full disk, a read-only or missing folder, no
permission; see :data:`FILE_ERRNOS`) and running out of memory become one ``error:`` line
naming the path and what to do. Bugs still raise ordinary exceptions with a traceback.
"""

from __future__ import annotations

import argparse
import errno
import functools
import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """Bad input (config, spec, data, path): the message says what is wrong and how to fix it."""


class OutputError(OSError):
    """Writing ``filename`` failed (raised by :mod:`icl.io`, which names the destination, not
    its temporary file). An ``OSError``, so code that handles file-system errors still does."""


EXIT_USER_ERROR = 2

_FULL = "free space there (or choose another location) and run the same command again"
_ADVICE = {
    errno.ENOSPC: _FULL,
    errno.EDQUOT: "the disk quota is used up: " + _FULL,
    errno.EFBIG: "the file is too large for that file system: choose another location",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.EACCES: "permission denied: choose a location you may {action} or change its permissions",
    errno.EPERM: "operation not permitted: choose a location you may {action}",
    errno.ENOENT: "it does not exist: create the folder or correct the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: correct the path",
    errno.EISDIR: "it is a folder: give a file name",
    errno.EEXIST: "something is already there: remove it or choose another path",
    errno.ENOTEMPTY: "the folder is not empty: remove it or choose another path",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    errno.ELOOP: "too many symbolic links: correct the path",
    errno.EXDEV: "it is on another file system: choose a location on the same one",
    errno.EBUSY: "it is in use: try again later or choose another path",
    errno.ETXTBSY: "it is in use: try again later or choose another path",
    errno.EIO: "the device reported an input/output error: check the disk",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.ENFILE: "too many open files on this machine: close some programs",
    errno.EINVAL: "the file system refuses this operation there: choose an ordinary folder",
}
FILE_ERRNOS = frozenset(_ADVICE)  # errno values that mean "the file system refuses", not a bug


def os_error_advice(e: OSError, action: str = "write") -> str:
    """What the user can do about ``e`` (``action``: read or write), in a few words."""
    return _ADVICE.get(e.errno or 0, "check the path and try again").format(action=action)


def describe_os_error(e: OSError) -> str | None:
    """One line for an ``OSError`` the file system raised, naming the path and what to do;
    None for other ones (a socket, a child process: a bug or not ours to explain)."""
    if isinstance(e, (ConnectionError, TimeoutError, BrokenPipeError)) or e.errno is None:
        return None
    if e.errno not in FILE_ERRNOS and e.filename is None:
        return None
    reason = e.strerror or str(e)
    action = "write" if isinstance(e, OutputError) else "use"
    if e.filename is None:
        return f"{reason}; {os_error_advice(e, action)}"
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    verb = "cannot write" if isinstance(e, OutputError) else "cannot use"
    return f"{verb} {where}: {reason}; {os_error_advice(e, action)}"


def _out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")  # never imported just to ask
    return torch is not None and isinstance(e, torch.OutOfMemoryError)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 2."""
    message = " ".join(str(message).split())  # one line, always
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one ``error:`` line (argparse prints two)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        fail(f"{message} (see `{self.prog} --help`)")


def cli_entry(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a CLI ``main(argv)``: a :class:`UserError`, a file-system ``OSError`` or running
    out of memory becomes ``error: ...`` and exit 2; Ctrl-C exits 130."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return int(main(argv) or 0)
        except UserError as e:
            fail(str(e))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except OSError as e:
            message = describe_os_error(e)
            if message is None:
                raise
            fail(message)
        except Exception as e:
            if not _out_of_memory(e):
                raise
            fail(f"out of memory ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}); "
                 "make the model or the batches smaller (model.*, train.batch_size, eval.batch_size)")

    return wrapped
