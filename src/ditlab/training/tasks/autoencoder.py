"""`task: autoencoder`: a KL-regularized encoder/decoder trained with reconstruction, KL and
adversarial losses (Esser et al. 2021; the first stage of latent diffusion, Rombach et al. 2022).

Sections it reads: autoencoder (the preset), loss, train. Per step:

    generator: rec + kl_weight * KL [+ perceptual_weight * LPIPS] [+ adversarial_weight * lambda * G]
    discriminator (from loss.discriminator_start): hinge or non-saturating loss on real vs reconstructed

`rec` is the mean L1 or L2 error per pixel and KL is summed over latent elements then divided by the
pixel count, so `kl_weight` means what it means in latent diffusion (whose losses are sums over
pixels and latents). `lambda` is the adaptive weight (gradient-norm ratio at the decoder's last
layer) or 1. Two optimizers: the autoencoder's (the bundle's "optimizer") and the discriminator's
(with the discriminator, in "task_state"). Validation: L1 and PSNR of reconstructions of a fixed
slice of the test split. Evaluation: MSE, PSNR, SSIM, rFID (and LPIPS where local) of the
reconstructed test split against the originals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ditlab.config import EvaluationSpec, ExperimentSpec, from_dict
from ditlab.data import load_dataset, to_uint8
from ditlab.evaluation.reconstruction import lpips_unavailable_reason
from ditlab.models.autoencoder import Autoencoder, autoencoder_from_config, build_autoencoder
from ditlab.training.optim import adamw
from ditlab.training.tasks.adversarial import ADVERSARIAL_KEYS, Adversary
from ditlab.training.tasks.base import Batch, Task
from ditlab.training.validation import validation_set

log = logging.getLogger(__name__)

# Reported at every step, so every report window has the same keys before and after the
# discriminator starts (zeros before).
STEP_KEYS = ("loss", "rec_loss", "kl", "perceptual", *ADVERSARIAL_KEYS)


class AutoencoderTask(Task):
    name = "autoencoder"
    model: Autoencoder

    def __init__(self, spec: ExperimentSpec, num_classes: int, device: torch.device):
        super().__init__(spec, num_classes, device)
        train, loss = spec.train, spec.loss
        self.model = build_autoencoder(spec.autoencoder.name, input_size=spec.data.resolution,
                                       in_channels=spec.data.channels).to(device)
        self.forward_model: nn.Module = self.model
        self.optimizer = adamw(self.model.parameters(), lr=train.lr, betas=train.adam_betas,
                               weight_decay=train.weight_decay)
        self.adversary = Adversary(self, spec.data.channels) if loss.adversarial_weight > 0 else None
        self.perceptual = perceptual_loss(loss.perceptual_weight, device)
        val = validation_set(spec.data, train.val_images)
        self.validation_images = None if val is None else val.x0

    # -- one step ----------------------------------------------------------------------------------

    def step(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        loss_spec, x = self.spec.loss, batch.images
        cfg = self.model.config
        noise = torch.randn((len(x), cfg.latent_channels, cfg.latent_size, cfg.latent_size), generator=generator)
        figures = dict.fromkeys(STEP_KEYS, 0.0)
        adversarial = self.adversary is not None and self.adversary.active
        with self.autocast():
            recon, posterior = self.forward_model(x, noise.to(self.device))
            rec = reconstruction_loss(recon, x, loss_spec.reconstruction)
            if self.perceptual is not None:
                perceptual = self.perceptual(recon.float().clamp(-1, 1), x).mean()
                rec = rec + loss_spec.perceptual_weight * perceptual
                figures["perceptual"] = float(perceptual.detach())
            kl = posterior.kl().mean() / x[0].numel()
            loss = rec + loss_spec.kl_weight * kl
            if adversarial:
                loss = loss + self.adversary.generator_term(recon, rec, self.model.last_layer, figures)
        figures.update(loss=float(loss.detach()), rec_loss=float(rec.detach()), kl=float(kl.detach()))
        figures["grad_norm"] = self.optimize(loss, self.optimizer, self.model.parameters())
        if adversarial:
            figures.update(self.adversary.update(x, recon))
        if self.adversary is not None:
            self.adversary.end_step()
        return figures

    # -- validation and checkpoint state -------------------------------------------------------------

    @property
    def validates(self) -> bool:
        return self.validation_images is not None

    @torch.no_grad()
    def validation(self, weights: nn.Module) -> dict[str, float]:
        if self.validation_images is None:
            return {}
        recon = reconstruct(weights, self.validation_images, self.device)
        l1 = float((recon - self.validation_images).abs().mean())
        per_image = ((recon - self.validation_images) / 2).pow(2).flatten(1).mean(1)  # on [0, 1]
        return {"val_loss": l1, "val_psnr": float((10 * torch.log10(1.0 / per_image.clamp(min=1e-10))).mean())}

    # -- after training ----------------------------------------------------------------------------

    @classmethod
    def evaluate_checkpoint(cls, bundle: dict, source: str, ev: EvaluationSpec | None = None,
                            progress: bool = False, reference=None):
        """Reconstruct the test split (or `reference`'s images) with the weights `train.val_weights`
        names and score the reconstructions against the originals; rFID is their FID."""
        from ditlab.evaluation.reconstruction import mean_gradient_magnitude
        from ditlab.evaluation.suite import evaluate_pairs

        spec = from_dict(bundle["spec"], f"spec stored in {source}")
        ev = ev or spec.evaluation
        model = load_autoencoder(bundle, source)
        if reference is not None:
            originals, name = reference.images, reference.name
            originals = originals[..., :1] if spec.data.channels == 1 else originals
        else:
            data = load_dataset(spec.data, ev.reference_split)
            originals, name = data.to_uint8(), f"{data.name} {ev.reference_split} split"
        if ev.num_samples:
            originals = originals[: ev.num_samples]
        tic = time.perf_counter()
        images = torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        recon = to_uint8(reconstruct(model, images, torch.device("cpu"), ev.batch_size, progress))
        seconds = time.perf_counter() - tic
        report = evaluate_pairs(recon, originals, ev, name=f"{name} ({len(originals)} images)", fid_name="rfid",
                                progress=progress)
        sharp_recon, sharp_orig = mean_gradient_magnitude(recon), mean_gradient_magnitude(originals)
        report.figures.update(sharpness=sharp_recon, sharpness_original=sharp_orig,
                              sharpness_ratio=sharp_recon / max(sharp_orig, 1e-12),
                              eval_num_samples=float(len(originals)), eval_reconstruction_seconds=seconds)
        report.notes["reconstruction"] = (f"{spec.train.val_weights} weights, posterior mean, "
                                          f"{model.config.latent_channels}x{model.config.latent_size}"
                                          f"x{model.config.latent_size} latents")
        if spec.loss.perceptual_weight > 0:
            reason = lpips_unavailable_reason()
            if reason:
                report.notes["perceptual_loss"] = f"skipped in training: {reason}"
        pairs = np.stack([originals[:50], recon[:50]], axis=1).reshape(-1, *recon.shape[1:])
        report.samples, report.grid_columns = pairs, 10
        report.title = "originals (left) beside reconstructions (right)"
        return report


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    diff = recon.float() - target
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()


@torch.no_grad()
def reconstruct(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 256,
                progress: bool = False) -> torch.Tensor:
    """Decoded posterior means of `images` ([-1, 1]), clamped to [-1, 1], on the CPU, in eval mode."""
    was_training = model.training
    model.eval()
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="reconstructing", unit="batch")
    out = [model(images[i: i + batch_size].to(device))[0].float().clamp(-1, 1).cpu() for i in starts]
    model.train(was_training)
    return torch.cat(out)


def load_autoencoder(bundle: dict, source: str) -> Autoencoder:
    """The autoencoder of a `task: autoencoder` bundle, with the weights its spec validates with
    (`train.val_weights`: EMA by default), in eval mode."""
    config = bundle.get("model_config", {})
    if bundle.get("spec", {}).get("task") != "autoencoder" or config.get("kind") != "autoencoder":
        task = bundle.get("spec", {}).get("task", "unknown")
        raise ValueError(f"{str(source)!r} is not an autoencoder checkpoint (task {task!r})")
    model = autoencoder_from_config(config)
    weights = bundle["spec"].get("train", {}).get("val_weights", "ema")
    model.load_state_dict(bundle["ema"]["model"] if weights == "ema" else bundle["model"])
    return model.eval()


def perceptual_loss(weight: float, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """LPIPS as a training loss when `weight` > 0 and its weights are on disk; else None, with a
    note in the log (the evaluation report repeats it). Never downloads."""
    if weight <= 0:
        return None
    reason = lpips_unavailable_reason()
    if reason:
        log.warning("loss.perceptual_weight=%s: perceptual loss skipped: %s", weight, reason)
        return None
    import lpips

    net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)

    def distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape[1] == 1:  # LPIPS' AlexNet takes RGB
            pred, target = pred.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        size = max(64, pred.shape[-1])  # AlexNet's stride-4 stem leaves little of a 16px image
        return net(F.interpolate(pred, size=size, mode="bilinear"), F.interpolate(target, size=size, mode="bilinear"))

    return distance
