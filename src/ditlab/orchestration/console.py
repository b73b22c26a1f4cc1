"""What `ditlab` prints on stderr: progress bars, the summary and real warnings; informational lines
of Ray and MLflow only with --verbose (or DITLAB_VERBOSE=1).

Two calls:
- `configure_console(verbose)` in the CLI, once, before Ray starts (driver side);
- `quiet_train_worker()` at the top of the Ray Train worker function (worker side: each worker is a
  process of its own, which the driver's logging settings do not reach).

What is hidden and why (Ray 2.60, MLflow 3.17):
- Ray Train V2 logs "Reporting training result N: TrainingReport(...)" at INFO on every report of
  every rank (ray/train/v2/_internal/execution/context.py, `_wait_then_report`). Its logger is
  `logging.getLogger(__file__)`, a path rather than a `ray.train.*` name, so RunConfig's
  LoggingConfig(log_level=...) never applies to it: the record reaches the worker's root logger,
  whose console handler prints it, and log_to_driver copies it to our stderr between the
  progress bar's updates. `quiet_train_worker` raises that one logger to WARNING.
- `ray.init()` starting a local instance with RAY_AUTH_MODE unset logs a WARNING that token
  authentication is on (ray/_private/authentication/authentication_token_setup.py,
  `_warn_token_auth_enabled`). Token authentication on is what ditlab wants, so the notice is
  dropped by a filter on that logger that matches its text; every other record of that logger
  (a missing or wrong token, for instance) still prints.
- MLflow logs "Creating initial MLflow database tables..." and "Updating database tables" at INFO
  when it creates a SQLite store (mlflow/store/db/utils.py); that logger is raised to WARNING.
- Ray Train V2's controller, as it starts, sends the run's resources to Ray Data's autoscaling
  coordinator (train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py). The
  first request creates that actor and waits 5 s for it; on a busy machine the wait times out, and
  the controller logs "Failed to send resource request for train-..." as a WARNING with an 18-line
  traceback, which Ray's own message calls safe to ignore when it happens only transiently. Seen in
  CI on an overloaded 2-core machine, before the first step; the next request went through. Failed
  requests are retried at the controller's next poll, so `quiet_train_controller` drops the first
  two and lets a failure that persists print from the third on. The request's cancellation at the
  run's end waits 5 s the same way and, when it times out, logs "Failed to cancel resource request
  for train-..." (the request expires by itself after 180 s); it counts in the same two.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "DITLAB_VERBOSE"

# Ray's notice that a new local instance has token authentication on (its default).
_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"
_TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster."
# MLflow's INFO lines when it creates or migrates a SQLite tracking store.
_MLFLOW_DB_LOGGER = "mlflow.store.db.utils"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


# $DITLAB_VERBOSE as this process inherited it: configure_console rewrites the variable, and a second
# call in the same process (tests call the CLI in-process) must not read back the first call's choice.
_INHERITED = os.environ.get(VERBOSE_ENV)


def verbose_requested() -> bool:
    """Whether $DITLAB_VERBOSE asks for the informational lines (1, true, yes, on)."""
    return _truthy(os.environ.get(VERBOSE_ENV))


class _DropMessage(logging.Filter):
    """Drops the records whose message starts with `prefix` (or one of them); lets every other
    record through."""

    def __init__(self, prefix: str | tuple[str, ...]):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


class _DropFirst(_DropMessage):
    """Drops the first `count` records whose message starts with `prefix` and lets the later ones
    (a failure that persists) and every other record through."""

    def __init__(self, prefix: str | tuple[str, ...], count: int):
        super().__init__(prefix)
        self.left = count

    def filter(self, record: logging.LogRecord) -> bool:
        if self.left <= 0 or super().filter(record):
            return True
        self.left -= 1
        return False


_token_filter = _DropMessage(_TOKEN_NOTICE)

# Ray Train's controller: a resource request to the autoscaling coordinator, or its cancellation,
# that timed out.
_RESOURCE_REQUEST_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
_RESOURCE_REQUEST_FAILURES = ("Failed to send resource request for ", "Failed to cancel resource request for ")
RESOURCE_REQUEST_FAILURES_DROPPED = 2


def configure_console(verbose: bool = False) -> bool:
    """Set what this process prints; call before Ray starts. `verbose` (the --verbose flag) or the
    $DITLAB_VERBOSE this process started with brings the hidden lines back. The choice is written to
    $DITLAB_VERBOSE, so
    the processes started afterwards (a local Ray instance and its Train workers, which inherit the
    environment) make the same one in `quiet_train_worker`. Returns the choice."""
    verbose = bool(verbose) or _truthy(_INHERITED)
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    token_logger = logging.getLogger(_TOKEN_LOGGER)
    mlflow_db_logger = logging.getLogger(_MLFLOW_DB_LOGGER)
    if verbose:
        token_logger.removeFilter(_token_filter)
        mlflow_db_logger.setLevel(logging.NOTSET)
    else:
        token_logger.addFilter(_token_filter)  # adding it twice keeps one
        mlflow_db_logger.setLevel(logging.WARNING)
    return verbose


def train_log_level() -> str:
    """Ray Train's own `ray.train` log level for RunConfig(logging_config=LoggingConfig(...)):
    INFO with --verbose, else WARNING."""
    return "INFO" if verbose_requested() else "WARNING"


def quiet_train_worker(verbose: bool | None = None) -> None:
    """Call first thing in the Ray Train worker function (runs on every worker, every attempt).
    Hides Ray Train V2's per-report INFO line unless `verbose` (the driver's choice, which
    trainer.build_trainer sends in the worker config; default: $DITLAB_VERBOSE)."""
    if verbose if verbose is not None else verbose_requested():
        return
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logger = getattr(context, "logger", None)
    if isinstance(logger, logging.Logger):
        logger.setLevel(logging.WARNING)


def quiet_train_controller(verbose: bool | None = None) -> None:
    """Runs in Ray Train's controller process (remote.py's callbacks call it as they are unpickled
    there, before the controller starts the run). Drops the first RESOURCE_REQUEST_FAILURES_DROPPED
    timed-out resource requests or cancellations (see the module's docstring) unless `verbose`
    (the driver's choice; default: $DITLAB_VERBOSE). Calling it again in the same process adds no
    second filter."""
    if verbose if verbose is not None else verbose_requested():
        return
    logger = logging.getLogger(_RESOURCE_REQUEST_LOGGER)
    if not any(isinstance(f, _DropFirst) for f in logger.filters):
        logger.addFilter(_DropFirst(_RESOURCE_REQUEST_FAILURES, RESOURCE_REQUEST_FAILURES_DROPPED))
