"""The dependency rules of ARCHITECTURE.md, checked on the source: which package may import which."""

import pytest

from import_graph import SRC, imported_names

PACKAGE = SRC / "ditlab"


def imports_of(folder: str) -> dict[str, set[str]]:
    return {str(f.relative_to(PACKAGE)): imported_names(f, "") for f in (PACKAGE / folder).rglob("*.py")}


def offending(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{file} imports {name}" for file, names in imports_of(folder).items() for name in names
                  if name.split(".")[0] in forbidden or any(name.startswith(f + ".") or name == f for f in forbidden))


@pytest.mark.parametrize("folder,forbidden", [
    # the model knows nothing about diffusion, the process nothing about networks or specs
    ("models", ("ditlab.config", "ditlab.diffusion", "ditlab.training", "ditlab.data", "ray", "mlflow")),
    ("diffusion", ("ditlab.config", "ditlab.models", "ditlab.training", "ditlab.data", "ray", "mlflow")),
    # the loop and its tasks run and are tested without Ray or MLflow
    ("training", ("ray", "mlflow", "ditlab.orchestration", "dvc")),
    # folder in, metrics out: usable on its own
    ("evaluation", ("ditlab.training", "ditlab.sampling", "ditlab.orchestration", "ray", "mlflow")),
    ("data", ("ditlab.training", "ditlab.orchestration", "ray", "mlflow")),
])
def test_layer_does_not_import(folder, forbidden):
    assert not offending(folder, forbidden)


def test_only_tracking_imports_mlflow():
    users = sorted(str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py")
                   if any(n == "mlflow" or n.startswith("mlflow.") for n in imported_names(f, "")))
    assert users == ["orchestration/tracking.py"]


def test_what_ray_train_unpickles_in_its_controller_imports_no_torch_mlflow_or_evaluation():
    """The worker function and the callbacks reach Ray Train's controller by reference: unpickling them
    there imports their module, before the controller starts a worker (orchestration/remote.py)."""
    import subprocess
    import sys

    import cloudpickle

    from ditlab.orchestration.remote import CheckpointSync, MetricReportCallback
    from ditlab.orchestration.trainer import train_worker  # what build_trainer hands to TorchTrainer

    # The classes, not instances: a TuneReportCallback is made in a Tune session only; an instance
    # pickles its class by the same reference.
    payload = cloudpickle.dumps([train_worker, CheckpointSync, MetricReportCallback])
    heavy = ("torch", "mlflow", "ditlab.evaluation", "ditlab.training", "sklearn")
    prefixes = tuple(h + "." for h in heavy)
    probe = ("import pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
             f"print(sorted(m for m in sys.modules if m in {heavy!r} or m.startswith({prefixes!r})))")
    done = subprocess.run([sys.executable, "-c", probe], input=payload, capture_output=True, check=True)
    assert done.stdout.decode().strip() == "[]", done.stdout.decode()[:500]
