"""`task: generation`: a class-conditional DiT trained as a denoiser (the default task).

Sections it reads: model, diffusion, train. One AdamW optimizer; label dropout (for classifier-free
guidance) drawn from the step's generator; validation loss on a fixed slice of the test split;
evaluation by sampling the EMA weights and scoring FID, KID, precision/recall, classifier score and
conditional accuracy against the dataset's split.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ditlab.builders import build_diffusion, build_dit
from ditlab.config import EvaluationSpec, ExperimentSpec
from ditlab.data import to_uint8
from ditlab.diffusion import training_losses
from ditlab.training.tasks.base import Batch, Task
from ditlab.training.validation import validation_loss, validation_set


class GenerationTask(Task):
    name = "generation"

    def __init__(self, spec: ExperimentSpec, num_classes: int, device: torch.device):
        super().__init__(spec, num_classes, device)
        train = spec.train
        self.model = build_dit(spec, num_classes).to(device)
        self.forward_model: nn.Module = self.model  # DDP-wrapped by `wrap`
        self.diffusion = build_diffusion(spec)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=train.lr,
                                           betas=train.adam_betas, weight_decay=train.weight_decay)
        self.validation_data = validation_set(spec.data, train.val_images)

    def step(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        # Drawn on the CPU from the step's generator (same order as before the Task seam), then moved.
        n = len(batch)
        t = torch.randint(self.diffusion.num_timesteps, (n,), generator=generator)
        noise = torch.randn(batch.images.shape, generator=generator)
        drop = torch.rand(n, generator=generator) < self.spec.model.class_dropout_prob
        t, noise, drop = (v.to(self.device) for v in (t, noise, drop))
        with self.autocast():
            terms = training_losses(self.forward_model, self.diffusion, batch.images, t, batch.labels, noise, drop)
        grad_norm = self.optimize(terms["loss"].mean(), self.optimizer, self.model.parameters())
        return {**{k: float(v.detach().mean()) for k, v in terms.items()}, "grad_norm": grad_norm}

    @property
    def validates(self) -> bool:
        return self.validation_data is not None

    def validation(self, weights: nn.Module) -> dict[str, float]:
        if self.validation_data is None:
            return {}
        return {"val_loss": validation_loss(weights, self.diffusion, self.validation_data, self.device)}

    @classmethod
    def evaluate_checkpoint(cls, bundle: dict, source: str, ev: EvaluationSpec | None = None,
                            progress: bool = False, reference=None):
        """Sample from the checkpoint's EMA weights with `ev` (default: the spec's own evaluation
        settings) and compare with `reference` (default: the split of its training dataset that `ev`
        names)."""
        from ditlab.evaluation.suite import Report, check_set_sizes, dataset_reference, evaluate_sets
        from ditlab.sampling import balanced_labels, from_bundle, generate

        ckpt = from_bundle(bundle, source, "ema")
        ev = ev or ckpt.spec.evaluation
        if ev.num_samples:
            check_set_sizes(ev, ev.num_samples)
        labels = balanced_labels(ev.num_samples, ckpt.model.config.num_classes)
        tic = time.perf_counter()
        images = generate(ckpt, labels, ev.sampler, ev.steps, ev.guidance, ev.seed, ev.batch_size, ev.clip_x0,
                          progress=progress)
        sampling_seconds = time.perf_counter() - tic
        if ev.num_samples == 0:
            return Report({"eval_num_samples": 0.0}, {"evaluation": "skipped: evaluation.num_samples is 0"},
                          settings=ev.model_dump(mode="json"))
        reference = reference or dataset_reference(ckpt.spec.data, ev.reference_split)
        report = evaluate_sets(to_uint8(images), reference, ev, fake_labels=labels.numpy(), progress=progress)
        report.figures.update(eval_num_samples=float(len(labels)), eval_sampling_seconds=sampling_seconds)
        report.notes["sampler"] = (f"{ev.sampler}, {ev.steps} steps, guidance {ev.guidance}, seed {ev.seed}, "
                                   "EMA weights")
        report.title = f"EMA samples, {ev.sampler} {ev.steps} steps, guidance {ev.guidance}"
        return report
