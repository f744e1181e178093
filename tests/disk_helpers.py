"""Small file systems made by the tests: a tmpfs of a few MiB mounted on a test's folder.

Mounting needs root (CI runs as root); elsewhere the tests that need it are skipped with the
reason, unless ``ICL_REQUIRE_TMPFS=1`` (set by ``.ci/run``) turns the skip into a failure.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path


def mount_tmpfs(target: Path, size: str = "4m", read_only: bool = False) -> str | None:
    """Mount a fresh tmpfs of ``size`` on the existing folder ``target``; None if it worked,
    else why not."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount command on this machine"
    options = f"size={size},mode=0755" + (",ro" if read_only else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                            capture_output=True, text=True)
    if result.returncode:
        return f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}"
    return None


def unmount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def fill(folder: Path) -> Path:
    """Fill the file system holding ``folder`` to the last byte; returns the filler file
    (remove it to free the space)."""
    filler = folder / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = 1 << 20
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                size //= 2
    finally:
        os.close(fd)
    return filler
