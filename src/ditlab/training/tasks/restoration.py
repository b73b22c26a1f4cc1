"""`task: restoration`: a DiT that restores degraded images (super-resolution, denoising).

Sections it reads: model, diffusion, train, restoration, evaluation. The DiT is a conditional
denoiser: the degraded image, at the target size (bicubic-upsampled for super-resolution), is
concatenated to the noisy input's channels (SR3, Saharia et al. 2021). Pairs are made on the fly
from the batch's clean images with the seeded degradation of degradations.py. Without
`restoration.class_conditional` the model has no labels (the null class always), so it restores
unlabelled images. With `restoration.residual` the diffused variable is the residual over the
conditioning image (clean - condition, SRDiff, Li et al. 2022), so the network need not carry the
conditioning image's pixels through to its output: the bicubic image comes for free.

Restoring is sampling: deterministic DDIM from per-image seeded noise with few steps, whose x0
prediction is close to the conditional mean that PSNR rewards. Validation reports `val_psnr` and
`val_ssim` of that sampler (evaluation.sampler, evaluation.steps) on a fixed slice of the test
split; evaluation restores the test split and scores it beside the baselines: bicubic upsampling
for super-resolution, the noisy input and the better of non-local means and total variation
(chosen on a training slice) for denoising.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ditlab.builders import build_diffusion
from ditlab.config import EvaluationSpec, ExperimentSpec
from ditlab.data import load_dataset, to_uint8
from ditlab.degradations import Degradation, choose_classical_denoiser
from ditlab.diffusion import GaussianDiffusion, get_sampler, training_losses
from ditlab.models import DiT, build_model
from ditlab.training.optim import adamw
from ditlab.training.tasks.base import Batch, Task
from ditlab.training.validation import VALIDATION_SEED

GRID_COLUMNS = 10  # images per row of the evaluation grid
CLASSICAL_SLICE = 64  # training images the classical denoiser's setting is chosen on
RECONSTRUCTION_KEYS = ("mse", "psnr", "ssim", "lpips", "fid", "kid")


def build_restoration_dit(spec: ExperimentSpec, num_classes: int) -> DiT:
    """The spec's DiT preset with as many conditioning channels as image channels; without class
    conditioning it has no labels, only the null class."""
    conditional = spec.restoration.class_conditional
    return build_model(
        spec.model.name,
        **spec.model.architecture(),
        input_size=spec.data.resolution,
        in_channels=spec.data.channels,
        cond_channels=spec.data.channels,
        num_classes=num_classes if conditional else 0,
        learn_sigma=spec.model.learn_sigma,
        class_dropout_prob=spec.model.class_dropout_prob if conditional else 0.0,
        dropout=spec.model.dropout,
    )


def model_labels(model: DiT, labels: torch.Tensor, class_conditional: bool) -> torch.Tensor:
    """The labels the model sees: the images' own, or the null class for a model without labels."""
    return labels if class_conditional else torch.full_like(labels, model.null_class)


def start_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Image i's starting noise from a generator seeded by (seed, i): results do not depend on the
    batch size."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                        for i in range(n)]) if n else torch.zeros(0, *shape)


@torch.no_grad()
def restore(model: DiT, diffusion: GaussianDiffusion, condition: torch.Tensor, labels: torch.Tensor,
            sampler: str = "ddim", steps: int = 10, seed: int = 0, batch_size: int = 100, clip_x0: bool = True,
            progress: bool = False, device: str | torch.device = "cpu", residual: bool = False) -> torch.Tensor:
    """Restored images in [-1, 1] for conditioning images [N, C, R, R] (the model in eval mode); a
    `residual` model's samples are added to the conditioning image."""
    was_training = model.training
    model.eval()
    sample_fn = get_sampler(sampler)
    noise = start_noise(len(condition), (model.in_channels, *condition.shape[-2:]), seed)
    starts = range(0, len(condition), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"restoring ({sampler}, {steps} steps)", unit="batch")
    out = []
    for i, start in enumerate(starts):
        part = slice(start, start + batch_size)
        cond, y = condition[part].to(device), labels[part].to(device)

        def denoise(x, t, cond=cond, y=y):
            return model(x, t, y, cond=cond)

        g = torch.Generator().manual_seed(seed * 100_003 + i)  # DDPM's per-step noise
        x0 = sample_fn(denoise, noise[part].to(device), diffusion, steps, generator=g, clip_x0=clip_x0)
        out.append((x0 + cond if residual else x0).clamp(-1, 1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros_like(condition)


def diffused_target(clean: torch.Tensor, condition: torch.Tensor, residual: bool) -> torch.Tensor:
    """What the diffusion process models: the clean image, or its residual over the condition."""
    return clean - condition if residual else clean


@dataclass(frozen=True)
class RestorationPairs:
    """Clean images with their degraded observations and conditioning inputs."""

    clean: torch.Tensor
    observation: torch.Tensor
    condition: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def split_pairs(spec: ExperimentSpec, split: str, num: int, shuffle_seed: int | None = None) -> RestorationPairs:
    """`num` images of a split (all if fewer; a fixed random subset with `shuffle_seed`, else the
    first ones), degraded with their seeded degradation."""
    data = load_dataset(spec.data, split)
    n = min(num, len(data))
    if shuffle_seed is None:
        indices = torch.arange(n)
    else:
        indices = torch.randperm(len(data), generator=torch.Generator().manual_seed(shuffle_seed))[:n]
    clean, labels = data.batch(indices)
    observation, condition = Degradation.from_spec(spec).pair(clean, indices, split)
    return RestorationPairs(clean, observation, condition, labels)


class RestorationTask(Task):
    name = "restoration"

    def __init__(self, spec: ExperimentSpec, num_classes: int, device: torch.device):
        super().__init__(spec, num_classes, device)
        train = spec.train
        self.degradation = Degradation.from_spec(spec)
        self.class_conditional = spec.restoration.class_conditional
        self.residual = spec.restoration.residual
        self.model = build_restoration_dit(spec, num_classes).to(device)
        self.forward_model: nn.Module = self.model  # DDP-wrapped by `wrap`
        self.diffusion = build_diffusion(spec)
        self.optimizer = adamw([p for p in self.model.parameters() if p.requires_grad], lr=train.lr,
                               betas=train.adam_betas, weight_decay=train.weight_decay)
        self.validation_pairs = (split_pairs(spec, "test", train.val_images, shuffle_seed=VALIDATION_SEED)
                                 if train.val_images > 0 else None)

    def step(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        if batch.indices is None:
            raise ValueError("restoration needs the batch's dataset indices (its degradation is seeded by them)")
        _, condition = self.degradation.pair(batch.images.cpu(), batch.indices, "train")
        n = len(batch)
        t = torch.randint(self.diffusion.num_timesteps, (n,), generator=generator)
        noise = torch.randn(batch.images.shape, generator=generator)
        drop = torch.rand(n, generator=generator) < self.spec.model.class_dropout_prob
        t, noise, drop, condition = (v.to(self.device) for v in (t, noise, drop, condition))
        labels = model_labels(self.model, batch.labels, self.class_conditional)

        def conditioned(x, t, y, drop_mask=None):
            return self.forward_model(x, t, y, drop_mask, cond=condition)

        with self.autocast():
            x0 = diffused_target(batch.images, condition, self.residual)
            terms = training_losses(conditioned, self.diffusion, x0, t, labels, noise,
                                    drop if self.class_conditional else None)
        grad_norm = self.optimize(terms["loss"].mean(), self.optimizer, self.model.parameters())
        return {**{k: float(v.detach().mean()) for k, v in terms.items()}, "grad_norm": grad_norm}

    @property
    def validates(self) -> bool:
        return self.validation_pairs is not None

    def validation(self, weights: nn.Module) -> dict[str, float]:
        """PSNR and SSIM of the evaluation sampler's restorations of a fixed test slice."""
        from ditlab.evaluation.reconstruction import psnr, ssim

        v, ev = self.validation_pairs, self.spec.evaluation
        if v is None:
            return {}
        labels = model_labels(weights, v.labels, self.class_conditional)
        restored = restore(weights, self.diffusion, v.condition, labels, ev.sampler, ev.steps, ev.seed,
                           ev.batch_size, ev.clip_x0, device=self.device, residual=self.residual)
        pred, target = to_uint8(restored), to_uint8(v.clean)
        return {"val_psnr": psnr(pred, target), "val_ssim": ssim(pred, target)}

    @classmethod
    def evaluate_checkpoint(cls, bundle: dict, source: str, ev: EvaluationSpec | None = None,
                            progress: bool = False, reference=None):
        """Restore `ev.num_samples` images of the split `ev` names (or of `reference`, degraded the
        same way) with the EMA weights, and score them and the baselines against the clean images."""
        from ditlab.evaluation.suite import Report
        from ditlab.sampling import from_bundle

        ckpt = from_bundle(bundle, source, "ema")
        spec, ev = ckpt.spec, ev or ckpt.spec.evaluation
        if ev.num_samples == 0:
            return Report({"eval_num_samples": 0.0}, {"evaluation": "skipped: evaluation.num_samples is 0"},
                          settings=ev.model_dump(mode="json"))
        pairs, reference_name = evaluation_pairs(spec, ev, reference)
        labels = model_labels(ckpt.model, pairs.labels, spec.restoration.class_conditional)
        tic = time.perf_counter()
        restored = restore(ckpt.model, ckpt.diffusion, pairs.condition, labels, ev.sampler, ev.steps, ev.seed,
                           ev.batch_size, ev.clip_x0, progress=progress, residual=spec.restoration.residual)
        seconds = time.perf_counter() - tic
        baselines, notes = baseline_restorations(spec, pairs)
        report = score(restored, baselines, pairs, ev, reference_name, progress)
        report.figures.update(eval_num_samples=float(len(pairs)), eval_sampling_seconds=seconds)
        report.notes.update(notes)
        report.notes["degradation"] = Degradation.from_spec(spec).describe()
        report.notes["sampler"] = f"{ev.sampler}, {ev.steps} steps, seed {ev.seed}, EMA weights"
        return report


def evaluation_pairs(spec: ExperimentSpec, ev: EvaluationSpec, reference) -> tuple[RestorationPairs, str]:
    """The first `ev.num_samples` images of the split `ev` names, or of `reference` (an
    evaluation.suite.Reference of clean images at the model's size), with their degradations."""
    if reference is None:
        pairs = split_pairs(spec, ev.reference_split, ev.num_samples)
        return pairs, f"{spec.data.source} {ev.reference_split} split ({len(pairs)} images)"
    images = reference.images[: ev.num_samples]
    clean = torch.from_numpy(images[..., : spec.data.channels]).permute(0, 3, 1, 2).float() / 127.5 - 1
    indices = torch.arange(len(clean))
    observation, condition = Degradation.from_spec(spec).pair(clean, indices, "test")
    labels = torch.zeros(len(clean), dtype=torch.long)
    if spec.restoration.class_conditional:
        if reference.labels is None:
            raise ValueError("a class-conditional restoration model needs labelled reference images")
        labels = torch.as_tensor(reference.labels[: len(clean)], dtype=torch.long)
    return RestorationPairs(clean, observation, condition, labels), f"{reference.name} ({len(clean)} images)"


def baseline_restorations(spec: ExperimentSpec, pairs: RestorationPairs) -> tuple[dict[str, torch.Tensor], dict]:
    """The restorations that need no training, by name: bicubic for super-resolution; the noisy input
    and the classical denoiser chosen on a training slice for denoising."""
    degradation = Degradation.from_spec(spec)
    if degradation.kind == "downsample":
        return {"bicubic": pairs.condition}, {"baselines": "bicubic upsampling of the box-downsampled input"}
    train = split_pairs(spec, "train", CLASSICAL_SLICE)
    denoiser = choose_classical_denoiser(train.observation, train.clean, degradation.sigma)
    notes = {"baselines": f"noisy input; {denoiser.describe()}, the best of non-local means and total "
                          f"variation on {len(train)} training images"}
    return {"noisy": pairs.observation, denoiser.name: denoiser(pairs.observation)}, notes


def score(restored: torch.Tensor, baselines: dict[str, torch.Tensor], pairs: RestorationPairs, ev: EvaluationSpec,
          reference_name: str, progress: bool):
    """The restored set's figures, each baseline's as baseline_<name>_<figure>, the PSNR gain over the
    best baseline, and the grid (rows: degraded, best baseline, restored, clean)."""
    from ditlab.evaluation.suite import evaluate_pairs

    clean = to_uint8(pairs.clean)
    report = evaluate_pairs(to_uint8(restored), clean, ev, name=reference_name, progress=progress)
    best = None
    for name, images in baselines.items():
        figures = evaluate_pairs(to_uint8(images), clean, ev, name=reference_name, progress=progress).figures
        report.figures.update({f"baseline_{name}_{k}": v for k, v in figures.items() if k in RECONSTRUCTION_KEYS})
        if "psnr" in figures and (best is None or figures["psnr"] > report.figures[f"baseline_{best}_psnr"]):
            best = name
    if best is not None and "psnr" in report.figures:
        report.figures["psnr_gain_db"] = report.figures["psnr"] - report.figures[f"baseline_{best}_psnr"]
        report.notes["best_baseline"] = best
    shown = best or next(iter(baselines))
    report.samples = restoration_grid(pairs, baselines[shown], restored)
    report.grid_columns = len(report.samples) // 4
    report.title = f"rows: degraded, {shown}, restored ({ev.sampler} {ev.steps} steps), clean"
    report.notes["grid"] = f"rows: degraded, {shown}, restored, clean ({report.grid_columns} test images)"
    return report


def restoration_grid(pairs: RestorationPairs, baseline: torch.Tensor, restored: torch.Tensor) -> np.ndarray:
    """uint8 [4 * k, R, R, C]: k degraded observations (low-res ones shown with nearest-neighbour
    pixels), then their baseline, restored and clean images; k a row makes one row each."""
    k = min(GRID_COLUMNS, len(pairs))
    size = pairs.clean.shape[-1]
    degraded = torch.nn.functional.interpolate(pairs.observation[:k], size=(size, size), mode="nearest")
    return np.concatenate([to_uint8(x[:k]) for x in (degraded, baseline, restored, pairs.clean)])
