"""Audio DSP: STFT sanity, phase-blind losses, Griffin-Lim, SI-SNR, LSD, resampling."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio

from lit_vqdiff.dsp import (
    griffin_lim,
    log_magnitude_spectrogram,
    log_spectral_distance,
    multi_resolution_stft_loss,
    resample,
    si_snr,
    spectral_convergence,
    stft_magnitude,
)
from lit_vqdiff.data.shapes import SAMPLE_RATE, Attributes, make_sample, render_sound

SR = SAMPLE_RATE


def sine(freq: float, sr: int = SR, seconds: float = 1.0, phase: float = 0.0) -> torch.Tensor:
    t = torch.arange(int(sr * seconds), dtype=torch.float64) / sr
    return torch.sin(2 * math.pi * freq * t + phase).float()


def note(shape: str = "square", color: str = "green", phase: float = 0.0) -> torch.Tensor:
    """A shapes-v1 note with fixed onset, pitch and gain; only the start phase varies."""
    attrs = Attributes(shape=shape, color=color, size="large", position="center")
    return torch.from_numpy(render_sound(attrs, onset_s=0.3, detune=0.0, phase=phase, gain=1.0))


def dominant_frequency(wave: torch.Tensor, sr: int) -> float:
    spectrum = torch.fft.rfft(wave.double() * torch.hann_window(wave.shape[-1], dtype=torch.float64)).abs()
    return float(spectrum.argmax()) * sr / wave.shape[-1]


def test_sine_peaks_at_its_bin_in_every_frame() -> None:
    n_fft, hop = 256, 64
    freq = 32 * SR / n_fft  # exactly bin 32 (1000 Hz)
    mag = stft_magnitude(sine(freq), n_fft, hop)
    assert mag.shape == (n_fft // 2 + 1, 1 + 8000 // hop)
    assert (mag[:, 2:-2].argmax(0) == 32).all()


def test_parseval_on_one_frame() -> None:
    torch.manual_seed(0)
    n_fft, hop, frame = 256, 64, 10
    wave = torch.randn(2000, dtype=torch.float64).float()
    mag = stft_magnitude(wave, n_fft, hop)[:, frame].double()
    # center=True: frame t covers samples [t*hop - n_fft/2, t*hop + n_fft/2).
    start = frame * hop - n_fft // 2
    windowed = wave[start : start + n_fft].double() * torch.hann_window(n_fft, dtype=torch.float64)
    one_sided = mag[0] ** 2 + mag[-1] ** 2 + 2 * (mag[1:-1] ** 2).sum()
    torch.testing.assert_close(one_sided / n_fft, windowed.pow(2).sum(), rtol=1e-4, atol=0)


def test_batch_dims_are_kept_and_log_spectrogram_inverts_by_exp() -> None:
    waves = torch.stack([note(), note("circle", "red")]).reshape(2, 1, 8000)
    mag = stft_magnitude(waves, 256, 64)
    log_mag = log_magnitude_spectrogram(waves, 256, 64)
    assert mag.shape == log_mag.shape == (2, 1, 129, 126)
    loud = mag > 1e-3
    torch.testing.assert_close(log_mag.exp()[loud], mag[loud])


def test_stft_args_are_checked() -> None:
    with pytest.raises(ValueError, match="win"):
        stft_magnitude(torch.randn(1000), 256, 64, win=300)
    with pytest.raises(ValueError, match="n_fft // 2"):
        stft_magnitude(torch.randn(100), 256, 64)


def test_mr_stft_loss_zero_for_identical_small_for_phase_large_for_pitch() -> None:
    target = note("square", "green")
    identical = multi_resolution_stft_loss(target, target.clone())
    shifted = multi_resolution_stft_loss(note("square", "green", phase=0.37), target)
    other_pitch = multi_resolution_stft_loss(note("square", "blue"), target)
    silence = multi_resolution_stft_loss(torch.zeros_like(target), target)
    assert identical == 0.0
    assert shifted < 0.35
    assert other_pitch > 5 * shifted
    assert silence > other_pitch


def test_mr_stft_loss_has_finite_gradients_through_silence() -> None:
    target = note("triangle", "yellow").reshape(1, 1, -1)
    pred = (0.5 * target).requires_grad_()  # exact zeros wherever the target is silent
    multi_resolution_stft_loss(pred, target).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shapes differ"):
        multi_resolution_stft_loss(target, target[..., :-1])


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_griffin_lim_recovers_shapes_sound_from_true_magnitude(shape: str) -> None:
    sample = make_sample(seed=3, index=0, label={"circle": 0, "square": 24, "triangle": 48}[shape])
    wave = torch.from_numpy(sample.sound)
    n_fft, hop = 256, 64
    magnitude = stft_magnitude(wave, n_fft, hop)
    rebuilt = griffin_lim(magnitude, n_fft, hop, n_iter=32, length=8000)
    assert rebuilt.shape == wave.shape
    # Measured: 0.04-0.07 over the three waveforms (classic Griffin-Lim, momentum 0: ~0.2).
    assert spectral_convergence(stft_magnitude(rebuilt, n_fft, hop), magnitude) < 0.1


def test_griffin_lim_rejects_mismatched_sizes() -> None:
    magnitude = stft_magnitude(note(), 256, 64)
    with pytest.raises(ValueError, match="bins"):
        griffin_lim(magnitude, 512, 64)
    with pytest.raises(ValueError, match="length=7000"):
        griffin_lim(magnitude, 256, 64, length=7000)


def test_si_snr_exact_on_orthogonal_noise_and_scale_invariant() -> None:
    torch.manual_seed(0)
    signal = note("triangle", "red").double()
    signal = signal - signal.mean()
    noise = torch.randn(8000, dtype=torch.float64)
    noise = noise - noise.mean()
    noise = noise - (noise @ signal) / (signal @ signal) * signal  # orthogonal to the signal
    noise = noise * (signal.norm() / noise.norm()) * 10 ** (-12.5 / 20)  # exactly 12.5 dB below
    noisy = (signal + noise).float()
    clean = signal.float()
    assert si_snr(noisy, clean) == pytest.approx(12.5, abs=1e-3)
    assert si_snr(3.7 * noisy, clean) == pytest.approx(12.5, abs=1e-3)
    assert si_snr(noisy, 0.2 * clean) == pytest.approx(12.5, abs=1e-3)
    assert si_snr(noisy, clean) == pytest.approx(float(scale_invariant_signal_noise_ratio(noisy, clean)), abs=1e-3)


def test_si_snr_high_for_itself_low_for_noise() -> None:
    torch.manual_seed(0)
    clean = torch.stack([note(), note("circle", "yellow")])
    assert (si_snr(clean, clean) > 80).all()
    assert (si_snr(torch.randn(2, 8000), clean) < -20).all()
    assert si_snr(clean, clean).shape == (2,)


def test_log_spectral_distance_in_db() -> None:
    torch.manual_seed(0)
    wave = torch.randn(3, 4000)  # no silent frames: every bin is above the floor
    assert (log_spectral_distance(wave, wave) == 0).all()
    torch.testing.assert_close(log_spectral_distance(2 * wave, wave), torch.full((3,), 20 * math.log10(2)))
    silent_twice = log_spectral_distance(2 * note(), note())
    assert 0 < silent_twice < 20 * math.log10(2)  # silent frames match at the floor


@pytest.mark.parametrize(
    ("orig_sr", "new_sr", "freq"), [(16000, 8000, 440.0), (8000, 22050, 523.0), (44100, 8000, 1000.0)]
)
def test_resample_keeps_a_sines_frequency_and_shape(orig_sr: int, new_sr: int, freq: float) -> None:
    out = resample(sine(freq, orig_sr), orig_sr, new_sr)
    assert out.shape == (new_sr,)
    assert dominant_frequency(out, new_sr) == pytest.approx(freq, abs=1.0)
    # Away from the edges the result is the same sine sampled at the new rate, in phase.
    ideal = sine(freq, new_sr)
    assert (out - ideal)[200:-200].abs().max() < 1e-2


def test_resample_removes_what_would_alias_and_keeps_batches() -> None:
    above_new_nyquist = resample(sine(6000.0, 16000), 16000, 8000)
    assert above_new_nyquist[200:-200].pow(2).mean().sqrt() < 1e-2  # a 0.707-rms tone, suppressed
    batch = torch.stack([sine(440.0, 16000), sine(880.0, 16000)]).reshape(2, 1, -1)
    out = resample(batch, 16000, 8000)
    assert out.shape == (2, 1, 8000)
    torch.testing.assert_close(out[1, 0], resample(batch[1, 0], 16000, 8000))
    wave = note()
    assert resample(wave, SR, SR) is wave
    with pytest.raises(ValueError, match="orig_sr"):
        resample(wave, 0, SR)


def test_phase_blind_loss_prefers_right_pitch_across_colors() -> None:
    target = note("triangle", "blue")
    losses = {
        color: float(multi_resolution_stft_loss(note("triangle", color, phase=0.5), target))
        for color in ("red", "green", "blue", "yellow")
    }
    assert min(losses, key=losses.get) == "blue"


def test_griffin_lim_is_deterministic_per_seed() -> None:
    magnitude = stft_magnitude(note(), 256, 64)
    first = griffin_lim(magnitude, 256, 64, n_iter=4, length=8000)
    torch.testing.assert_close(first, griffin_lim(magnitude, 256, 64, n_iter=4, length=8000), rtol=0, atol=0)
    assert not torch.equal(first, griffin_lim(magnitude, 256, 64, n_iter=4, length=8000, seed=1))

