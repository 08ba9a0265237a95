"""Spec fidelity of the shapes-v1 renderer (docs/shapes-v1.md): labels, captions, image
pixels and areas, sound timing and loudness, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lit_vqdiff.data import shapes as S

SEED = 20240601


def _spec_paints(shape: str, px: float, py: float, cx: float, cy: float, r: float) -> bool:
    """The spec's painting rule for one pixel centre, written out independently."""
    if shape == "circle":
        return (px - cx) ** 2 + (py - cy) ** 2 <= r * r
    if shape == "square":
        return abs(px - cx) <= 0.89 * r and abs(py - cy) <= 0.89 * r
    return cy - r <= py <= cy + 0.8 * r and abs(px - cx) <= 0.62 * (py - (cy - r))


def _analytic_area(shape: str, r: float) -> float:
    """Area of the continuous shape the spec describes."""
    if shape == "circle":
        return math.pi * r * r
    if shape == "square":
        return (2 * 0.89 * r) ** 2
    height = 1.8 * r  # from cy - r down to cy + 0.8 r
    return 0.5 * height * (2 * 0.62 * height)


def _painted(image: np.ndarray) -> np.ndarray:
    """Mask of pixels that differ from the background."""
    return np.any(image != np.array(S.BACKGROUND, dtype=np.uint8), axis=-1)


def test_label_formula_and_inverse_cover_all_72():
    seen = set()
    for s, shape in enumerate(S.SHAPES):
        for c, color in enumerate(S.COLORS):
            for z, size in enumerate(S.SIZES):
                for p, position in enumerate(S.POSITIONS):
                    attrs = S.Attributes(shape, color, size, position)
                    label = ((s * 4 + c) * 2 + z) * 3 + p
                    assert S.label_of(attrs) == attrs.label == label
                    assert S.attributes_of(label) == attrs
                    seen.add(label)
    assert seen == set(range(72)) and S.NUM_CLASSES == 72


@pytest.mark.parametrize("bad", [-1, 72, 1000])
def test_attributes_of_rejects_out_of_range_labels(bad):
    with pytest.raises(ValueError, match="label"):
        S.attributes_of(bad)


def test_caption_format_and_round_trip():
    place = {"left": "on the left", "center": "in the center", "right": "on the right"}
    captions = set()
    for label in range(S.NUM_CLASSES):
        a = S.attributes_of(label)
        caption = S.caption_of(a)
        assert caption == f"a {a.size} {a.color} {a.shape} {place[a.position]}"
        assert caption == caption.lower() and "  " not in caption and not caption.endswith(".")
        assert S.parse_caption(caption) == a
        captions.add(caption)
    assert len(captions) == 72
    example = S.Attributes("triangle", "blue", "large", "right")
    assert S.parse_caption("a large blue triangle on the right") == example
    assert S.parse_caption("a large blue triangle on the right.") is None


def test_render_paints_exactly_the_spec_pixels():
    rng = np.random.default_rng(SEED)
    for label in range(0, S.NUM_CLASSES, 5):
        a = S.attributes_of(label)
        cx = S.CENTER_X[a.position] + rng.uniform(-S.JITTER_X, S.JITTER_X)
        cy = S.CENTER_Y + rng.uniform(-S.JITTER_Y, S.JITTER_Y)
        image = S.render_image(a, cx, cy)
        r = S.RADIUS[a.size]
        expected = np.array(
            [[_spec_paints(a.shape, j + 0.5, i + 0.5, cx, cy, r) for j in range(32)] for i in range(32)]
        )
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        assert (image[expected] == S.RGB[a.color]).all()
        assert (image[~expected] == S.BACKGROUND).all()


def _extent(shape: str, r: float) -> tuple[float, float, float]:
    """Half width, reach above and reach below the centre of the spec's shape."""
    if shape == "circle":
        return r, r, r
    if shape == "square":
        return 0.89 * r, 0.89 * r, 0.89 * r
    return 0.62 * 1.8 * r, r, 0.8 * r


def test_samples_hold_two_colours_and_stay_inside_their_region():
    for i in range(300):
        sample = S.make_sample(SEED, i)
        a, image = sample.attributes, sample.image
        colours = {tuple(c) for c in image.reshape(-1, 3)}
        assert colours == {S.BACKGROUND, S.RGB[a.color]}
        rows, cols = np.nonzero(_painted(image))
        half_width, up, down = _extent(a.shape, S.RADIUS[a.size])
        # Pixel centres of the object lie within the shape drawn at a centre in the jitter box.
        assert rows.min() + 0.5 >= S.CENTER_Y - S.JITTER_Y - up
        assert rows.max() + 0.5 <= S.CENTER_Y + S.JITTER_Y + down
        assert cols.min() + 0.5 >= S.CENTER_X[a.position] - S.JITTER_X - half_width
        assert cols.max() + 0.5 <= S.CENTER_X[a.position] + S.JITTER_X + half_width


@pytest.mark.parametrize("shape", S.SHAPES)
@pytest.mark.parametrize("size", S.SIZES)
def test_mean_pixel_count_equals_the_analytic_area(shape, size):
    # Jitter spans a whole number of pixels in x and y, so the sub-pixel offset is uniform
    # and the expected count of pixel centres inside the shape is exactly its area.
    label = S.label_of(S.Attributes(shape, "red", size, "center"))
    counts = np.array([_painted(S.make_sample(SEED, i, label=label).image).sum() for i in range(300)])
    stderr = counts.std() / math.sqrt(len(counts))
    assert abs(counts.mean() - _analytic_area(shape, S.RADIUS[size])) <= 4 * stderr + 0.05


def _note_bounds(sound: np.ndarray) -> tuple[int, int]:
    """First and last non-zero sample."""
    nonzero = np.flatnonzero(sound)
    return int(nonzero[0]), int(nonzero[-1])


def test_sound_length_peak_and_silence_outside_the_note():
    for i in range(300):
        sample = S.make_sample(SEED, i)
        a, sound = sample.attributes, sample.sound
        assert sound.shape == (8000,) and sound.dtype == np.float32
        peak = np.abs(sound).max()
        # A triangle's sharp top may fall between samples and lose up to 2 f / sample_rate.
        f_max = max(S.PITCH_HZ.values()) * (1 + S.DETUNE)
        low = S.PEAK[a.size] * S.GAIN_RANGE[0] * (1 - 2 * f_max / S.SAMPLE_RATE) * 0.999
        assert low <= peak <= S.PEAK[a.size] * S.GAIN_RANGE[1] + 1e-6
        first, last = _note_bounds(sound)
        assert last - first < S.NOTE_SAMPLES
        onset = first / S.SAMPLE_RATE
        # The Hann window's first sample is 0, so the first audible sample may come 1-2 later.
        assert S.ONSET_S[a.position] - 0.05 - 1e-9 <= onset <= S.ONSET_S[a.position] + 0.05 + 3 / S.SAMPLE_RATE


def test_square_note_is_a_hann_envelope_of_constant_magnitude():
    label = S.label_of(S.Attributes("square", "green", "large", "left"))
    for i in range(20):
        sound = S.make_sample(SEED, i, label=label).sound.astype(np.float64)
        start = _note_bounds(sound)[0] - 1  # the window's first sample is silent
        window = np.hanning(S.NOTE_SAMPLES)
        inner = slice(1, S.NOTE_SAMPLES - 1)
        magnitude = np.abs(sound[start : start + S.NOTE_SAMPLES])[inner] / window[inner]
        gain = magnitude.mean() / S.PEAK["large"]
        assert np.allclose(magnitude, magnitude.mean(), rtol=1e-4)
        assert S.GAIN_RANGE[0] - 1e-6 <= gain <= S.GAIN_RANGE[1] + 1e-6


@pytest.mark.parametrize("color", S.COLORS)
def test_sine_pitch_is_within_the_detune_range(color):
    label = S.label_of(S.Attributes("circle", color, "small", "center"))
    n_fft = 1 << 17  # 0.06 Hz bins
    freqs = np.fft.rfftfreq(n_fft, 1 / S.SAMPLE_RATE)
    for i in range(10):
        sound = S.make_sample(SEED, i, label=label).sound.astype(np.float64)
        f = freqs[np.abs(np.fft.rfft(sound, n_fft)).argmax()]
        assert abs(f / S.PITCH_HZ[color] - 1) <= S.DETUNE + 0.1 / S.PITCH_HZ[color]


def test_make_sample_is_deterministic_and_varies_with_seed_and_index():
    a, b = S.make_sample(SEED, 7), S.make_sample(SEED, 7)
    assert a.image.tobytes() == b.image.tobytes() and a.sound.tobytes() == b.sound.tobytes()
    assert (a.caption, a.label, a.seed, a.index) == (b.caption, b.label, SEED, 7)
    for other in (S.make_sample(SEED + 1, 7), S.make_sample(SEED, 8)):
        assert other.sound.tobytes() != a.sound.tobytes()
    labels = {S.make_sample(SEED, i).label for i in range(200)}
    assert len(labels) > 50  # 200 draws from 72 classes cover most of them


def test_forced_label_keeps_the_jitter_of_seed_and_index():
    free = S.make_sample(SEED, 3)
    forced = S.make_sample(SEED, 3, label=free.label)
    assert forced.image.tobytes() == free.image.tobytes() and forced.sound.tobytes() == free.sound.tobytes()
    other = (free.label + 1) % S.NUM_CLASSES
    assert S.make_sample(SEED, 3, label=other).label == other


def test_compositional_holdout_is_the_spec_list_and_never_reaches_the_train_stream(tmp_path, tiny_config):
    shapes = S
    from lit_vqdiff.data.datamodule import ShardDataModule
    from lit_vqdiff.data.shards import write_shapes_set

    assert shapes.HELDOUT_LABELS == (0, 11, 13, 21, 28, 30, 41, 43, 50, 58, 60, 71)
    pairs = {(shapes.attributes_of(k).shape, shapes.attributes_of(k).color) for k in shapes.HELDOUT_LABELS}
    assert len(pairs) == 12  # one combination per shape-colour pair: every pair and value still trains
    out = tmp_path / "shapes-v1-compositional"
    write_shapes_set(out, 720, 360, 0, 1, 90, holdout="compositional")
    dm = ShardDataModule(tiny_config(out, batch_size=64), ("class",))
    train = [int(label) for batch in dm.train_dataloader() for label in batch["label"]]
    assert len(train) == 720 and not set(train) & set(shapes.HELDOUT_LABELS)
    assert len(set(train)) == 60  # the other 60 all occur
    val = [int(label) for batch in dm.val_dataloader() for label in batch["label"]]
    assert set(shapes.HELDOUT_LABELS) <= set(val)  # val keeps them, to be scored
