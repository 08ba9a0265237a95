"""Media for humans: image grids, sounds, spectrogram and histogram pictures.

Everything is saved as PNG/WAV in the run folder and, when a W&B logger is active,
logged there too. Drawn with numpy + Pillow only (no plotting library needed).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf
import torch
from PIL import Image


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8 (C = 1 or 3)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, ncols: int = 8, pad: int = 2, scale: int = 2) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into one RGB picture, each scaled up ``scale`` times."""
    if images.ndim == 3 or images.shape[-1] == 1:  # grey pictures are shown as grey RGB
        images = np.repeat(images.reshape(*images.shape[:3], 1), 3, axis=-1)
    n, h, w, c = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = img
    return grid


def spectrogram_image(wave: np.ndarray, n_fft: int = 256, hop: int = 64, floor_db: float = -80.0) -> np.ndarray:
    """Log-magnitude spectrogram of a mono waveform as a uint8 picture (low frequencies at the bottom)."""
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32))
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs()
    db = 20 * torch.log10(spec.clamp_min(1e-5) / spec.max().clamp_min(1e-5))
    img = ((db.clamp(min=floor_db) - floor_db) / -floor_db * 255).round().to(torch.uint8).flip(0)
    return np.stack([img.numpy()] * 3, axis=-1)


def histogram_image(counts: Sequence[float] | np.ndarray, height: int = 128) -> np.ndarray:
    """Bar chart of code counts sorted high to low: a healthy codebook is a flat profile."""
    counts = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    width = len(counts)
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    if counts.max(initial=0) > 0:
        bars = np.ceil(counts / counts.max() * (height - 1)).astype(int)
        rows = np.arange(height)[:, None]
        img[rows >= height - bars[None, :]] = (40, 90, 200)
    img[:, counts == 0] = (230, 60, 60)  # dead codes stand out in red along the tail
    return img


def save_png(path: Path, image: np.ndarray) -> Path:
    """An (H, W), (H, W, 1) or (H, W, 3) uint8 picture as a PNG file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).save(path)
    return path


def save_wav(path: Path, wave: np.ndarray, sample_rate: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.clip(np.asarray(wave, dtype=np.float32), -1, 1), sample_rate, subtype="PCM_16")
    return path


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of an (H, W, 3), (H, W, 1) or (H, W) uint8 array."""
    buf = io.BytesIO()
    picture = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    Image.fromarray(np.ascontiguousarray(picture)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_wav(wave: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV bytes of a mono float waveform in [-1, 1]."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()
