"""shapes-v1: the embedded multimodal data set (image, caption, sound per sample).

Every sample is a pure function of (seed, index), so shards are reproducible byte for
byte and any generated sample can be checked analytically (see ``eval/shapes.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ..media import encode_png, encode_wav

NAME = "shapes-v1"

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
POSITIONS = ("left", "center", "right")
ATTRIBUTES = ("shape", "color", "size", "position")
VALUES = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS}
NUM_CLASSES = len(SHAPES) * len(COLORS) * len(SIZES) * len(POSITIONS)  # 72

IMAGE_SIZE = 32
BACKGROUND = (16, 16, 16)
RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
RADIUS = {"small": 5.0, "large": 8.5}
CENTER_X = {"left": 9.5, "center": 16.0, "right": 22.5}
CENTER_Y = 16.0
JITTER_X, JITTER_Y = 1.0, 2.5

SAMPLE_RATE = 8000
NUM_SAMPLES = 8000  # 1.0 s
NOTE_SAMPLES = 3200  # 0.4 s
ONSET_S = {"left": 0.05, "center": 0.30, "right": 0.55}
JITTER_ONSET_S = 0.05
PITCH_HZ = {"red": 262.0, "green": 330.0, "blue": 392.0, "yellow": 523.0}
DETUNE = 0.01
PEAK = {"small": 0.3, "large": 0.8}
GAIN_RANGE = (0.9, 1.1)

CAPTION_PLACE = {"left": "on the left", "center": "in the center", "right": "on the right"}


@dataclass(frozen=True)
class Attributes:
    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for key in ATTRIBUTES:
            if getattr(self, key) not in VALUES[key]:
                raise ValueError(f"shapes-v1 {key} must be one of {VALUES[key]}, got {getattr(self, key)!r}")

    @property
    def label(self) -> int:
        return label_of(self)

    def as_dict(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in ATTRIBUTES}


def label_of(attrs: Attributes) -> int:
    """Class label ((shape * 4 + color) * 2 + size) * 3 + position, as the spec defines it."""
    s, c = SHAPES.index(attrs.shape), COLORS.index(attrs.color)
    z, p = SIZES.index(attrs.size), POSITIONS.index(attrs.position)
    return ((s * len(COLORS) + c) * len(SIZES) + z) * len(POSITIONS) + p


def attributes_of(label: int) -> Attributes:
    """Inverse of ``label_of``."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"shapes-v1 label must be in [0, {NUM_CLASSES}), got {label!r}")
    label, p = divmod(int(label), len(POSITIONS))
    label, z = divmod(label, len(SIZES))
    s, c = divmod(label, len(COLORS))
    return Attributes(SHAPES[s], COLORS[c], SIZES[z], POSITIONS[p])


def caption_of(attrs: Attributes) -> str:
    """The one caption of a set of attributes, e.g. 'a large blue triangle on the right'."""
    return f"a {attrs.size} {attrs.color} {attrs.shape} {CAPTION_PLACE[attrs.position]}"


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask of the pixels a shape paints; pixel (i, j) has centre (j + .5, i + .5)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(x - cx) <= 0.89 * r) & (np.abs(y - cy) <= 0.89 * r)
    if shape == "triangle":
        top = cy - r
        return (y >= top) & (y <= cy + 0.8 * r) & (np.abs(x - cx) <= 0.62 * (y - top))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_image(attrs: Attributes, cx: float, cy: float) -> np.ndarray:
    """32x32x3 uint8 image, no anti-aliasing."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    img[shape_mask(attrs.shape, cx, cy, RADIUS[attrs.size])] = RGB[attrs.color]
    return img


def waveform(shape: str, cycles: np.ndarray) -> np.ndarray:
    """Periodic waveform by shape, evaluated at phase ``cycles`` (in cycles, not radians)."""
    if shape == "circle":
        return np.sin(2 * np.pi * cycles)
    if shape == "square":
        return np.sign(np.sin(2 * np.pi * cycles))
    if shape == "triangle":
        return 4 * np.abs(np.mod(cycles, 1.0) - 0.5) - 1
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_sound(attrs: Attributes, onset_s: float, detune: float, phase: float, gain: float) -> np.ndarray:
    """1 s of mono float32 audio at 8 kHz: one Hann-windowed 0.4 s note on silence."""
    f = PITCH_HZ[attrs.color] * (1 + detune)
    t = np.arange(NOTE_SAMPLES, dtype=np.float64) / SAMPLE_RATE
    note = waveform(attrs.shape, f * t + phase) * np.hanning(NOTE_SAMPLES) * PEAK[attrs.size] * gain
    start = min(int(round(onset_s * SAMPLE_RATE)), NUM_SAMPLES - NOTE_SAMPLES)
    out = np.zeros(NUM_SAMPLES, dtype=np.float64)
    out[start : start + NOTE_SAMPLES] = note
    return out.astype(np.float32)


@dataclass(frozen=True)
class Sample:
    attributes: Attributes
    image: np.ndarray  # (32, 32, 3) uint8
    sound: np.ndarray  # (8000,) float32 in [-1, 1]
    caption: str
    seed: int
    index: int

    @property
    def label(self) -> int:
        return self.attributes.label


def heldout_labels() -> tuple[int, ...]:
    """The compositional hold-out: one combination per shape-colour pair, with size
    (shape + colour) mod 2 and position (shape + 2 colour) mod 3 (indices in spec order)."""
    labels = []
    for s in range(len(SHAPES)):
        for c in range(len(COLORS)):
            attrs = Attributes(SHAPES[s], COLORS[c], SIZES[(s + c) % 2], POSITIONS[(s + 2 * c) % 3])
            labels.append(label_of(attrs))
    return tuple(sorted(labels))


HELDOUT_LABELS = heldout_labels()
HOLDOUTS = {"none": (), "compositional": HELDOUT_LABELS}  # data.shapes.holdout -> labels never in train


def make_sample(seed: int, index: int, label: int | None = None, excluded: tuple[int, ...] = ()) -> Sample:
    """Sample ``index`` of the stream with ``seed``; a pure function of its arguments.

    ``label`` forces the attributes (the jitter still comes from (seed, index));
    ``excluded`` labels are never drawn (the same stream without them: a hold-out).
    """
    rng = np.random.default_rng([int(seed), int(index)])
    allowed = [k for k in range(NUM_CLASSES) if k not in excluded] if excluded else None
    drawn = int(rng.integers(NUM_CLASSES)) if allowed is None else allowed[int(rng.integers(len(allowed)))]
    attrs = attributes_of(drawn if label is None else label)
    cx = CENTER_X[attrs.position] + rng.uniform(-JITTER_X, JITTER_X)
    cy = CENTER_Y + rng.uniform(-JITTER_Y, JITTER_Y)
    onset = ONSET_S[attrs.position] + rng.uniform(-JITTER_ONSET_S, JITTER_ONSET_S)
    detune = rng.uniform(-DETUNE, DETUNE)
    phase = rng.uniform(0.0, 1.0)
    gain = rng.uniform(*GAIN_RANGE)
    return Sample(
        attributes=attrs,
        image=render_image(attrs, cx, cy),
        sound=render_sound(attrs, onset, detune, phase, gain),
        caption=caption_of(attrs),
        seed=int(seed),
        index=int(index),
    )


def parse_caption(text: str) -> Attributes | None:
    """Attributes of a well-formed caption, or None when it is not one of the 72 captions."""
    return _CAPTIONS.get(text)


_CAPTIONS = {caption_of(attributes_of(k)): attributes_of(k) for k in range(NUM_CLASSES)}


def members(sample: Sample) -> dict[str, bytes]:
    """The five shard members of a sample, as the spec lists them."""
    meta = sample.attributes.as_dict() | {"seed": sample.seed, "index": sample.index}
    return {
        "png": encode_png(sample.image),
        "wav": encode_wav(sample.sound, SAMPLE_RATE),
        "txt": sample.caption.encode("utf-8"),
        "cls": str(sample.label).encode("ascii"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def class_names() -> list[str]:
    """Names of the 72 classes in label order, e.g. 'large blue triangle, right'."""
    return [f"{a.size} {a.color} {a.shape}, {a.position}" for a in map(attributes_of, range(NUM_CLASSES))]
