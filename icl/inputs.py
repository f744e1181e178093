"""The input boundary: every file, YAML document and path a user hands the CLIs is read here.

Why one place: a hostile or careless input (bytes that are not UTF-8, a YAML key given twice,
a ``~nosuchuser`` path, a self-referencing YAML alias) must end as one
:class:`~icl.errors.UserError` naming the input, never as a traceback and never as a silent
guess. So:

- :func:`read_text` decodes strictly as UTF-8 and reports the first bad byte;
- :func:`parse_yaml` refuses duplicate keys (YAML would keep the last one silently), aliases
  (``*name``: they make recursive or exponentially large documents) and keys that are not
  text; anything else the YAML library rejects (bad syntax, an invalid date, a document
  nested too deeply) is reported with its line;
- :func:`read_yaml` is the two together, for files that must hold a mapping;
- :func:`user_path` expands ``~`` and refuses what no file system accepts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from icl.errors import UserError, os_error_advice

MAX_INPUT_BYTES = 64 << 20  # a config or spec is far smaller: refuse a runaway file


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader minus what makes a document ambiguous or explosive."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not supported: write the value out", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is not text: quote it", key_node.start_mark
                    )
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice: keep one", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str) -> Any:
    """The value of one YAML document; :class:`UserError` naming ``where`` if it is not one."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where} is not valid YAML{line}: {problem}") from None
    except RecursionError:
        raise UserError(f"{where} is nested too deeply to be a config") from None
    except (ValueError, TypeError, OverflowError) as e:  # a constructor's: e.g. the date 2001-13-01
        raise UserError(f"{where} holds a value YAML cannot build ({e}); quote it to make it text") from None


def read_bytes(path: Path | str, what: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    """The file's bytes; :class:`UserError` saying why it cannot be read, or that it is
    larger than ``limit`` (a runaway or wrong file, read no further)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}; {os_error_advice(e, 'read')}") from None
    if len(data) > limit:
        raise UserError(f"{what} {path} is larger than {limit >> 20} MiB; is it the right file?")
    return data


def decode(data: bytes, where: str) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark is dropped); no replacement characters."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None


def read_text(path: Path | str, what: str = "file", limit: int = MAX_INPUT_BYTES) -> str:
    """A text file, decoded strictly as UTF-8."""
    return decode(read_bytes(path, what, limit), f"{what} {path}")


def read_yaml(path: Path | str, what: str = "config") -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty mapping)."""
    where = f"{what} {path}"
    data = parse_yaml(read_text(path, what), where)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def user_path(text: str | os.PathLike[str], what: str) -> Path:
    """A path given by a user, ``~`` expanded, absolute and resolved; :class:`UserError` if it
    cannot name a file (empty, a NUL byte, an unknown ``~user``, a symbolic-link loop)."""
    text = os.fspath(text)
    if not text or "\0" in text:
        raise UserError(f"{what} {text!r} is not a usable path")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # ~nosuchuser
        user = text[1:].split("/", 1)[0]
        raise UserError(f"{what} {text!r} starts with ~{user}, but there is no such user; give the full path") from None
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise UserError(f"{what} {text!r} cannot be resolved ({e}); correct the path") from None


__all__ = ["StrictLoader", "parse_yaml", "read_bytes", "decode", "read_text", "read_yaml", "user_path"]
