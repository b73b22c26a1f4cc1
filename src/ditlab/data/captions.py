"""Captions for text-conditioned generation (`model.conditioning: text`).

Every training image gets one or more captions; each step draws one of them. Digits (and folder
datasets without captions) get captions from phrasing templates filled with the class name, for
digits also the numeral: "a handwritten seven", "the digit 7". The templates come in two sets:
TRAIN_PHRASINGS are the only ones training sees; HELDOUT_PHRASINGS are never trained on and are what
evaluation samples from, so `conditional_accuracy` of a text model measures whether it understood
captions worded in ways it has not seen, not whether it memorised a few strings.

A folder dataset may carry `captions.jsonl` at its root: one JSON object per line,
`{"image": "<class>/<file>", "caption": "..."}` (several lines may caption one image). Images it does
not caption fall back to the class templates. A line naming an image that is missing on disk or
not part of the dataset is an error naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CAPTIONS_FILE = "captions.jsonl"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {word}: the class name ("seven"); {num}: the numeral for digits, the class name for folders.
TRAIN_PHRASINGS = (
    "a handwritten {word}",
    "the digit {num}",
    "{word}, drawn with a thick stroke",
    "a picture of the number {word}",
    "number {num} written by hand",
    "an image of a {word}",
)
HELDOUT_PHRASINGS = (
    "a scanned {word} on a small grid",
    "someone wrote {num} here",
    "this looks like the numeral {word}",
)


class CaptionError(ValueError):
    """A captions file that cannot be used; the message names the file and line."""


def fill(phrasings: tuple[str, ...], word: str, num: str) -> list[str]:
    return [p.format(word=word, num=num) for p in phrasings]


@dataclass(frozen=True)
class CaptionBank:
    """The captions of one split: `per_item[i]` lists the captions of the split's i-th image;
    `heldout[k]` the unseen-phrasing captions of class k (what evaluation samples from)."""

    per_item: list[list[str]]
    heldout: list[list[str]]

    def draw(self, indices: torch.Tensor, generator: torch.Generator, word_dropout: float = 0.0) -> list[str]:
        """One caption per index, chosen with `generator` (the training step's own); with
        `word_dropout`, each word is left out with that probability (one is always kept), so the
        model learns from any subset of a caption's words, as a new phrasing presents them."""
        choices = torch.randint(1 << 30, (len(indices),), generator=generator).tolist()
        captions = [self.per_item[i][c % len(self.per_item[i])] for i, c in zip(indices.tolist(), choices, strict=True)]
        return [drop_words(c, word_dropout, generator) for c in captions] if word_dropout else captions

    def first(self, indices: torch.Tensor) -> list[str]:
        """The first caption of each index: a fixed choice (validation)."""
        return [self.per_item[i][0] for i in indices.tolist()]

    def for_labels(self, labels: torch.Tensor) -> list[str]:
        """Unseen-phrasing captions for `labels`, cycling through each class's phrasings."""
        seen = [0] * len(self.heldout)
        out = []
        for k in labels.tolist():
            out.append(self.heldout[k][seen[k] % len(self.heldout[k])])
            seen[k] += 1
        return out


def drop_words(caption: str, p: float, generator: torch.Generator) -> str:
    words = caption.split()
    keep = torch.rand(len(words), generator=generator) >= p
    if not keep.any():
        keep[torch.randint(len(words), (1,), generator=generator)] = True
    return " ".join(w for w, k in zip(words, keep.tolist(), strict=True) if k)


def class_names(data_spec) -> list[tuple[str, str]]:
    """(word, numeral) of each class: digit words for digits, the folder names for a folder."""
    if data_spec.source == "digits":
        return [(w, str(i)) for i, w in enumerate(DIGIT_WORDS)]
    from ditlab.data.folder import scan_image_folder

    _, _, classes = scan_image_folder(data_spec.path)
    return [(c.replace("_", " "), c.replace("_", " ")) for c in classes]


def heldout_captions(data_spec) -> list[list[str]]:
    return [fill(HELDOUT_PHRASINGS, w, n) for w, n in class_names(data_spec)]


def load_caption_bank(data_spec, split: str) -> CaptionBank:
    """Captions of the `split` ("train", "test" or "all") images, in load_dataset's order."""
    labels, files = split_labels_and_files(data_spec, split)
    names = class_names(data_spec)
    templated = [fill(TRAIN_PHRASINGS, w, n) for w, n in names]
    per_item = [list(templated[k]) for k in labels.tolist()]
    if files is not None:
        given = read_captions_file(data_spec.path)
        for i, f in enumerate(files):
            per_item[i] = given.get(Path(f).resolve(), per_item[i])
    return CaptionBank(per_item, [fill(HELDOUT_PHRASINGS, w, n) for w, n in names])


def read_captions_file(root: str | Path) -> dict[Path, list[str]]:
    """{resolved image path: its captions} from <root>/captions.jsonl ({} when there is none)."""
    from ditlab.data.folder import scan_image_folder

    path = Path(root) / CAPTIONS_FILE
    if not path.is_file():
        return {}
    known = {f.resolve() for f in scan_image_folder(root)[0]}
    captions: dict[Path, list[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            entry = json.loads(line)
        except ValueError:
            raise CaptionError(f"{where}: not a JSON object") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
                or not isinstance(entry.get("caption"), str) or not entry["caption"].strip():
            raise CaptionError(f'{where}: expected {{"image": "<class>/<file>", "caption": "<text>"}}')
        image = (Path(root) / entry["image"]).resolve()
        if not image.is_file():
            raise CaptionError(f"{where}: image {entry['image']!r} does not exist")
        if image not in known:
            raise CaptionError(f"{where}: image {entry['image']!r} is not an image of the dataset "
                               "(not in a class subfolder, or not a known image type)")
        captions.setdefault(image, []).append(entry["caption"].strip())
    return captions


def check_captions(data_spec) -> None:
    """The preflight check of a text spec's data: its captions file (if any) reads."""
    if data_spec.source == "folder" and data_spec.path:
        read_captions_file(data_spec.path)


def split_labels_and_files(data_spec, split: str) -> tuple[np.ndarray, list[Path] | None]:
    """The labels (and, for a folder, the image files) of `split`, in load_dataset's order."""
    from ditlab.data import stratified_split

    if data_spec.source == "digits":
        from ditlab.data.digits import load_digits_arrays

        labels, files = load_digits_arrays()[1], None
    else:
        from ditlab.data.folder import scan_image_folder

        files, labels, _ = scan_image_folder(data_spec.path)
    if split != "all":
        train, test = stratified_split(labels, data_spec.test_fraction, data_spec.split_seed)
        keep = train if split == "train" else test
        labels, files = labels[keep], None if files is None else [files[i] for i in keep]
    return labels, files
