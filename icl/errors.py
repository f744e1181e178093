"""One way to report bad input: a single ``error:`` line on stderr and exit status 2.

Every command-line entry point in the project (``icl-data``, ``icl-train``, ``icl-sweep``,
``icl-analyze``) wraps its ``main`` with :func:`cli_entry`, and every check of user input
raises :class:`UserError`. Bugs still raise ordinary exceptions with a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """Bad input (config, spec, data, path): the message says what is wrong and how to fix it."""


EXIT_USER_ERROR = 2


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
    """Wrap a CLI ``main(argv)`` so a :class:`UserError` becomes ``error: ...`` and exit 2."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return int(main(argv) or 0)
        except UserError as e:
            fail(str(e))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapped
