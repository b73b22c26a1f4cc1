"""Sample quality during training: FID and KID of a small sample budget (`train.eval_every`).

`val_loss` compares trials that share a diffusion process only; FID compares any two, so it is
what a sweep over noise schedules and prediction targets is judged by, and what gives a run its
FID curve in MLflow (`eval/fid`, `eval/kid`).

The budget (`train.eval_samples`, balanced over the classes) is drawn in chunks of CHUNK samples
with a DDIM sampler of `train.eval_sampler_steps` steps (a distillation student: its own sampler
and the step count of its round, unguided); chunk k is seeded by (evaluation.seed, k)
whichever rank draws it, so the figures do not depend on the number of workers. Each rank samples
and extracts Inception features for chunks rank, rank + W, ...; rank 0 gathers the features, scores
them against the cached features of the reference split (evaluation/stats.py; on a cache miss the
ranks extract those together too) and broadcasts the figures, so every rank reports the same ones.
Guidance, seed, reference split and the FID and KID settings are the `evaluation` section's, as
in the final evaluation; its larger budget makes that FID lower than these (FID is biased upwards
at small N), so compare curves with curves.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ditlab.config import ExperimentSpec
from ditlab.data import load_dataset, to_uint8
from ditlab.diffusion import GaussianDiffusion

CHUNK = 10  # samples per seeded chunk: the unit of work a rank takes


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SampleQuality:
    """Scores `train.eval_samples` samples of a DiT: {"fid", "kid", "sample_eval_seconds"}."""

    def __init__(self, spec: ExperimentSpec, diffusion: GaussianDiffusion, device: torch.device,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.spec, self.diffusion, self.device = spec, diffusion, device
        self.decode = decode  # a latent model's decoder: samples are scored as pixels
        # How samples are drawn: a distillation student changes these to its own (per round).
        self.sampler, self.steps, self.guidance = "ddim", spec.train.eval_sampler_steps, spec.evaluation.guidance
        self._reference: np.ndarray | None = None  # rank 0's reference features, loaded once
        self._reference_loaded = False  # on every rank: whether load_reference has run

    def __call__(self, model: nn.Module) -> dict[str, float]:
        tic = time.perf_counter()
        rank, world = _rank_and_world()
        num_chunks = -(-self.spec.train.eval_samples // CHUNK)
        self.load_reference(rank, world)
        mine = {k: self.chunk_features(model, k) for k in range(rank, num_chunks, world)}
        gathered = [mine]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
        figures = None
        if rank == 0:
            by_chunk = {k: f for part in gathered for k, f in part.items()}
            figures = self.score(np.concatenate([by_chunk[k] for k in range(num_chunks)]))
            figures["sample_eval_seconds"] = time.perf_counter() - tic
        if world > 1:
            box = [figures]
            dist.broadcast_object_list(box, src=0)
            figures = box[0]
        return figures

    @torch.no_grad()
    def chunk_features(self, model: nn.Module, k: int) -> np.ndarray:
        """Inception features of chunk k of the budget (in eval mode, the mode restored after)."""
        from ditlab.evaluation.features import inception_features
        from ditlab.evaluation.images import as_rgb_uint8
        from ditlab.sampling import LoadedCheckpoint, balanced_labels, generate

        train, ev = self.spec.train, self.spec.evaluation
        labels = balanced_labels(train.eval_samples, model.config.num_classes)[k * CHUNK : (k + 1) * CHUNK]
        was_training = model.training
        model.eval()
        ckpt = LoadedCheckpoint(model, self.diffusion, self.spec, step=0, decode=self.decode)
        images = generate(ckpt, labels, self.sampler, self.steps, self.guidance, seed=ev.seed * 10_007 + k,
                          batch_size=CHUNK, clip_x0=ev.clip_x0, device=self.device)
        model.train(was_training)
        return inception_features(as_rgb_uint8(to_uint8(images)), weights=ev.inception_weights,
                                  resize=ev.fid.resize)

    def score(self, fake: np.ndarray) -> dict[str, float]:
        from ditlab.evaluation import generative

        ev = self.spec.evaluation
        real = self._reference
        kid, _ = generative.kid(fake, real, ev.kid.num_subsets, ev.kid.subset_size, ev.kid.seed)
        return {"fid": generative.fid(fake, real), "kid": kid}

    def load_reference(self, rank: int, world: int) -> None:
        """Rank 0's features of `evaluation.reference_split`, from the cache the final evaluation
        shares. On a miss every rank extracts images rank, rank + W, ... and rank 0 stores the
        whole set: with one thread a worker, 360 images took one rank about 70 s while the
        others waited. Every rank takes part once, whether or not the cache had the entry."""
        if self._reference_loaded:
            return
        from ditlab.evaluation.features import inception_features
        from ditlab.evaluation.images import as_rgb_uint8
        from ditlab.evaluation.stats import (cached_reference_features, reference_entry, reference_features,
                                            store_reference_features)

        ev = self.spec.evaluation
        settings = {"resize": ev.fid.resize, "weights": ev.inception_weights}

        def split() -> tuple[np.ndarray, str]:  # the reference images, and what to call them
            data = load_dataset(self.spec.data, ev.reference_split)
            name = f"{data.name} {ev.reference_split} split ({len(data)} images, {self.spec.data.resolution}px)"
            return as_rgb_uint8(data.to_uint8()), name

        if world == 1:
            images, name = split()
            self._reference = reference_features(images, describe=name, **settings)
        else:
            images, name = split() if rank == 0 else (None, "")  # other ranks load it on a miss only
            entry = reference_entry(images, **settings) if rank == 0 else None
            found = cached_reference_features(entry, len(images)) if rank == 0 else None
            box = [found is not None]
            dist.broadcast_object_list(box, src=0)
            if box[0]:
                self._reference = found
            else:
                if images is None:
                    images, name = split()
                parts = [None] * world if rank == 0 else None  # only rank 0 receives the features
                dist.gather_object(inception_features(images[rank::world], **settings), parts, dst=0)
                if rank == 0:
                    self._reference = _interleave(parts)
                    store_reference_features(entry, images, self._reference, describe=name, **settings)
        self._reference_loaded = True


def _interleave(parts: list[np.ndarray]) -> np.ndarray:
    """Rows taken as parts[r] = rows[r::W], put back in their order."""
    out = np.empty((sum(len(p) for p in parts), parts[0].shape[1]), dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        out[r :: len(parts)] = part
    return out
