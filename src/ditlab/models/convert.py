"""DiT weights in the layouts users already hold, to and from ours.

Two layouts exist in the wild:

- facebookresearch/DiT: a plain state dict (`DiT-XL-2-256x256.pt`). Our module tree follows that
  code, so the keys differ only in the patch embedder (timm's `PatchEmbed` wraps its convolution
  as `x_embedder.proj`; ours is the convolution itself).
- diffusers' `DiTTransformer2DModel` (a folder with `config.json` and safetensors). The same
  network under other names, with three differences that matter when converting:
  q, k and v are separate linears (ours is one fused `qkv`); every block holds its own copy of
  the timestep and class embedders (the DiT code has one of each); and diffusers' timestep
  embedding divides the frequency exponent by `half - 1` where the DiT code divides by `half`,
  and the LayerNorm before each MLP has diffusers' `norm_eps` (default 1e-5; DiT's code 1e-6).
  We keep the last two as `DiTConfig.frequency_shift` and `mlp_norm_eps`, so a converted model
  computes what its source computed, to float rounding.

`load_dit(path)` reads either, `save_dit` writes either, `from_ditlab` takes a loaded ditlab
checkpoint bundle; `ditlab convert` does it all from the command line. diffusers is needed only
for its own layout: `pip install 'ditlab[bench]'`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ditlab.models.dit import DiT, DiTConfig
from ditlab.models.registry import SIZES

LAYOUTS = ("ditlab", "facebook", "diffusers")

# Heads cannot be read off the weights: take the DiT paper's count for the model's width.
HEADS_BY_WIDTH = {hidden: heads for _, hidden, heads in SIZES.values()}


class ConversionError(ValueError):
    """Weights that do not fit the layout they were read as."""


# -- facebookresearch/DiT ----------------------------------------------------------------------------

def from_facebook(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> DiT:
    """A DiT from a facebookresearch/DiT state dict; its config is read off the weights' shapes."""
    ours = {_facebook_to_ours(k): v for k, v in state_dict.items()}
    model = DiT(config_from_weights(ours, num_heads))
    model.load_state_dict(ours)
    return model


def to_facebook(model: DiT) -> dict[str, torch.Tensor]:
    """The state dict facebookresearch/DiT's `DiT_models[...]` loads with `load_state_dict`."""
    c = model.config
    if c.cond_channels or c.frequency_shift or c.mlp_norm_eps != 1e-6:
        raise ConversionError("facebookresearch/DiT has no conditioning image, and only its own timestep "
                              "embedding (frequency_shift 0) and LayerNorm eps (1e-6)")
    return {_ours_to_facebook(k): v.detach().clone() for k, v in model.state_dict().items()}


def _facebook_to_ours(key: str) -> str:
    return key.replace("x_embedder.proj.", "x_embedder.", 1)


def _ours_to_facebook(key: str) -> str:
    return key.replace("x_embedder.", "x_embedder.proj.", 1) if key.startswith("x_embedder.") else key


def config_from_weights(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> DiTConfig:
    """The DiTConfig that state dict `sd` (our key names) was made from."""
    try:
        embed = sd["x_embedder.weight"]  # [hidden, in_channels (+ cond), p, p]
        tokens = sd["pos_embed"].shape[1]
        classes_rows = sd["y_embedder.embedding_table.weight"].shape[0]
        out = sd["final_layer.linear.weight"].shape[0]
    except KeyError as err:
        raise ConversionError(f"not a DiT state dict: no {err.args[0]!r}") from None
    hidden, channels, patch = embed.shape[0], embed.shape[1], embed.shape[2]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    out_channels = out // (patch * patch)
    learn_sigma = out_channels == 2 * channels
    heads = num_heads or HEADS_BY_WIDTH.get(hidden)
    if heads is None:
        raise ConversionError(f"hidden size {hidden} is not a DiT paper size: pass num_heads")
    grid = round(tokens ** 0.5)
    # The null class's row exists when the model was trained with label dropout (CFG).
    return DiTConfig(input_size=grid * patch, patch_size=patch, in_channels=out_channels // (2 if learn_sigma else 1),
                     hidden_size=hidden, depth=depth, num_heads=heads,
                     mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden, num_classes=classes_rows - 1,
                     class_dropout_prob=0.1, learn_sigma=learn_sigma)


# -- diffusers ---------------------------------------------------------------------------------------

def _diffusers():
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        raise ConversionError("the diffusers layout needs diffusers: pip install 'ditlab[bench]'") from None
    return DiTTransformer2DModel


def diffusers_config(config: DiTConfig) -> dict[str, Any]:
    """DiTTransformer2DModel's constructor arguments for the same network."""
    if config.cond_channels:
        raise ConversionError("DiTTransformer2DModel takes no conditioning image (cond_channels > 0)")
    return {"num_attention_heads": config.num_heads, "attention_head_dim": config.hidden_size // config.num_heads,
            "in_channels": config.in_channels, "out_channels": config.in_channels * (2 if config.learn_sigma else 1),
            "num_layers": config.depth, "sample_size": config.input_size, "patch_size": config.patch_size,
            "num_embeds_ada_norm": config.num_classes, "norm_eps": config.mlp_norm_eps, "dropout": config.dropout}


def to_diffusers(model: DiT):
    """A DiTTransformer2DModel computing what `model` computes.

    A model with the DiT code's timestep embedding (frequency_shift 0) gets it in the returned
    instance (each block's `time_proj.downscale_freq_shift` set to 0); diffusers' config cannot say
    so, so the instance's `save_pretrained` folder reloads with diffusers' own embedding."""
    config = model.config
    if config.mlp_ratio != 4.0:
        raise ConversionError(f"DiTTransformer2DModel has mlp_ratio 4 only (got {config.mlp_ratio})")
    peer = _diffusers()(**diffusers_config(config))
    sd = model.state_dict()
    table = sd["y_embedder.embedding_table.weight"]
    if table.shape[0] == config.num_classes:  # no null class in ours; diffusers always has one
        table = torch.cat([table, torch.zeros_like(table[:1])])
    shared = {"norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
              "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2"}
    out: dict[str, torch.Tensor] = {"pos_embed.proj.weight": sd["x_embedder.weight"],
                                    "pos_embed.proj.bias": sd["x_embedder.bias"],
                                    "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
                                    "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
                                    "proj_out_2.weight": sd["final_layer.linear.weight"],
                                    "proj_out_2.bias": sd["final_layer.linear.bias"]}
    for i in range(config.depth):
        theirs, ours = f"transformer_blocks.{i}.", f"blocks.{i}."
        for name, source in shared.items():
            for p in ("weight", "bias"):
                out[f"{theirs}{name}.{p}"] = sd[f"{source}.{p}"]
        out[f"{theirs}norm1.emb.class_embedder.embedding_table.weight"] = table
        for p in ("weight", "bias"):
            q, k, v = sd[f"{ours}attn.qkv.{p}"].chunk(3)
            out.update({f"{theirs}attn1.to_q.{p}": q, f"{theirs}attn1.to_k.{p}": k, f"{theirs}attn1.to_v.{p}": v})
            for their_name, our_name in (("norm1.linear", "adaLN_modulation.1"), ("attn1.to_out.0", "attn.proj"),
                                         ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2")):
                out[f"{theirs}{their_name}.{p}"] = sd[f"{ours}{our_name}.{p}"]
    peer.load_state_dict({k: v.detach().clone() for k, v in out.items()})
    for block in peer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = config.frequency_shift
    return peer.eval()


def from_diffusers(peer) -> DiT:
    """Our DiT computing what a DiTTransformer2DModel computes (block 0's embedders are the model's:
    diffusers' own DiT conversion fills every block with the same copy)."""
    c = peer.config
    if c.norm_type != "ada_norm_zero" or c.activation_fn != "gelu-approximate":
        raise ConversionError(f"not a DiT: norm_type {c.norm_type!r}, activation_fn {c.activation_fn!r}")
    hidden = c.num_attention_heads * c.attention_head_dim
    learn_sigma = c.out_channels == 2 * c.in_channels
    shift = int(peer.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift)
    config = DiTConfig(input_size=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels,
                       hidden_size=hidden, depth=c.num_layers, num_heads=c.num_attention_heads,
                       num_classes=c.num_embeds_ada_norm, class_dropout_prob=0.1, learn_sigma=learn_sigma,
                       dropout=c.dropout, frequency_shift=shift, mlp_norm_eps=c.norm_eps)
    sd = peer.state_dict()
    b0 = "transformer_blocks.0.norm1.emb."
    for key in (k for k in sd if ".norm1.emb." in k):
        if not torch.equal(sd[key], sd[b0 + key.split(".norm1.emb.", 1)[1]]):
            raise ConversionError(f"{key} differs from block 0's: our DiT has one timestep and class embedder")
    ours: dict[str, torch.Tensor] = {
        "pos_embed": DiT(replace(config, depth=0)).pos_embed.data,
        "x_embedder.weight": sd["pos_embed.proj.weight"], "x_embedder.bias": sd["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": sd[b0 + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": sd[b0 + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": sd[b0 + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": sd[b0 + "timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": sd[b0 + "class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"], "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    for i in range(c.num_layers):
        theirs, mine = f"transformer_blocks.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            ours[f"{mine}attn.qkv.{p}"] = torch.cat([sd[f"{theirs}attn1.to_{x}.{p}"] for x in "qkv"])
            for their_name, our_name in (("norm1.linear", "adaLN_modulation.1"), ("attn1.to_out.0", "attn.proj"),
                                         ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2")):
                ours[f"{mine}{our_name}.{p}"] = sd[f"{theirs}{their_name}.{p}"]
    model = DiT(config)
    model.load_state_dict({k: v.detach().clone() for k, v in ours.items()})
    return model.eval()


def from_ditlab(bundle: dict) -> DiT:
    """The EMA weights (what it samples with) of a loaded ditlab checkpoint bundle, as a DiT."""
    try:
        model = DiT(DiTConfig(**bundle["model_config"]))
    except TypeError:
        raise ConversionError("the checkpoint's model is not a DiT (an autoencoder?)") from None
    model.load_state_dict(bundle["ema"]["model"])
    return model.eval()


# -- files -------------------------------------------------------------------------------------------

def detect_layout(path: str | Path) -> str:
    """Which layout the file or folder at `path` holds."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return "diffusers"
        raise ConversionError(f"{path}: a folder without config.json is not a diffusers model")
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    return "ditlab" if str(_torch_load(path).get("format", "")).startswith("ditlab-checkpoint") else "facebook"


def load_dit(path: str | Path, layout: str | None = None, num_heads: int | None = None) -> DiT:
    """The DiT stored at `path` in the facebook or diffusers layout (`layout` None: detected)."""
    layout = layout or detect_layout(path)
    if layout == "diffusers":
        peer = _diffusers().from_pretrained(str(path))
        sidecar = Path(path) / "ditlab.json"  # written by save_dit: the embedding diffusers' config cannot hold
        if sidecar.is_file():
            for block in peer.transformer_blocks:
                block.norm1.emb.time_proj.downscale_freq_shift = json.loads(sidecar.read_text())["frequency_shift"]
        return from_diffusers(peer)
    if layout == "ditlab":
        raise ConversionError(f"{path} is a ditlab checkpoint: read it with ditlab.training.load_bundle and "
                              "from_ditlab (checksum checked), or convert it with `ditlab convert`")
    if layout == "facebook":
        obj = _torch_load(Path(path))
        # A released model is the state dict itself; a checkpoint of DiT's train.py holds it as "ema".
        return from_facebook(obj["ema"] if isinstance(obj.get("ema"), dict) else obj, num_heads).eval()
    raise ConversionError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")


def save_dit(model: DiT, path: str | Path, layout: str) -> Path:
    """Write `model`'s weights at `path` in `layout` ("facebook": a .pt state dict; "diffusers": a
    save_pretrained folder)."""
    path = Path(path)
    if layout == "facebook":
        from ditlab.atomic import atomic_path

        with atomic_path(path) as tmp:
            torch.save(to_facebook(model), tmp)
    elif layout == "diffusers":
        to_diffusers(model).save_pretrained(str(path))
        (path / "ditlab.json").write_text(json.dumps({"frequency_shift": model.config.frequency_shift}))
    else:
        raise ConversionError(f"save_dit writes the facebook or diffusers layout, not {layout!r}")
    return path


def _torch_load(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for files that are not its own
        raise ConversionError(f"{path}: not a torch state dict or checkpoint ({type(err).__name__})") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: not a state dict or checkpoint")
    return obj
