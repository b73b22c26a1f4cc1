"""Conditional accuracy of a text-conditioned run against a class-conditional one, step for step.

    .venv/bin/python scripts/text_vs_class.py --text runs/text-1 --class runs/qs-1 [--num 200]

For every checkpoint step the two run folders share, both checkpoints' EMA weights draw `--num`
class-balanced samples with the text run's evaluation settings (sampler, steps, guidance, seed):
the class model from its labels, the text model from captions in phrasings training never saw and,
for scale, from its training phrasings. A classifier trained on the digits' train split (the
evaluation suite's) judges each set. Writes text_vs_class.png and text_vs_class.json into the text
run's folder and logs both to its MLflow run (the run id in its tracking.json). Starts no Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ditlab.atomic import write_json
from ditlab.data import to_uint8
from ditlab.data.captions import TRAIN_PHRASINGS, CaptionBank, class_names, fill
from ditlab.evaluation.images import as_rgb_uint8
from ditlab.evaluation.plots import pyplot, save_png
from ditlab.evaluation.suite import dataset_reference
from ditlab.sampling import balanced_labels, generate, load_for_sampling


def checkpoints(run: Path) -> dict[int, Path]:
    return {int(p.name.split("_")[1]): p for p in sorted(run.glob("checkpoint_*")) if (p / "checkpoint.pt").is_file()}


def accuracy(ckpt, labels, ev, classifier, captions=None) -> float:
    images = generate(ckpt, labels, ev.sampler, ev.steps, ev.guidance, ev.seed, ev.batch_size, ev.clip_x0,
                      captions=captions)
    return classifier.accuracy(as_rgb_uint8(to_uint8(images)), labels.numpy())


def compare(text_run: Path, class_run: Path, num: int) -> list[dict]:
    steps = sorted(set(checkpoints(text_run)) & set(checkpoints(class_run)))
    if not steps:
        sys.exit(f"text_vs_class: {text_run} and {class_run} share no checkpoint step")
    rows, classifier = [], None
    for step in steps:
        text = load_for_sampling(checkpoints(text_run)[step])
        klass = load_for_sampling(checkpoints(class_run)[step])
        if text.model.text is None or klass.model.text is not None:
            sys.exit("text_vs_class: --text must be a text-conditioned run and --class a class-conditional one")
        ev = text.spec.evaluation
        classifier = classifier or dataset_reference(text.spec.data, ev.reference_split).classifier
        labels = balanced_labels(num, text.model.config.num_classes)
        trained = CaptionBank([fill(TRAIN_PHRASINGS, w, n) for w, n in class_names(text.spec.data)], [])
        seen = [trained.per_item[k][i % len(TRAIN_PHRASINGS)] for i, k in enumerate(labels.tolist())]
        rows.append({"step": step,
                     "text_unseen_phrasings": accuracy(text, labels, ev, classifier),
                     "text_training_phrasings": accuracy(text, labels, ev, classifier, seen),
                     "class_labels": accuracy(klass, labels, ev, classifier)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(rows: list[dict], path: Path, num: int, settings: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = {"text_unseen_phrasings": "text, unseen phrasings", "text_training_phrasings": "text, training phrasings",
             "class_labels": "class labels"}
    for key, name in names.items():
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", label=name,
                linestyle="--" if key == "text_training_phrasings" else "-")
    ax.axhline(0.85, color="grey", linewidth=0.8, linestyle=":", label="0.85 target")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"conditional accuracy ({num} samples)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"Text vs class conditioning, same steps ({settings})", fontsize=9)
    path = save_png(fig, path)
    plt.close(fig)
    return path


def log_to_mlflow(run: Path, files: list[Path]) -> None:
    tracking = json.loads((run / "tracking.json").read_text())
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking["tracking_uri"])
    for f in files:
        client.log_artifact(tracking["run_id"], str(f))
    print(f"logged {', '.join(f.name for f in files)} to MLflow run {tracking['run_id']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, required=True, help="run folder of a text-conditioned run")
    parser.add_argument("--class", dest="klass", type=Path, required=True, help="run folder of a class run")
    parser.add_argument("--num", type=int, default=200, help="samples per model and step (class-balanced)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to the text run's MLflow run")
    args = parser.parse_args()
    rows = compare(args.text, args.klass, args.num)
    ev = load_for_sampling(checkpoints(args.text)[rows[-1]["step"]]).spec.evaluation
    settings = f"{ev.sampler} {ev.steps} steps, guidance {ev.guidance}"
    png = plot(rows, args.text / "text_vs_class.png", args.num, settings)
    data = write_json(args.text / "text_vs_class.json", {"text_run": str(args.text), "class_run": str(args.klass),
                                                         "num_samples": args.num, "sampling": settings,
                                                         "rows": rows, "mean_gap_unseen_vs_class": float(np.mean(
                                                             [r["text_unseen_phrasings"] - r["class_labels"]
                                                              for r in rows]))})
    print(f"wrote {png} and {data}")
    if not args.no_mlflow and (args.text / "tracking.json").is_file():
        log_to_mlflow(args.text, [png, args.text / "text_vs_class.json"])


if __name__ == "__main__":
    main()
