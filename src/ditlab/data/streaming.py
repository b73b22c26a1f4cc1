"""Training on a shard set without holding it: a Ray Data stream, split across the Ray Train ranks.

The driver builds one Ray Dataset (orchestration/trainer.py, training_stream) that runs through
every epoch the run needs ("epoch-unrolled"): its rows are (epoch, slot) pairs, and a read task
turns each into the images of one shard. The shuffle is a seeded block shuffle: the order of the
shards is a permutation drawn from (seed, epoch), and the rows inside each shard are permuted from
(seed, epoch, shard). Ray Train's `streaming_split` then deals the shards out to the ranks
(get_dataset_shard). With `preserve_order` on, the stream's order and the split are functions of the
seed alone, so a rank's k-th batch is the same in every execution: a resumed run re-creates the
stream and skips the batches before its step (it reads them again: seeding plus skipping).

Images stay uint8 through the object store and the prefetch queue; they become float in [-1, 1]
only as a batch (`StreamBatches.batch`), so a worker's memory is a few shards plus a few batches,
whatever the size of the set. A latent cache streams the same way: float16 latents, made float32
and multiplied by the cache's scale factor on the batch (data/shards.py, `to_float`).
"""

from __future__ import annotations

import numpy as np
import torch

from ditlab.data.shards import handed_filesystems, load_shard, to_float, use_filesystems

# No Ray here (data/ stays free of the orchestrator): orchestration/trainer.py builds the Ray Dataset
# from `shard_reads` and `ReadShard`, and the loop reads whatever `iter_batches` it is handed.


def epochs_needed(steps: int, batch_size: int, num_images: int, world_size: int) -> int:
    """Epochs in the stream: enough that every rank has `steps` full batches (the split hands each
    rank an equal share; each rank drops its own tail)."""
    per_rank_batch = batch_size // world_size
    epochs = 1
    while (epochs * num_images // world_size) // per_rank_batch < steps:
        epochs += 1
    return epochs


def epoch_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0]).permutation(num_shards)


class ReadShard:
    """A read task: one (epoch, slot) row -> the images of the shard in that slot of that epoch's
    order, rows permuted, uint8, with their positions in the split."""

    def __init__(self, location: str, entries: list[dict], seed: int):
        self.location, self.entries, self.seed = location, entries, seed
        # Built here, in the driver: a read task runs on any node, with or without AWS variables.
        self.filesystems = handed_filesystems(location)

    def __call__(self, row: dict) -> dict:
        use_filesystems(self.filesystems)
        epoch, slot = int(row["epoch"][0]), int(row["slot"][0])
        shard = int(epoch_order(self.seed, epoch, len(self.entries))[slot])
        entry = self.entries[shard]
        images, labels = load_shard(self.location, entry)
        order = np.random.default_rng([self.seed, epoch, 1 + shard]).permutation(len(labels))
        return {"image": images[order], "label": labels[order], "index": entry["offset"] + order}


def shard_reads(steps: int, batch_size: int, num_images: int, num_shards: int, world_size: int) -> list[dict]:
    """The stream's rows before reading: one (epoch, slot) per shard of every epoch the run needs."""
    epochs = epochs_needed(steps, batch_size, num_images, world_size)
    return [{"epoch": e, "slot": s} for e in range(epochs) for s in range(num_shards)]


class StreamBatches:
    """This rank's batches, in step order, from its share of the stream (a Ray DataIterator, or
    anything with the same `iter_batches`) of the shard set `manifest` describes. Resuming at
    `start_step` skips that many batches."""

    def __init__(self, stream, local_batch: int, manifest: dict, start_step: int = 0, prefetch_batches: int = 2):
        self.manifest = manifest
        self.num_images, self.num_classes = int(manifest["counts"]["train"]), int(manifest["num_classes"])
        self._batches = iter(stream.iter_batches(batch_size=local_batch, drop_last=True, batch_format="numpy",
                                                 prefetch_batches=prefetch_batches))
        self._step = 0
        while self._step < start_step:
            self._next()

    def __len__(self) -> int:
        return self.num_images

    def _next(self) -> dict:
        try:
            batch = next(self._batches)
        except StopIteration:
            raise RuntimeError(f"the data stream ended at step {self._step}") from None
        self._step += 1
        return batch

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images float [B, C, R, R]: pixels in [-1, 1] or scaled latents, labels, indices) of `step`;
        steps come in order."""
        if step != self._step:
            raise RuntimeError(f"stream batches are drawn in order: asked for step {step} at {self._step}")
        batch = self._next()
        return (to_float(batch["image"], self.manifest), torch.tensor(batch["label"], dtype=torch.long),
                torch.tensor(batch["index"], dtype=torch.long))
