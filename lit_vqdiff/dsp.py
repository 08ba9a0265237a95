"""Audio DSP on torch alone: spectrograms, Griffin-Lim, STFT losses, metrics, resampling.

Waveforms are float tensors of shape (..., T). Every STFT here uses a periodic Hann
window of length ``win`` (default ``n_fft``) zero-padded to ``n_fft`` and ``center=True``,
so a signal of T samples has ``1 + T // hop`` frames and ``n_fft // 2 + 1`` bins; the
analysis in ``stft_magnitude`` and the synthesis in ``griffin_lim`` agree on this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

LOG_FLOOR = 1e-5  # magnitudes below this (-100 dB re full scale) count as silence


def check_stft_args(n_fft: int, hop: int, win: int | None) -> int:
    """Validate STFT sizes; return the window length."""
    win = n_fft if win is None else win
    if n_fft < 2 or hop < 1 or not 1 <= win <= n_fft:
        raise ValueError(f"need n_fft >= 2, hop >= 1 and 1 <= win <= n_fft; got n_fft={n_fft}, hop={hop}, win={win}")
    return win


def stft(wave: torch.Tensor, n_fft: int, hop: int, win: int | None = None) -> torch.Tensor:
    """Complex STFT of (..., T) -> (..., n_fft // 2 + 1, frames), computed in float32."""
    win = check_stft_args(n_fft, hop, win)
    if wave.shape[-1] <= n_fft // 2:
        raise ValueError(f"wave needs more than n_fft // 2 = {n_fft // 2} samples, got {wave.shape[-1]}")
    # torch.stft has no bf16/fp16 kernels on CPU: autocast callers get float32 here.
    flat = wave.float().reshape(-1, wave.shape[-1])
    window = torch.hann_window(win, device=wave.device)
    spec = torch.stft(flat, n_fft, hop_length=hop, win_length=win, window=window, center=True, return_complex=True)
    return spec.reshape(*wave.shape[:-1], *spec.shape[-2:])


def istft(
    spec: torch.Tensor, n_fft: int, hop: int, win: int | None = None, length: int | None = None
) -> torch.Tensor:
    """Inverse of ``stft``: (..., bins, frames) complex -> (..., T)."""
    win = check_stft_args(n_fft, hop, win)
    flat = spec.reshape(-1, *spec.shape[-2:])
    window = torch.hann_window(win, device=spec.device)
    wave = torch.istft(flat, n_fft, hop_length=hop, win_length=win, window=window, center=True, length=length)
    return wave.reshape(*spec.shape[:-2], wave.shape[-1])


def stft_magnitude(wave: torch.Tensor, n_fft: int, hop: int, win: int | None = None) -> torch.Tensor:
    """|STFT| of (..., T) -> (..., n_fft // 2 + 1, 1 + T // hop)."""
    return stft(wave, n_fft, hop, win).abs()


def log_magnitude_spectrogram(
    wave: torch.Tensor, n_fft: int, hop: int, win: int | None = None, floor: float = LOG_FLOOR
) -> torch.Tensor:
    """Natural log of |STFT| clamped at ``floor``; ``griffin_lim(x.exp(), ...)`` inverts it."""
    return stft_magnitude(wave, n_fft, hop, win).clamp_min(floor).log()


@torch.no_grad()
def griffin_lim(
    magnitude: torch.Tensor,
    n_fft: int,
    hop: int,
    win: int | None = None,
    n_iter: int = 32,
    momentum: float = 0.99,
    length: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Waveform (..., T) whose STFT magnitude approximates ``magnitude`` (..., bins, frames).

    Fast Griffin-Lim (Perraudin et al. 2013): alternate projections between "has this
    magnitude" and "is a consistent STFT", extrapolated by ``momentum`` (0 gives classic
    Griffin-Lim). The start phase is random from ``seed``, so a call is deterministic.
    ``length`` is the output's sample count; it must give ``frames`` frames (default
    (frames - 1) * hop). An inference tool: no gradients flow through it.
    """
    if magnitude.shape[-2] != n_fft // 2 + 1:
        raise ValueError(f"magnitude has {magnitude.shape[-2]} bins; n_fft={n_fft} needs {n_fft // 2 + 1}")
    if n_iter < 0 or not 0.0 <= momentum < 1.0:
        raise ValueError(f"need n_iter >= 0 and 0 <= momentum < 1; got n_iter={n_iter}, momentum={momentum}")
    frames = magnitude.shape[-1]
    if length is not None and 1 + length // hop != frames:
        raise ValueError(f"length={length} gives {1 + length // hop} frames at hop={hop}, magnitude has {frames}")
    magnitude = magnitude.float()
    generator = torch.Generator().manual_seed(seed)
    phase = torch.rand(magnitude.shape, generator=generator).to(magnitude.device) * (2 * math.pi)
    unit = torch.polar(torch.ones_like(magnitude), phase)
    consistent_before = None
    for _ in range(n_iter):
        consistent = stft(istft(magnitude * unit, n_fft, hop, win, length), n_fft, hop, win)
        target = consistent
        if consistent_before is not None:
            target = consistent + momentum * (consistent - consistent_before)
        consistent_before = consistent
        unit = target / target.abs().clamp_min(1e-12)
    return istft(magnitude * unit, n_fft, hop, win, length)


def spectral_convergence(pred_magnitude: torch.Tensor, target_magnitude: torch.Tensor) -> torch.Tensor:
    """||pred - target||_F / ||target||_F over the whole batch (0 = identical magnitudes)."""
    return (pred_magnitude - target_magnitude).norm() / target_magnitude.norm().clamp_min(1e-12)


def multi_resolution_stft_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    resolutions: Sequence[tuple[int, int]] = ((512, 128), (256, 64), (128, 32)),
    floor: float = LOG_FLOOR,
) -> torch.Tensor:
    """Mean over (n_fft, hop) resolutions of spectral convergence + L1 of log magnitudes.

    Blind to phase by construction: it compares only magnitudes, so a note that starts at
    another phase costs (almost) nothing, while a wrong pitch moves energy to other bins.
    Spectral convergence is taken over the whole batch, so one silent target item cannot
    blow it up.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if not resolutions:
        raise ValueError("resolutions must name at least one (n_fft, hop) pair")
    total = pred.new_zeros((), dtype=torch.float32)
    for n_fft, hop in resolutions:
        pred_mag, target_mag = stft_magnitude(pred, n_fft, hop), stft_magnitude(target, n_fft, hop)
        log_l1 = F.l1_loss(pred_mag.clamp_min(floor).log(), target_mag.clamp_min(floor).log())
        total = total + spectral_convergence(pred_mag, target_mag) + log_l1
    return total / len(resolutions)


def si_snr(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant signal-to-noise ratio in dB over the last axis, (..., T) -> (...)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    pred = pred.double() - pred.double().mean(-1, keepdim=True)
    target = target.double() - target.double().mean(-1, keepdim=True)
    # Project pred on target: the part along target is signal, the rest is noise.
    scale = (pred * target).sum(-1, keepdim=True) / (target.pow(2).sum(-1, keepdim=True) + eps)
    signal = scale * target
    noise = pred - signal
    ratio = (signal.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps)
    return (10 * torch.log10(ratio)).float()


def log_spectral_distance(
    pred: torch.Tensor, target: torch.Tensor, n_fft: int = 256, hop: int = 64, floor: float = LOG_FLOOR
) -> torch.Tensor:
    """Log-spectral distance in dB, (..., T) -> (...).

    Per frame, the RMS over bins of 20 log10(|pred| / |target|); then the mean over frames.
    Magnitudes are clamped at ``floor`` so silent frames compare as equal, not as infinite.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    pred_db = 20 * stft_magnitude(pred, n_fft, hop).clamp_min(floor).log10()
    target_db = 20 * stft_magnitude(target, n_fft, hop).clamp_min(floor).log10()
    return (pred_db - target_db).pow(2).mean(-2).sqrt().mean(-1)


def sinc_resample_kernel(orig: int, new: int, zero_crossings: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc filters for ``orig`` -> ``new`` (coprime rates).

    Returns weights (new, 1, 2 * pad + orig) for a conv1d of stride ``orig`` over the input
    padded by ``pad`` on both sides (plus ``orig`` on the right); output channel j holds
    the output samples with index j modulo ``new``.
    """
    # Cutoff in cycles per input sample: below the Nyquist of the slower of the two rates.
    cutoff = 0.5 * rolloff * min(1.0, new / orig)
    pad = math.ceil(zero_crossings / (2 * cutoff))
    taps = torch.arange(-pad, pad + orig, dtype=torch.float64)
    phases = torch.arange(new, dtype=torch.float64)[:, None] * (orig / new)
    offset = taps[None, :] - phases  # input sample minus output time, in input samples
    window = torch.cos(offset / pad * (math.pi / 2)).pow(2) * (offset.abs() <= pad)  # Hann of half-width pad
    kernel = 2 * cutoff * torch.sinc(2 * cutoff * offset) * window
    return kernel[:, None, :], pad


def resample(
    wave: torch.Tensor, orig_sr: int, new_sr: int, zero_crossings: int = 16, rolloff: float = 0.945
) -> torch.Tensor:
    """Band-limited resampling of (..., T) -> (..., ceil(T * new_sr / orig_sr)).

    Windowed-sinc polyphase filter: ``zero_crossings`` per side sets the filter length,
    ``rolloff`` puts the cutoff just below the lower Nyquist so that what would alias is
    attenuated instead. Rates are reduced by their gcd, so 16000 -> 8000 is a 2:1 filter.
    """
    if int(orig_sr) != orig_sr or int(new_sr) != new_sr or orig_sr < 1 or new_sr < 1:
        raise ValueError(f"sample rates must be positive integers, got orig_sr={orig_sr!r}, new_sr={new_sr!r}")
    if not 0.0 < rolloff <= 1.0 or zero_crossings < 1:
        raise ValueError(f"need 0 < rolloff <= 1 and zero_crossings >= 1; got {rolloff}, {zero_crossings}")
    if orig_sr == new_sr:
        return wave
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    kernel, pad = sinc_resample_kernel(orig, new, zero_crossings, rolloff)
    length = wave.shape[-1]
    flat = F.pad(wave.reshape(-1, 1, length), (pad, pad + orig))
    out = F.conv1d(flat, kernel.to(device=wave.device, dtype=flat.dtype), stride=orig)  # (N, new, blocks)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)[:, : math.ceil(length * new / orig)]
    return out.reshape(*wave.shape[:-1], out.shape[-1])
