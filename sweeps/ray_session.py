"""The Ray session of a sweep: authentication, joining a cluster or starting an embedded Ray,
and the checks of what the cluster offers (resources, shared storage) before any trial."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from icl.errors import UserError
from sweeps.ray_adapter import (keep_handlers, loopback_only, quiet_ray_logs, reload_auth_mode, reset_token_cache,
                                session_dir)
from sweeps.results import error_line
from sweeps.spec import SweepSpec, format_value

CONNECT_TIMEOUT_S = 5.0
JOIN_ATTEMPTS = 5  # seconds-ish ray.init spends on a cluster that answers but refuses


@dataclass
class RayOptions:
    """Where trials run: ``address`` of a cluster, else an embedded Ray of this size."""

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None


def machine_cpus() -> int:
    """CPUs this process may use (a SLURM or taskset CPU set, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"


def _token_file() -> Path | None:
    """The token file Ray would read (``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``);
    None when the token comes from ``RAY_AUTH_TOKEN`` or there is none."""
    if os.environ.get(TOKEN_ENV):
        return None
    path = os.environ.get(TOKEN_PATH_ENV)
    if path:
        return Path(path).expanduser()
    default = Path.home() / ".ray" / "auth_token"
    return default if default.is_file() else None


def _token_available() -> bool:
    if os.environ.get(TOKEN_ENV):
        return True
    path = _token_file()
    return path is not None and path.is_file()


def check_token_private(path: Path) -> None:
    """A token file anyone else can read (Ray 2.60 writes ``~/.ray/auth_token`` with the
    umask's mode, 0644) gives them the cluster: refuse it, saying how to fix it. The folder
    holding it must not be writable by others either (they could swap the file)."""
    try:
        st = os.stat(path)
        folder = os.stat(path.parent)
    except OSError as e:
        raise UserError(f"cannot read the Ray token file {path} ({e.strerror}); set {TOKEN_PATH_ENV} to a "
                        "readable file or unset it") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"the Ray token file {path} is not a regular file; set {TOKEN_PATH_ENV} to the token file")
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise UserError(f"the Ray token file {path} can be read by other users (mode {stat.S_IMODE(st.st_mode):04o}, "
                        f"owner uid {st.st_uid}); make it yours and private: chmod 600 {path}")
    if folder.st_mode & 0o022 and not folder.st_mode & stat.S_ISVTX:
        raise UserError(f"the folder of the Ray token file {path} is writable by other users "
                        f"(mode {stat.S_IMODE(folder.st_mode):04o}); keep the token in a private folder (chmod 700)")


def private_token() -> Path:
    """A fresh random token for an embedded Ray, in a file only this user can read (0600, in a
    new 0700 folder), named by ``RAY_AUTH_TOKEN_PATH`` for this process and the Ray it starts.
    Returns the folder (the driver removes it with its Ray). Never ``~/.ray``: Ray 2.60 would
    write its default token there readable by everyone, and it would outlive the sweep."""
    folder = Path(tempfile.mkdtemp(prefix="icl-sweep-auth-"))  # mode 0700, ours
    path = folder / "token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ[TOKEN_PATH_ENV] = str(path)
    reset_token_cache()  # Ray caches the token it read first
    return folder


def configure_auth(address: str | None) -> str:
    """Set ``RAY_AUTH_MODE`` deliberately (an explicit value in the environment wins).

    Embedded Ray: ``token`` (Ray 2.59+'s own default for local clusters). Joining a cluster:
    ``token`` when a token is available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``; what ``ray start`` itself does), else ``disabled``:
    ``ray.init(address=...)`` never guesses. A token file others can read is refused.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None:
        mode = "token" if (address is None or _token_available()) else "disabled"
        os.environ["RAY_AUTH_MODE"] = mode
        reload_auth_mode()
    if mode == "token" and (path := _token_file()) is not None and (address or os.environ.get(TOKEN_PATH_ENV)):
        check_token_private(path)
    return mode


def _host_port(address: str) -> tuple[str, int] | None:
    addr = address.split("://", 1)[-1]
    m = re.fullmatch(r"\[?([^\]]+?)\]?:(\d+)", addr)
    return (m.group(1), int(m.group(2))) if m else None


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A plain TCP connect first: ``ray.init`` retries an unreachable address for a minute."""
    if address in ("auto", "local"):
        return
    hp = _host_port(address)
    if hp is None:
        raise UserError(f"--address {address!r} must look like HOST:PORT (e.g. 10.0.0.5:6379) or auto")
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(
            f"cannot reach a Ray cluster at {address} ({reason}); start one with `ray start --head` "
            "or fix --address"
        ) from None


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what this process (C++ included) writes to fd 2 meanwhile; the yielded list
    holds the text once the block is left."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read())


def start_ray(opts: RayOptions) -> Path | None:
    """Join the cluster at ``opts.address``, or start an embedded Ray sized to this machine,
    listening on 127.0.0.1 only, with token authentication. Returns a folder to remove after
    ``ray.shutdown()`` (the embedded Ray's private token), or None."""
    from sweeps.signals import SIGNALS

    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    if opts.address:
        if opts.num_cpus is not None or opts.num_gpus is not None:
            raise UserError("--num-cpus/--num-gpus size an embedded Ray; a cluster (--address) has its own sizes")
        mode = configure_auth(opts.address)
        check_reachable(opts.address)
        import ray

        # A reachable cluster that refuses us (wrong token) would be retried 20 times, one
        # C++ warning line a second; try a few times and keep the noise for the error.
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(JOIN_ATTEMPTS))
        with _captured_stderr() as noise, keep_handlers(SIGNALS):
            try:
                ray.init(address=opts.address, **quiet)
                failure = None
            except Exception as e:  # noqa: BLE001 - any failure to join is the user's address/auth
                failure = e
        if failure is None:
            sys.stderr.write("".join(noise))
            return None
        text = "".join(noise) + str(failure)
        if "Unauthenticated" in text or "AuthToken" in text or "authentication" in text.lower():
            hint = (
                f"authentication failed (RAY_AUTH_MODE={mode}): give the cluster's token with RAY_AUTH_TOKEN "
                "or RAY_AUTH_TOKEN_PATH and RAY_AUTH_MODE=token"
            )
        else:
            hint = error_line(str(failure))
        raise UserError(f"cannot join the Ray cluster at {opts.address}: {hint}")
    if opts.num_cpus is not None and opts.num_cpus < 1:
        raise UserError(f"--num-cpus must be >= 1, got {opts.num_cpus}")
    if opts.num_gpus is not None and opts.num_gpus < 0:
        raise UserError(f"--num-gpus must be >= 0, got {opts.num_gpus}")
    loopback_only()
    mode = configure_auth(None)
    # the user's token if given (RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH: checked private above);
    # else one for this Ray alone (never ~/.ray/auth_token)
    given = os.environ.get(TOKEN_ENV) or os.environ.get(TOKEN_PATH_ENV)
    token_dir = private_token() if mode == "token" and not given else None
    import ray

    try:
        with keep_handlers(SIGNALS):
            ray.init(
                address="local",  # never RAY_ADDRESS: an embedded Ray was asked for
                num_cpus=opts.num_cpus if opts.num_cpus is not None else machine_cpus(),
                num_gpus=opts.num_gpus,  # None: Ray detects the GPUs it can see (CUDA_VISIBLE_DEVICES)
                include_dashboard=False,
                **quiet,
            )
    except BaseException:
        if token_dir is not None:
            shutil.rmtree(token_dir, ignore_errors=True)
        raise
    return token_dir


class RaySession:
    """The sweep's Ray, for a ``with`` block: joined or started on entry (:func:`start_ray`),
    shut down on exit with signals only noted meanwhile (``ray.shutdown`` interrupted leaves Ray
    half stopped), then ``on_stop`` run (forgetting the record of this Ray: after it is gone)
    and the private token removed."""

    def __init__(self, opts: RayOptions) -> None:
        self.opts = opts
        self.token_dir: Path | None = None
        self.on_stop: list[Callable[[], None]] = []

    def __enter__(self) -> "RaySession":
        import ray

        from sweeps import signals

        try:
            self.token_dir = start_ray(self.opts)
        except BaseException:
            with signals.stopping():
                if ray.is_initialized():
                    ray.shutdown()
            raise
        quiet_ray_logs()
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        from sweeps import signals

        with signals.stopping():
            ray.shutdown()
            for stop in self.on_stop:
                stop()
            if self.token_dir is not None:
                shutil.rmtree(self.token_dir, ignore_errors=True)

    def session_dir(self) -> str | None:
        """The embedded Ray's session directory (what a SIGKILL of the driver would leave
        running: ``sweeps.leftovers``); None when joining a cluster."""
        return None if self.opts.address else session_dir()


def check_resources(spec: SweepSpec) -> None:
    """A trial (a pack, in a packed sweep) runs on one node: some alive node must hold its
    CPUs and GPUs."""
    import ray

    need = spec.resources
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    have = [(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)) for n in nodes]
    if any(cpu + 1e-9 >= need.cpu and gpu + 1e-9 >= need.gpu for cpu, gpu in have):
        return
    best = ", ".join(f"{format_value(c)} CPU + {format_value(g)} GPU" for c, g in have) or "no nodes"
    unit = "pack" if spec.pack > 1 else "trial"
    raise UserError(
        f"each {unit} needs {format_value(need.cpu)} CPU + {format_value(need.gpu)} GPU (spec `resources`) "
        f"but no node of the Ray cluster has that much (nodes: {best}); lower `resources` or give "
        "--num-cpus/--num-gpus / a bigger cluster"
    )


def check_storage_shared(storage: Path, timeout: float = 60.0) -> None:
    """On a multi-node cluster every node must see the storage directory (as Ray Tune
    requires): write a marker here, look for it from a task pinned to each node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    marker = storage / f".icl-sweep-shared-{uuid.uuid4().hex}"
    marker.write_text("")
    try:
        probe = ray.remote(num_cpus=0)(_exists)
        refs = [
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
            for n in nodes
        ]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        seen = {ref: ray.get(ref) for ref in ready}
        missing = [n.get("NodeManagerAddress", n["NodeID"]) for n, ref in zip(nodes, refs) if not seen.get(ref)]
    finally:
        marker.unlink(missing_ok=True)
    if missing:
        raise UserError(
            f"storage {storage} is not visible from Ray node(s) {', '.join(missing)}; on a cluster, "
            "--storage must be a filesystem every node shares (NFS, Lustre, ...)"
        )


def _exists(path: str) -> bool:
    return os.path.exists(path)
