"""`task: distillation`: a trained class-conditional DiT (the teacher) distilled into a student that
samples in a few steps, with classifier-free guidance built in.

Progressive distillation (Salimans & Ho 2022, algorithm 2). On the trailing timestep grid
(diffusion/schedules.py), a student of K steps moves from t_i to t_{i-1}; its teacher of 2K steps
takes two DDIM steps over the same span, through the midpoint. For an image x_0 of the batch, noise
eps and a grid index i drawn from the step's generator:

    x_t    = alpha_t x_0 + sigma_t eps                          t = t_i of the K-step grid
    x_t'   = DDIM(teacher, x_t,  t  -> t')                      t' = the midpoint (2K-step grid)
    x_t''  = DDIM(teacher, x_t', t' -> t'')                     t'' = t_{i-1}, or the clean image
    target = (x_t'' - (sigma''/sigma_t) x_t) / (alpha'' - (sigma''/sigma_t) alpha_t)

`target` is the x_0 from which one DDIM step of the student lands exactly on x_t''. The loss is
max(SNR_t, 1) * |x0_student - target|^2 ("truncated SNR" weighting, their section 4), whatever the
network predicts (eps, v or x0): its output is converted to x_0 first.

Round 1's teacher is the generation checkpoint sampling with classifier-free guidance at
`distillation.guidance` (two forward passes a step); the student conditions on the label alone, so it
learns the guided model in one forward pass (Meng et al. 2023 distil guidance in a stage of their own
and condition the student on the scale; here the scale is fixed and the two stages are one). Each
later round's teacher is the previous round's student, sampling unguided.

Rounds split `train.steps` evenly, or as `distillation.round_steps` says. When a round ends
(`before_step` at the next round's first step), the EMA weights become the next teacher and the
student's new starting point, the EMA restarts from them and the optimizer's moments are cleared:
each round is a fresh distillation of the one before. The rounds' students are kept in the
checkpoint ("task_state"), so the finished run has a student for each step count
(steps * 2**(rounds - 1), ..., steps), and a resumed run rebuilds the teacher of its round.
The teacher's SHA-256 is recorded and checked on resume. Students train on DDIM's deterministic
steps but sample by default with `ddim-trailing-stochastic` (diffusion/samplers.py, Meng et al.
2023), which scored better at 2, 4 and 8 steps (README).

Distribution matching (`distillation.matching_steps`: the last steps of a round). A student that
learns its teacher's path can be no better than the teacher's DDIM, and for the quickstart teacher
DDIM's FID is 1.2x DDPM's at 50 steps. Matching (DMD, Yin et al. 2024; on the student's own
multi-step chain as in DMD2, Yin et al. 2024b, section 4.5) asks for the teacher's distribution
instead. The round's EMA student starts it; a second copy of the guided teacher (the "fake" score)
learns the student's samples as they change. Per step, from the student's sampling chain with its
current weights (no gradient), the input x_t of one of its K steps drawn per image:

    x0     = student(x_t)                                      with gradient
    x_tau  = alpha_tau x0 + sigma_tau eps                      tau uniform in [0.02 T, 0.98 T)
    g      = (fake_x0(x_tau) - teacher_x0(x_tau)) / mean|x0 - teacher_x0(x_tau)|
    loss   = 0.5 |x0 - stopgrad(x0 - g)|^2                     whose gradient is g: KL(student || teacher)
           + matching_anchor |x0 - anchor(x_t)|^2              anchor: the student that started matching

teacher_x0 guided at `distillation.guidance`; then `matching_fake_updates` diffusion-loss steps of the
fake score on the student's x0. The phase has its own learning rates (`matching_lr`,
`matching_fake_lr`), clears the student's optimizer moments, and restarts the fake score from the
teacher; the fake score, its optimizer and the anchor are checkpoint state, so resume stays exact.

The teacher's passes (four forward passes of the batch in round 1, two later) cost more than the
student's forward and backward. With `distillation.target_reuse` r, a step computes targets for 1/r
of its batch and trains on them beside the latest (r - 1)/r of earlier steps' targets, so each
target trains the student in r consecutive steps. The reused ones are dropped at every checkpoint
step (that step computes the whole batch's), so a run resumed from a checkpoint is the same run.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import torch

from ditlab.config import STUDENT_SAMPLERS, EvaluationSpec, ExperimentSpec
from ditlab.diffusion import guided_denoiser
from ditlab.diffusion.samplers import ddim_move, predict_x0_eps, student_stochastic_move
from ditlab.diffusion.schedules import trailing_timesteps
from ditlab.training.ema import EMA
from ditlab.training.optim import adamw
from ditlab.training.tasks.base import Batch
from ditlab.training.tasks.generation import GenerationTask, score_samples

COMPARED = ("fid", "kid", "conditional_accuracy")  # the figures the steps comparison keeps


def comparison_row(model: str, steps: int, figures: dict[str, float], key: str = "student") -> dict:
    row = {"model": model, "key": key, "steps": steps, **{k: figures[k] for k in COMPARED if k in figures}}
    row["seconds_per_100"] = 100 * figures["eval_sampling_seconds"] / figures["eval_num_samples"]
    return row


class TeacherMismatch(ValueError):
    pass


def distilled_guidance(spec: ExperimentSpec, teacher_spec: ExperimentSpec) -> float:
    """The guidance scale distilled into the student: distillation.guidance, else the teacher's own."""
    guidance = spec.distillation.guidance
    return teacher_spec.evaluation.guidance if guidance is None else guidance


def round_students(bundle: dict, final) -> dict[int, Any]:
    """The earlier rounds' students a distillation checkpoint keeps, by step count, each a
    sampling.LoadedCheckpoint beside `final` (the checkpoint's own, last student)."""
    from ditlab.models import model_from_config
    from ditlab.sampling import LoadedCheckpoint

    students = {}
    for steps, weights in sorted(bundle.get("task_state", {}).get("students", {}).items(), key=lambda kv: int(kv[0])):
        model = model_from_config(bundle["model_config"])
        model.load_state_dict(weights)
        students[int(steps)] = LoadedCheckpoint(model.eval(), final.diffusion, final.spec, final.step)
    return students


def open_teacher(spec: ExperimentSpec):
    """The teacher's sampling view (EMA weights), the guidance to distil and the teacher's SHA-256,
    after checking it is a pixel generation checkpoint of the spec's data, model and diffusion."""
    from ditlab.atomic import file_digest
    from ditlab.sampling import from_bundle
    from ditlab.training.checkpoint import CheckpointError, load_bundle, resolve_bundle_path

    where = spec.distillation.teacher
    try:
        path = resolve_bundle_path(where)
        bundle = load_bundle(path)
    except CheckpointError as err:
        raise TeacherMismatch(f"distillation.teacher: {err}") from None
    task = bundle["spec"].get("task", "generation")
    if task != "generation":
        raise TeacherMismatch(f"distillation.teacher: {where} is a {task} checkpoint, not a generation one")
    if bundle.get("task_state", {}).get("latent"):
        raise TeacherMismatch(f"distillation.teacher: {where} is a latent DiT; distilling latent models is not "
                              "supported yet")
    teacher = from_bundle(bundle, str(path), "ema")
    check_teacher_shape(spec, teacher.spec, where)
    guidance = distilled_guidance(spec, teacher.spec)
    if guidance != 1.0 and teacher.model.config.class_dropout_prob == 0:
        raise TeacherMismatch(f"distillation.guidance: {guidance}, but the teacher {where} was trained without "
                              "label dropout, so it has no unconditional branch to guide with")
    return teacher, guidance, file_digest(path)


def check_teacher_shape(spec: ExperimentSpec, teacher_spec: ExperimentSpec, where: str) -> None:
    """A TeacherMismatch naming the first field where the student's spec differs from its teacher's
    in data, model shape (its depth included) or noise process."""
    for section, fields in (("data", ("source", "path", "name", "resolution", "channels", "prepared")),
                            ("model", ("name", "learn_sigma", "conditioning")),
                            ("diffusion", ("schedule", "num_timesteps", "prediction"))):
        for name in fields:
            mine, theirs = getattr(getattr(spec, section), name), getattr(getattr(teacher_spec, section), name)
            if name in ("path", "prepared") and mine and theirs:  # the teacher's workers got it made absolute
                mine, theirs = str(Path(mine).resolve()), str(Path(theirs).resolve())
            if mine != theirs:
                raise TeacherMismatch(f"{section}.{name}: {mine!r}, but the teacher {where} was trained with "
                                      f"{theirs!r}; a student has its teacher's shape, data and noise process")
    mine, theirs = spec.model.blocks(), teacher_spec.model.blocks()
    if mine != theirs:
        raise TeacherMismatch(f"model.depth: {mine}, but the teacher {where} has {theirs} blocks; a student has "
                              "its teacher's shape, data and noise process")


class DistillationTask(GenerationTask):
    """The student is `model` (what EMA tracks and evaluation samples); it starts as the teacher."""

    name = "distillation"

    def __init__(self, spec: ExperimentSpec, num_classes: int, device: torch.device):
        teacher, self.guidance, self.teacher_sha256 = open_teacher(spec)
        super().__init__(spec, num_classes, device)  # builds the spec's DiT: same preset as the teacher's
        self.model.load_state_dict(teacher.model.state_dict())
        self.teacher_clip_x0 = teacher.spec.evaluation.clip_x0
        d = spec.distillation
        ends = list(itertools.accumulate(d.round_lengths(spec.train.steps)))
        # The step at which each round but the last hands over to the next.
        self.round_ends = ends[:-1]
        # The step at which each round's distribution matching starts (None: the round has none).
        self.matching_starts = [end - m if m else None for end, m in zip(ends, d.matching_lengths(), strict=True)]
        self.matching = False  # this step is one of distribution matching (before_step says)
        # Students of finished rounds, by step count: the teacher of the round after each.
        self.students: dict[int, dict[str, torch.Tensor]] = {}
        # (x_t, t, labels, target) of the latest samples whose targets train again (target_reuse > 1).
        self.replay: tuple[torch.Tensor, ...] | None = None
        self.teacher = teacher.model.to(device).requires_grad_(False)  # round 1's; later rounds': _enter_round
        self.guided_teacher = self.teacher  # the distribution that matching aims at, in every round
        self.fake: torch.nn.Module | None = None  # the score model of the student's samples (matching)
        if any(d.matching_lengths()):
            self.anchor = copy.deepcopy(self.model).eval().requires_grad_(False)  # set when matching starts
            self.fake = copy.deepcopy(self.teacher).requires_grad_(True)
            self.fake_forward = self.fake  # DDP-wrapped by `wrap`
            self.fake_optimizer = adamw(self.fake.parameters(), lr=d.matching_fake_lr,
                                        betas=spec.train.adam_betas, weight_decay=0.0)
        self.validation_data = None  # the diffusion loss does not measure a student (train.val_images: 0 too)
        if self.sample_scorer is not None:
            self.sample_scorer.sampler, self.sample_scorer.guidance = spec.evaluation.sampler, 1.0
        self._enter_round()

    @classmethod
    def streams(cls, spec: ExperimentSpec) -> bool:
        return False  # students train on the teacher's samples of the images held in memory

    @classmethod
    def preflight(cls, spec: ExperimentSpec) -> None:
        open_teacher(spec)

    # -- modules -----------------------------------------------------------------------------------

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return super().optimizers() + ([self.fake_optimizer] if self.fake is not None else [])

    def wrap(self, wrap_model) -> None:
        super().wrap(wrap_model)
        if self.fake is not None:
            self.fake_forward = wrap_model(self.fake)

    def set_train_mode(self) -> None:
        super().set_train_mode()
        if self.fake is not None:
            self.fake.train()

    def learning_rate(self, optimizer: torch.optim.Optimizer, scheduled: float) -> float:
        if not self.matching:
            return scheduled
        d = self.spec.distillation
        return d.matching_lr if optimizer is self.optimizer else d.matching_fake_lr

    # -- rounds ------------------------------------------------------------------------------------

    @property
    def round(self) -> int:
        """The current round, from 0."""
        return len(self.students)

    @property
    def student_steps(self) -> int:
        """The step count the student learns this round."""
        return self.spec.distillation.teacher_steps // 2 ** (self.round + 1)  # the last round: distillation.steps

    def _enter_round(self) -> None:
        """Teacher and sampling settings of the current round (the students dict says which)."""
        if self.students:
            latest = self.students[min(self.students)]
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.teacher.load_state_dict(latest)
        if self.sample_scorer is not None:
            self.sample_scorer.steps = self.student_steps

    def before_step(self, step: int, ema: EMA) -> None:
        if step % self.spec.train.checkpoint_every == 0:
            self.replay = None  # a run resumed from this step's checkpoint starts without it too
        if self.round < len(self.round_ends) and step >= self.round_ends[self.round]:
            finished = {k: v.detach().clone() for k, v in ema.model.state_dict().items()}
            self.students[self.student_steps] = finished
            with torch.no_grad():
                self.model.load_state_dict(finished)
            ema.num_updates = 0  # its warm-up starts again from the new starting point
            self.optimizer.state.clear()
            self.replay = None  # the last round's targets
            self._enter_round()
        start = self.matching_starts[self.round]
        self.matching = start is not None and step >= start
        if step == start:
            self._start_matching(ema)

    def _start_matching(self, ema: EMA) -> None:
        """The round's EMA student starts distribution matching, with fresh optimizer moments, beside a
        fresh copy of the guided teacher as the score of its samples. The EMA carries on."""
        with torch.no_grad():
            self.model.load_state_dict(ema.model.state_dict())
            self.anchor.load_state_dict(ema.model.state_dict())
            self.fake.load_state_dict(self.guided_teacher.state_dict())
        self.optimizer.state.clear()
        self.fake_optimizer.state.clear()
        self.replay = None

    # -- one step ----------------------------------------------------------------------------------

    def step(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        if self.matching:
            return self.matching_step(batch, generator)
        n, K = len(batch), self.student_steps
        T = self.diffusion.num_timesteps
        fresh = n - (len(self.replay[0]) if self.replay else 0)  # the targets computed this step
        images, labels = batch.images[:fresh], batch.labels[:fresh]
        i = torch.randint(K, (fresh,), generator=generator)  # index into the student's grid, from t = T-1
        noise = torch.randn(images.shape, generator=generator)
        grid, fine = torch.from_numpy(trailing_timesteps(T, K)), torch.from_numpy(trailing_timesteps(T, 2 * K))
        t, t_mid = grid[i].to(self.device), fine[2 * i + 1].to(self.device)
        t_next = grid[(i + 1).clamp(max=K - 1)].to(self.device)
        final = (i == K - 1).to(self.device)  # the last step lands on the clean image
        x_t = self.diffusion.q_sample(images, t, noise.to(self.device))
        target = self.target(x_t, t, t_mid, t_next, final, labels)
        if self.replay:  # the last steps' targets first, this step's last
            fresh_parts = (x_t, t, labels, target)
            x_t, t, labels, target = (torch.cat(pair) for pair in zip(self.replay, fresh_parts, strict=True))
        keep = n - n // self.spec.distillation.target_reuse
        self.replay = tuple(z[n - keep:] for z in (x_t, t, labels, target)) if keep else None
        with self.autocast():
            out = self.forward_model(x_t, t, labels)
        x0, _ = self.diffusion.to_x0_eps(out[:, : x_t.shape[1]].float(), x_t, t)
        alpha, sigma = self.diffusion.coefficients(t, x_t.ndim)
        weight = (alpha**2 / sigma**2).clamp(min=1.0)
        loss = (weight * (x0 - target) ** 2).mean()
        grad_norm = self.optimize(loss, self.optimizer, self.model.parameters())
        figures = {"loss": float(loss.detach()), "grad_norm": grad_norm, "student_steps": float(K)}
        return figures if self.fake is None else {**figures, "fake_loss": 0.0, "matching_loss": 0.0}  # same keys

    def matching_step(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        """One step of distribution matching (module docstring): the student's update, then the fake
        score's."""
        n, K, T, C = len(batch), self.student_steps, self.diffusion.num_timesteps, batch.images.shape[1]
        labels = batch.labels
        inputs = self.chain_inputs(labels, torch.randn(batch.images.shape, generator=generator), generator)
        i = torch.randint(K, (n,), generator=generator)
        x_t = inputs[i.to(self.device), torch.arange(n, device=self.device)]
        t = torch.from_numpy(trailing_timesteps(T, K))[i].to(self.device)
        with self.autocast():
            out = self.forward_model(x_t, t, labels)
        x0, _ = self.diffusion.to_x0_eps(out[:, :C].float(), x_t, t)
        tau = torch.randint(int(0.02 * T), int(0.98 * T), (n,), generator=generator).to(self.device)
        x_tau = self.diffusion.q_sample(x0.detach(), tau, torch.randn(x0.shape, generator=generator).to(self.device))
        with torch.no_grad(), self.autocast():
            real_out = guided_denoiser(self.guided_teacher, labels, self.guidance, self.guided_teacher.null_class)(
                x_tau, tau)
            fake_out = self.fake(x_tau, tau, labels)
        real, _ = self.diffusion.to_x0_eps(real_out[:, :C].float(), x_tau, tau)
        fake, _ = self.diffusion.to_x0_eps(fake_out[:, :C].float(), x_tau, tau)
        scale = (x0.detach() - real).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clamp(min=1e-3)
        target = x0.detach() - (fake - real) / scale
        matching = 0.5 * ((x0 - target) ** 2).mean()
        loss = matching
        if self.spec.distillation.matching_anchor:
            with torch.no_grad(), self.autocast():
                anchor = self.anchor(x_t, t, labels)
            anchor_x0, _ = self.diffusion.to_x0_eps(anchor[:, :C].float(), x_t, t)
            loss = loss + self.spec.distillation.matching_anchor * ((x0 - anchor_x0) ** 2).mean()
        grad_norm = self.optimize(loss, self.optimizer, self.model.parameters())
        samples = x0.detach().clamp(-1, 1)
        for _ in range(self.spec.distillation.matching_fake_updates):
            s = torch.randint(T, (n,), generator=generator).to(self.device)
            noise = torch.randn(samples.shape, generator=generator).to(self.device)
            with self.autocast():
                out = self.fake_forward(self.diffusion.q_sample(samples, s, noise), s, labels)
            fake_loss = ((out[:, :C].float() - self.diffusion.target(samples, noise, s)) ** 2).mean()
            self.optimize(fake_loss, self.fake_optimizer, self.fake.parameters())
        return {"loss": float(loss.detach()), "grad_norm": grad_norm, "student_steps": float(K),
                "fake_loss": float(fake_loss.detach()), "matching_loss": float(matching.detach())}

    @torch.no_grad()
    def chain_inputs(self, labels: torch.Tensor, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[K, n, ...]: the input of each of the student's K sampling steps from `noise`, with its
        current weights and evaluation.sampler (stochastic or not), as its samples are drawn."""
        K, ev = self.student_steps, self.spec.evaluation
        ts, ab = trailing_timesteps(self.diffusion.num_timesteps, K), self.diffusion.alphas_cumprod
        x = noise.to(self.device)
        inputs = [x]
        for k in range(K - 1):
            t = torch.full((len(x),), int(ts[k]), dtype=torch.long, device=self.device)
            with self.autocast():
                x0, eps = predict_x0_eps(lambda xx, tt: self.model(xx, tt, labels), self.diffusion, x, t, ev.clip_x0)
            a_next = float(ab[ts[k + 1]])
            if ev.sampler == "ddim-trailing-stochastic":
                a_skip = float(ab[ts[k + 2]]) if k + 2 < K else 1.0
                x = student_stochastic_move(x0, eps, a_next, a_skip,
                                            torch.randn(x.shape, generator=generator).to(self.device))
            else:
                x = ddim_move(x0, eps, a_next)
            inputs.append(x.float())
        return torch.stack(inputs)

    @torch.no_grad()
    def target(self, x_t, t, t_mid, t_next, final, labels) -> torch.Tensor:
        """The x_0 from which one DDIM step t -> t'' lands where two of the teacher's do."""
        guidance = self.guidance if self.round == 0 else 1.0
        denoise = guided_denoiser(self.teacher, labels, guidance, self.teacher.null_class)
        ab = self.diffusion.alphas_cumprod.to(x_t.device).float()
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        ab_mid = ab[t_mid].reshape(shape)
        ab_next = torch.where(final, torch.ones_like(t_next, dtype=ab.dtype), ab[t_next]).reshape(shape)
        with self.autocast():
            x0, eps = predict_x0_eps(denoise, self.diffusion, x_t, t, self.teacher_clip_x0)
            x_mid = ddim_move(x0, eps, ab_mid)
            x0, eps = predict_x0_eps(denoise, self.diffusion, x_mid, t_mid, self.teacher_clip_x0)
        x_next = ddim_move(x0, eps, ab_next)
        alpha, sigma = self.diffusion.coefficients(t, x_t.ndim)
        ratio = (1 - ab_next).sqrt() / sigma
        return (x_next - ratio * x_t) / (ab_next.sqrt() - ratio * alpha)

    # -- checkpoint state --------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        state = {**super().extra_state(), "teacher_sha256": self.teacher_sha256,
                 "students": {str(k): v for k, v in self.students.items()}}
        if self.fake is not None:
            state["matching"] = {"fake": self.fake.state_dict(), "fake_optimizer": self.fake_optimizer.state_dict(),
                                 "anchor": self.anchor.state_dict()}
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        recorded = state.get("teacher_sha256")
        if recorded and recorded != self.teacher_sha256:
            raise TeacherMismatch(f"distillation.teacher: {self.spec.distillation.teacher} has SHA-256 "
                                  f"{self.teacher_sha256[:16]}..., the checkpoint was distilled from "
                                  f"{recorded[:16]}...")
        super().load_extra_state(state)
        self.students = {int(k): v for k, v in state.get("students", {}).items()}
        if self.fake is not None and "matching" in state:
            self.fake.load_state_dict(state["matching"]["fake"])
            self.anchor.load_state_dict(state["matching"]["anchor"])
            self.fake_optimizer.load_state_dict(state["matching"]["fake_optimizer"])
        self._enter_round()

    # -- after training ----------------------------------------------------------------------------

    @classmethod
    def evaluate_checkpoint(cls, bundle: dict, source: str, ev: EvaluationSpec | None = None,
                            progress: bool = False, reference=None):
        """The final student with `ev` (default: the spec's evaluation, its own sampler and steps),
        then, with the same samples budget and seed, every earlier round's student at its step count
        and the teacher at `distillation.compare_teacher_steps` with each of `compare_teacher_samplers`:
        the `steps_comparison` figure and a `student_<steps>_steps/<figure>` or
        `teacher_<sampler>_<steps>_steps/<figure>` figure for each."""
        from ditlab.evaluation.plots import save_steps_comparison
        from ditlab.evaluation.suite import dataset_reference
        from ditlab.sampling import from_bundle, load_for_sampling

        final = from_bundle(bundle, source, "ema")
        spec, ev = final.spec, ev or final.spec.evaluation
        if ev.num_samples == 0:
            return score_samples(final, ev)
        reference = reference or dataset_reference(spec.data, ev.reference_split)
        report = score_samples(final, ev, reference, progress)
        report.notes["teacher"] = (f"{spec.distillation.teacher} (SHA-256 {bundle['task_state']['teacher_sha256']}), "
                                   f"{spec.distillation.rounds} rounds from {spec.distillation.teacher_steps} steps")
        rows = [comparison_row("student", ev.steps, report.figures)]
        # Earlier students sample as `ev` does, unless it names a sampler off their trailing grid.
        sampler = ev.sampler if ev.sampler in STUDENT_SAMPLERS else spec.evaluation.sampler
        student_ev = ev.model_copy(update={"sampler": sampler, "guidance": 1.0})
        for steps, ckpt in round_students(bundle, final).items():
            figures = score_samples(ckpt, student_ev.model_copy(update={"steps": steps}), reference).figures
            rows.append(comparison_row("student", steps, figures))
        if spec.distillation.compare_teacher_steps:
            try:
                teacher = load_for_sampling(spec.distillation.teacher)
            except ValueError as err:
                report.notes["teacher_comparison"] = f"skipped: {err}"
            else:
                guidance = distilled_guidance(spec, teacher.spec)
                for sampler in spec.distillation.compare_teacher_samplers or (teacher.spec.evaluation.sampler,):
                    for steps in spec.distillation.compare_teacher_steps:
                        teacher_ev = ev.model_copy(update={"sampler": sampler, "steps": steps, "guidance": guidance})
                        figures = score_samples(teacher, teacher_ev, reference).figures
                        rows.append(comparison_row(f"teacher ({sampler}, guidance {guidance})", steps, figures,
                                                   f"teacher_{sampler}"))
        for row in rows:
            report.figures.update({f"{row['key']}_{row['steps']}_steps/{k}": v for k, v in row.items()
                                   if k not in ("model", "key", "steps")})
        report.plots["steps_comparison"] = lambda path: save_steps_comparison(
            rows, path, title=f"{spec.name}: distilled student and teacher, {ev.num_samples} samples each")
        return report
