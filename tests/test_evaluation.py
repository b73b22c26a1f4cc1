import numpy as np
import pytest
import torch

from ditlab.evaluation import features as feats
from ditlab.evaluation.classifier import PixelClassifier
from ditlab.evaluation.fid import fid_from_features, frechet_distance


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid_from_features(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)


def test_inception_fingerprint_on_zeros():
    """EVALUATION.md's fingerprint of the TF Inception pool3 net: layers(zeros) sums to 201.387619."""
    model = feats.load_inception()
    out = model.layers(torch.zeros(1, 3, 299, 299))
    assert float(out.sum()) == pytest.approx(201.387619, abs=1e-3)
    assert float(out.max()) == pytest.approx(4.347140, abs=1e-4)


def test_eager_inception_gives_the_scripted_files_features():
    """The batch-norm-folded, channels-last copy is what runs, and it matches the TorchScript graph
    whose SHA-256 was checked on resized digits (not only on the load-time check image)."""
    from sklearn.datasets import load_digits

    from ditlab.evaluation.inception_eager import EagerInception

    model = feats.load_inception()
    assert isinstance(model.layers, EagerInception)
    digits = (load_digits().images[:4] * (255 / 16)).astype(np.uint8)[..., None]
    x = (torch.from_numpy(feats.clean_resize(digits)) - 128.0) / 128.0
    with torch.no_grad():
        eager = model.layers(x).reshape(4, -1)
        scripted = model.scripted_layers(x.contiguous(memory_format=torch.channels_last)).reshape(4, -1)
    assert float((eager - scripted).abs().max()) < 1e-3
    assert float(scripted.abs().max()) > 0.5  # real activations, not an all-zero pair


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_a_network_laid_out_otherwise_runs_as_scripted():
    """A file whose modules the eager copy does not know is run as it is, never approximated."""
    other = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()))
    assert feats._faster_layers(other) is other


def test_inception_features_shape_and_grayscale_conversion():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    f_gray = feats.inception_features(gray)
    f_rgb = feats.inception_features(np.repeat(gray, 3, axis=-1))
    assert f_gray.shape == (2, 2048) and f_gray.dtype == np.float64
    assert np.allclose(f_gray, f_rgb)


def test_clean_resize_matches_pil_bicubic_per_channel():
    from PIL import Image

    img = np.random.default_rng(1).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    out = feats.clean_resize(img, size=20)
    ref = np.asarray(Image.fromarray(img[0, :, :, 1].astype(np.float32), mode="F").resize((20, 20), Image.BICUBIC))
    assert out.shape == (1, 3, 20, 20) and np.allclose(out[0, 1], ref.clip(0, 255))
    # A gray image as RGB (and one with two equal channels) resizes each distinct channel once:
    # every channel still holds exactly what PIL gives for it.
    mixed = np.concatenate([np.repeat(img[..., :1], 3, axis=-1), img[..., [0, 2, 0]]])
    out = feats.clean_resize(mixed, size=20)
    for i, c in np.ndindex(2, 3):
        channel = Image.fromarray(mixed[i, :, :, c].astype(np.float32), mode="F")
        assert np.array_equal(out[i, c], np.asarray(channel.resize((20, 20), Image.BICUBIC)).clip(0, 255))
    with pytest.raises(ValueError, match="uint8"):
        feats.clean_resize(img.astype(np.float32))


def test_pixel_classifier_on_digits():
    from ditlab.config import load
    from ditlab.data import load_dataset

    from conftest import ROOT

    data = load(ROOT / "experiments" / "quickstart.yaml").data
    train, test = load_dataset(data, "train"), load_dataset(data, "test")
    clf = PixelClassifier.fit(train.to_uint8(), train.labels.numpy())
    assert clf.accuracy(test.to_uint8(), test.labels.numpy()) > 0.93


def test_fid_with_fewer_images_than_features_equals_the_sqrtm_formula():
    """Fewer images than feature dimensions: the trace term from the N_a x N_b SVD equals
    Tr sqrtm(S1 S2) of the D x D covariances (the formula clean-fid uses)."""
    from ditlab.evaluation.fid import feature_statistics

    rng = np.random.default_rng(0)
    fake, real = rng.normal(size=(40, 256)) ** 2, rng.normal(0.2, 1.0, size=(60, 256)) ** 2
    assert fid_from_features(fake, real) == pytest.approx(
        frechet_distance(*feature_statistics(fake), *feature_statistics(real)), rel=1e-7)
    many = rng.normal(size=(300, 64))  # more images than dimensions: the D x D formula itself
    assert fid_from_features(many, many[::-1]) == pytest.approx(0.0, abs=1e-6)
