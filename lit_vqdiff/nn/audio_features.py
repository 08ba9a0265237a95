"""A feature space for sounds: the aiSFX sound-effects embedding (512-d), in plain torch.

The network is the embedding CNN of aiSFX (Ma and Lerch, "Representation Learning for the
Automatic Indexing of Sound Effects Libraries", ISMIR 2022; model X-Sequential-CE, trained
across nine sound-effects libraries). Its weights ship inside the PyPI package
``aisfx==0.1.2`` (``aisfx/models/checkpoint.pth``, CC-BY-4.0, (c) 2022 A. B. Ma and
A. Lerch); they are read with ``weights_only=True`` and nothing of the package is imported.

The front end follows the package's librosa path, re-implemented on ``torch.stft``:

- each sound is resampled to 44.1 kHz (``dsp.resample``, a windowed sinc; the package
  loads with librosa's resampler) and peak-normalized (a silent sound stays silent);
- power spectrogram: periodic Hann window of 2048, hop 1024, frames centred with zero
  padding (librosa >= 0.9 ``center=True``);
- 96 mel bands from 0 to 22050 Hz on the HTK mel scale, each triangle normalized to unit
  sum of its weights (librosa's ``norm=1``, Essentia's ``unit_sum``, which the ISMIR
  features used; not Slaney's area normalization by bandwidth);
- ``log10(mel * 1e4 + 1) / 9.4578`` (the package's "original" min-max scaling).

The network reads blocks of 100 frames (about 2.3 s): four double-3x3 conv blocks (64,
128, 256, 512 channels; BatchNorm, ReLU; 2x2 max pools after the first three), then the
mean over frequency and the max over time. A sound shorter than a block is zero-padded
(silence, as the package pads); a longer one is cut into blocks with a hop of 50 frames,
the last partial block dropped, and its block embeddings are averaged into one vector.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dsp import resample
from ..packaged import package_file, package_folder, sha256_of

WEIGHTS_PACKAGE = "aisfx==0.1.2"
CHECKPOINT = Path("models") / "checkpoint.pth"
CHECKPOINT_SHA256 = "499ea75909c932a2f94c35fa722fa4fabc5bcb7e84917209cc5f7402627b7eb5"
NETWORK_PREFIX = "embedding_net."
SAMPLE_RATE = 44100
N_FFT, HOP = 2048, 1024
N_MELS, F_MIN, F_MAX = 96, 0.0, 22050.0
LOG_SCALE = 1e4
SPEC_MAX = 9.457798957824707  # the package's "original" normalization: max over its training spectrograms
BLOCK, BLOCK_HOP = 100, 50  # frames per embedding, and between blocks (the package's 0.5 hop)
FEATURES = 512
BATCH = 64


# ----------------------------------------------------------------------------- weights


def checkpoint_path() -> Path | None:
    """The checkpoint inside the installed aisfx package (found, never imported); None when absent."""
    folder = package_folder("aisfx")
    path = folder / CHECKPOINT if folder is not None else None
    return path if path is not None and path.is_file() else None


def require_checkpoint() -> Path:
    """The checkpoint, or an error saying how to install it."""
    return package_file("aisfx", CHECKPOINT, WEIGHTS_PACKAGE)


def load_embedding_state(checkpoint: Path | None = None) -> dict[str, Tensor]:
    """The embedding network's weights (prefix stripped) from the (state_dict, datasets) checkpoint."""
    checkpoint = checkpoint or require_checkpoint()
    digest = sha256_of(checkpoint)
    if checkpoint.name == CHECKPOINT.name and digest != CHECKPOINT_SHA256:
        raise ValueError(f"{checkpoint}: sha256 {digest}, expected {CHECKPOINT_SHA256} ({WEIGHTS_PACKAGE}); reinstall it")
    # The datasets dict holds numpy integers, pickled under numpy 1's module path; a numpy
    # scalar's reducer is that function, and type(dtype) its dtype class, under whichever numpy runs here.
    scalar = np.int64(0).__reduce__()[0]
    allowed = [(scalar, "numpy.core.multiarray.scalar"), np.dtype, type(np.dtype(np.int64))]
    with torch.serialization.safe_globals(allowed):
        state, _ = torch.load(checkpoint, map_location="cpu", weights_only=True)
    out = {k.removeprefix(NETWORK_PREFIX): v for k, v in state.items() if k.startswith(NETWORK_PREFIX)}
    if not out:
        raise ValueError(f"{checkpoint}: no {NETWORK_PREFIX}* weights in it")
    return out


# ----------------------------------------------------------------------------- front end


def hz_to_mel(hz: Tensor) -> Tensor:
    """HTK mel scale."""
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@functools.cache
def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                   f_min: float = F_MIN, f_max: float = F_MAX) -> Tensor:
    """(n_mels, n_fft // 2 + 1) float32 HTK-mel triangles, each row summing to 1 (an empty row stays 0)."""
    bins = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(torch.tensor(f_min, dtype=torch.float64))),
                                     float(hz_to_mel(torch.tensor(f_max, dtype=torch.float64))),
                                     n_mels + 2, dtype=torch.float64))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    sums = weights.sum(dim=1, keepdim=True)
    return (weights / torch.where(sums > 0, sums, 1.0)).float()


def log_mel(wave: Tensor) -> Tensor:
    """A 44.1 kHz (T,) waveform -> (frames, 96) normalized log mel spectrogram, peak-normalized first."""
    peak = wave.abs().max()
    wave = wave / peak if peak > 0 else wave
    spec = torch.stft(wave, N_FFT, HOP, window=torch.hann_window(N_FFT, device=wave.device), center=True,
                      pad_mode="constant", return_complex=True)
    power = spec.real.square() + spec.imag.square()
    mel = mel_filterbank().to(wave.device) @ power
    return (torch.log10(mel * LOG_SCALE + 1.0) / SPEC_MAX).T


def blocks_of(spec: Tensor) -> Tensor:
    """(frames, 96) -> (blocks, 100, 96): zero-padded to one block, else hop 50 with the partial tail dropped."""
    frames = spec.shape[0]
    if frames <= BLOCK:
        return F.pad(spec, (0, 0, 0, BLOCK - frames))[None]
    count = (frames - BLOCK) // BLOCK_HOP + 1
    return torch.stack([spec[i * BLOCK_HOP : i * BLOCK_HOP + BLOCK] for i in range(count)])


# ----------------------------------------------------------------------------- network


class ConvBlock(nn.Module):
    """Two 3x3 convolutions (no bias) with BatchNorm and ReLU, then a max pool of ``pool``."""

    def __init__(self, cin: int, cout: int, pool: int):
        super().__init__()
        self.pool = pool
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.max_pool2d(x, self.pool) if self.pool > 1 else x


class SfxEmbedding(nn.Module):
    """(N, 100, 96) normalized log mel blocks -> (N, 512) embeddings."""

    num_features = FEATURES

    def __init__(self):
        super().__init__()
        self.conv_block1 = ConvBlock(1, 64, 2)
        self.conv_block2 = ConvBlock(64, 128, 2)
        self.conv_block3 = ConvBlock(128, 256, 2)
        self.conv_block4 = ConvBlock(256, 512, 1)

    def forward(self, blocks: Tensor) -> Tensor:
        x = blocks[:, None]  # (N, 1, time, freq)
        for block in (self.conv_block1, self.conv_block2, self.conv_block3, self.conv_block4):
            x = block(x)
        return x.mean(dim=3).amax(dim=2)


def build_sfx_embedding(checkpoint: Path | None = None) -> SfxEmbedding:
    """The embedding network with the aiSFX weights, in eval mode."""
    model = SfxEmbedding()
    model.load_state_dict(load_embedding_state(checkpoint))
    return model.eval()


@functools.cache
def default_sfx_embedding() -> SfxEmbedding:
    """``build_sfx_embedding`` once per process."""
    return build_sfx_embedding()


# ----------------------------------------------------------------------------- sounds -> features


def sound_blocks(wave: np.ndarray | Tensor, sample_rate: int) -> Tensor:
    """One sound (T,) at ``sample_rate`` -> its (blocks, 100, 96) network input."""
    wave = torch.from_numpy(np.array(wave, dtype=np.float32))  # a copy: the caller's array may be read-only
    if wave.dim() != 1 or wave.numel() == 0:
        raise ValueError(f"a sound must be a non-empty (T,) waveform, got shape {tuple(wave.shape)}")
    if not torch.isfinite(wave).all():
        raise ValueError("a sound holds NaN or infinite samples")
    return blocks_of(log_mel(resample(wave, int(sample_rate), SAMPLE_RATE)))


@torch.no_grad()
def audio_features(waves: Sequence[np.ndarray | Tensor], sample_rate: int, batch_size: int = BATCH,
                   model: SfxEmbedding | None = None, device: torch.device | str | None = None) -> Tensor:
    """(N, 512) float32 CPU aiSFX embeddings of (T,) float waveforms at ``sample_rate`` (block means)."""
    if not len(waves):
        raise ValueError("no sounds to compute aiSFX features of")
    if int(sample_rate) <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    model = model or default_sfx_embedding()
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    per_sound = [sound_blocks(w, sample_rate) for w in waves]
    blocks = torch.cat(per_sound)
    embedded = torch.cat([model(blocks[i : i + batch_size].to(device)).cpu() for i in range(0, len(blocks), batch_size)])
    owners = torch.repeat_interleave(torch.arange(len(per_sound)), torch.tensor([len(b) for b in per_sound]))
    sums = torch.zeros(len(per_sound), FEATURES).index_add_(0, owners, embedded)
    return sums / torch.bincount(owners, minlength=len(per_sound))[:, None].float()

