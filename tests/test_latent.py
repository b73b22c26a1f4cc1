"""Latent diffusion (`latent.autoencoder`): the latent cache is keyed by the autoencoder and the
dataset, the DiT trains on scaled latents and is scored in pixel space, the checkpoint records
the autoencoder's hash, and a latent spec whose autoencoder cannot serve it is refused before Ray
starts, naming the field."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from ditlab import cli
from ditlab.config import load
from ditlab.data import load_dataset
from ditlab.data.shards import read_manifest
from ditlab.data.streaming import ReadShard, StreamBatches, shard_reads
from ditlab.latents import encode_split, ensure_latent_cache, load_latent_split, open_autoencoder
from ditlab.training.loop import Placement, batch_source
from ditlab.training import LocalReporter, train
from ditlab.training.checkpoint import load_bundle
from ditlab.training.tasks import GenerationTask

from conftest import ROOT

AE_SPEC = ROOT / "experiments" / "autoencoder.yaml"
LATENT_SPEC = ROOT / "experiments" / "latent.yaml"
TINY_AE = ["resources.num_workers=1", "autoencoder.name=KL-N/f2c2", "data.resolution=8", "train.batch_size=16",
           "train.warmup_steps=1", "train.checkpoint_every=1", "train.val_images=0", "loss.adversarial_weight=0"]


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory):
    """A tiny autoencoder run folder with checkpoints after steps 1 and 2 (two different hashes)."""
    root = tmp_path_factory.mktemp("ae")
    train(load(AE_SPEC, [*TINY_AE, "train.steps=2"]), LocalReporter(root))
    return root


def latent_spec(tmp_path, autoencoder, *overrides):
    return load(LATENT_SPEC, ["resources.num_workers=1", "data.resolution=8", f"latent.autoencoder={autoencoder}",
                              f"latent.cache={tmp_path / 'cache'}", "model.name=DiT-N/2", "train.steps=3",
                              "train.batch_size=16", "train.warmup_steps=1", "train.log_every=1",
                              "train.checkpoint_every=3", "train.val_images=16", "evaluation.num_samples=20",
                              "evaluation.steps=4", "evaluation.batch_size=20", "evaluation.kid.subset_size=10",
                              "evaluation.kid.num_subsets=5", *overrides])


def test_the_cache_is_reused_for_the_same_pair_and_rebuilt_when_either_changes(tmp_path, autoencoders):
    spec = latent_spec(tmp_path, autoencoders / "checkpoint_000002")
    folder, meta, reused = ensure_latent_cache(spec)
    assert not reused and meta["counts"] == {"train": 1437, "test": 360} and meta["latent_shape"] == [2, 4, 4]
    assert (meta["format"], meta["content"], meta["dtype"], meta["layout"], meta["image_shape"]) == (
        "ditlab-shards/1", "latents", "float16", "NHWC", [4, 4, 2])
    assert json.loads((folder / "manifest.json").read_text()) == meta  # the cache's one record
    for entry in meta["shards"]["train"] + meta["shards"]["test"]:
        data = (folder / entry["file"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"])
    # float16 round trip: the cache in memory is the autoencoder's float32 posterior means times the
    # scale factor, up to float16 rounding (2^-11 relative), and unit variance once scaled.
    direct = encode_split(open_autoencoder(spec).model, load_dataset(spec.data, "train").images)
    assert meta["scale_factor"] == pytest.approx(1 / float(direct.std()), rel=1e-6)
    held = load_latent_split(spec, "train")[0]
    torch.testing.assert_close(held.images, direct * meta["scale_factor"], rtol=2 ** -10, atol=1e-6)
    assert held.images.dtype == torch.float32 and not torch.equal(held.images, direct * meta["scale_factor"])
    again, _, reused = ensure_latent_cache(spec)
    assert reused and again == folder
    # A folder of the older one-file layout under the same key is not misread: encoded again, replaced.
    shutil.rmtree(folder)
    folder.mkdir()
    torch.save({"train": {"latents": torch.zeros(1), "labels": torch.zeros(1)}}, folder / "latents.pt")
    (folder / "meta.json").write_text(json.dumps({k: meta[k] for k in ("counts", "scale_factor")}))
    again, rebuilt, reused = ensure_latent_cache(spec)
    assert not reused and again == folder and rebuilt["shards"] == meta["shards"]
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "test", "train"]
    other_ae, _, reused = ensure_latent_cache(latent_spec(tmp_path, autoencoders / "checkpoint_000001"))
    assert not reused and other_ae != folder and other_ae.name[17:] == folder.name[17:]  # same dataset
    other_data, _, reused = ensure_latent_cache(latent_spec(tmp_path, autoencoders / "checkpoint_000002",
                                                            "data.split_seed=1"))
    assert not reused and other_data.name[:16] == folder.name[:16] and other_data != folder  # same autoencoder


class LocalReads:
    """The part Ray Data plays in a stream, without Ray: the read tasks (streaming.ReadShard) over
    the stream's rows, in order, cut into batches as a DataIterator's `iter_batches` cuts them."""

    def __init__(self, read: ReadShard, rows: list[dict]):
        self.read, self.rows = read, rows

    def iter_batches(self, batch_size: int, drop_last: bool, batch_format: str, prefetch_batches: int):
        parts = [self.read({k: [v] for k, v in row.items()}) for row in self.rows]
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for start in range(0, len(rows["label"]) - batch_size + 1, batch_size):
            yield {k: v[start:start + batch_size] for k, v in rows.items()}


def test_a_shard_set_is_encoded_shard_by_shard_and_its_latents_stream_as_held(tmp_path, autoencoders, monkeypatch):
    """A latent spec on a shard set (data.format: shards) is encoded one shard at a time into a
    cache of the same shards, keyed by the source's checksums (no image loaded whole); it streams,
    and a streamed batch (float16 -> float32 x scale on the batch) is the in-memory batch of the
    same images, before and after a resume."""
    from test_shards import digit_shards

    from ditlab.data.shards import read_split
    from ditlab.orchestration.preflight import preflight

    monkeypatch.setenv("DITLAB_CACHE_DIR", str(tmp_path / "verified"))
    monkeypatch.setattr("ditlab.latents.load_dataset", lambda *a: pytest.fail("a shard source was loaded whole"))
    source = digit_shards(tmp_path / "digits", shard_size=100)
    spec = latent_spec(tmp_path, autoencoders / "checkpoint_000002", "data.format=shards", f"data.path={source}")
    preflight(spec)  # streaming a latent spec is no longer refused
    folder, manifest, _ = ensure_latent_cache(spec)
    assert GenerationTask.streams(spec) and GenerationTask.stream_location(spec) == str(folder)
    monkeypatch.chdir(tmp_path)  # read tasks run in folders of their own: a relative latent.cache is made absolute
    relative = spec.model_copy(update={"latent": spec.latent.model_copy(update={"cache": "cache"})})
    assert GenerationTask.stream_location(relative) == str(folder)
    entries = manifest["shards"]["train"]
    assert [e["count"] for e in entries] == [e["count"] for e in read_manifest(str(source))["shards"]["train"]]
    held = load_latent_split(spec, "train")[0]
    assert held.labels.tolist() == read_split(str(source), "train")[1].tolist()
    stream = LocalReads(ReadShard(str(folder), entries, spec.seed),
                        shard_reads(spec.train.steps, spec.train.batch_size, 400, len(entries), 1))
    streamed = batch_source(spec, Placement(stream=stream), None, None, manifest)
    assert isinstance(streamed, StreamBatches) and len(streamed) == 400
    for step in range(3):
        images, labels, indices = streamed.batch(step)
        assert torch.equal(images, held.images[indices]) and torch.equal(labels, held.labels[indices])
    resumed = batch_source(spec, Placement(stream=stream), None, {"step": 2}, manifest)
    assert torch.equal(resumed.batch(2)[0], images)


def test_a_latent_dit_trains_samples_pixels_and_records_its_autoencoder(tmp_path, autoencoders, capsys):
    ae = tmp_path / "ae"
    shutil.copytree(autoencoders / "checkpoint_000002", ae)
    # A 90-image test split: FID during training extracts the reference split's Inception features
    # (on a cache miss), and those of the 360 of the default split took most of this test's time.
    spec = latent_spec(tmp_path, ae, "train.eval_every=3", "train.eval_samples=10", "train.eval_sampler_steps=2",
                       "data.test_fraction=0.05")
    reporter = LocalReporter(tmp_path / "run")
    state = train(spec, reporter)
    assert (state.model.config.in_channels, state.model.config.input_size) == (2, 4)
    assert reporter.history[-1]["fid"] > 0  # FID during training: samples decoded before Inception
    bundle = load_bundle(tmp_path / "run" / "checkpoint_000003")
    recorded = bundle["task_state"]["latent"]
    assert recorded["autoencoder_sha256"] == ensure_latent_cache(spec)[1]["autoencoder_sha256"]
    # Decoded to 8x8 pixels and judged there by the digits classifier (no Inception pass: FID of
    # decoded samples is the final evaluation's, in test_e2e-sized runs).
    ev = spec.evaluation.model_copy(update={"metrics": ("classifier_score", "conditional_accuracy")})
    report = GenerationTask.evaluate_checkpoint(bundle, "latent", ev)
    assert report.samples.shape == (20, 8, 8, 3) and 0 <= report.figures["conditional_accuracy"] <= 1
    # Against another reference (--real), at the data's resolution, not the latents' 4x4.
    from ditlab.orchestration.evaluate import evaluate_checkpoint

    other = evaluate_checkpoint(str(tmp_path / "run" / "checkpoint_000003"), "digits:test", ev, progress=False)
    assert "8px" in other.notes["reference"] and "conditional_accuracy" in other.figures

    shutil.copy(autoencoders / "checkpoint_000001" / "checkpoint.pt", ae / "checkpoint.pt")  # another autoencoder
    shutil.copy(autoencoders / "checkpoint_000001" / "checkpoint.pt.sha256", ae / "checkpoint.pt.sha256")
    capsys.readouterr()
    assert cli.main(["sample", str(tmp_path / "run" / "checkpoint_000003"), "--num", "2",
                     "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and recorded["autoencoder_sha256"][:16] in err[0]
    other = ensure_latent_cache(latent_spec(tmp_path, ae))[1]["autoencoder_sha256"]
    assert other[:16] in err[0] and not (tmp_path / "s").exists()


@pytest.mark.parametrize("case", ["missing", "corrupt", "not an autoencoder", "channels", "patch", "cache shard"])
def test_a_latent_spec_the_autoencoder_cannot_serve_is_one_error_line(case, tmp_path, autoencoders, capsys):
    ae = tmp_path / "ae"
    shutil.copytree(autoencoders / "checkpoint_000002", ae)
    overrides, expected = [], "latent.autoencoder: "
    if case == "missing":
        shutil.rmtree(ae)
        expected += "checkpoint"
    elif case == "corrupt":
        data = (ae / "checkpoint.pt").read_bytes()
        (ae / "checkpoint.pt").write_bytes(data[: len(data) // 2])
        expected += "checkpoint"
    elif case == "not an autoencoder":
        ae = ROOT / "tests" / "data" / "legacy_checkpoint"
        expected += f"{str(ae)!r} is not an autoencoder checkpoint"
    elif case == "channels":
        overrides, expected = ["latent.channels=4"], "latent.channels: 4 does not match the 2 latent channels"
    elif case == "cache shard":  # a latent shard changed on disk after encoding
        shard = ensure_latent_cache(latent_spec(tmp_path, ae))[0] / "train" / "00000.npz"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        overrides = [f"latent.cache={tmp_path / 'cache'}"]
        expected = f"latent.cache: shard {str(shard)!r} does not match its checksum in the manifest"
    else:
        overrides, expected = ["model.name=DiT-N/8"], "model.name: the 4x4x2 latents of latent.autoencoder"
    argv = ["run", str(LATENT_SPEC), "--name", "never", "--storage", str(tmp_path / "runs"),
            "--set", "data.resolution=8", "--set", f"latent.autoencoder={ae}"]
    argv += [a for o in overrides for a in ("--set", o)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ditlab: error: ") and expected in err[0], err
    assert not (tmp_path / "runs").exists()  # refused before anything was written or Ray started


def test_data_prepare_needs_no_autoencoder(tmp_path):
    """The latent pipeline's first stage prepares the data before its autoencoder stage has run."""
    spec = ROOT / "pipelines" / "latent" / "params.yaml"
    assert cli.main(["data", "prepare", str(spec), "--set", "data.resolution=8", "--set",
                     f"latent.autoencoder={tmp_path / 'not-yet'}", "--out", str(tmp_path / "data")]) == 0
    assert (tmp_path / "data" / "manifest.json").is_file()


def test_a_changed_loss_or_autoencoder_is_another_experiment_for_the_run_folder(tmp_path):
    """`ditlab run --name` resumes only a run of the same spec: the adversarial weight, the
    autoencoder preset and a latent spec's autoencoder are part of what a run trained."""
    from ditlab.orchestration.train import spec_changes

    base = load(AE_SPEC).to_dict()
    assert spec_changes(base, load(AE_SPEC, ["loss.adversarial_weight=0"]).to_dict()) == ["loss.adversarial_weight"]
    assert spec_changes(base, load(AE_SPEC, ["autoencoder.name=KL-S/f4c4"]).to_dict()) == ["autoencoder.name"]
    latent = load(LATENT_SPEC).to_dict()
    other = load(LATENT_SPEC, ["latent.autoencoder=runs/other"]).to_dict()
    assert spec_changes(latent, other) == ["latent.autoencoder"]
