"""The output boundary (icl.io): atomic writes, all-or-nothing groups, stale temporaries, probes."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from icl.errors import OutputError, UserError, describe_os_error
from icl.io import all_or_nothing, atomic_write, check_writable, remove_stale_temporaries, staged, writing_to


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_bytes_text_and_callable(tmp_path: Path):
    atomic_write(tmp_path / "a" / "b.txt", "héllo")
    atomic_write(tmp_path / "c.bin", b"\x00\x01")
    atomic_write(tmp_path / "d.bin", lambda f: f.write(b"xyz"))
    assert (tmp_path / "a" / "b.txt").read_text() == "héllo"
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01" and (tmp_path / "d.bin").read_bytes() == b"xyz"
    assert (tmp_path / "c.bin").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert leftovers(tmp_path) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    "where, code",
    [("under_a_file", errno.ENOTDIR), ("onto_a_folder", errno.EISDIR), ("proc", None)],
)
def test_a_refused_write_names_the_destination_and_leaves_nothing(tmp_path: Path, where: str, code: int | None):
    (tmp_path / "file").write_text("keep")
    (tmp_path / "folder").mkdir()
    path = {"under_a_file": tmp_path / "file" / "x.csv", "onto_a_folder": tmp_path / "folder",
            "proc": Path("/proc/icl-test/x.csv")}[where]
    with pytest.raises(OutputError) as e:
        atomic_write(path, "data")
    assert e.value.filename == str(path) and (code is None or e.value.errno == code)
    line = describe_os_error(e.value)
    assert line is not None and line.startswith(f"cannot write {path}:")
    assert (tmp_path / "file").read_text() == "keep" and leftovers(tmp_path) == leftovers(tmp_path / "folder") == []


def test_a_payload_that_fails_leaves_the_old_file(tmp_path: Path):
    path = tmp_path / "r.csv"
    path.write_text("old")

    def half(f):
        f.write(b"new, half of it")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError) as e:
        atomic_write(path, half)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert path.read_text() == "old" and leftovers(tmp_path) == []


def test_all_or_nothing_writes_together_or_not_at_all(tmp_path: Path):
    a, b = tmp_path / "a.npz", tmp_path / "b.png"
    a.write_text("old a")
    with pytest.raises(OutputError):
        with all_or_nothing():
            atomic_write(a, "new a")
            assert a.read_text() == "old a"  # staged, not yet visible
            atomic_write(tmp_path / "missing" / "file" / "b.png", "x")  # (missing is then created)
            (tmp_path / "blocker").write_text("")
            atomic_write(tmp_path / "blocker" / "b.png", "x")  # fails: a file as folder
    assert a.read_text() == "old a" and not b.exists() and leftovers(tmp_path) == []
    assert not (tmp_path / "missing" / "file" / "b.png").exists()
    with all_or_nothing():
        atomic_write(a, "new a")
        with all_or_nothing():  # nested: joins the outer group
            atomic_write(b, "new b")
        assert not b.exists()
    assert a.read_text() == "new a" and b.read_text() == "new b" and leftovers(tmp_path) == []


def test_staged_finds_what_an_open_group_has_written(tmp_path: Path):
    a = tmp_path / "a.png"
    a.write_text("old")
    assert staged(a) == a
    with all_or_nothing():
        atomic_write(a, "first")
        atomic_write(a, "second")  # written twice in the group: the later one is what appears
        assert staged(a) != a and staged(a).read_text() == "second" and a.read_text() == "old"
        assert staged(tmp_path / "other") == tmp_path / "other"
    assert staged(a) == a and a.read_text() == "second"


def test_stale_temporaries_go_live_ones_and_other_files_stay(tmp_path: Path):
    import fcntl

    stale = tmp_path / ".results.csv.abcd1234.tmp"
    live = tmp_path / ".results.csv.live5678.tmp"
    other_stale = tmp_path / ".summary.csv.zzzz9999.tmp"
    mine = tmp_path / ".notes.tmp"  # not the temporaries' shape: never ours
    for p in (stale, live, other_stale, mine):
        p.write_text("x")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer still at work
    try:
        atomic_write(tmp_path / "results.csv", "a,b\n")  # clears its own destination's stale ones
        assert not stale.exists() and live.exists() and other_stale.exists()
        assert remove_stale_temporaries(tmp_path) == [other_stale]
        assert live.exists() and mine.exists()
    finally:
        os.close(fd)
    assert remove_stale_temporaries(tmp_path) == [live]
    assert mine.exists() and (tmp_path / "results.csv").read_text() == "a,b\n"


WRITER = """
import sys, time
from icl.io import atomic_write
def slow(f):
    f.write(b"partial")
    f.flush()
    print("writing", flush=True)
    time.sleep(600)
atomic_write(sys.argv[1], slow)
"""


def test_a_killed_writer_leaves_a_temporary_that_the_next_start_removes(tmp_path: Path):
    dest = tmp_path / "metrics.csv"
    dest.write_text("previous")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(dest)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert proc.stdout.readline().strip() == "writing"
        (temp,) = [tmp_path / n for n in leftovers(tmp_path)]
        assert remove_stale_temporaries(tmp_path) == [] and temp.exists()  # its writer is alive
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert temp.exists() and dest.read_text() == "previous"
    assert remove_stale_temporaries(tmp_path) == [temp]
    assert leftovers(tmp_path) == [] and dest.read_text() == "previous"


def test_check_writable(tmp_path: Path):
    (tmp_path / "file").write_text("")
    assert check_writable(tmp_path / "new.npz", "--out") == tmp_path / "new.npz"
    assert check_writable(tmp_path / "a" / "b" / "report", "--out", folder=True)
    cases = [
        (tmp_path, {}, "is a folder"),
        (tmp_path / "nope" / "x.npz", {}, "does not exist"),
        (tmp_path / "file", {"folder": True}, "not a folder"),
        (tmp_path / "file" / "x" / "y", {"folder": True}, "is a file"),
        (Path("/proc/x.npz"), {}, "cannot write --out /proc/x.npz"),
        (Path("/dev/null"), {}, "not a regular file"),
    ]
    for path, kwargs, words in cases:
        with pytest.raises(UserError, match=words):
            check_writable(path, "--out", **kwargs)
    assert leftovers(tmp_path) == []


def test_check_writable_on_a_read_only_file_system(tmpfs):
    read_only = tmpfs("64k", read_only=True)
    with pytest.raises(UserError, match="read-only"):
        check_writable(read_only / "x.npz", "--out")
    with pytest.raises(OutputError) as e:
        atomic_write(read_only / "x.npz", b"x")
    assert e.value.errno == errno.EROFS and "read-only" in describe_os_error(e.value)


def test_a_device_or_pipe_is_never_replaced(tmp_path: Path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError) as e:
        atomic_write(fifo, "x")
    assert e.value.filename == str(fifo) and "not a regular file" in describe_os_error(e.value)
    assert fifo.is_fifo() and leftovers(tmp_path) == []


def test_writing_to_names_the_path_of_a_write_that_is_not_atomic(tmp_path: Path):
    log = tmp_path / "attempts.jsonl"
    with pytest.raises(OutputError) as e:
        with writing_to(log):
            raise OSError(errno.ENOSPC, "No space left on device")  # what f.write raises: no file name
    assert e.value.filename == str(log) and describe_os_error(e.value).startswith(f"cannot write {log}:")
    with writing_to(log), open(log, "a") as f:
        f.write("{}\n")
    assert log.read_text() == "{}\n"
