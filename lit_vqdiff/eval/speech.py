"""Speech quality of decoded speech against its reference, scored at 8 kHz (narrow band).

- ``pesq``: ITU-T P.862 narrow-band PESQ as MOS-LQO (P.862.1 mapping), 1.0 (bad) to 4.55
  (identical), from the ``pesq`` package. It aligns the pair itself.
- ``stoi``: short-time objective intelligibility (Taal et al. 2011), 0 to 1, from ``pystoi``.
- ``lsd``: log-spectral distance in dB (``lit_vqdiff.dsp.log_spectral_distance``, 256-point
  STFT, hop 64), 0 for identical magnitudes.
- ``mcd``: mel-cepstral distortion in dB over mel cepstra c1..c13 (c0 excluded) of 32 ms
  frames, 0 for identical; see ``mel_cepstra`` and ``mcd``.

Signals at another rate are resampled to 8 kHz first. A metric that cannot score a pair
(silence, too short, PESQ finding no utterance) gives NaN with a note, counted by
``score_pairs``, instead of stopping a whole evaluation.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Any, Callable, Iterable

import numpy as np
import pesq as pesq_lib
import pystoi
import torch
from scipy.fft import dct
from scipy.signal import correlate, fftconvolve

from ..dsp import log_spectral_distance, resample

RATE = 8000
SILENT_PEAK = 1e-4  # a signal whose peak stays below this (-80 dBFS) counts as silent
PESQ_MIN_S = 0.25  # P.862 refuses shorter signals
STOI_MIN_S = 0.4  # pystoi needs 30 frames of 256 samples at 10 kHz (hop 128)
LSD_FFT, LSD_HOP = 256, 64
# Mel cepstra for MCD: 32 ms Hann frames every 10 ms, 24 mel bands over 0-4 kHz, c1..c13.
MCD_FRAME, MCD_HOP, MCD_MELS, MCD_COEFFS = 256, 80, 24, 13
BAND_RANGE_DB = 60.0  # MCD clamps mel bands this far below the reference's loudest band
SPEECH_RANGE_DB = 40.0  # MCD averages frames within this range of the reference's loudest
MCD_SCALE = 10.0 / math.log(10.0) * math.sqrt(2.0)  # Kubichek's dB scaling of a cepstral distance


class Unscorable(ValueError):
    """A pair a metric cannot score; the message is the note ``score_pairs`` counts."""


# ----------------------------------------------------------------------------- signals


def at_rate(wave: np.ndarray, rate: int) -> np.ndarray:
    """A mono float64 waveform at 8 kHz (resampled with ``lit_vqdiff.dsp.resample`` when needed)."""
    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono waveform (1-D), got shape {wave.shape}")
    if rate == RATE:
        return wave
    return resample(torch.from_numpy(wave), rate, RATE).numpy()


def is_silent(wave: np.ndarray) -> bool:
    """Whether a waveform's peak stays below ``SILENT_PEAK``."""
    return wave.size == 0 or float(np.max(np.abs(wave))) < SILENT_PEAK


def envelope(wave: np.ndarray, smooth: int) -> np.ndarray:
    """Energy envelope: squared samples smoothed by a Hann window of ``smooth`` samples."""
    window = np.hanning(smooth + 2)[1:-1]
    return fftconvolve(np.square(wave), window / window.sum(), mode="same")


def envelope_lag(degraded: np.ndarray, reference: np.ndarray, max_lag: int, smooth: int = 40) -> float:
    """Samples by which ``degraded`` trails ``reference`` (negative: leads), within ``max_lag``.

    Cross-correlates energy envelopes rather than waveforms: a codec that synthesizes its
    own phases (Codec2, a vocoder) keeps the envelope's timing but not the waveform's.
    The peak is refined to a fraction of a sample with a parabola through its neighbours.
    """
    a, b = envelope(degraded, smooth), envelope(reference, smooth)
    corr = correlate(a - a.mean(), b - b.mean(), mode="full", method="fft")
    zero = b.size - 1  # corr[zero + k] pairs degraded[t + k] with reference[t]
    lo, hi = max(0, zero - max_lag), min(corr.size, zero + max_lag + 1)
    k = lo + int(np.argmax(corr[lo:hi]))
    offset = 0.0
    if lo < k < hi - 1:
        left, mid, right = corr[k - 1], corr[k], corr[k + 1]
        curve = left - 2 * mid + right
        offset = 0.5 * (left - right) / curve if curve < 0 else 0.0
    return float(k - zero + offset)


def shift(wave: np.ndarray, lag: int, length: int) -> np.ndarray:
    """``wave`` moved ``lag`` samples earlier (later when negative), zero-padded or cut to ``length``."""
    out = np.zeros(length, dtype=np.float64)
    src = wave[max(0, lag) :]
    start = max(0, -lag)
    n = max(0, min(src.size, length - start))
    out[start : start + n] = src[:n]
    return out


# ----------------------------------------------------------------------------- metrics


def pesq_nb(reference: np.ndarray, degraded: np.ndarray) -> float:
    """Narrow-band PESQ (P.862 MOS-LQO) of an 8 kHz pair."""
    if min(reference.size, degraded.size) < PESQ_MIN_S * RATE:
        raise Unscorable(f"shorter than {PESQ_MIN_S} s")
    if is_silent(reference) or is_silent(degraded):
        raise Unscorable(f"silent {'reference' if is_silent(reference) else 'degraded'} signal")
    try:
        return float(pesq_lib.pesq(RATE, reference, degraded, "nb"))
    except (pesq_lib.PesqError, ValueError) as err:  # e.g. no utterance found in the reference
        reason = err.args[0] if err.args else type(err).__name__
        raise Unscorable(reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)) from None


def stoi(reference: np.ndarray, degraded: np.ndarray) -> float:
    """STOI of an 8 kHz pair of equal length."""
    if reference.size < STOI_MIN_S * RATE:
        raise Unscorable(f"shorter than {STOI_MIN_S} s")
    if is_silent(reference):
        raise Unscorable("silent reference signal")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = float(pystoi.stoi(reference, degraded, RATE, extended=False))
    for warning in caught:
        # pystoi warns, and returns 1e-5, when too few frames remain after dropping silent ones.
        if "Not enough STFT frames" in str(warning.message):
            raise Unscorable("too few speech frames")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return score


def lsd(reference: np.ndarray, degraded: np.ndarray) -> float:
    """Log-spectral distance (dB) of an 8 kHz pair of equal length."""
    if reference.size <= LSD_FFT // 2:
        raise Unscorable(f"shorter than {LSD_FFT // 2 + 1} samples")
    pred, target = torch.from_numpy(degraded), torch.from_numpy(reference)
    return float(log_spectral_distance(pred, target, n_fft=LSD_FFT, hop=LSD_HOP))


def mel_filterbank(n_fft: int = MCD_FRAME, mels: int = MCD_MELS, rate: int = RATE) -> np.ndarray:
    """(mels, n_fft // 2 + 1) triangular filters equally spaced on the HTK mel scale from 0 Hz to Nyquist."""
    to_mel = lambda hz: 2595.0 * np.log10(1.0 + hz / 700.0)  # noqa: E731
    edges = 700.0 * (10.0 ** (np.linspace(0.0, to_mel(rate / 2), mels + 2) / 2595.0) - 1.0)
    bins = np.fft.rfftfreq(n_fft, 1.0 / rate)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return np.clip(np.minimum(rising, falling), 0.0, None)


def frames_of(wave: np.ndarray) -> np.ndarray:
    """Hann-windowed frames (count, MCD_FRAME) every MCD_HOP samples, no padding."""
    if wave.size < MCD_FRAME:
        raise Unscorable(f"shorter than {MCD_FRAME} samples")
    frames = np.lib.stride_tricks.sliding_window_view(wave, MCD_FRAME)[::MCD_HOP]
    return frames * np.hanning(MCD_FRAME + 1)[:-1]


def mel_bands(wave: np.ndarray) -> np.ndarray:
    """Mel band powers (frames, MCD_MELS) of an 8 kHz waveform."""
    return np.square(np.abs(np.fft.rfft(frames_of(wave), axis=-1))) @ mel_filterbank().T


def mel_cepstra(bands: np.ndarray, floor: float) -> np.ndarray:
    """Mel cepstra c1..c13 (frames, 13) of mel band powers, bands clamped at ``floor``.

    c_n = (1/M) sum_m ln(A_m) cos(pi n (m + 1/2) / M) over the M = 24 band amplitudes A_m
    (square roots of the powers): the real cepstrum of the mel-sampled log amplitude
    spectrum, the quantity MCD's dB scaling assumes. c0, the frame's overall level, is left
    out: MCD measures spectral shape, not loudness. These are mel-frequency cepstra, not
    SPTK's all-pass-warped mel-cepstra: compare MCDs from this module only.
    """
    log_amplitude = 0.5 * np.log(np.maximum(bands, floor))
    return dct(log_amplitude, type=2, axis=-1)[:, 1 : 1 + MCD_COEFFS] / (2 * bands.shape[-1])


def mcd(reference: np.ndarray, degraded: np.ndarray) -> float:
    """Mel-cepstral distortion (dB) of an 8 kHz pair of equal length, time-aligned (no DTW).

    Frames of 256 samples (32 ms, Hann) every 80 (10 ms); 24 HTK mel bands over 0-4 kHz;
    13 coefficients, c1..c13 (``mel_cepstra``). Per frame (10/ln 10) * sqrt(2 * sum_n
    (c_n - c'_n)^2), averaged over the frames whose reference power lies within
    ``SPEECH_RANGE_DB`` of its loudest (pauses would dilute the figure). Bands more than
    ``BAND_RANGE_DB`` below the reference's loudest band count as that level in both
    signals: synthesized speech holds digital silence in parts of its spectrum, where logs
    would compare arbitrarily small numbers; being relative, the figure ignores the pair's
    overall level.
    """
    if is_silent(reference):
        raise Unscorable("silent reference signal")
    ref_bands, deg_bands = mel_bands(reference), mel_bands(degraded)
    floor = ref_bands.max() * 10.0 ** (-BAND_RANGE_DB / 10.0)
    distance = MCD_SCALE * np.linalg.norm(mel_cepstra(ref_bands, floor) - mel_cepstra(deg_bands, floor), axis=-1)
    level = 10.0 * np.log10(np.maximum(ref_bands.sum(-1), floor))
    return float(distance[level >= level.max() - SPEECH_RANGE_DB].mean())


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"pesq": pesq_nb, "stoi": stoi, "lsd": lsd, "mcd": mcd}


# ----------------------------------------------------------------------------- pairs


def score_pair(
    reference: np.ndarray, degraded: np.ndarray, rate: int = RATE, max_shift_s: float | None = None
) -> tuple[dict[str, float], list[str]]:
    """Every metric of one pair (NaN where it cannot score), and notes ``metric: reason``.

    The degraded signal is fitted to the reference's length (cut or zero-padded, noted when
    they differ). ``max_shift_s`` set: it is first shifted by its ``envelope_lag`` (rounded,
    within that many seconds), for outputs whose delay is unknown; PESQ aligns on its own.
    """
    reference, degraded = at_rate(reference, rate), at_rate(degraded, rate)
    notes = []
    if degraded.size != reference.size:
        notes.append("pair: lengths differ, degraded fitted to the reference")
    lag = 0
    if max_shift_s is not None and not (is_silent(reference) or is_silent(degraded)):
        lag = round(envelope_lag(degraded, reference, max(1, round(max_shift_s * RATE))))
    degraded = shift(degraded, lag, reference.size)
    scores = {}
    for name, metric in METRICS.items():
        try:
            scores[name] = metric(reference, degraded)
        except Unscorable as err:
            scores[name] = math.nan
            notes.append(f"{name}: {err}")
    return scores, notes


def score_pairs(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]], rate: int = RATE, max_shift_s: float | None = None
) -> dict[str, Any]:
    """Mean of each metric over (reference, degraded) pairs, with how many pairs each scored
    (``<metric>_scored``) and the count of every note (see ``score_pair``)."""
    values: dict[str, list[float]] = {name: [] for name in METRICS}
    notes: Counter[str] = Counter()
    count = 0
    for reference, degraded in pairs:
        scores, pair_notes = score_pair(reference, degraded, rate, max_shift_s)
        for name, value in scores.items():
            values[name].append(value)
        notes.update(pair_notes)
        count += 1
    out: dict[str, Any] = {"pairs": count}
    for name, seen in values.items():
        finite = [v for v in seen if math.isfinite(v)]
        out[name] = float(np.mean(finite)) if finite else math.nan
        out[f"{name}_scored"] = len(finite)
    out["notes"] = dict(sorted(notes.items()))
    return out
