"""cli_entry: bad input, a refusing file system and running out of memory are one line and exit 2."""

from __future__ import annotations

import errno

import pytest

from icl.errors import OutputError, UserError, cli_entry


def run(capsys, exc: BaseException) -> tuple[int, str]:
    @cli_entry
    def main(argv):
        raise exc

    try:
        code = main([])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_line(code: int, err: str) -> str:
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "exc, words",
    [
        (UserError("bad value\n  on two lines"), ["bad value on two lines"]),
        (OutputError(errno.ENOSPC, "No space left on device", "/x/metrics.csv"),
         ["cannot write /x/metrics.csv", "No space left", "free space", "same command again"]),
        (OutputError(errno.EROFS, "Read-only file system", "/ro/r.csv"), ["/ro/r.csv", "read-only"]),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x"), ["cannot use /root/x", "permission"]),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/a/b"), ["/a/b", "does not exist"]),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp"), ["/tmp", "folder"]),
        (OSError(errno.ENOSPC, "No space left on device"), ["No space left", "free space"]),
        (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), ["/a -> /b"]),
        (MemoryError(), ["out of memory", "eval.batch_size"]),
    ],
)
def test_one_error_line(capsys, exc, words):
    err = one_line(*run(capsys, exc))
    for w in words:
        assert w in err


@pytest.mark.parametrize("exc", [ConnectionRefusedError(errno.ECONNREFUSED, "refused"), OSError("no errno"),
                                 ValueError("a bug"), OSError(errno.ECHILD, "No child processes")])
def test_bugs_and_other_errors_keep_their_traceback(capsys, exc):
    with pytest.raises(type(exc)):
        run(capsys, exc)


def test_torch_out_of_memory_is_one_line(capsys):
    import torch

    one_line(*run(capsys, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))


def test_interrupt_exits_130(capsys):
    code, err = run(capsys, KeyboardInterrupt())
    assert code == 130 and err == "interrupted\n"
