"""`ditlab evaluate`: figures for a checkpoint or a folder of images, tracked in MLflow.

The figures come from evaluation/ (a folder) or from the checkpoint's task (training/tasks/), which
knows how its checkpoints are evaluated. A checkpoint's evaluation becomes an MLflow run nested under
(and tagged with) the training run that produced it, when its run folder records one; a folder's
evaluation is a run of its own."""

from __future__ import annotations

import time
from pathlib import Path

from ditlab.atomic import write_json
from ditlab.config import EvaluationSpec, flatten, from_dict
from ditlab.evaluation.folders import evaluate_folder, real_data_spec, reference_for, samples_source
from ditlab.evaluation.plots import save_sample_grid
from ditlab.orchestration.records import source_run_id
from ditlab.orchestration.tracking import Tracker, experiment_of_run
from ditlab.orchestration.versioning import data_tags, experiment_tags
from ditlab.training.checkpoint import is_checkpoint, load_bundle
from ditlab.training.tasks import task_class


def evaluate_checkpoint(checkpoint: str, real, ev: EvaluationSpec | None, progress: bool):
    """The evaluation the checkpoint's task gives it; `real` (see evaluation.folders.reference_for)
    replaces its own dataset's split when given."""
    bundle = load_bundle(checkpoint)
    spec = from_dict(bundle["spec"], f"spec stored in {checkpoint}")
    split = ev.reference_split if ev else spec.evaluation.reference_split
    # At the data's resolution: a latent model's input_size is that of its latents.
    reference = None if real is None else reference_for(real, spec.data.resolution, split)
    return task_class(spec.task).evaluate_checkpoint(bundle, str(checkpoint), ev, progress=progress,
                                                     reference=reference)


def run_evaluation(fake: str, real, ev: EvaluationSpec | None, out_dir: str | Path,
                   experiment: str = "ditlab-evaluation", progress: bool = True) -> dict:
    """Evaluate, write evaluation.json, metrics.json (the figures alone, for DVC) and samples.png
    to `out_dir`, log it all to MLflow. `real` is what `reference_for` takes, or None for a
    checkpoint's own dataset."""
    started = time.perf_counter()
    if is_checkpoint(fake):
        report = evaluate_checkpoint(fake, real, ev, progress)
        source = source_run_id(fake)
    else:
        if real is None:
            raise ValueError("--real: required when --fake is a folder of images")
        report = evaluate_folder(fake, real, ev or EvaluationSpec(), progress)
        checkpoint = samples_source(fake)
        source = source_run_id(checkpoint) if checkpoint and Path(checkpoint).exists() else None
    report.figures["eval_seconds"] = time.perf_counter() - started
    out_dir = Path(out_dir)
    data, _ = real_data_spec(real)
    real = real if data is None else (data.prepared or data.source)
    tracker = _open_tracker(fake, real, source, experiment)
    tracker.set_tags({**(data_tags(data) if data is not None else {}), **experiment_tags()})
    if data is not None:  # the runs table's Dataset column
        tracker.log_dataset(data, context="evaluation")
    tracker.log_params(flatten({"evaluation": report.settings}))
    tracker.log_metrics(report.figures)
    tracker.set_tags({f"ditlab.eval.{k}": v for k, v in report.notes.items()})
    if report.samples is not None and len(report.samples):
        grid = save_sample_grid(report.samples, out_dir / "samples.png",
                                title=report.title or f"evaluated images ({len(report.samples)} in all)",
                                nrow=report.grid_columns)
        tracker.log_artifact(grid, "figures")
        tracker.log_image(grid, "samples")  # the dashboard's image chart (eval/samples)
    for name, write in report.plots.items():
        tracker.log_artifact(write(out_dir / f"{name}.png"), "figures")
    summary = {"fake": fake, "real": real, "mlflow_run_id": tracker.run_id, "source_run_id": source,
               "mlflow_url": tracker.url, **report.to_dict()}
    write_json(out_dir / "evaluation.json", summary)
    write_json(out_dir / "metrics.json", report.figures)
    tracker.log_artifact(out_dir / "evaluation.json")
    tracker.end("FINISHED")
    return summary


def _open_tracker(fake: str, real: str | None, source: str | None, experiment: str) -> Tracker:
    tags = {"ditlab.kind": "evaluation", "ditlab.fake": str(fake), "ditlab.real": str(real)}
    if source is not None:
        # Nest under the training run, in its experiment, so the dashboard shows them together.
        tags.update({"ditlab.source_run_id": source, "mlflow.parentRunId": source})
        experiment = experiment_of_run(source)
    return Tracker.create(experiment, f"evaluate-{Path(fake).name}", tags)
