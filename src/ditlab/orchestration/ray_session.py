"""Starting or joining Ray. A local instance always runs with Ray's token authentication on, even
when the shell has RAY_AUTH_MODE set otherwise: anyone who can reach an unauthenticated instance's
ports can run code as the user."""

from __future__ import annotations

import os
import threading

import ray


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join `address` (a cluster's GCS address, ray://..., or "auto"), or the cluster in $RAY_ADDRESS
    (set for a Ray Job's entrypoint), or else start a local instance; reuse the one this process is
    already connected to. Without either, a `ray start` cluster on the same host is not joined by
    accident: the local instance is started with address="local". Returns whether this call
    started a local instance (which `shutdown_in_background` may then stop)."""
    if ray.is_initialized():
        return False
    # ditlab's trainers use Ray Train V2's API (the default in Ray 2.60), so V2 is forced, not defaulted:
    # the Train controller and workers read this variable in their own processes (those of a local
    # instance inherit it; Ray Train passes it on to a cluster's). The driver's own `ray.train`
    # picked its API when first imported: an inherited RAY_TRAIN_V2_ENABLED=0 fails there, as an
    # ImportError of a V2-only name (LoggingConfig, UserCallback), before this line runs.
    os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
    kwargs = dict(logging_level="warning", log_to_driver=True)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **kwargs)
        return False
    # Cloud-preemption polling means nothing on a local instance and logs an error at start.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Train's controller polls its workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S). Polling
    # at 0.5 s starts and ends a tiny run seconds sooner (the tests do: tests/conftest.py), but costs
    # the steps in between: the quickstart's workers trained 534 images/s against 583 at 2 s (medians
    # of 7 runs each, alternated: benchmarks/results/health_check_interval-20261201.txt and
    # train_throughput_filed_vs_head-20261201.txt), so a user's run keeps Ray's default.
    force_token_auth()
    # The dashboard (on loopback only) also serves the state API that Ray Train's placement
    # group cleaner polls; without it the cleaner logs a warning every few seconds.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    return True


def shutdown_in_background() -> threading.Thread:
    """Stops this process's Ray instance on a thread, for a driver whose remaining work needs no
    Ray (`ditlab run`'s final evaluation): the instance's own processes (GCS, raylet, dashboard,
    idle workers) used about 8% of a core while idle on the 2-core development machine, and Ray's
    shutdown at exit waits 1.5-2 s for them to end. Join the thread before the process exits."""
    thread = threading.Thread(target=ray.shutdown, name="ray-shutdown")
    thread.start()
    return thread


def force_token_auth() -> None:
    """Token authentication on for the instance this process starts (and its workers), whatever
    RAY_AUTH_MODE it inherited; Ray makes and keeps the token in ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_MODE") == "token":
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config

    Config.initialize("")  # Ray caches its config on first use: make this process see token mode too
