"""Telemetry off in everything ditlab starts, unless the user opts in.

Ray reports usage statistics, MLflow sends usage events, DVC (through iterative-telemetry) sends
analytics, each by default. ditlab turns all three off in its own process as soon as the package
is imported, before any of them is, so the Ray instances, Train workers, Tune trials, `dvc`
subprocesses and MLflow clients it starts inherit the setting. `DITLAB_TELEMETRY=1` leaves the
tools' own defaults (and the user's own settings of these variables) alone.
"""

from __future__ import annotations

import os

OPT_IN = "DITLAB_TELEMETRY"
# Each tool's documented switch: Ray's usage stats, MLflow's telemetry, DVC's analytics.
OFF = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}


def telemetry_off() -> bool:
    """Set every switch in OFF for this process and its children; False when the user opted in."""
    if os.environ.get(OPT_IN, "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    os.environ.update(OFF)
    return True
