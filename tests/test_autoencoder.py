"""`task: autoencoder`: the KL autoencoder with its patch discriminator trains, resumes exactly with
the discriminator active (one process and two DDP ranks), refuses bad specs before Ray starts, and
its checkpoints are scored on reconstructions of the test split."""


import numpy as np
import pytest
import torch

from ditlab import cli
from ditlab.config import SpecError, load
from ditlab.training import LocalReporter, train
from ditlab.training.checkpoint import load_bundle
from ditlab.training.tasks import AutoencoderTask

from conftest import ROOT, run_cli_json
from ddp import run_then_resume_on_two_ranks, same_parameters

SPEC = ROOT / "experiments" / "autoencoder.yaml"
# The shipped spec at test size: 8px digits, the narrowest preset, the discriminator from step 2.
TINY = ["autoencoder.name=KL-N/f2c2", "data.resolution=8", "train.steps=6", "train.batch_size=16",
        "train.warmup_steps=2", "train.log_every=1", "train.checkpoint_every=3", "train.val_images=16",
        "loss.discriminator_start=2", "loss.discriminator_channels=8", "evaluation.num_samples=16",
        "evaluation.batch_size=16"]


def tiny(*overrides: str):
    return load(SPEC, ["resources.num_workers=1", *TINY, *overrides])


def test_resume_is_exact_with_the_discriminator_active(tmp_path):
    """Interrupted at the step-3 checkpoint (the discriminator trained since step 2) and resumed: the
    losses of steps 4..6 and the final autoencoder, EMA and discriminator weights are the run's."""
    spec = tiny()
    full = LocalReporter(tmp_path / "full")
    end_full = train(spec, full)
    assert all(h["d_loss"] > 0 for h in full.history if h["step"] > 2)  # the discriminator trained
    assert all(h["d_loss"] == 0 and h["g_loss"] == 0 for h in full.history if h["step"] <= 2)
    resumed = LocalReporter(tmp_path / "resumed")
    end = train(spec, resumed, resume_from=str(tmp_path / "full" / "checkpoint_000003" / "checkpoint.pt"))
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history][3:]
    assert same_parameters(end.ema.model, end_full.ema.model)
    assert same_parameters(end.task.adversary.discriminator, end_full.task.adversary.discriminator)
    bundle = load_bundle(tmp_path / "full" / "checkpoint_000006" / "checkpoint.pt")
    assert set(bundle["task_state"]) == {"steps_done", "discriminator", "discriminator_optimizer"}
    assert bundle["task_state"]["steps_done"] == 6 and bundle["model_config"]["kind"] == "autoencoder"


def test_no_discriminator_without_an_adversarial_weight():
    task = AutoencoderTask(tiny("loss.adversarial_weight=0"), 10, torch.device("cpu"))
    assert task.adversary is None and task.optimizers() == [task.optimizer]
    assert tiny().loss.adversarial_weight == 0.5  # the task's default
    assert load(None).loss.adversarial_weight == 0  # generation's


def _autoencoder_ddp_record(rank, spec, full, end_full, resumed, end_resumed) -> dict:
    return {"full": [h["loss"] for h in full.history], "resumed": [h["loss"] for h in resumed.history],
            "same": same_parameters(end_resumed.ema.model, end_full.ema.model)
            and same_parameters(end_resumed.task.adversary.discriminator, end_full.task.adversary.discriminator),
            "discriminator": [float(p.sum()) for p in end_resumed.task.adversary.discriminator.parameters()]}


def test_two_ddp_ranks_resume_exactly_and_share_one_discriminator(tmp_path):
    """Both modules under DistributedDataParallel, as Ray Train runs them: the adaptive weight's
    gradients and the discriminator's single forward per backward work with gloo, the ranks end
    with the same discriminator, and resume is exact."""
    spec = load(SPEC, [*TINY, "resources.num_workers=2"])
    ranks = run_then_resume_on_two_ranks(spec, tmp_path, _autoencoder_ddp_record)
    for record in ranks:
        assert record["resumed"] == record["full"][3:] and record["same"]
    assert ranks[0]["discriminator"] == ranks[1]["discriminator"]


def test_the_checkpoint_is_scored_on_reconstructions_of_the_test_split(tmp_path, capsys):
    spec = tiny("train.steps=3")
    train(spec, LocalReporter(tmp_path))
    bundle = load_bundle(tmp_path / "checkpoint_000003" / "checkpoint.pt")
    report = AutoencoderTask.evaluate_checkpoint(bundle, "tiny")
    f = report.figures
    assert {"mse", "psnr", "ssim", "rfid", "sharpness_ratio"} <= set(f) and "fid" not in f
    assert f["eval_num_samples"] == 16 and 0 < f["ssim"] < 1 and f["rfid"] > 0
    assert f["psnr"] == pytest.approx(10 * np.log10(1 / f["mse"]), abs=3)  # mean of per-image PSNR
    assert report.samples.shape == (32, 8, 8, 1)  # originals and reconstructions, in pairs
    # `ditlab evaluate --fake CHECKPOINT` dispatches to the task: the same figures, tracked in MLflow.
    out = run_cli_json(["evaluate", "--fake", str(tmp_path / "checkpoint_000003"), "--set", "metrics=[mse,psnr,ssim]",
                        "--out", "eval", "--no-progress", "--json"], tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert out["figures"]["psnr"] == pytest.approx(f["psnr"]) and "rfid" not in out["figures"]
    assert (tmp_path / "eval" / "samples.png").is_file()
    code = cli.main(["sample", str(tmp_path / "checkpoint_000003"), "--num", "2", "--out", str(tmp_path / "s")])
    assert code == 2 and "not a generation checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("data.resolution=12", "data.resolution: 12 is not divisible by the downsampling factor 8 of KL-S/f8c2"),
    ("loss.adversarial_weight=-1", "loss.adversarial_weight: Input should be greater than or equal to 0"),
])
def test_bad_specs_are_refused_naming_the_field(override, message, capsys):
    overrides = [override] + (["autoencoder.name=KL-S/f8c2"] if "resolution" in override else [])
    with pytest.raises(SpecError, match=message.split(": ", 1)[1].split(" (")[0]):
        load(SPEC, overrides)
    argv = ["run", str(SPEC), "--dry-run"] + [a for o in overrides for a in ("--set", o)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ditlab: error: ") and message in err[0]


def test_a_sweep_scores_its_best_trial_with_the_task_evaluation(tmp_path, monkeypatch):
    """`evaluate_best: true` (the autoencoder sweep): the best trial's last checkpoint, where Tune
    trials keep theirs (<sweep>/train/<trial id>/), gets the task's evaluation, logged on the parent
    run as best_<figure> (MLflow: sweep/best_psnr)."""
    from mlflow.tracking import MlflowClient

    from ditlab.orchestration.tracking import Tracker
    from ditlab.orchestration.tune.summary import evaluate_best

    spec = tiny("train.steps=3", "evaluation.metrics=[mse,psnr,ssim]")
    train(spec, LocalReporter(tmp_path / "sweep" / "train" / "abc_00001"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    parent = Tracker.create("sweeps", "parent", {"ditlab.kind": "sweep"})
    result = evaluate_best(tmp_path / "sweep", {"trial_id": "abc_00001", "last_step": 3}, parent)
    assert result["checkpoint"].endswith("checkpoint_000003") and result["figures"]["psnr"] > 0
    logged = MlflowClient(uri).get_run(parent.run_id).data.metrics
    assert logged["sweep/best_psnr"] == pytest.approx(result["figures"]["psnr"])
    skipped = evaluate_best(tmp_path / "sweep", {"trial_id": "none", "last_step": 0}, parent)
    assert skipped["skipped"].startswith("no checkpoint of trial none")
