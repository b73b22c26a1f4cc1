"""`task: restoration`: the seeded degradations, the conditional DiT, the task's step and exact
resume, validation PSNR, the evaluation beside its baselines, the spec's bad input and `ditlab
restore`. Tiny models on 8px digits, trained in-process (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ditlab import cli
from ditlab.config import SpecError, load
from ditlab.degradations import Degradation, bicubic_upsample, box_downsample, choose_classical_denoiser, mean_psnr
from ditlab.models import build_model
from ditlab.training import LocalReporter, train
from ditlab.training.checkpoint import load_bundle
from ditlab.training.tasks import RestorationTask
from ditlab.training.tasks.restoration import restore

from conftest import ROOT

LEGACY = ROOT / "tests" / "data" / "legacy_checkpoint"  # a generation checkpoint
TINY = ["task=restoration", "data.resolution=8", "model.name=DiT-N/2", "diffusion.num_timesteps=100",
        "train.steps=6", "train.batch_size=16", "train.warmup_steps=2", "train.log_every=2",
        "train.checkpoint_every=3", "train.val_images=16", "resources.num_workers=1",
        "evaluation.metrics=[psnr,ssim]", "evaluation.num_samples=20", "evaluation.steps=3",
        "evaluation.batch_size=20"]


def tiny_spec(*overrides: str):
    return load(None, [*TINY, *overrides])


def gray(n: int = 4, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- degradations ------------------------------------------------------------------------------------

def test_noise_is_a_function_of_split_and_index_not_of_the_batch():
    deg = Degradation("gaussian_noise", 8, sigma=0.2, split_seed=0)
    clean = torch.zeros(4, 1, 8, 8)
    whole = deg.observe(clean, torch.arange(4), "train")
    parts = torch.cat([deg.observe(clean[2:], torch.tensor([2, 3]), "train"),
                       deg.observe(clean[:2], torch.tensor([0, 1]), "train")])
    assert torch.equal(whole, torch.cat([parts[2:], parts[:2]]))  # same image, same noise, any batch
    assert not torch.equal(whole[0], whole[1])  # a different draw per image
    assert not torch.equal(whole, deg.observe(clean, torch.arange(4), "test"))  # splits apart
    other_seed = Degradation("gaussian_noise", 8, sigma=0.2, split_seed=1).observe(clean, torch.arange(4), "train")
    assert not torch.equal(whole, other_seed)
    # sigma 0.2 in [0, 1] units is 0.4 in [-1, 1] units (mid-grey: no clipping to speak of)
    big = deg.observe(torch.zeros(64, 1, 8, 8), torch.arange(64), "train")
    assert abs(float(big.std()) - 0.4) < 0.02 and big.min() >= -1 and big.max() <= 1


def test_downsampling_averages_blocks_and_the_condition_is_its_bicubic_upsampling():
    clean = gray(3, 8)
    deg = Degradation("downsample", 8, factor=2)
    observation, condition = deg.pair(clean, torch.arange(3), "train")
    assert observation.shape == (3, 1, 4, 4) and condition.shape == (3, 1, 8, 8)
    assert torch.allclose(observation[0, 0, 0, 0], clean[0, 0, :2, :2].mean())
    assert torch.equal(condition, bicubic_upsample(observation, 8))
    assert deg.observed_size == 4 and deg.baseline_name == "bicubic"
    flat = torch.full((1, 1, 8, 8), 0.3)  # a constant image survives down- and upsampling
    assert torch.allclose(deg.condition(box_downsample(flat, 2)), flat)
    with pytest.raises(ValueError, match="factor 3 does not divide the image size 8"):
        box_downsample(clean, 3)
    with pytest.raises(ValueError, match="expected 4x4 observations, got 8x8"):
        deg.condition(clean)


def test_the_classical_denoiser_chosen_beats_the_noisy_input():
    clean = bicubic_upsample(gray(16, 4, seed=3), 16)  # smooth 16px images
    noisy = Degradation("gaussian_noise", 16, sigma=0.2).observe(clean, torch.arange(16), "train")
    denoiser = choose_classical_denoiser(noisy, clean, 0.2)
    assert denoiser.method in ("nl_means", "tv")
    assert mean_psnr(denoiser(noisy), clean) > mean_psnr(noisy, clean) + 2


# -- spec -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("restoration.factor=3", "restoration.factor: 3 does not divide data.resolution 8"),
    ("restoration.sigma=-0.1", "restoration.sigma: Input should be greater than 0"),
])
def test_bad_restoration_settings_are_one_error_line(override, message, capsys, tmp_path):
    with pytest.raises(SpecError, match=message.split(": ", 1)[1]):
        tiny_spec(override)
    code = cli.main(["run", str(ROOT / "experiments" / "tiny.yaml"), "--set", "task=restoration",
                     "--set", override, "--storage", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ditlab: error: ") and message in err[0]
    assert not (tmp_path / "runs").exists()


def test_a_changed_degradation_is_another_experiment_for_the_run_folder():
    from ditlab.orchestration.train import spec_changes

    old, new = tiny_spec().to_dict(), tiny_spec("restoration.factor=4").to_dict()
    assert spec_changes(old, new) == ["restoration.factor"]  # no silent resume from the x2 model


def test_a_conditional_dit_needs_its_conditioning_image():
    model = build_model("DiT-N/2", input_size=8, in_channels=1, cond_channels=1, num_classes=0,
                        class_dropout_prob=0.0, learn_sigma=False)
    x, t = torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    y = torch.full((2,), model.null_class)
    assert model.null_class == 0 and model(x, t, y, cond=x).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="takes 1 conditioning channels; got none"):
        model(x, t, y)


# -- training, resume, evaluation ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny denoiser trained 6 steps in-process: (spec, reporter, final state)."""
    spec = tiny_spec("restoration.degradation=gaussian_noise")
    reporter = LocalReporter(tmp_path_factory.mktemp("restoration"))
    state = train(spec, reporter)
    return spec, reporter, state


def test_the_task_trains_reports_validation_psnr_and_resumes_exactly(trained, tmp_path):
    spec, full, end_full = trained
    assert isinstance(end_full.task, RestorationTask)
    validated = [h for h in full.history if "val_psnr" in h]
    assert [h["step"] for h in validated] == [2, 4, 6]
    assert all(0 < h["val_psnr"] < 60 and -1 <= h["val_ssim"] <= 1 for h in validated)
    resumed = LocalReporter(tmp_path)
    end_resumed = train(spec, resumed, resume_from=str(full.checkpoints[0]))  # step 3
    losses = lambda r: [(h["step"], h["loss"], h.get("val_psnr")) for h in r.history if "loss" in h]  # noqa: E731
    assert losses(resumed) == [x for x in losses(full) if x[0] > 3]
    assert all(torch.equal(a, b) for a, b in zip(end_full.ema.model.parameters(), end_resumed.ema.model.parameters(),
                                                  strict=True))


def test_restoring_does_not_depend_on_the_batch_size(trained):
    _, _, state = trained
    cond = gray(5)
    y = torch.zeros(5, dtype=torch.long)
    one = restore(state.ema.model, state.task.diffusion, cond, y, "ddim", 3, batch_size=5)
    split = restore(state.ema.model, state.task.diffusion, cond, y, "ddim", 3, batch_size=2)
    assert one.shape == (5, 1, 8, 8) and torch.allclose(one, split, atol=1e-5)
    # a residual model's sample is added to the conditioning image
    plain = restore(state.ema.model, state.task.diffusion, cond, y, "ddim", 3, batch_size=5)
    residual = restore(state.ema.model, state.task.diffusion, cond, y, "ddim", 3, batch_size=5,
                       residual=True)
    assert torch.allclose(residual, (plain + cond).clamp(-1, 1), atol=1e-5)


def test_evaluation_scores_restored_images_beside_the_baselines(trained):
    _, reporter, _ = trained
    path = reporter.latest_checkpoint / "checkpoint.pt"
    report = RestorationTask.evaluate_checkpoint(load_bundle(path), str(path))
    f = report.figures
    baselines = {k.removeprefix("baseline_").removesuffix("_psnr") for k in f if k.endswith("_psnr") and k != "psnr"}
    assert baselines in ({"noisy", "nl_means"}, {"noisy", "tv"})
    assert all(f"baseline_{b}_ssim" in f for b in baselines) and {"psnr", "ssim"} <= set(f)
    best = max(f[f"baseline_{b}_psnr"] for b in baselines)
    assert f["psnr_gain_db"] == pytest.approx(f["psnr"] - best)
    # sigma 0.2 alone would give 14 dB; clipping at black (the digits' background) removes some noise
    assert -20 * np.log10(0.2) < f["baseline_noisy_psnr"] < -20 * np.log10(0.2) + 3
    assert f["eval_num_samples"] == 20
    assert report.samples.shape == (40, 8, 8, 1)  # rows: degraded, baseline, restored, clean
    assert "rows: degraded" in report.notes["grid"] and "sigma 0.2" in report.notes["degradation"]


def test_super_resolution_evaluation_has_the_bicubic_baseline(tmp_path):
    spec = tiny_spec("train.steps=0", "restoration.factor=2", "restoration.residual=true")
    reporter = LocalReporter(tmp_path)
    train(spec, reporter)
    path = reporter.latest_checkpoint / "checkpoint.pt"
    report = RestorationTask.evaluate_checkpoint(load_bundle(path), str(path))
    f = report.figures
    assert {"psnr", "baseline_bicubic_psnr", "baseline_bicubic_ssim", "psnr_gain_db"} <= set(f)
    assert report.notes["best_baseline"] == "bicubic"
    assert f["psnr_gain_db"] == pytest.approx(f["psnr"] - f["baseline_bicubic_psnr"])
    degraded = report.samples[:10]  # 4x4 observations shown as 2x2 blocks
    assert np.array_equal(degraded[:, ::2, ::2], degraded[:, 1::2, 1::2])


# -- ditlab restore ------------------------------------------------------------------------------------------

def write_pngs(folder, n: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_restore_writes_one_png_per_input_and_a_manifest(trained, tmp_path, capsys):
    _, reporter, _ = trained
    write_pngs(tmp_path / "noisy", 3, 8)
    code = cli.main(["restore", str(reporter.out_dir), "--input", str(tmp_path / "noisy"), "--out",
                     str(tmp_path / "out"), "--steps", "2", "--json", "--no-progress"])
    manifest = json.loads(capsys.readouterr().out)
    assert code == 0 and manifest["steps"] == 2 and len(manifest["files"]) == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img0.png", "img1.png", "img2.png", "restore.json"]
    assert Image.open(tmp_path / "out" / "img0.png").size == (8, 8)


@pytest.mark.parametrize("case, message", [
    ("generation", "is a `task: generation` checkpoint; ditlab restore needs a `task: restoration` one"),
    ("empty", "holds no images"),
    ("size", "is 5x5; this model (Gaussian noise sigma 0.2 ([0, 1] units) on 8px images, clipped) takes 8x8"),
])
def test_restore_bad_input_is_one_error_line_and_writes_nothing(case, message, trained, tmp_path, capsys):
    _, reporter, _ = trained
    checkpoint = str(LEGACY if case == "generation" else reporter.out_dir)
    folder = tmp_path / "in"
    folder.mkdir()
    if case != "empty":
        write_pngs(folder, 2, 5 if case == "size" else 8)
    code = cli.main(["restore", checkpoint, "--input", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ditlab: error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


# -- through Ray and MLflow ----------------------------------------------------------------------------------

@pytest.mark.e2e
def test_a_tiny_run_trains_on_two_ray_workers_and_is_evaluated_beside_bicubic(ray_session, mlflow_server, tmp_path):
    """`ditlab run` of x2 super-resolution (2 Ray Train workers, each its own shard: the degradation is
    seeded by image, not by rank), then `ditlab evaluate` of its run folder."""
    from mlflow.tracking import MlflowClient

    from conftest import run_cli_json

    sets = [a for o in TINY if not o.startswith("resources.") for a in ("--set", o)]
    summary = run_cli_json(["run", str(ROOT / "experiments" / "tiny.yaml"), *sets, "--set", "restoration.factor=2",
                            "--name", "sr", "--storage", "runs", "--json", "--no-progress"], tmp_path, mlflow_server)
    m = summary["metrics"]
    assert {"psnr", "ssim", "baseline_bicubic_psnr", "psnr_gain_db", "final_loss"} <= set(m)
    assert summary["notes"]["best_baseline"] == "bicubic" and (tmp_path / "runs" / "sr" / "samples.png").is_file()
    run = MlflowClient(mlflow_server).get_run(summary["mlflow_run_id"])
    assert run.data.params["resources.num_workers"] == "2" and run.data.params["restoration.factor"] == "2"
    assert {"val/psnr", "val/ssim", "eval/psnr", "eval/baseline_bicubic_psnr"} <= set(run.data.metrics)
    evaluation = run_cli_json(["evaluate", "--fake", "runs/sr", "--out", "ev", "--json", "--no-progress"], tmp_path,
                              mlflow_server)
    assert evaluation["figures"]["psnr"] == pytest.approx(m["psnr"])  # seeded: the same restorations
