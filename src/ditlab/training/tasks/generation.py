"""`task: generation`: a class-conditional DiT trained as a denoiser (the default task).

Sections it reads: model, diffusion, loss, train. One AdamW optimizer; label dropout (for
classifier-free guidance) drawn from the step's generator; validation loss on a fixed slice of the
test split; FID and KID of a small sample budget every `train.eval_every` steps; evaluation by
sampling the EMA weights and scoring FID, KID, precision/recall, classifier score and conditional
accuracy against the dataset's split.

With `loss.adversarial_weight` > 0, a patch discriminator judges the denoiser's predicted clean
image x0_hat (from its eps, v or x0 output at x_t) against the batch's real images, from step
`loss.discriminator_start` on:

    generator: diffusion loss + adversarial_weight * lambda * G(D(x0_hat))
    discriminator: hinge or non-saturating loss on [real, x0_hat] in one forward pass

`lambda` is the adaptive weight (loss.adaptive_weight; Esser et al. 2021): the ratio of the
diffusion loss's and the adversarial term's gradient norms at the DiT's final linear layer (the
output head plays the part of a decoder's last layer), else 1. x0_hat is not clipped: at high noise
levels an eps-model's x0_hat is far outside [-1, 1] and the discriminator tells it apart easily;
the adaptive weight keeps that term's gradient at the diffusion loss's size. The discriminator and
its optimizer live in the bundle's "task_state". The reported `loss` stays the diffusion loss, so
runs with and without the term compare; `g_loss`, `d_loss`, `d_weight` (adversarial_weight *
lambda, 0 before the start) and the mean logits are reported beside it.

With `model.conditioning: text` the same task trains on captions (data/captions.py, models/text.py):
each step draws one of every image's training captions from the step's generator, after the draws
above, and the label dropout mask becomes caption dropout (the null caption). Validation scores each
image with a fixed training caption; evaluation samples captions in phrasings training never saw, so
`conditional_accuracy` is the accuracy on unseen phrasings.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ditlab.builders import build_diffusion, build_dit
from ditlab.config import EvaluationSpec, ExperimentSpec
from ditlab.data import to_uint8
from ditlab.data.captions import load_caption_bank
from ditlab.diffusion import training_losses
from ditlab.models.text import caption_inputs, check_encoder
from ditlab.training.optim import adamw
from ditlab.training.sample_quality import SampleQuality
from ditlab.training.tasks.adversarial import ADVERSARIAL_KEYS, Adversary
from ditlab.training.tasks.base import Batch, Task
from ditlab.training.validation import ValidationSet, validation_loss, validation_set


class GenerationTask(Task):
    name = "generation"

    def __init__(self, spec: ExperimentSpec, num_classes: int, device: torch.device):
        super().__init__(spec, num_classes, device)
        train, loss = spec.train, spec.loss
        test, self.latent = None, None  # on latents: the encoded test split, the cache's record
        if spec.latent.autoencoder:
            from ditlab.latents import load_latent_split

            test, meta = load_latent_split(spec, "test")
            self.latent = {k: meta[k] for k in ("autoencoder", "autoencoder_sha256", "scale_factor")}
        self.model = build_dit(spec, num_classes, None if test is None else tuple(test.images.shape[1:])).to(device)
        self.forward_model: nn.Module = self.model  # DDP-wrapped by `wrap`
        self.diffusion = build_diffusion(spec)
        self.optimizer = adamw([p for p in self.model.parameters() if p.requires_grad], lr=train.lr,
                               betas=train.adam_betas, weight_decay=train.weight_decay)
        self.validation_data = validation_set(spec.data, train.val_images, test)
        self.captions = None  # text conditioning: the train split's captions (data/captions.py)
        if spec.model.conditioning == "text":
            self.captions = load_caption_bank(spec.data, "train")
            if spec.model.text_encoder == "learned":
                self.model.text.encoder.learn_vocabulary(sorted({c for item in self.captions.per_item for c in item}))
            self.validation_data = captioned_validation_set(spec, self.model.config, self.validation_data)
        self.sample_scorer = None
        if train.eval_every:
            from ditlab.latents import LatentDecoder

            decode = LatentDecoder(spec, self.latent) if self.latent else None
            self.sample_scorer = SampleQuality(spec, self.diffusion, device, decode)
        self.adversary = Adversary(self, self.model.config.in_channels) if loss.adversarial_weight > 0 else None

    # -- latent diffusion (latent.autoencoder) ------------------------------------------------------

    @classmethod
    def preflight(cls, spec: ExperimentSpec) -> None:
        """A latent spec's autoencoder: present, intact, an autoencoder, fit for the data, and its
        latents divisible by the DiT's patch size; its latent cache, if written, intact."""
        if spec.model.conditioning == "text":
            from ditlab.data.captions import check_captions

            check_encoder(spec.model.text_encoder)
            check_captions(spec.data)
        if not spec.latent.autoencoder:
            return
        from ditlab.latents import check_latent_cache, open_autoencoder
        from ditlab.models.registry import PRESETS

        autoencoder = open_autoencoder(spec)
        channels, size, _ = autoencoder.latent_shape
        patch = PRESETS[spec.model.name].patch_size
        if size % patch:
            raise ValueError(f"model.name: the {size}x{size}x{channels} latents of latent.autoencoder are not "
                             f"divisible by the patch size {patch} of {spec.model.name}")
        check_latent_cache(spec, autoencoder)

    @classmethod
    def training_data(cls, spec: ExperimentSpec):
        if not spec.latent.autoencoder:
            return super().training_data(spec)
        from ditlab.latents import load_latent_split

        return load_latent_split(spec, "train")[0]

    @classmethod
    def stream_location(cls, spec: ExperimentSpec) -> str:
        """On latents the stream reads the latent cache (a shard set too), encoding it first if missing;
        made absolute, as read tasks run in folders of their own."""
        if not spec.latent.autoencoder:
            return super().stream_location(spec)
        from ditlab.data.shards import normalize
        from ditlab.latents import ensure_latent_cache

        return normalize(ensure_latent_cache(spec)[0])

    def check_latent_record(self, state: dict[str, Any]) -> None:
        """On resume: the latents must come from the autoencoder the checkpoint was trained on."""
        recorded = state.get("latent")
        if recorded and self.latent and recorded["autoencoder_sha256"] != self.latent["autoencoder_sha256"]:
            raise ValueError(f"latent.autoencoder: {self.latent['autoencoder']} has SHA-256 "
                             f"{self.latent['autoencoder_sha256'][:16]}..., the checkpoint was trained on latents "
                             f"of {recorded['autoencoder_sha256'][:16]}...")

    # -- one step ----------------------------------------------------------------------------------

    def step(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        # Drawn on the CPU from the step's generator (same order as before the Task seam), then moved.
        n = len(batch)
        t = torch.randint(self.diffusion.num_timesteps, (n,), generator=generator)
        noise = torch.randn(batch.images.shape, generator=generator)
        drop = torch.rand(n, generator=generator) < self.spec.model.class_dropout_prob
        t, noise, drop = (v.to(self.device) for v in (t, noise, drop))
        if self.captions is not None:  # one of each image's training captions, drawn after the above
            captions = self.captions.draw(batch.indices.cpu(), generator, self.spec.model.word_dropout)
            batch = replace(batch, labels=caption_inputs(self.model.config, captions).to(self.device))
        if self.adversary is None:
            def losses(s: slice) -> dict[str, torch.Tensor]:  # of samples s (micro-batches: train.grad_accumulation)
                return training_losses(self.forward_model, self.diffusion, batch.images[s], t[s], batch.labels[s],
                                       noise[s], drop[s])

            terms, grad_norm = self.accumulate(losses, n, self.optimizer, self.model.parameters())
            return {**{k: float(v.detach().mean()) for k, v in terms.items()}, "grad_norm": grad_norm}
        return self.adversarial_step(batch, t, noise, drop)

    def adversarial_step(self, batch: Batch, t: torch.Tensor, noise: torch.Tensor,
                         drop: torch.Tensor) -> dict[str, float]:
        """The diffusion loss plus the adversarial term on x0_hat, then a discriminator update."""
        active = self.adversary.active
        outputs: list[torch.Tensor] = []

        def recorded(*args):  # training_losses' forward pass, its output kept for x0_hat
            outputs.append(self.forward_model(*args))
            return outputs[-1]

        figures = dict.fromkeys(ADVERSARIAL_KEYS, 0.0)
        with self.autocast():
            terms = training_losses(recorded, self.diffusion, batch.images, t, batch.labels, noise, drop)
            loss = terms["loss"].mean()
            total = loss
            if active:
                x_t = self.diffusion.q_sample(batch.images, t, noise)
                channels = batch.images.shape[1]
                x0_hat, _ = self.diffusion.to_x0_eps(outputs[0][:, :channels].float(), x_t, t)
                # The DiT's output head plays the part of a decoder's last layer for the adaptive weight.
                total = loss + self.adversary.generator_term(x0_hat, loss, self.model.final_layer.linear.weight,
                                                             figures)
        figures.update({k: float(v.detach().mean()) for k, v in terms.items()})
        figures["grad_norm"] = self.optimize(total, self.optimizer, self.model.parameters())
        if active:
            figures.update(self.adversary.update(batch.images, x0_hat))
        self.adversary.end_step()
        return figures

    # -- validation, sample quality and checkpoint state ---------------------------------------------

    @property
    def validates(self) -> bool:
        return self.validation_data is not None

    def validation(self, weights: nn.Module) -> dict[str, float]:
        if self.validation_data is None:
            return {}
        return {"val_loss": validation_loss(weights, self.diffusion, self.validation_data, self.device)}

    def sample_quality(self, weights: nn.Module) -> dict[str, float]:
        return self.sample_scorer(weights) if self.sample_scorer is not None else {}

    def extra_state(self) -> dict[str, Any]:
        """The discriminator's state (base class) and, on latents, the autoencoder's record."""
        return {**super().extra_state(), **({"latent": dict(self.latent)} if self.latent else {})}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.check_latent_record(state)
        super().load_extra_state(state)

    # -- after training ----------------------------------------------------------------------------

    @classmethod
    def evaluate_checkpoint(cls, bundle: dict, source: str, ev: EvaluationSpec | None = None,
                            progress: bool = False, reference=None):
        """Sample from the checkpoint's EMA weights with `ev` (default: the spec's own evaluation
        settings) and compare with `reference` (default: the split of its training dataset that `ev`
        names)."""
        from ditlab.sampling import from_bundle

        ckpt = from_bundle(bundle, source, "ema")
        return score_samples(ckpt, ev or ckpt.spec.evaluation, reference, progress)


def captioned_validation_set(spec: ExperimentSpec, config, val: ValidationSet | None) -> ValidationSet | None:
    """A text model's validation set: the first training phrasing of each image's class in place of its
    label (fixed, so val_loss compares across steps; a folder's captions.jsonl is not used here)."""
    if val is None:
        return None
    from ditlab.data.captions import TRAIN_PHRASINGS, CaptionBank, class_names, fill

    bank = CaptionBank([fill(TRAIN_PHRASINGS, w, n) for w, n in class_names(spec.data)], [])
    return replace(val, y=caption_inputs(config, bank.first(val.y)))


def score_samples(ckpt, ev: EvaluationSpec, reference=None, progress: bool = False):
    """Draw `ev.num_samples` class-balanced samples of a loaded checkpoint with `ev`'s sampler, steps,
    guidance and seed, and score them against `reference` (default: the checkpoint's dataset split
    that `ev` names): an evaluation.suite.Report, with the sampling time among its figures."""
    from ditlab.evaluation.suite import Report, check_set_sizes, dataset_reference, evaluate_sets
    from ditlab.sampling import balanced_labels, generate

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
    report.notes["sampler"] = f"{ev.sampler}, {ev.steps} steps, guidance {ev.guidance}, seed {ev.seed}, EMA weights"
    report.title = f"EMA samples, {ev.sampler} {ev.steps} steps, guidance {ev.guidance}"
    if ev.inspect_samples:  # attention maps and the denoising trajectory, traced when first written
        from ditlab.interpret import report_plots

        report.plots.update(report_plots(ckpt, ev, ev.inspect_samples))
    return report
