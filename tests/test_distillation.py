"""`task: distillation`: the trailing grid, the progressive-distillation target, rounds that hand
over and resume exactly on two DDP ranks, student checkpoints that `ditlab sample` and `evaluate`
take like any other, and a teacher that does not fit refused in one line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ditlab import cli
from ditlab.builders import build_diffusion
from ditlab.config import from_dict, load
from ditlab.evaluation.suite import Reference, dataset_reference
from ditlab.diffusion.samplers import ddim_trailing_sample, guided_denoiser
from ditlab.diffusion.schedules import trailing_timesteps
from ditlab.training import LocalReporter, train
from ditlab.training.ema import EMA
from ditlab.atomic import file_digest
from ditlab.training.checkpoint import load_bundle, resolve_bundle_path
from ditlab.training.tasks.base import Batch
from ditlab.training.tasks.distillation import DistillationTask, TeacherMismatch, check_teacher_shape, open_teacher

from conftest import ROOT, write_digits_folder
from ddp import run_then_resume_on_two_ranks, same_parameters

TINY = ROOT / "experiments" / "tiny.yaml"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A tiny generation checkpoint (6 steps, in-process): the teacher of every test here."""
    out = tmp_path_factory.mktemp("teacher")
    reporter = LocalReporter(out)
    train(load(TINY, ["resources.num_workers=1"]), reporter)
    return str(reporter.latest_checkpoint)


def tiny_student(teacher: str, *overrides: str):
    """Tiny's data, model and noise process; 2 rounds from a 4-step teacher (students of 2 and 1
    steps), 3 steps a round: the step-3 checkpoint is written just before the hand-over."""
    return load(TINY, ["task=distillation", f"distillation.teacher={teacher}", "distillation.steps=1",
                       "distillation.rounds=2", "evaluation.steps=1", "train.log_every=1", "train.warmup_steps=0",
                       *overrides])


def test_the_trailing_grid_halves_exactly_and_one_step_goes_from_pure_noise_to_x0():
    for steps in (1, 2, 4, 8):
        coarse, fine = trailing_timesteps(1000, steps), trailing_timesteps(1000, 2 * steps)
        assert coarse[0] == 999 and len(coarse) == steps
        assert np.array_equal(fine[::2], coarse)  # a student step spans exactly two teacher steps
    spec = load(TINY)
    diffusion = build_diffusion(spec)
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    # A denoiser that knows x0: one trailing step must return it (the spaced grid's 1 step is t = 0 alone).

    def oracle(x, t):
        a, s = diffusion.coefficients(t)
        return diffusion.target(x0, (x - a * x0) / s, t)

    out = ddim_trailing_sample(oracle, torch.randn(2, 1, 8, 8), diffusion, 1)
    assert torch.allclose(out, x0, atol=1e-4)


def test_one_student_step_from_the_target_lands_where_two_guided_teacher_steps_do(teacher):
    """The target is the x0 from which the student's single DDIM step t -> t'' reaches where the
    teacher's two guided DDIM steps t -> t' -> t'' do: checked against the teacher's own 4-step
    trailing sampler, from pure noise (round 1's 2-step student)."""
    task = DistillationTask(tiny_student(teacher, "distillation.guidance=3"), 10, torch.device("cpu"))
    assert task.guidance == 3.0 and task.round == 0 and task.student_steps == 2
    diffusion = task.diffusion
    grid, fine = trailing_timesteps(diffusion.num_timesteps, 2), trailing_timesteps(diffusion.num_timesteps, 4)
    labels = torch.tensor([3, 7])
    noise = torch.randn(2, 1, 8, 8)
    path = []  # the teacher's x after each of its 4 steps
    ddim_trailing_sample(guided_denoiser(task.teacher, labels, 3.0, task.teacher.null_class), noise.clone(),
                         diffusion, 4, callback=lambda s: path.append(s["x"]))

    def student_step(x_t, i: int, final: bool) -> torch.Tensor:
        t = torch.full((2,), int(grid[i]))
        t_next = torch.full((2,), int(grid[min(i + 1, 1)]))
        x0 = task.target(x_t, t, torch.full((2,), int(fine[2 * i + 1])), t_next, torch.tensor([final] * 2), labels)
        a, s = diffusion.coefficients(t)
        ab_next = 1.0 if final else float(diffusion.alphas_cumprod[int(grid[i + 1])])
        return ab_next**0.5 * x0 + (1 - ab_next) ** 0.5 * (x_t - a * x0) / s

    assert torch.allclose(student_step(noise, 0, final=False), path[1], atol=1e-4)
    assert torch.allclose(student_step(path[1], 1, final=True), path[3], atol=1e-4)
    assert not torch.allclose(path[1], path[3], atol=1e-2)


def _rounds_record(rank, spec, full, end_full, resumed, end_resumed) -> dict:
    return {"full": [h["loss"] for h in full.history if "loss" in h],
            "resumed": [h["loss"] for h in resumed.history if "loss" in h],
            "steps": [h["student_steps"] for h in full.history if "loss" in h],
            "matching": [h["fake_loss"] > 0 for h in full.history if "loss" in h],
            "lr": [h["lr"] for h in full.history if "loss" in h],
            "students": sorted(end_full.task.students),
            "same_weights": same_parameters(end_full.ema.model, end_resumed.ema.model),
            "same_student": all(torch.equal(end_full.task.students[2][k], v)
                                for k, v in end_resumed.task.students[2].items())}


def test_rounds_hand_over_and_resume_exactly_on_two_ranks(teacher, tmp_path):
    """Round 1 (2-step student, guided teacher) for steps 1-4, the last two of them distribution
    matching; round 2 (1-step student, taught by round 1's matched student) for 5-6, the last one
    matching. Resumed from the step-3 checkpoint, in the middle of round 1's matching (so the fake
    score and its optimizer come from the checkpoint), both ranks repeat the uninterrupted run's
    losses and end with its weights."""
    spec = tiny_student(teacher, "distillation.round_steps=[4, 2]", "distillation.matching_steps=[2, 1]",
                        "distillation.matching_lr=1e-4")
    ranks = run_then_resume_on_two_ranks(spec, tmp_path, _rounds_record)
    for record in ranks:
        assert record["steps"] == [2, 2, 2, 2, 1, 1]
        assert record["matching"] == [False, False, True, True, False, True]
        assert [lr == 1e-4 for lr in record["lr"]] == record["matching"]  # matching_lr, else train.lr's schedule
        assert record["students"] == [2]
        assert record["resumed"] == record["full"][3:]
        assert record["same_weights"] and record["same_student"]
    bundle = load_bundle(tmp_path / "full" / "checkpoint_000006")
    assert bundle["task_state"]["teacher_sha256"] == file_digest(resolve_bundle_path(teacher))
    evaluation = bundle["spec"]["evaluation"]
    assert (evaluation["sampler"], evaluation["steps"]) == ("ddim-trailing-stochastic", 1)


def test_uneven_rounds_hand_over_where_round_steps_says(teacher):
    """distillation.round_steps [2, 4]: the 2-step student learns for steps 0-1, the 1-step one for 2-5."""
    task = DistillationTask(tiny_student(teacher, "distillation.round_steps=[2, 4]"), 10, torch.device("cpu"))
    ema = EMA(task.model, 0.9)
    learning = []
    for step in range(6):
        task.before_step(step, ema)
        learning.append(task.student_steps)
    assert learning == [2, 2, 1, 1, 1, 1]
    assert sorted(task.students) == [2]


def test_reused_targets_train_twice_and_a_resumed_run_repeats_the_full_one(teacher, tmp_path):
    """target_reuse 2: a step computes half its batch's targets afresh and reuses the last step's
    half, so the losses part from a run without reuse after step 1; the reuse is dropped at the
    checkpoint step (3, mid round 2 here), so a run resumed there repeats the full run exactly."""
    spec = tiny_student(teacher, "resources.num_workers=1", "distillation.round_steps=[2, 4]",
                        "distillation.target_reuse=2")
    full, resumed, plain = LocalReporter(tmp_path / "full"), LocalReporter(), LocalReporter()
    end_full = train(spec, full)
    end_resumed = train(spec, resumed, resume_from=str(tmp_path / "full" / "checkpoint_000003"))
    train(spec.model_copy(update={"distillation": spec.distillation.model_copy(update={"target_reuse": 1})}), plain)

    def losses(reporter):
        return [h["loss"] for h in reporter.history if "loss" in h]

    assert losses(resumed) == losses(full)[3:] and same_parameters(end_full.ema.model, end_resumed.ema.model)
    assert losses(plain)[0] == losses(full)[0] and losses(plain)[1] != losses(full)[1]
    assert end_full.task.replay is not None and len(end_full.task.replay[0]) == 8  # half the batch of 16


def test_matching_is_driven_by_the_score_difference_alone(teacher):
    """Distribution matching moves the student by fake score minus teacher score. Its fresh fake
    score is the teacher, and the anchor the student itself: unguided, the scores agree and the first
    step's loss is exactly 0, so the student does not move; with the guided teacher as target it does."""
    for guidance, moved in ((1.0, False), (3.0, True)):
        spec = tiny_student(teacher, f"distillation.guidance={guidance}", "distillation.round_steps=[2, 4]",
                            "distillation.matching_steps=[1, 0]")
        task = DistillationTask(spec, 10, torch.device("cpu"))
        task.wrap(lambda m: m)
        ema = EMA(task.model, 0.9)
        for step in range(2):
            task.before_step(step, ema)
        assert task.matching and task.learning_rate(task.optimizer, 1e-3) == spec.distillation.matching_lr
        before = {k: v.clone() for k, v in task.model.state_dict().items()}
        batch = Batch(torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8))
        figures = task.step(batch, torch.Generator().manual_seed(0))
        assert (figures["matching_loss"] > 0) == moved and figures["fake_loss"] > 0
        assert figures["loss"] == figures["matching_loss"]  # the anchor term is 0 where the student starts
        assert any(not torch.equal(v, task.model.state_dict()[k]) for k, v in before.items()) == moved
        task.before_step(2, ema)  # round 2 has no matching
        assert not task.matching and task.student_steps == 1


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("student")
    reporter = LocalReporter(out)
    train(tiny_student(teacher, "resources.num_workers=1"), reporter)
    return str(reporter.latest_checkpoint)


def test_a_student_samples_with_its_own_sampler_and_steps_and_refuses_guidance(student, tmp_path, capsys):
    assert cli.main(["sample", student, "--out", str(tmp_path / "s"), "--num", "4", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert (manifest["sampler"], manifest["steps"], manifest["guidance"]) == ("ddim-trailing-stochastic", 1, 1.0)
    assert cli.main(["sample", student, "--out", str(tmp_path / "g"), "--guidance", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--guidance" in err[0] and "distilled" in err[0]


@pytest.mark.parametrize("override,field", [("model.name=DiT-N/4", "model.name"),
                                            ("model.depth=1", "model.depth"),
                                            ("diffusion.prediction=eps", "diffusion.prediction"),
                                            ("distillation.teacher=missing/run", "distillation.teacher"),
                                            ("distillation.compare_teacher_steps=[8, 0]",
                                             "distillation.compare_teacher_steps"),
                                            ("distillation.round_steps=[2, 2]", "distillation.round_steps"),
                                            ("distillation.round_steps=[6]", "distillation.round_steps"),
                                            ("distillation.target_reuse=3", "distillation.target_reuse"),
                                            ("distillation.matching_steps=[1]", "distillation.matching_steps"),
                                            ("distillation.matching_steps=[0, 3]", "distillation.matching_steps"),
                                            ("distillation.compare_teacher_samplers=[ddim, heun]",
                                             "distillation.compare_teacher_samplers"),
                                            ("evaluation.sampler=ddim", "evaluation")])
def test_a_teacher_of_another_shape_or_missing_is_one_error_line(teacher, tmp_path, capsys, monkeypatch, override,
                                                                 field):
    monkeypatch.chdir(tmp_path)
    argv = ["run", str(TINY), "--set", "task=distillation", "--set", f"distillation.teacher={teacher}",
            "--set", "distillation.steps=1", "--set", "evaluation.steps=1", "--set", override]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ditlab: error:") and field in err[0], err
    assert not (tmp_path / "runs").exists()


def test_a_resumed_student_must_have_the_same_teacher(student, tmp_path):
    other = LocalReporter(tmp_path / "other")
    train(load(TINY, ["resources.num_workers=1", "seed=1"]), other)
    spec = tiny_student(str(other.latest_checkpoint), "resources.num_workers=1")
    with pytest.raises(ValueError, match="distillation.teacher: .* SHA-256"):
        train(spec, LocalReporter(), resume_from=student)


def test_the_evaluation_puts_every_round_beside_the_teacher(student, tmp_path):
    """Each round's student at its own step count and the teacher at compare_teacher_steps with each
    of compare_teacher_samplers (DDIM's and DDPM's samples differ), on one budget (10 samples against
    10 test images here: four short Inception passes), and the figure."""
    bundle = load_bundle(student)
    bundle["spec"]["distillation"].update(compare_teacher_steps=[2], compare_teacher_samplers=["ddim", "ddpm"])
    spec = from_dict(bundle["spec"])
    ev = spec.evaluation.model_copy(update={"num_samples": 10, "metrics": ("fid", "conditional_accuracy")})
    full = dataset_reference(spec.data, "test")
    reference = Reference(full.images[:10], "10 test images", full.labels[:10], full.classifier)
    report = DistillationTask.evaluate_checkpoint(bundle, student, ev, reference=reference)
    for key in ("student_1_steps/fid", "student_2_steps/fid", "teacher_ddim_2_steps/fid", "teacher_ddpm_2_steps/fid",
                "student_2_steps/conditional_accuracy", "teacher_ddpm_2_steps/seconds_per_100"):
        assert key in report.figures
    assert report.figures["fid"] == report.figures["student_1_steps/fid"]  # the final student is the run's own
    assert report.figures["teacher_ddim_2_steps/fid"] != report.figures["teacher_ddpm_2_steps/fid"]
    assert load_bundle(student)["task_state"]["teacher_sha256"] in report.notes["teacher"]
    assert report.plots["steps_comparison"](tmp_path / "steps.png").stat().st_size > 1000


def test_a_teacher_trained_under_ray_is_found_by_its_data_path(teacher, tmp_path, monkeypatch):
    """Ray Train workers store the data path made absolute; the student's relative one is the same
    folder (found by running a student of a Ray-trained teacher: it was refused)."""
    from ditlab.data import load_dataset
    from ditlab.orchestration.trainer import worker_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_digits_folder(tmp_path / "data" / "digits-png")
    folder = ["data.source=folder", "data.path=data/digits-png", "data.test_fraction=0.05"]
    out = tmp_path / "folder-teacher"
    reporter = LocalReporter(out)
    train(from_dict(worker_spec(load(TINY, ["resources.num_workers=1", "train.steps=1", *folder]))), reporter)
    assert Path(load_bundle(reporter.latest_checkpoint)["spec"]["data"]["path"]).is_absolute()
    spec = tiny_student(str(reporter.latest_checkpoint), "resources.num_workers=1", *folder)
    assert len(load_dataset(spec.data, "train"))
    open_teacher(spec)  # no TeacherMismatch


@pytest.mark.parametrize("student", ["experiments/distill.yaml", "pipelines/distill/params.yaml"])
def test_the_shipped_students_have_the_shipped_quickstarts_shape(student):
    # Their teacher is a quickstart run (the spec's comment; the pipeline's teacher stage): a change to
    # the quickstart's model that the students do not follow fails here, not 10 minutes into a user's run.
    check_teacher_shape(load(ROOT / student), load(ROOT / "experiments" / "quickstart.yaml"), "the quickstart")
    with pytest.raises(TeacherMismatch, match="model.depth: 6, but the teacher the quickstart has 4 blocks"):
        check_teacher_shape(load(ROOT / student, ["model.depth=6"]), load(ROOT / "experiments" / "quickstart.yaml"),
                            "the quickstart")
