"""Shared test setup for the whole tree: the real Omniglot data and a per-session cache.

For the whole pytest session (restored afterwards):
- ``ICL_DATA_DIR`` -> the offline Omniglot copy, as an absolute path: the value already in
  the environment if set (a relative one is resolved against the current directory), else
  ``../shared/data/omniglot`` next to the project root.
- ``ICL_CACHE_DIR`` -> a fresh session temporary folder, so the decoded-image cache is built
  at most once per image size per session (seconds each) and never touches the user's
  ``~/.cache/icl``. A test that damages a cache must use its own folder
  (``monkeypatch.setenv("ICL_CACHE_DIR", str(tmp_path))`` or ``data.cache_dir``).
- ``OMP_NUM_THREADS=1`` and one torch thread in this process (see the fixture for why).
All are plain ``os.environ`` entries, so subprocesses (``icl-data``, ``icl-train`` ...)
inherit them.

Nothing a test starts outlives the run, also when the run is aborted: every process the
session starts inherits ``ICL_TEST_SESSION`` (a value unique to this pytest run, which its
xdist workers keep: ``-n 2``, the README's test command), the
temporary folders Ray runs in are marked with it (``.icl-test-session``, written by
``sweep_helpers.short_tmpdir``), and when the session ends (normally, on Ctrl-C, on SIGTERM,
which is turned into a KeyboardInterrupt so that pytest runs its fixture finalizers) every
process carrying the value, or naming or holding open a file in a marked folder (Ray's
retitled agents, orphaned by a killed driver), is killed and the folders are removed.

Fixtures: ``omniglot_dir`` (Path of the data), ``session_cache_dir`` (Path of the cache),
``omniglot_subset(n_background, n_evaluation)``: a folder holding a small npz pair of
real data (the first characters of each file, written once per session per size) for fast
tests of the loaders; give it ``data.n_holdout`` < the character count and
``data.custom=true`` (it is not the whole of Omniglot); and ``tmpfs(size, read_only)``: a
small file system of its own (tests/disk_helpers.py), for full-disk and read-only tests.

Hypothesis runs derandomized (the same examples on every run, as CI needs) unless
``HYPOTHESIS_PROFILE=explore`` asks for fresh random ones.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import threading
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from disk_helpers import mount_tmpfs, unmount
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("explore", deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from sweeps.procs import kill_pids, pids_mentioning, pids_with_env, with_descendants

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data" / "omniglot"
_ENV_KEYS = ("ICL_DATA_DIR", "ICL_CACHE_DIR", "OMP_NUM_THREADS")
SESSION_ENV = "ICL_TEST_SESSION"
SESSION_MARK = ".icl-test-session"  # in a temporary folder of the session: its value


def pytest_configure(config: pytest.Config) -> None:
    """Mark this session's processes before any starts; stop them however the run ends. An
    xdist worker keeps the mark of the run that started it: the run stops them all at its end."""
    if not _is_xdist_worker(config):
        os.environ[SESSION_ENV] = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        atexit.register(stop_session_processes)  # also after an interrupted run
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")  # pytest-xdist's own test for a worker


# A test that starts or joins Ray needs one of these (tests/sweeps/conftest.py), directly or
# through its other fixtures: it is a slow one, marked so by the rule below.
RAY_FIXTURES = frozenset({"ray_head", "embedded_env", "smoke_run"})
# Those of the session's shared head and smoke sweep: under pytest-xdist (the README's test
# command: -n 2 --dist loadgroup) the tests needing them share one worker, so that both are
# made once; as the largest group, xdist starts it first. The rest (an embedded Ray's tests
# too) is shared out test by test.
SHARED_RAY_FIXTURES = frozenset({"ray_head", "smoke_run"})


@pytest.hookimpl(tryfirst=True)  # before pytest selects by -m
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The two tiers and the opt-in suites: a test that needs Ray is ``slow`` (the others are
    marked where they are defined: SIGKILL, full disk, signals, long); ``slurm`` tests run only
    when ``-m`` names them (``-m slurm``); ``cuda`` tests are skipped, with the reason, where
    there is no CUDA device; the tests of the shared Ray head form one xdist group."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if RAY_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
        if SHARED_RAY_FIXTURES & fixtures:  # under -n 2 --dist loadgroup: all on one worker, first
            item.add_marker(pytest.mark.xdist_group("shared-ray"))
    if "slurm" not in (config.getoption("markexpr") or ""):
        kept = [item for item in items if not item.get_closest_marker("slurm")]
        if len(kept) < len(items):
            config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("slurm")])
            items[:] = kept
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(skip)


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _is_xdist_worker(config):
        stop_session_processes()


def stop_session_processes() -> None:
    """Kill every process of this session (and what it started); remove its marked folders."""
    session = os.environ.get(SESSION_ENV)
    if not session:
        return
    folders = [d for d in Path(tempfile.gettempdir()).glob("icl-*") if _marked(d, session)]
    doomed = pids_with_env(SESSION_ENV, session)
    for d in folders:
        doomed += pids_mentioning(str(d))
    kill_pids(with_descendants(doomed))
    for d in folders:
        shutil.rmtree(d, ignore_errors=True)


def _marked(folder: Path, session: str) -> bool:
    try:
        return (folder / SESSION_MARK).read_text() == session
    except OSError:
        return False


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    """SIGTERM (kill, a CI timeout) ends the run like Ctrl-C: fixture finalizers run."""
    signal.signal(signal.SIGTERM, lambda *_: None)  # once is enough; let the teardown finish
    raise KeyboardInterrupt

@pytest.fixture(scope="session", autouse=True)
def _icl_test_env(tmp_path_factory: pytest.TempPathFactory):
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    data = Path(os.environ.get("ICL_DATA_DIR") or DEFAULT_DATA_DIR).expanduser().resolve()
    cache = tmp_path_factory.mktemp("icl-cache")
    os.environ["ICL_DATA_DIR"] = str(data)
    os.environ["ICL_CACHE_DIR"] = str(cache)
    # One torch thread per process: the tests' models are tiny, and the suite runs several
    # processes at once (Ray workers, CLI subprocesses); OpenMP workers spinning against each
    # other on 2 cores made single tests 10x slower. Subprocesses inherit the variable.
    os.environ["OMP_NUM_THREADS"] = "1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"data": data, "cache": cache}
    torch.set_num_threads(threads)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def omniglot_dir(_icl_test_env) -> Path:
    """The real Omniglot data folder (npz pair + SHA256SUMS) the session uses."""
    return _icl_test_env["data"]


@pytest.fixture(scope="session")
def session_cache_dir(_icl_test_env) -> Path:
    """The session-wide cache folder (``$ICL_CACHE_DIR``); do not damage files in it."""
    return _icl_test_env["cache"]


def first_characters(path: Path, k: int) -> np.ndarray:
    """The first ``k`` rows of an npz's ``images`` array, read without decompressing the rest."""
    with zipfile.ZipFile(path) as zf, zf.open("images.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran, dtype = read_header(fh)
        assert not fortran and k <= shape[0]
        count = k * int(np.prod(shape[1:]))
        return np.frombuffer(fh.read(count * dtype.itemsize), dtype=dtype).reshape(k, *shape[1:])


@pytest.fixture(scope="session")
def omniglot_subset(omniglot_dir, tmp_path_factory):
    """``make(n_background, n_evaluation) -> Path``: an npz pair (no SHA256SUMS) of the first
    characters of the real files, ids 1..n_background then 965..964+n_evaluation."""
    made: dict[tuple[int, int], Path] = {}

    def make(n_background: int, n_evaluation: int) -> Path:
        key = (n_background, n_evaluation)
        if key not in made:
            root = tmp_path_factory.mktemp(f"omniglot-{n_background}-{n_evaluation}")
            for name, k in zip(("images_background.npz", "images_evaluation.npz"), key):
                images = first_characters(omniglot_dir / name, k)
                labels = np.repeat(np.arange(k), images.shape[1]).reshape(k, images.shape[1])
                np.savez_compressed(root / name, images=images, labels=labels)
            made[key] = root
        return made[key]

    return make


@pytest.fixture
def tmpfs(tmp_path_factory):
    """``make(size="4m", read_only=False) -> Path``: a fresh tmpfs, unmounted after the test.
    Skipped with the reason where none can be mounted (fails instead with ICL_REQUIRE_TMPFS=1)."""
    mounted: list[Path] = []

    def make(size: str = "4m", read_only: bool = False) -> Path:
        target = tmp_path_factory.mktemp("tmpfs")
        reason = mount_tmpfs(target, size, read_only)
        if reason:
            if os.environ.get("ICL_REQUIRE_TMPFS") == "1":
                pytest.fail(f"ICL_REQUIRE_TMPFS=1 but {reason}")
            pytest.skip(reason)
        mounted.append(target)
        return target

    yield make
    for target in mounted:
        unmount(target)
