"""Running `icl-train` in-process and reading its one `error:` line (shared by the train tests)."""
from __future__ import annotations

from icl.train.cli import main as train_main


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """`icl-train ARGS` in this process: its exit status and what it wrote to stderr."""
    try:
        code = train_main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_error_line(code: int, err: str) -> str:
    """The one `error:` line of a refusal (exit 2, no traceback; `warning:` lines may precede it)."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]
