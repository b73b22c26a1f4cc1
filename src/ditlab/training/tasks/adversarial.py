"""The adversarial term a task adds to its loss (`loss.adversarial_weight` > 0): a patch
discriminator with its own optimizer, trained from `loss.discriminator_start` on.

The autoencoder task applies it to reconstructions, the generation task to the denoiser's predicted
clean image. Per step the task calls `generator_term` inside its forward pass (the generator's
weighted term, added to its loss), then `update` with the real and generated images (one
discriminator step), then `end_step`. The discriminator, its optimizer and the step count are the
task's extra checkpoint state (`state_dict`), so resume is exact with the discriminator active.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ditlab.models.adversarial import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from ditlab.training.optim import adamw

# Reported at every step of a task with a discriminator (zeros before it starts), so each report
# window has the same keys.
ADVERSARIAL_KEYS = ("g_loss", "d_loss", "d_weight", "logits_real", "logits_fake")


class Adversary:
    """`task` is the Task that owns it (its spec, device, autocast and optimize are used)."""

    def __init__(self, task, in_channels: int):
        loss, train = task.spec.loss, task.spec.train
        self.task, self.loss = task, loss
        self.discriminator = PatchDiscriminator(in_channels, loss.discriminator_channels,
                                                loss.discriminator_layers).to(task.device)
        self.forward: nn.Module = self.discriminator  # DDP-wrapped by `wrap`
        self.optimizer = adamw(self.discriminator.parameters(), lr=train.lr, betas=train.adam_betas,
                               weight_decay=train.weight_decay)
        self.steps_done = 0  # the loop's step, for loss.discriminator_start (restored on resume)

    @property
    def active(self) -> bool:
        return self.steps_done >= self.loss.discriminator_start

    def wrap(self, wrap_model) -> None:
        self.forward = wrap_model(self.discriminator)

    def generator_term(self, fake: torch.Tensor, reference_loss: torch.Tensor, last_layer: torch.Tensor,
                       figures: dict[str, float]) -> torch.Tensor:
        """adversarial_weight * lambda * G(D(fake)), where lambda is the adaptive weight (the ratio of
        `reference_loss`'s and G's gradient norms at `last_layer`) or 1; `g_loss` and `d_weight`
        (adversarial_weight * lambda) go into `figures`."""
        g_loss = generator_loss(self.forward(fake), self.loss.discriminator_loss)
        lam = adaptive_weight(reference_loss, g_loss, last_layer) if self.loss.adaptive_weight else 1.0
        weight = self.loss.adversarial_weight * lam
        figures.update(g_loss=float(g_loss.detach()), d_weight=float(weight))
        return weight * g_loss

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        """One discriminator step on real and generated (detached) images, in one forward pass:
        one forward per backward, as DistributedDataParallel expects."""
        with self.task.autocast():
            real_logits, fake_logits = self.forward(torch.cat([real, fake.detach()])).float().chunk(2)
            d_loss = discriminator_loss(real_logits, fake_logits, self.loss.discriminator_loss)
        self.task.optimize(d_loss, self.optimizer, self.discriminator.parameters())
        return {"d_loss": float(d_loss.detach()), "logits_real": float(real_logits.detach().mean()),
                "logits_fake": float(fake_logits.detach().mean())}

    def end_step(self) -> None:
        self.steps_done += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "discriminator": self.discriminator.state_dict(),
                "discriminator_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "discriminator" in state:  # absent when the checkpoint was written without a discriminator
            self.steps_done = int(state["steps_done"])
            self.discriminator.load_state_dict(state["discriminator"])
            self.optimizer.load_state_dict(state["discriminator_optimizer"])
