"""Benchmark: ditlab's FID against clean-fid's `compute_fid`, same folders, same weights, one process.

    python benchmarks/fid_vs_cleanfid.py [--num 200] [--size 32] [--repeats 2]

Writes two folders of digits (a shifted "fake" set and a "real" set), then times each
implementation end to end (read files, clean resize, Inception, statistics, FID) alternately,
and prints both values, the best times and the ratio clean-fid / ditlab (>= 1: ditlab no slower).
The reference-statistics cache is off, so both extract features for both folders.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_digits(folder: Path, num: int, size: int, seed: int, shift: int) -> None:
    from ditlab.data.digits import load_digits_arrays, resize_to

    raw, _ = load_digits_arrays()
    idx = np.random.default_rng(seed).choice(len(raw), num, replace=False)
    imgs = ((resize_to(raw[idx], size, 3) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    folder.mkdir(parents=True)
    for i, img in enumerate(np.roll(imgs, shift, axis=2)):
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def ditlab_fid(fake: Path, real: Path) -> float:
    from ditlab.evaluation.features import inception_features
    from ditlab.evaluation.generative import fid
    from ditlab.evaluation.images import load_image_folder

    return fid(inception_features(load_image_folder(fake)), inception_features(load_image_folder(real)))


def cleanfid_fid(fake: Path, real: Path) -> float:
    from cleanfid import fid as cleanfid

    from ditlab.evaluation.features import load_inception

    # clean-fid hands over clean-resized NCHW batches. The same file's TorchScript network runs them
    # as loaded, as clean-fid runs its own copy of it; not ditlab's eager, batch-norm-folded copy
    # (`.layers`), which is part of what is being compared.
    class Extractor(torch.nn.Module):
        def forward(self, x):
            return load_inception().scripted_layers((x - 128) / 128).reshape(len(x), -1)

    return float(cleanfid.compute_fid(str(fake), str(real), mode="clean", custom_feat_extractor=Extractor(),
                                      device=torch.device("cpu"), num_workers=0, batch_size=50, verbose=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=200, help="images per folder")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from ditlab.evaluation.features import load_inception

    load_inception()  # load the weights once, outside the timings
    results: dict[str, dict] = {"ditlab": {"seconds": []}, "clean-fid": {"seconds": []}}
    with tempfile.TemporaryDirectory() as tmp:
        fake, real = Path(tmp) / "fake", Path(tmp) / "real"
        write_digits(fake, args.num, args.size, seed=1, shift=1)
        write_digits(real, args.num, args.size, seed=2, shift=0)
        for _ in range(args.repeats):
            for name, fn in (("ditlab", ditlab_fid), ("clean-fid", cleanfid_fid)):
                tic = time.perf_counter()
                results[name]["fid"] = fn(fake, real)
                results[name]["seconds"].append(time.perf_counter() - tic)
    ours, theirs = min(results["ditlab"]["seconds"]), min(results["clean-fid"]["seconds"])
    fid_ours, fid_theirs = results["ditlab"]["fid"], results["clean-fid"]["fid"]
    summary = {
        "images_per_folder": args.num, "image_size": args.size, "threads": torch.get_num_threads(),
        "fid_ditlab": fid_ours, "fid_cleanfid": fid_theirs,
        "relative_difference": abs(fid_ours - fid_theirs) / fid_theirs,
        "seconds_ditlab_best": ours, "seconds_cleanfid_best": theirs,
        "speed_ratio_cleanfid_over_ditlab": theirs / ours,
        "all_seconds": {k: v["seconds"] for k, v in results.items()},
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
