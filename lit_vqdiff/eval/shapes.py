"""Analytic verifiers for shapes-v1: read (shape, color, size, position) back from a
generated image, sound or caption, and score the readings against the conditioning.

It judges samples conditioned on shapes-v1 (real data gets the metrics of
``eval/metrics.py``), so every reader uses evidence that survives what a tokenizer does to a sample (blur, noise, softened corners and
colour shifts for images; phase changes, noise, low-pass and gain for sounds) and says
None for an attribute it cannot read rather than guessing.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..data import shapes as S

Reading = dict[str, str | None]

# --- images -----------------------------------------------------------------------------

# A pixel belongs to the foreground when it is this far (RGB L2, 0..255 units) from the
# background: far above noise (sigma 8 per channel) and well below the closest reference
# colour's distance from the background (~171 for green).
FOREGROUND_DISTANCE = 60.0
MIN_FOREGROUND_PIXELS = 10  # the smallest object (small triangle) paints ~50
# Core pixels (those that give the colour) are within this share of the farthest pixel's
# distance from the background, which keeps blurred edges out of the colour estimate.
CORE_SHARE = 0.8
# A colour farther than half the closest pair of reference colours from every reference
# cannot be told apart from a colour the data set does not have.
_REF_RGB = np.array([S.RGB[c] for c in S.COLORS], dtype=np.float32)
COLOR_TOLERANCE = 0.5 * min(
    float(np.linalg.norm(a - b)) for i, a in enumerate(_REF_RGB) for b in _REF_RGB[i + 1 :]
)
# Overlap (IoU) of the foreground with its best template: >= 0.88 on clean renders and
# >= 0.76 after blur (sigma 1 px), noise (sigma 12), colour shift and softened corners
# together. Below this the picture holds more than one object, or none of the 72.
MIN_TEMPLATE_IOU = 0.7
CENTRE_STEP = 0.5  # sub-pixel grid of candidate centres
CENTRE_SLACK = 1.0  # beyond the jitter ranges, in pixels
# Object pixels never reach these rows (y spans [5, 27] at most), so they give the
# background colour even when a picture's colours have drifted.
_BACKGROUND_ROWS = np.r_[0:3, S.IMAGE_SIZE - 3 : S.IMAGE_SIZE]
_IMAGE_CHUNK = 512  # images per matrix product, bounds the (chunk, templates) score array


@dataclass(frozen=True)
class _TemplateBank:
    masks: np.ndarray  # (templates, pixels in support) float32 0/1
    support: np.ndarray  # flat indices of the pixels some template paints
    area: np.ndarray  # painted pixels per template
    shape: np.ndarray  # index into SHAPES per template
    size: np.ndarray  # index into SIZES per template
    centre_x: np.ndarray  # template centre x, pixels


@functools.cache
def _template_bank() -> _TemplateBank:
    """Every shape and size drawn at every candidate centre, built once per process."""
    lo_x = min(S.CENTER_X.values()) - S.JITTER_X - CENTRE_SLACK
    hi_x = max(S.CENTER_X.values()) + S.JITTER_X + CENTRE_SLACK
    lo_y, hi_y = S.CENTER_Y - S.JITTER_Y - CENTRE_SLACK, S.CENTER_Y + S.JITTER_Y + CENTRE_SLACK
    xs = np.arange(lo_x, hi_x + 1e-9, CENTRE_STEP)
    ys = np.arange(lo_y, hi_y + 1e-9, CENTRE_STEP)
    masks, shape_idx, size_idx, centre_x = [], [], [], []
    for s, shape in enumerate(S.SHAPES):
        for z, size in enumerate(S.SIZES):
            for cy in ys:
                for cx in xs:
                    masks.append(S.shape_mask(shape, cx, cy, S.RADIUS[size]).ravel())
                    shape_idx.append(s)
                    size_idx.append(z)
                    centre_x.append(cx)
    full = np.asarray(masks, dtype=np.float32)
    # Pixels no template paints add the same to every template's distance: leave them out.
    support = np.flatnonzero(full.any(axis=0))
    return _TemplateBank(
        masks=np.ascontiguousarray(full[:, support]),
        support=support,
        area=full.sum(axis=1),
        shape=np.asarray(shape_idx),
        size=np.asarray(size_idx),
        centre_x=np.asarray(centre_x),
    )


def _as_images(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) float32 in 0..255 units from uint8 or float-in-[0, 1] input."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[1:] != (S.IMAGE_SIZE, S.IMAGE_SIZE, 3):
        raise ValueError(f"images must have shape (N, 32, 32, 3), got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {arr.dtype}")
    if arr.size and not np.isfinite(arr).all():
        raise ValueError("images contain NaN or infinite values")
    # A decoder may overshoot [0, 1] a little; [-1, 1] or 0..255 floats are a caller bug.
    if arr.size and (arr.min() < -0.25 or arr.max() > 1.25):
        raise ValueError(f"float images must be in [0, 1], got values in [{arr.min():.3g}, {arr.max():.3g}]")
    return np.clip(arr, 0.0, 1.0).astype(np.float32) * 255.0


def _nearest_color(rgb: np.ndarray) -> list[str | None]:
    """Name of the nearest reference colour for each row of ``rgb``, None when none is near."""
    dist = np.linalg.norm(rgb[:, None, :] - _REF_RGB[None], axis=2)
    best = dist.argmin(axis=1)
    near = dist[np.arange(len(rgb)), best] <= COLOR_TOLERANCE
    return [S.COLORS[b] if ok else None for b, ok in zip(best, near)]


def _read_image_chunk(pixels: np.ndarray) -> list[Reading]:
    """Readings for (n, 32, 32, 3) float pixels in 0..255 units."""
    n = len(pixels)
    background = np.median(pixels[:, _BACKGROUND_ROWS].reshape(n, -1, 3), axis=1)
    offset = pixels.reshape(n, -1, 3) - background[:, None, :]
    distance = np.linalg.norm(offset, axis=2)
    present = (distance > FOREGROUND_DISTANCE).sum(axis=1) >= MIN_FOREGROUND_PIXELS

    core = distance >= CORE_SHARE * distance.max(axis=1, keepdims=True)
    core_offset = (offset * core[..., None]).sum(axis=1) / core.sum(axis=1)[:, None]
    colors = _nearest_color(background + core_offset)

    # Foreground opacity: each pixel projected onto the object's colour direction, so
    # blurred edges count fractionally and noise across that direction is ignored.
    norm2 = np.maximum((core_offset**2).sum(axis=1), 1e-6)
    alpha = np.einsum("npc,nc->np", offset, core_offset) / norm2[:, None]

    # Least squares against binary templates: |alpha - t|^2 = |alpha|^2 + |t| - 2 alpha.t,
    # and |alpha|^2 is the same for every template of an image.
    bank = _template_bank()
    products = alpha[:, bank.support].astype(np.float32) @ bank.masks.T
    best = (bank.area[None, :] - 2.0 * products).argmin(axis=1)
    # Overlap counts every pixel at least half as far from the background as the object's
    # colour, whatever its hue, so a second object or a smear lowers it.
    painted = distance > 0.5 * np.sqrt(norm2)[:, None]
    chosen = np.zeros_like(painted)
    chosen[:, bank.support] = bank.masks[best] > 0.5
    iou = (painted & chosen).sum(axis=1) / np.maximum((painted | chosen).sum(axis=1), 1)

    centres = np.array([S.CENTER_X[p] for p in S.POSITIONS])
    position = np.abs(bank.centre_x[best][:, None] - centres[None]).argmin(axis=1)
    readings: list[Reading] = []
    for i in range(n):
        if not present[i]:
            readings.append(dict.fromkeys(S.ATTRIBUTES))
            continue
        fits = iou[i] >= MIN_TEMPLATE_IOU
        readings.append({
            "shape": S.SHAPES[bank.shape[best[i]]] if fits else None,
            "color": colors[i],
            "size": S.SIZES[bank.size[best[i]]] if fits else None,
            "position": S.POSITIONS[position[i]] if fits else None,
        })
    return readings


def verify_images(images: np.ndarray) -> list[Reading]:
    """Attributes read from (N, 32, 32, 3) images, uint8 or float in [0, 1]; None = unreadable."""
    pixels = _as_images(images)
    readings: list[Reading] = []
    for start in range(0, len(pixels), _IMAGE_CHUNK):
        readings.extend(_read_image_chunk(pixels[start : start + _IMAGE_CHUNK]))
    return readings


def verify_image(image: np.ndarray) -> Reading:
    """Attributes read from one (32, 32, 3) image."""
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"image must have shape (32, 32, 3), got {arr.shape}")
    return verify_images(arr[None])[0]


# --- sounds -----------------------------------------------------------------------------

SILENCE_PEAK = 1e-3  # about -60 dBFS; quieter clips hold no note
F0_RANGE_HZ = (220.0, 600.0)  # the pitches +-10%; holds no square-wave 3rd harmonic (>= 786 Hz)
# Spectra are Welch averages of short-frame power spectra: a change of phase between
# frames (Griffin-Lim, a vocoder) smears a whole-clip spectrum but leaves these intact.
WELCH_FRAME_S = 0.064
WELCH_HOP_S = 0.032  # half-overlapping Hann frames weigh every sample about equally
BAND_HALF_WIDTH_HZ = 40.0  # a 64 ms Hann frame's main lobe is +-31 Hz
LOW_CUT_HZ = 50.0  # DC offset and rumble are no part of a note
# A pitch more than this (relative) from every reference pitch is not one of the colours:
# the data set detunes by at most 1%, a vocoder may move a pitch a little further, and a
# semitone (5.9%) away is another note.
PITCH_TOLERANCE = 0.05
# Below this share of the energy in the fundamental, the clip is not a single note
# (sine 1.0, triangle 0.99, square 0.81 on clean renders).
MIN_TONAL_SHARE = 0.5
# 3rd harmonic / fundamental amplitude: sine 0, triangle 1/9, square 1/3. Boundaries sit
# at the geometric mean of 1/9 and 1/3, and at 1/9 divided by ~2.2 so that a low-pass
# that halves the 3rd harmonic keeps a triangle a triangle.
SINE_MAX_RATIO = 0.05
SQUARE_MIN_RATIO = float(np.sqrt(1 / 27))
# Fundamental amplitude per unit of peak amplitude for each waveform (Fourier series).
FUNDAMENTAL_PER_PEAK = {"circle": 1.0, "square": 4 / np.pi, "triangle": 8 / np.pi**2}
LOUDNESS_TOLERANCE = 2.0  # a peak beyond 2x the loudness range is no size at all
ENVELOPE_FRAME_S = 0.01
# The energy of a 0.4 s Hann note spreads over 0.057 s (standard deviation), that of
# noise filling a 1 s clip over 0.29 s: beyond this the energy sits nowhere in particular.
MAX_SPREAD_S = 0.12
NOTE_S = S.NOTE_SAMPLES / S.SAMPLE_RATE
HANN_MEAN_SQUARE = 0.375  # mean of the squared Hann window
_SOUND_CHUNK = 64  # sounds per batch of frame spectra: bounds memory, stays in cache


def _as_waves(waves: np.ndarray, sample_rate: float) -> np.ndarray:
    """(N, L) float64 from float input; rejects what cannot be a sound at ``sample_rate``."""
    arr = np.asarray(waves)
    if arr.ndim != 2:
        raise ValueError(f"waves must have shape (N, samples), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"waves must be float in [-1, 1], got dtype {arr.dtype}")
    if arr.size and not np.isfinite(arr).all():
        raise ValueError("waves contain NaN or infinite values")
    # The 3rd harmonic of the highest pitch (+10%) must lie below the Nyquist frequency.
    if not sample_rate >= 2 * 3 * F0_RANGE_HZ[1]:
        raise ValueError(f"sample_rate must be at least {2 * 3 * F0_RANGE_HZ[1]:g} Hz, got {sample_rate!r}")
    return arr.astype(np.float64)


def _band_energy(power: np.ndarray, centre_bin: np.ndarray, half_width: int) -> np.ndarray:
    """Sum of ``power`` over bins within ``half_width`` of each row's ``centre_bin``."""
    offsets = np.arange(-half_width, half_width + 1)
    bins = np.clip(np.rint(centre_bin)[:, None].astype(int) + offsets[None], 1, power.shape[1] - 1)
    return np.take_along_axis(power, bins, axis=1).sum(axis=1)


def _energy_location_s(waves: np.ndarray, sample_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre and spread (standard deviation), in seconds, of each clip's energy over time."""
    frame = max(1, int(round(ENVELOPE_FRAME_S * sample_rate)))
    n_frames = max(1, waves.shape[1] // frame)
    usable = waves[:, : n_frames * frame]
    energy = (usable**2).reshape(len(waves), n_frames, -1).sum(axis=2)
    # The note fills 40% of a clip, so the lower quartile of frame energies is silence
    # (plus whatever noise was added): subtract it so noise does not pull the centre to 0.5 s.
    energy = np.maximum(energy - np.quantile(energy, 0.25, axis=1, keepdims=True), 0.0)
    weight = energy / np.maximum(energy.sum(axis=1, keepdims=True), 1e-30)
    times = (np.arange(n_frames) + 0.5) * usable.shape[1] / n_frames / sample_rate
    centre = (weight * times).sum(axis=1)
    spread = np.sqrt((weight * (times - centre[:, None]) ** 2).sum(axis=1))
    return centre, spread


def _nearest_pitch(f0: np.ndarray) -> list[str | None]:
    """Colour whose pitch is nearest each f0 on a log scale, None when none is near."""
    refs = np.log(np.array([S.PITCH_HZ[c] for c in S.COLORS]))
    dist = np.abs(np.log(np.maximum(f0, 1e-6))[:, None] - refs[None])  # silence has f0 0
    best = dist.argmin(axis=1)
    near = dist[np.arange(len(f0)), best] <= np.log1p(PITCH_TOLERANCE)
    return [S.COLORS[b] if ok else None for b, ok in zip(best, near)]


def _shape_of(ratio: float) -> str:
    """Waveform named by its 3rd-harmonic-to-fundamental amplitude ratio."""
    if ratio < SINE_MAX_RATIO:
        return "circle"
    return "triangle" if ratio < SQUARE_MIN_RATIO else "square"


def _size_of(peak: float) -> str | None:
    """Size whose peak amplitude is nearest ``peak`` on a log scale, None when far from both."""
    lo = S.PEAK["small"] * S.GAIN_RANGE[0] / LOUDNESS_TOLERANCE
    hi = S.PEAK["large"] * S.GAIN_RANGE[1] * LOUDNESS_TOLERANCE
    if not lo <= peak <= hi:
        return None
    return "small" if peak < np.sqrt(S.PEAK["small"] * S.PEAK["large"]) else "large"


def _welch_power(waves: np.ndarray, sample_rate: float) -> tuple[np.ndarray, float]:
    """Mean power spectrum of Hann frames of each clip, and the Hz between its bins."""
    frame = max(8, int(round(WELCH_FRAME_S * sample_rate)))
    hop = max(1, int(round(WELCH_HOP_S * sample_rate)))
    padded = waves if waves.shape[1] >= frame else np.pad(waves, ((0, 0), (0, frame - waves.shape[1])))
    starts = np.arange(0, padded.shape[1] - frame + 1, hop)
    frames = padded[:, starts[:, None] + np.arange(frame)[None]] * np.hanning(frame + 2)[1:-1]
    n_fft = 1 << int(np.ceil(np.log2(2 * frame)))  # bins every ~8 Hz at 64 ms
    spectrum = np.fft.rfft(frames, n_fft, axis=2)
    power = (spectrum.real**2 + spectrum.imag**2).mean(axis=1)
    return power, sample_rate / n_fft


def _pitch_bin(power: np.ndarray, lo: int, hi: int, half_width: int) -> np.ndarray:
    """Fractional bin of each row's fundamental: the power centroid around the peak in [lo, hi]."""
    coarse = lo + power[:, lo : hi + 1].argmax(axis=1)
    bins = coarse[:, None] + np.arange(-half_width, half_width + 1)[None]
    band = np.take_along_axis(power, bins, axis=1)
    # The centroid of the whole lobe, unlike the top of the peak, stays put when
    # inconsistent frame phases make the lobe ragged.
    return (band * bins).sum(axis=1) / np.maximum(band.sum(axis=1), 1e-30)


def _read_sound_chunk(w: np.ndarray, sample_rate: float) -> list[Reading]:
    """Readings for (n, samples) float64 sounds."""
    power, hz_per_bin = _welch_power(w, sample_rate)
    half = int(np.ceil(BAND_HALF_WIDTH_HZ / hz_per_bin))
    lo, hi = (int(round(f / hz_per_bin)) for f in F0_RANGE_HZ)
    f0_bin = _pitch_bin(power, lo, hi, half)
    fundamental = _band_energy(power, f0_bin, half)
    ratio = np.sqrt(_band_energy(power, 3 * f0_bin, half) / np.maximum(fundamental, 1e-30))
    total = power[:, int(np.ceil(LOW_CUT_HZ / hz_per_bin)) :].sum(axis=1)
    fundamental_share = fundamental / np.maximum(total, 1e-30)
    # A Hann note of amplitude A holds A^2/2 * sum(hann^2) of energy in its fundamental.
    fundamental_energy = fundamental_share * (w**2).sum(axis=1)
    amplitude = np.sqrt(2.0 * fundamental_energy / (HANN_MEAN_SQUARE * NOTE_S * sample_rate))
    tonal = fundamental_share >= MIN_TONAL_SHARE
    colors = _nearest_pitch(f0_bin * hz_per_bin)
    centre, spread = _energy_location_s(w, sample_rate)
    onset = centre - NOTE_S / 2  # a Hann note's energy centre is its middle
    onsets = np.array([S.ONSET_S[p] for p in S.POSITIONS])
    position = np.abs(onset[:, None] - onsets[None]).argmin(axis=1)
    localized = spread <= MAX_SPREAD_S
    silent = np.abs(w).max(axis=1) < SILENCE_PEAK

    readings: list[Reading] = []
    for i in range(len(w)):
        if silent[i]:
            readings.append(dict.fromkeys(S.ATTRIBUTES))
            continue
        shape = _shape_of(ratio[i]) if tonal[i] else None
        readings.append({
            "shape": shape,
            "color": colors[i] if tonal[i] else None,
            "size": _size_of(amplitude[i] / FUNDAMENTAL_PER_PEAK[shape]) if shape else None,
            "position": S.POSITIONS[position[i]] if localized[i] else None,
        })
    return readings


def verify_sounds(waves: np.ndarray, sample_rate: float = S.SAMPLE_RATE) -> list[Reading]:
    """Attributes read from (N, samples) float sounds, from phase-independent evidence only."""
    w = _as_waves(waves, sample_rate)
    if w.shape[1] == 0:
        return [dict.fromkeys(S.ATTRIBUTES) for _ in range(len(w))]
    readings: list[Reading] = []
    for start in range(0, len(w), _SOUND_CHUNK):
        readings.extend(_read_sound_chunk(w[start : start + _SOUND_CHUNK], sample_rate))
    return readings


def verify_sound(wave: np.ndarray, sample_rate: float = S.SAMPLE_RATE) -> Reading:
    """Attributes read from one mono float sound."""
    arr = np.asarray(wave)
    if arr.ndim != 1:
        raise ValueError(f"wave must be 1-D (samples,), got shape {arr.shape}")
    return verify_sounds(arr[None], sample_rate)[0]


# --- captions and scoring ---------------------------------------------------------------

_PADDING = string.whitespace + "\x00"  # byte-level text decoders pad with NUL


def verify_caption(text: str | bytes) -> Reading:
    """Attributes of an exact shapes-v1 caption (padding stripped); all None otherwise."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise TypeError(f"text must be str or bytes, got {type(text).__name__}")
    attrs = S.parse_caption(text.strip(_PADDING))
    return attrs.as_dict() if attrs else dict.fromkeys(S.ATTRIBUTES)


def verify_captions(texts: Sequence[str | bytes]) -> list[Reading]:
    """``verify_caption`` over a batch."""
    return [verify_caption(t) for t in texts]


def score(
    predicted: Sequence[Mapping[str, str | None]], expected: Sequence[Mapping[str, str]]
) -> dict[str, float | int]:
    """Exact match (all four attributes right) and per-attribute accuracy; None never matches."""
    if len(predicted) != len(expected):
        raise ValueError(f"predicted and expected differ in length: {len(predicted)} vs {len(expected)}")
    if not expected:
        raise ValueError("score needs at least one (predicted, expected) pair")
    for i, exp in enumerate(expected):
        for key in S.ATTRIBUTES:
            if exp.get(key) not in S.VALUES[key]:
                raise ValueError(f"expected[{i}][{key!r}] must be one of {S.VALUES[key]}, got {exp.get(key)!r}")
    hits = np.array([[pred.get(k) == exp[k] for k in S.ATTRIBUTES] for pred, exp in zip(predicted, expected)])
    result: dict[str, float | int] = {"n": len(expected), "exact_match": float(hits.all(axis=1).mean())}
    result.update({k: float(hits[:, j].mean()) for j, k in enumerate(S.ATTRIBUTES)})
    return result


def read_items(modality: str, items: Sequence, sample_rate: int = S.SAMPLE_RATE) -> list[Reading]:
    """Readings of generated items of one modality: uint8 pictures, float waveforms or captions."""
    if modality == "image":
        return verify_images(np.stack(items))
    if modality == "audio":
        return verify_sounds(np.stack(items), sample_rate)
    if modality == "text":
        return verify_captions(items)
    raise ValueError(f"shapes-v1 has no {modality} reader; expected image, audio or text")
