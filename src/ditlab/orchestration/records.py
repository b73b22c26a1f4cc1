"""The MLflow run a folder belongs to: `tracking.json` in a run folder, a sweep folder, ...

`ditlab run --name` resumes into the run its folder records, `ditlab tune --resume` into the sweep's
parent run, and `ditlab evaluate` nests a checkpoint's evaluation under the run that trained it.
A record names its tracking store too, so a folder moved to another store starts a new run there
instead of reopening an id that store does not have."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ditlab.atomic import write_json
from ditlab.orchestration.tracking import Tracker, tracking_uri
from ditlab.redact import redact_uri

RECORD = "tracking.json"


def recorded_run_id(folder: str | Path) -> str | None:
    """The run id `folder` records for the current tracking store, if any."""
    record = Path(folder) / RECORD
    if not record.is_file():
        return None
    saved = json.loads(record.read_text())
    # Compared redacted: records hold no password (and older ones, written before, match as well).
    return saved["run_id"] if redact_uri(saved.get("tracking_uri", "")) == redact_uri(tracking_uri()) else None


def open_recorded_run(folder: str | Path, create: Callable[[], Tracker]) -> tuple[Tracker, bool]:
    """(the run `folder` records, reopened as RUNNING, True), or (a new run from `create()`, now
    recorded in `folder`, False)."""
    run_id = recorded_run_id(folder)
    if run_id is not None:
        return Tracker.resume(run_id), True
    tracker = create()
    write_json(Path(folder) / RECORD, {"run_id": tracker.run_id, "tracking_uri": tracker.uri})
    return tracker, False


def source_run_id(path: str | Path) -> str | None:
    """The run that trained a checkpoint: the record of its run folder (the bundle's folder, the
    checkpoint folder's parent, or the run folder itself)."""
    p = Path(path).resolve()
    for folder in (p, p.parent, p.parent.parent):
        run_id = recorded_run_id(folder)
        if run_id is not None:
            return run_id
    return None
