"""The MLflow dashboard as a user sees it: a finished `ditlab run` of the tiny spec (conftest.tiny_run,
shared with test_e2e.py), `mlflow ui` on 127.0.0.1 against its SQLite store (the README's way to open
runs), and the pages opened in headless Chromium. Checked: the runs table's Dataset and Source columns,
the run's parameters, its metric charts grouped in sections by name prefix, and the sample grid as an
image chart.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them) and the `selenium`
package; nothing downloads a browser or a driver. Without them the tests skip and say which is
missing. Screenshots of every page land in the test's temporary folder (printed with -s)."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, mlflow_web

CHROMIUM = os.environ.get("DITLAB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DITLAB_CHROMEDRIVER", "/usr/bin/chromedriver")
RUN_NAME = "e2e"  # conftest.tiny_run
# Each page renders client-side after several API calls; on a busy 2-core machine that takes a while.
PAGE_TIMEOUT = 60
ML_VIEW = "?workflowType=machine_learning"  # the dashboard's model-training view (see Tracker.url)


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            return f"{path} is missing: apt-get install {package} (Debian's Chromium; .ci/run installs it)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium driven by Debian's chromedriver. Selenium is given both paths, so its
    Selenium Manager is never called: it looks nothing up and downloads nothing."""
    reason = missing_browser()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=2000,2400", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def dashboard(browser, tiny_run, mlflow_server):
    """`mlflow ui` on 127.0.0.1 over the store of the e2e tests' MLflow server (its SQLite file and
    artifact folder), where the shared tiny run (conftest.tiny_run) finished. Yields (base URL, the
    run as MLflow returns it, a folder for screenshots)."""
    from mlflow.tracking import MlflowClient

    root = mlflow_server.root
    with mlflow_web("ui", root) as base:
        yield base, MlflowClient(mlflow_server).get_run(tiny_run["mlflow_run_id"]), root


def run_page(base: str, run, tab: str = "") -> str:
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}{tab}{ML_VIEW}"


def open_page(browser, url: str, ready, shot: Path) -> str:
    """Load `url`, wait until the page's text satisfies `ready`, screenshot it; returns the text.
    On a timeout the screenshot is still taken and the page's text is in the failure."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    text = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    try:
        WebDriverWait(browser, PAGE_TIMEOUT, poll_frequency=0.5).until(lambda _: ready(text()))
    except TimeoutException:
        browser.save_screenshot(str(shot))
        pytest.fail(f"{url}: not shown in {PAGE_TIMEOUT} s (screenshot {shot}); page text:\n{text()[:3000]}")
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    return text()


@pytest.mark.parametrize(("raw", "kind", "name"), [
    ("loss", "train", "train/loss"), ("lr", "trial", "train/lr"), ("images_per_sec", "train", "train/images_per_sec"),
    ("val_loss", "train", "val/loss"), ("final_val_loss", "train", "val/final_loss"),
    ("fid", "train", "eval/fid"), ("conditional_accuracy", "train", "eval/conditional_accuracy"),
    ("mse", "train", "train/mse"), ("mse", "evaluation", "eval/mse"),
    ("eval_num_samples", "evaluation", "eval/num_samples"),
    ("train_seconds", "train", "time/train_seconds"), ("eval_seconds", "evaluation", "time/eval_seconds"),
    ("best_val_loss", "sweep", "sweep/best_val_loss"), ("worker_seconds", "sweep", "time/worker_seconds"),
    ("config.train.lr", "trial", "config/train.lr"), ("samples", "train", "eval/samples"),
    ("eval/fid", "train", "eval/fid"), ("something_new", "train", "something_new"),
])
def test_mlflow_metric_names_are_grouped_by_prefix(raw, kind, name):
    from ditlab.orchestration.tracking import mlflow_metric_name

    assert mlflow_metric_name(raw, kind) == name


def test_a_training_run_gets_its_dataset_source_and_grouped_metrics(tmp_path, monkeypatch):
    """Without Ray or a browser: what Tracker.start records for the dashboard."""
    from mlflow.tracking import MlflowClient

    from ditlab.config import load
    from ditlab.orchestration.tracking import Tracker, git_commit

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    MlflowClient().create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    tracker = Tracker.start(load(ROOT / "experiments" / "tiny.yaml", ["tracking.experiment=t"]), "r")
    tracker.log_metrics({"loss": 1.0, "val_loss": 2.0, "fid": 3.0, "train_seconds": 4.0}, 6)
    tracker.end()
    run = MlflowClient().get_run(tracker.run_id)
    assert set(run.data.metrics) == {"train/loss", "val/loss", "eval/fid", "time/train_seconds"}
    assert run.data.tags["mlflow.source.name"] == "ditlab run" and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["ditlab.kind"] == "train"
    if git_commit(ROOT):
        assert run.data.tags["mlflow.source.git.commit"] == git_commit(ROOT)
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert (dataset.name, dataset.source_type) == ("digits", "local")
    assert json.loads(dataset.source)["uri"].endswith("digits.csv.gz")
    assert json.loads(dataset.profile)["resolution"] == 8
    assert [(t.key, t.value) for t in dataset_input.tags] == [("mlflow.data.context", "training")]


@pytest.mark.e2e
def test_every_metric_is_grouped_and_the_run_has_its_dataset(dashboard):
    """What the pages below show comes from here: no metric outside a group, one dataset input."""
    _, run, _ = dashboard
    assert run.info.status == "FINISHED"
    ungrouped = sorted(k for k in run.data.metrics if "/" not in k)
    assert not ungrouped, f"metrics without a group prefix: {ungrouped}"
    assert {"train/loss", "train/lr", "val/loss", "eval/fid", "eval/conditional_accuracy",
            "time/train_seconds"} <= set(run.data.metrics)
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "digits-png"
    assert run.data.tags["mlflow.source.name"] == "ditlab run"


@pytest.mark.e2e
def test_runs_table_shows_the_dataset_and_the_source(dashboard, browser):
    base, run, root = dashboard
    dataset = run.inputs.dataset_inputs[0].dataset
    label = f"{dataset.name} ({dataset.digest})"
    text = open_page(browser, f"{base}/#/experiments/{run.info.experiment_id}/runs{ML_VIEW}",
                     lambda t: RUN_NAME in t and label in t, root / "runs-table.png")
    lines = text.splitlines()
    assert {"Run Name", "Dataset", "Source"} <= set(lines), "the table's columns"
    assert label in lines, "the Dataset column shows the data's name and digest"
    assert "ditlab run" in lines, "the Source column names the ditlab command"


@pytest.mark.e2e
def test_run_page_shows_parameters_dataset_and_source(dashboard, browser):
    base, run, root = dashboard
    dataset = run.inputs.dataset_inputs[0].dataset
    text = open_page(browser, run_page(base, run),
                     lambda t: "train.steps" in t, root / "run-overview.png")
    lines = text.splitlines()
    assert lines[lines.index("train.steps") + 1] == "6"
    assert lines[lines.index("data.test_fraction") + 1] == "0.05"
    assert f"{dataset.name} ({dataset.digest})" in lines
    source = lines[lines.index("Source") + 1:lines.index("Source") + 3]
    assert source == ["ditlab run", run.data.tags["mlflow.source.git.commit"][:7]]


@pytest.mark.e2e
def test_model_metrics_groups_the_charts_and_shows_the_sample_grid(dashboard, browser):
    from selenium.webdriver.common.by import By

    base, run, root = dashboard
    groups = ("train", "val", "eval", "time")
    heading = lambda group, t: re.search(rf"^{group}\n\(\d+\)$", t, re.M)  # noqa: E731  a section: "train (7)"
    text = open_page(browser, run_page(base, run, "/model-metrics"),
                     lambda t: all(heading(g, t) for g in groups), root / "model-metrics.png")
    for group in groups:
        count = int(heading(group, text).group(0).split("(")[1].rstrip(")"))
        logged = sum(k.startswith(f"{group}/") for k in run.data.metrics)
        assert count == logged + (group == "eval"), f"section {group}: {count} charts, {logged} metrics (+ samples)"
    # MLflow's default section, for metrics without a prefix: there is none, so it is empty.
    assert re.search(r"^Model metrics\n\(0\)$", text, re.M), "a chart outside the groups"

    def sample_grid():
        for img in browser.find_elements(By.TAG_NAME, "img"):
            src = urllib.parse.unquote(img.get_attribute("src") or "")
            if "eval~samples+step+6+" in src and browser.execute_script(
                    "return arguments[0].complete && arguments[0].naturalWidth > 0", img):
                return img
        return None

    deadline = time.time() + PAGE_TIMEOUT
    while (img := sample_grid()) is None and time.time() < deadline:
        time.sleep(0.5)
    assert img is not None, "the sample grid (image key eval/samples, step 6) is not shown"
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", img)
    img.screenshot(str(root / "sample-grid.png"))
    print(f"screenshot: {root / 'sample-grid.png'}")
