"""The shapes-v1 verifiers: the spec's agreement bars on clean renders, chance level on
shuffled pairs, robustness to what a tokenizer does to a sample, and the API's edges."""

from __future__ import annotations

import numpy as np
import pytest

from lit_vqdiff.data import shapes as S
from lit_vqdiff.eval import shapes as V

SEED = 977
CLEAN_N = 2000
ROBUST_N = 400


@pytest.fixture(scope="module")
def clean() -> dict:
    samples = [S.make_sample(SEED, i) for i in range(CLEAN_N)]
    return {
        "images": np.stack([s.image for s in samples]),
        "sounds": np.stack([s.sound for s in samples]),
        "captions": [s.caption for s in samples],
        "expected": [s.attributes.as_dict() for s in samples],
    }


def _read(modality: str, data: dict) -> list[dict]:
    """Verifier readings of one modality of the clean set."""
    if modality == "images":
        return V.verify_images(data["images"])
    if modality == "sounds":
        return V.verify_sounds(data["sounds"])
    return V.verify_captions(data["captions"])


# --- perturbations ----------------------------------------------------------------------


def _quantize(images: np.ndarray) -> np.ndarray:
    """Round and clip float pixels back to uint8."""
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def _blur(images: np.ndarray, sigma: float = 0.7) -> np.ndarray:
    """Separable Gaussian blur (edge padding), as a decoder's smoothing."""
    kernel = np.exp(-0.5 * (np.arange(-2, 3) / sigma) ** 2)
    kernel /= kernel.sum()
    x = images.astype(np.float64)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (2, 2)
        padded = np.pad(x, pad, mode="edge")
        x = sum(k * np.take(padded, np.arange(32) + i, axis=axis) for i, k in enumerate(kernel))
    return _quantize(x)


def _noise(images: np.ndarray, rng: np.random.Generator, sigma: float = 8.0) -> np.ndarray:
    """Additive Gaussian pixel noise (sigma in 0..255 units)."""
    return _quantize(images + rng.normal(0.0, sigma, images.shape))


def _colour_shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-image, per-channel gain in [0.95, 1.05] and offset in [-12, 12] over the whole picture."""
    gain = rng.uniform(0.95, 1.05, (len(images), 1, 1, 3))
    offset = rng.uniform(-12, 12, (len(images), 1, 1, 3))
    return _quantize(images * gain + offset)


def _round_corners(images: np.ndarray, keep: float) -> np.ndarray:
    """Fade the pixels a 3x3-cross opening removes (corners, tips) to ``keep`` of their colour."""
    background = np.array(S.BACKGROUND, dtype=np.float64)
    painted = np.any(images != S.BACKGROUND, axis=-1)

    def cross(mask: np.ndarray, combine) -> np.ndarray:
        p = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
        return combine.reduce([p[:, 1:-1, 1:-1], p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]])

    opened = cross(cross(painted, np.logical_and), np.logical_or)
    corners = painted & ~opened
    out = images.astype(np.float64)
    out[corners] = keep * out[corners] + (1 - keep) * background
    return _quantize(out)


def _harmonic_phase_shift(waves: np.ndarray, f0: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Turn every harmonic of each clip (the bins nearest k * f0) by its own random phase."""
    spectrum = np.fft.rfft(waves, axis=1)
    freqs = np.fft.rfftfreq(waves.shape[1], 1 / S.SAMPLE_RATE)
    harmonic = np.rint(freqs[None] / f0[:, None]).astype(int)
    phases = rng.uniform(0, 2 * np.pi, (len(waves), harmonic.max() + 1))
    turned = spectrum * np.exp(1j * np.take_along_axis(phases, harmonic, axis=1))
    return np.fft.irfft(turned, waves.shape[1], axis=1)


def _stft(waves: np.ndarray, n_fft: int = 256, hop: int = 64) -> np.ndarray:
    """Centred Hann STFT, (clips, frames, bins)."""
    padded = np.pad(waves, ((0, 0), (n_fft // 2, n_fft // 2)))
    starts = np.arange(0, padded.shape[1] - n_fft + 1, hop)
    return np.fft.rfft(padded[:, starts[:, None] + np.arange(n_fft)] * np.hanning(n_fft + 1)[:-1], axis=2)


def _istft(spec: np.ndarray, length: int, n_fft: int = 256, hop: int = 64) -> np.ndarray:
    """Least-squares inverse of ``_stft``."""
    window = np.hanning(n_fft + 1)[:-1]
    frames = np.fft.irfft(spec, n_fft, axis=2) * window
    out = np.zeros((len(spec), length + n_fft))
    norm = np.zeros(length + n_fft)
    for t in range(spec.shape[1]):
        out[:, t * hop : t * hop + n_fft] += frames[:, t]
        norm[t * hop : t * hop + n_fft] += window**2
    return (out / np.maximum(norm, 1e-8))[:, n_fft // 2 : n_fft // 2 + length]


def _griffin_lim(waves: np.ndarray, rng: np.random.Generator, iterations: int = 16) -> np.ndarray:
    """Rebuild each clip from its STFT magnitude alone, starting from random phases."""
    magnitude = np.abs(_stft(waves))
    spec = magnitude * np.exp(2j * np.pi * rng.uniform(size=magnitude.shape))
    for _ in range(iterations):
        spec = magnitude * np.exp(1j * np.angle(_stft(_istft(spec, waves.shape[1]))))
    return _istft(spec, waves.shape[1])


def _add_noise(waves: np.ndarray, rng: np.random.Generator, snr_db: float = 30.0) -> np.ndarray:
    """White noise at ``snr_db`` below each clip's mean power."""
    power = (waves**2).mean(axis=1, keepdims=True)
    return waves + rng.normal(size=waves.shape) * np.sqrt(power / 10 ** (snr_db / 10))


def _low_pass(waves: np.ndarray) -> np.ndarray:
    """[1/4, 1/2, 1/4] FIR: -3 dB at 2 kHz, the 3rd harmonic of 523 Hz down to 0.67."""
    p = np.pad(waves, ((0, 0), (1, 1)))
    return 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]


def _gain(waves: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An extra gain of 0.9 or 1.1 per clip, on top of the data set's own."""
    return waves * rng.choice([0.9, 1.1], (len(waves), 1))


# --- agreement bars ---------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["images", "sounds", "captions"])
def test_clean_renders_agree_with_their_attributes(clean, modality):
    result = V.score(_read(modality, clean), clean["expected"])
    assert result["n"] == CLEAN_N
    assert result["exact_match"] >= 0.995


@pytest.mark.parametrize("modality", ["images", "sounds", "captions"])
def test_shuffled_pairs_fall_to_chance(clean, modality):
    order = np.random.default_rng(SEED).permutation(CLEAN_N)
    result = V.score(_read(modality, clean), [clean["expected"][j] for j in order])
    assert result["exact_match"] < 0.05  # chance is 1/72
    assert result["color"] < 0.35  # chance is 1/4


IMAGE_PERTURBATIONS = {
    "blur": lambda x, rng: _blur(x),
    "strong_blur": lambda x, rng: _blur(x, sigma=1.0),
    "noise": lambda x, rng: _noise(x, rng),
    "colour_shift": _colour_shift,
    "soft_corners": lambda x, rng: _round_corners(x, keep=0.5),
    "all_together": lambda x, rng: _noise(_colour_shift(_blur(_round_corners(x, keep=0.5)), rng), rng),
}


@pytest.mark.parametrize("name", IMAGE_PERTURBATIONS)
def test_images_survive_tokenizer_damage(clean, name):
    rng = np.random.default_rng(1)
    damaged = IMAGE_PERTURBATIONS[name](clean["images"][:ROBUST_N], rng)
    assert not np.array_equal(damaged, clean["images"][:ROBUST_N])
    assert V.score(V.verify_images(damaged), clean["expected"][:ROBUST_N])["exact_match"] >= 0.98


def test_large_shapes_survive_cut_corners(clean):
    # Cutting a small square's corner pixels leaves the pixel pattern of a small circle,
    # so only large shapes are held to this.
    large = [i for i, e in enumerate(clean["expected"][:ROBUST_N]) if e["size"] == "large"]
    damaged = _round_corners(clean["images"][large], keep=0.0)
    result = V.score(V.verify_images(damaged), [clean["expected"][i] for i in large])
    assert result["exact_match"] >= 0.98


SOUND_PERTURBATIONS = {
    "harmonic_phases": lambda w, f0, rng: _harmonic_phase_shift(w, f0, rng),
    "noise_30db": lambda w, f0, rng: _add_noise(w, rng),
    "low_pass": lambda w, f0, rng: _low_pass(w),
    "gain": lambda w, f0, rng: _gain(w, rng),
    "all_together": lambda w, f0, rng: _gain(_low_pass(_add_noise(_harmonic_phase_shift(w, f0, rng), rng)), rng),
}


def _pitches(expected: list[dict]) -> np.ndarray:
    """Nominal pitch of each expected colour."""
    return np.array([S.PITCH_HZ[e["color"]] for e in expected])


@pytest.mark.parametrize("name", SOUND_PERTURBATIONS)
def test_sounds_survive_phase_noise_filter_and_gain(clean, name):
    rng = np.random.default_rng(2)
    waves = clean["sounds"][:ROBUST_N].astype(np.float64)
    expected = clean["expected"][:ROBUST_N]
    damaged = SOUND_PERTURBATIONS[name](waves, _pitches(expected), rng)
    assert np.abs(damaged - waves).max() > 1e-3
    assert V.score(V.verify_sounds(damaged), expected)["exact_match"] >= 0.98


def test_sounds_survive_griffin_lim_reconstruction(clean):
    n = 96
    waves = clean["sounds"][:n].astype(np.float64)
    rebuilt = _griffin_lim(waves, np.random.default_rng(3))
    # The waveform itself changes a lot; only phase-free evidence survives.
    assert np.abs(rebuilt - waves).max() > 0.1
    assert V.score(V.verify_sounds(rebuilt), clean["expected"][:n])["exact_match"] >= 0.98


def test_sounds_at_another_sample_rate(clean):
    n = 200
    waves = clean["sounds"][:n].astype(np.float64)
    # Band-limited upsampling to 16 kHz by zero-padding the spectrum.
    upsampled = np.fft.irfft(np.fft.rfft(waves, axis=1), 2 * waves.shape[1], axis=1) * 2
    result = V.score(V.verify_sounds(upsampled, sample_rate=16000), clean["expected"][:n])
    assert result["exact_match"] >= 0.995


# --- API edges --------------------------------------------------------------------------

NONE_READING = dict.fromkeys(S.ATTRIBUTES)


def test_single_and_float_images_read_like_the_batch(clean):
    images = clean["images"][:50]
    batch = V.verify_images(images)
    assert V.verify_images(images / 255.0) == batch
    assert [V.verify_image(im) for im in images[:5]] == batch[:5]
    assert V.verify_images(np.zeros((0, 32, 32, 3), np.uint8)) == []


def test_pictures_without_one_known_object_read_as_none():
    blank = np.full((32, 32, 3), S.BACKGROUND, np.uint8)
    assert V.verify_image(blank) == NONE_READING
    noise = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert V.verify_image(noise)["shape"] is None
    left = S.render_image(S.Attributes("square", "red", "large", "left"), 9.5, 16.0)
    right = S.render_image(S.Attributes("circle", "blue", "large", "right"), 22.5, 16.0)
    both = np.where(np.any(right != S.BACKGROUND, axis=-1)[..., None], right, left)
    assert V.verify_image(both)["shape"] is None
    purple = S.render_image(S.Attributes("circle", "red", "large", "center"), 16.0, 16.0)
    purple[np.any(purple != S.BACKGROUND, axis=-1)] = (140, 40, 140)
    assert V.verify_image(purple)["color"] is None and V.verify_image(purple)["shape"] == "circle"


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 3, 32, 32), np.uint8), "shape"),
        (np.zeros((2, 32, 32, 3), np.int32), "dtype"),
        (np.full((1, 32, 32, 3), 200.0), r"\[0, 1\]"),
        (np.full((1, 32, 32, 3), np.nan), "NaN"),
    ],
)
def test_bad_images_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        V.verify_images(bad)


def test_silent_empty_and_noise_sounds_read_as_none():
    assert V.verify_sound(np.zeros(8000)) == NONE_READING
    assert V.verify_sound(np.zeros(0)) == NONE_READING
    assert V.verify_sounds(np.zeros((0, 8000))) == []
    noise = np.random.default_rng(5).normal(0, 0.1, 8000)
    assert V.verify_sound(noise) == NONE_READING


def _centre_note(freq: float, peak: float) -> np.ndarray:
    """A Hann-windowed sine of ``freq`` Hz and ``peak`` amplitude starting at 0.30 s."""
    t = np.arange(S.NUM_SAMPLES) / S.SAMPLE_RATE
    window = np.zeros(S.NUM_SAMPLES)
    start = round(S.ONSET_S["center"] * S.SAMPLE_RATE)
    window[start : start + S.NOTE_SAMPLES] = np.hanning(S.NOTE_SAMPLES)
    return peak * window * np.sin(2 * np.pi * freq * t)


def test_off_pitch_or_odd_loudness_reads_as_none():
    assert V.verify_sound(_centre_note(392.0, 0.8)) == {
        "shape": "circle", "color": "blue", "size": "large", "position": "center"
    }
    # 295 Hz lies between red (262) and green (330); 0.05 is far below a small note's 0.3.
    assert V.verify_sound(_centre_note(295.0, 0.8))["color"] is None
    assert V.verify_sound(_centre_note(392.0, 0.05))["size"] is None


@pytest.mark.parametrize(
    "bad, rate, match",
    [
        (np.zeros((2, 3, 8000)), 8000, "shape"),
        (np.zeros((1, 8000), np.int16), 8000, "dtype"),
        (np.full((1, 8000), np.inf), 8000, "NaN"),
        (np.zeros((1, 8000)), 2000, "sample_rate"),
    ],
)
def test_bad_sounds_raise(bad, rate, match):
    with pytest.raises(ValueError, match=match):
        V.verify_sounds(bad, sample_rate=rate)


def test_captions_parse_exactly_but_tolerate_padding():
    expected = {"shape": "triangle", "color": "blue", "size": "large", "position": "right"}
    for text in ["a large blue triangle on the right", "  a large blue triangle on the right\n",
                 "a large blue triangle on the right\x00\x00\x00", b"a large blue triangle on the right\x00"]:
        assert V.verify_caption(text) == expected
    for text in ["A large blue triangle on the right", "a large  blue triangle on the right",
                 "a large blue triangle on the right.", "a big blue triangle on the right",
                 "a large blue triangle on the right please", "", b"\xff\xfe"]:
        assert V.verify_caption(text) == NONE_READING
    with pytest.raises(TypeError, match="text"):
        V.verify_caption(42)


def _other(key: str, value: str) -> str:
    """A value of attribute ``key`` different from ``value``."""
    return next(v for v in S.VALUES[key] if v != value)


def test_score_counts_exact_and_per_attribute_matches():
    truth = [S.attributes_of(k).as_dict() for k in (0, 17, 40, 71)]
    predicted = [
        dict(truth[0]),
        {**truth[1], "color": None},
        {**truth[2], "shape": _other("shape", truth[2]["shape"]), "size": _other("size", truth[2]["size"])},
        dict.fromkeys(S.ATTRIBUTES),
    ]
    result = V.score(predicted, truth)
    assert result == {"n": 4, "exact_match": 0.25, "shape": 0.5, "color": 0.5, "size": 0.5, "position": 0.75}


def test_score_rejects_mismatched_or_invalid_input():
    truth = [S.attributes_of(3).as_dict()]
    with pytest.raises(ValueError, match="length"):
        V.score([], truth)
    with pytest.raises(ValueError, match="at least one"):
        V.score([], [])
    with pytest.raises(ValueError, match="color"):
        V.score(truth, [{**truth[0], "color": "purple"}])
