"""A Ray cluster of real `ray start` processes on this host, for the end-to-end tests.

Each node is one `ray start --block` process in a session of its own, with its own --temp-dir.
Stopping a node signals the processes it started and nothing else: `ray stop` is never used,
because it kills every Ray process on the host, other test sessions' included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from conftest import RAY_TRAIN_POLL, free_port

VENV_BIN = Path(sys.executable).parent


# How fast the head's GCS declares a node dead: Ray checks each raylet every 3 s and gives up after
# 5 failed checks, so the node-loss test waited about 15 s for a killed raylet's node to be
# declared dead. Checked every second here (the 5 failures and each check's 10 s timeout as Ray has
# them: a slow but living raylet still gets 10 s a check).
NODE_HEALTH_CHECK = {"RAY_health_check_period_ms": "1000"}


def node_env(token: str) -> dict[str, str]:
    """The environment of a node, a client or a driver of this cluster: token auth on with `token`,
    the venv first on PATH (as in a cluster image, where `python` has ditlab), and none of this
    process's RAY_* settings (a local instance of the test session may have set some) but the
    tests' Ray Train poll interval (conftest.RAY_TRAIN_POLL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_USAGE_STATS_ENABLED="0", **{k: os.environ.get(k, v) for k, v in RAY_TRAIN_POLL.items()},
               **NODE_HEALTH_CHECK)
    return env


class RayNode:
    """One `ray start --block` process and everything it starts."""

    def __init__(self, args: list[str], temp_dir: Path, env: dict[str, str]):
        self.temp_dir = temp_dir
        temp_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = temp_dir / "ray-start.log"
        # Every port a second node on this host would otherwise take at its default value.
        ports = ["--ray-client-server-port", "--dashboard-agent-listen-port", "--metrics-export-port",
                 "--runtime-env-agent-port", "--dashboard-agent-grpc-port"]
        args = [*args, *(x for flag in ports for x in (flag, str(free_port())))]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "ray"), "start", "--block", "--temp-dir", str(temp_dir), "--disable-usage-stats",
                 "--object-store-memory", str(200 * 2**20), *args],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:]

    def processes(self) -> list[psutil.Process]:
        """This node's processes: those of its session (daemons, Ray workers), plus job drivers,
        which Ray starts in sessions of their own but in a folder under the node's temp dir."""
        found = []
        for proc in psutil.process_iter(["cmdline", "cwd"]):
            try:
                ours = (os.getsid(proc.pid) == self.proc.pid
                        or (proc.info["cwd"] or "").startswith(str(self.temp_dir))
                        or str(self.temp_dir) in " ".join(proc.info["cmdline"] or ()))
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
            if ours and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        return found

    def describe(self) -> str:
        """For failure messages: which of the node's daemons still run, and the end of its log."""
        names = sorted({proc.name() for proc in self.processes() if proc.name() in ("gcs_server", "raylet")})
        return f"daemons running: {names or 'none'}; ray start log:\n{self.log_tail()}"

    def stop(self, grace_seconds: float = 5) -> list[int]:
        """SIGTERM to this node's processes (as `ray stop` does, for ours only), SIGKILL to any left
        after the grace period: seen here, raylets took up to 30 s to drain on SIGTERM, which a
        throwaway test cluster need not wait for. Returns the pids still alive at the end (none
        expected)."""
        procs = self.processes()
        for proc in procs:
            _signal(proc, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace_seconds)
        for proc in alive:
            _signal(proc, signal.SIGKILL)
        _, alive = psutil.wait_procs(alive, timeout=10)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        return sorted(p.pid for p in alive + self.processes())


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


class RayHead(RayNode):
    """A head node: GCS on a free port, the dashboard (Jobs API) on 127.0.0.1."""

    def __init__(self, temp_dir: Path, token: str, num_cpus: int = 2):
        self.token = token
        self.env = node_env(token)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        super().__init__(["--head", "--port", str(self.gcs_port), "--num-cpus", str(num_cpus),
                          "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port)],
                         temp_dir, self.env)
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # GCS listens on every interface; Ray names the node by the host's IP, but 127.0.0.1 reaches it.
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.workers: list[RayNode] = []

    def wait_until_serving(self, timeout: float = 180) -> None:
        """Until the Jobs API answers an authenticated request."""
        request = urllib.request.Request(f"{self.dashboard}/api/version",
                                         headers={"Authorization": f"Bearer {self.token}"})
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(request, timeout=5):
                    return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head did not serve in {timeout} s:\n{self.log_tail()}") from None
                time.sleep(0.5)

    def add_worker_node(self, temp_dir: Path, num_cpus: int = 1) -> RayNode:
        """A second node on this host, a separate `ray start` process joining the head's GCS."""
        node = RayNode(["--address", self.gcs_address, "--num-cpus", str(num_cpus)], temp_dir, self.env)
        self.workers.append(node)
        return node
