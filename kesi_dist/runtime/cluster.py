"""Connecting to Ray with bounded, explained failures.

`ray.init` on a bad address or a missing token either retries for 20-40 s and then raises a bare
`ConnectionError`, or (token mode on, token file missing) aborts the whole process inside Ray's C++
token loader. `connect_ray` checks those cases first, within a time bound, and raises `RunError`
saying what to fix. `check_resources` turns "the trial never starts" into an error up front, and
`check_shared_path` refuses a local output path that some node of a multi-node cluster cannot see.

Token authentication in Ray 2.60: a client sends a token only when RAY_AUTH_MODE=token, and takes
it from RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from kesi_dist.errors import RunError, UsageError
from kesi_dist.train.devices import cuda_problem

__all__ = ["connect_ray", "disconnect_ray", "check_resources", "check_gpus", "check_shared_path", "token_source"]

_TOKEN_HELP = (
    "Ray sends a token only when RAY_AUTH_MODE=token and reads it from RAY_AUTH_TOKEN, else the file "
    "named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (for cluster/local-cluster.sh: source DIR/env.sh)"
)


# Workers' stdout/stderr stay in Ray's log files (`ray logs`, the dashboard): the driver prints one
# readable line per epoch itself instead of forwarding a wall of worker logs.
_QUIET = {"log_to_driver": False, "logging_level": "WARNING"}


def token_source() -> str:
    """Where this process's Ray client would take its auth token from (never the token itself).

    Raises:
        RunError: RAY_AUTH_MODE=token but the configured source is missing or empty (Ray itself
            would abort the process on this).
    """
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode != "token":
        return f"none (RAY_AUTH_MODE={mode or 'unset'})"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if "RAY_AUTH_TOKEN_PATH" in os.environ:
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not _nonempty_file(path):
            raise RunError(f"RAY_AUTH_TOKEN_PATH={path}: no such file or it is empty; point it at the "
                           "cluster's token file, or unset it and set RAY_AUTH_TOKEN")
        return f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    if not _nonempty_file(default):
        raise RunError(f"RAY_AUTH_MODE=token but no token found: {_TOKEN_HELP}")
    return str(default)


def _nonempty_file(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def _parse_address(address: str) -> tuple[str, int]:
    if address.startswith(("http://", "https://")):
        raise UsageError(
            f"Ray address {address!r} is a dashboard/job-submission URL; a driver connects to the GCS "
            "address host:port (default port 6379). Under `ray job submit` leave cluster.address unset"
        )
    if "://" in address:
        raise UsageError(f"Ray address {address!r}: Ray Client (ray://) is not supported; "
                         "submit the run with `ray job submit` instead")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"Ray address {address!r}: expected host:port, e.g. 10.0.0.5:6379")
    return host.strip("[]"), int(port)


def _probe_gcs(address: str, timeout_s: float) -> None:
    """Ask the GCS for its cluster id in a helper thread (the call blocks in C++ without the GIL)."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    result: dict[str, BaseException | None] = {}

    def probe() -> None:
        try:
            GcsClient(address=address)
            result["error"] = None
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            result["error"] = e

    thread = threading.Thread(target=probe, name="kesi-gcs-probe", daemon=True)
    thread.start()
    thread.join(max(timeout_s, 0.1))
    if thread.is_alive():
        raise RunError(
            f"Ray address {address}: a server answers but not as a Ray GCS within {timeout_s:.0f} s; "
            "use the head's GCS port (`ray start --head --port`, default 6379), not the dashboard's"
        )
    error = result["error"]
    if isinstance(error, AuthenticationError):
        raise RunError(
            f"Ray cluster at {address} rejected the connection (auth token missing or wrong; this "
            f"process's token source: {token_source()}). {_TOKEN_HELP}"
        ) from None
    if error is not None:
        raise RunError(f"Ray cluster at {address}: cannot talk to its GCS ({error}); "
                       "check the address and that the head node is healthy (`ray status`)") from None


def connect_ray(address: str | None, *, timeout_s: float = 30) -> None:
    """Connect this process to Ray, or start a local Ray.

    Args:
        address: GCS address ``host:port`` (or "auto", "local"). None means RAY_ADDRESS when set
            (as under `ray job submit`), else a new local Ray (``ray.init(address="local")``).
        timeout_s: upper bound on how long a failing connection takes to be reported.

    Raises:
        UsageError: the address is not ``host:port``.
        RunError: unreachable address, a port that is not a GCS, or a missing/wrong auth token.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local", "auto") and ray.is_initialized():
        return
    # Ray's notice that token auth is on suggests switching it off; kesi_dist keeps it on, so the
    # notice is not repeated to users (auth itself is untouched).
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if address is None or address == "local":
        ray.init(address="local", **_QUIET)
        return
    if address == "auto":  # Ray's own discovery of a cluster started on this machine
        try:
            ray.init(address="auto", **_QUIET)
        except ConnectionError as e:
            raise RunError(f"Ray address 'auto': {e}; start one with `ray start --head` or give host:port") from None
        return
    host, port = _parse_address(address)
    deadline = time.monotonic() + timeout_s
    token_source()  # fail here, not inside Ray's C++ token loader, when the token file is missing
    try:
        with socket.create_connection((host, port), timeout=min(timeout_s, 10)):
            pass
    except OSError as e:
        raise RunError(
            f"cannot reach the Ray cluster at {address} ({e.strerror or e}): is it running "
            "(`ray status --address ...`, cluster/local-cluster.sh status)? Otherwise fix "
            "cluster.address or RAY_ADDRESS"
        ) from None
    _probe_gcs(f"{host}:{port}", deadline - time.monotonic())
    if ray.is_initialized():  # already connected (the checks above still vetted the address)
        return
    try:
        ray.init(address=f"{host}:{port}", **_QUIET)
    except ConnectionError as e:
        raise RunError(f"Ray cluster at {address}: connection failed after the GCS answered ({e}); "
                       "check that this machine can reach the cluster's node IPs") from None


def disconnect_ray() -> None:
    """Leave Ray: a local Ray this process started goes down with its workers; on a cluster its GCS
    ends this driver's tasks and actors (an interrupted run: `kesi_dist.launch`)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def check_resources(num_gpus_needed: float, num_cpus_needed: float) -> None:
    """Fail early when the connected cluster can never fit one trial.

    Counts the nodes in the cluster now: an autoscaling cluster must keep enough workers up
    (min_workers) for its first trial.

    Args:
        num_gpus_needed: GPUs one trial holds at once (workers x GPUs per worker).
        num_cpus_needed: CPUs one trial holds at once.

    Raises:
        RunError: the cluster has fewer GPUs or CPUs in total than one trial needs.
    """
    import ray

    total = ray.cluster_resources()
    gpus, cpus = float(total.get("GPU", 0)), float(total.get("CPU", 0))
    if num_gpus_needed > gpus:
        raise RunError(
            f"config asks for {num_gpus_needed:g} GPUs per trial but the cluster has {gpus:g}: "
            "set train.gpus_per_worker=0 or add GPU nodes"
        )
    if num_cpus_needed > cpus:
        raise RunError(
            f"config asks for {num_cpus_needed:g} CPUs per trial but the cluster has {cpus:g}: "
            "lower train.num_workers or train.cpus_per_worker, or add nodes"
        )


def _gpu_probe(gpus: float) -> str | None:
    return cuda_problem(gpus)


def check_gpus(gpus_per_worker: float, *, timeout_s: float = 120) -> None:
    """Fail before anything runs when a GPU the cluster advertises cannot be used.

    A task holding `gpus_per_worker` GPUs (at most 1) runs where Ray places GPU work and reports
    whether it sees a usable CUDA device; a node whose GPU resource is not backed by one (no driver,
    CUDA_VISIBLE_DEVICES emptied) would otherwise train on its CPU while holding the GPU. When no GPU is
    free within `timeout_s` (a busy cluster) the check is skipped: every worker checks again anyway.

    Raises:
        RunError: the probe's node has no usable CUDA device (the message names it and what it saw).
    """
    import ray

    if gpus_per_worker <= 0:
        return
    ref = ray.remote(_gpu_probe).options(num_cpus=0, num_gpus=min(gpus_per_worker, 1.0), max_retries=0) \
        .remote(gpus_per_worker)
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        return
    problem = ray.get(ref)
    if problem:
        raise RunError(problem)


def _sees_marker(marker: str, token: str) -> str | None:
    """Runs on one node: None when `marker` holds `token` and a file can be written next to it."""
    try:
        with open(marker) as f:
            if f.read() != token:
                return "it holds a different file at that path"
    except FileNotFoundError:
        return "the path does not exist there"
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    probe = f"{marker}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "w") as f:
            f.write(token)
        os.remove(probe)
    except OSError as e:
        return f"cannot write there ({e.strerror or e})"
    return None


def _probe_nodes(marker: str, token: str, nodes: list[dict], timeout_s: float) -> dict[str, str | None]:
    """Ask every node in `nodes` (a 0-CPU task pinned to each) whether it sees the marker."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(_sees_marker)
    refs = {n["NodeID"]: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(marker, token) for n in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    out: dict[str, str | None] = {}
    for node_id, ref in refs.items():
        if ref not in ready:
            out[node_id] = f"no answer within {timeout_s:.0f} s"
            ray.cancel(ref, force=True)
            continue
        try:
            out[node_id] = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - e.g. the node died meanwhile: it cannot be used either
            cause = str(getattr(e, "cause", None) or e).strip().splitlines()
            out[node_id] = f"the check failed there ({type(e).__name__}: {cause[-1][:200] if cause else 'no message'})"
    return out


Probe = Callable[[str, str, list[dict], float], dict[str, "str | None"]]


def check_shared_path(path: str | os.PathLike, *, timeout_s: float = 60, probe: Probe | None = None) -> list[str]:
    """Fail early when a local output path is not the same folder on every node that runs work.

    A run's snapshots, checkpoints and data are written by one node and read by others, so on a
    multi-node cluster a local `--output` must be a shared filesystem mounted at the same path
    everywhere. The driver writes a marker file under `path` (creating the folder if needed; it
    removes both again), then a 0-CPU task pinned to every other alive node with CPUs or GPUs checks
    that it reads the same marker and can write next to it. Storage URIs (s3://, gs://, file://...)
    and single-node clusters skip the check.

    Args:
        path: the run's output path.
        timeout_s: how long to wait for every node's answer.
        probe: how nodes are asked: ``probe(marker, token, nodes, timeout_s) -> {node_id: None if
            it sees the marker, else why not}``; default a pinned Ray task on each node.

    Returns:
        The ids of the nodes that were asked (empty when the check was skipped).

    Raises:
        RunError: a node cannot see or write the path (the message names the node and the fix), or
            the folder cannot be created here.
    """
    import ray

    path = os.fspath(path)
    if "://" in path:
        return []
    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here
             and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)]
    if not nodes:
        return []
    folder = Path(path).absolute()
    created = not folder.exists()
    token = uuid.uuid4().hex
    marker = folder / f".kesi-shared-check-{token[:12]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    except OSError as e:
        raise RunError(f"--output {path}: cannot write there ({e.strerror or e}); choose a writable folder") from None
    try:
        answers = (probe or _probe_nodes)(str(marker), token, nodes, timeout_s)
    finally:
        marker.unlink(missing_ok=True)
        if created:
            try:
                folder.rmdir()
            except OSError:  # something else appeared in it meanwhile: leave it
                pass
    for n in nodes:
        why = answers.get(n["NodeID"], "no answer")
        if why is not None:
            raise RunError(
                f"--output {path}: not visible from node {n.get('NodeManagerAddress', '?')} ({n['NodeID']}): "
                f"{why}; use a shared filesystem (NFS) mounted at the same path on every node, or a storage "
                "URI such as s3://bucket/runs"
            )
    return [n["NodeID"] for n in nodes]
