"""Sounds: mono waveforms at ``sample_rate``, cropped or zero-padded to ``audio_samples``;
tensors (T,) float32 in [-1, 1], items the same as numpy arrays, files 16-bit WAV."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import soundfile as sf
import torch
from torch import nn

from .. import media
from ..dsp import resample
from ..errors import SampleError
from ..nn.conditions import CodeEncoder
from ..nn.tokenizer import Tokenizer
from .base import DecodeSpec, Modality, TokenSpace, first_member

MEDIA_SOUNDS = 4


def fit_length(wave: torch.Tensor, length: int) -> torch.Tensor:
    """Crop (keeping the start) or zero-pad (at the end) the last axis to ``length``."""
    if wave.shape[-1] >= length:
        return wave[..., :length].contiguous()
    return torch.nn.functional.pad(wave, (0, length - wave.shape[-1]))


def decode_audio(data: bytes, spec: DecodeSpec) -> torch.Tensor:
    """Sound bytes -> mono float32 (audio_samples,) at ``spec.sample_rate``."""
    try:
        frames, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile errors, and anything a broken header provokes
        raise SampleError("bad_audio", f"{type(err).__name__}: {err}") from None
    if frames.shape[0] == 0 or not np.isfinite(frames).all():
        raise SampleError("bad_audio", f"{frames.shape[0]} frames, finite={bool(np.isfinite(frames).all())}")
    wave = torch.from_numpy(frames.mean(axis=1))
    if rate != spec.sample_rate:
        if not spec.resample_audio:
            raise SampleError("sample_rate", f"{rate} Hz, expected {spec.sample_rate} Hz (data.resample_audio=false)")
        if not spec.min_source_rate <= rate <= spec.max_source_rate:
            raise SampleError(
                "sample_rate",
                f"{rate} Hz is outside [data.min_source_rate, data.max_source_rate]"
                f" = [{spec.min_source_rate}, {spec.max_source_rate}]",
            )
        wave = resample(wave, rate, spec.sample_rate)
    return fit_length(wave, spec.audio_samples)


class AudioModality(Modality):
    name = "audio"
    batch_key = "audio"
    suffix = ".wav"
    coded = True
    members = ("wav", "flac", "ogg")
    cached_forms = ("codes",)

    def decode(self, members: Mapping[str, bytes], spec: DecodeSpec) -> dict[str, Any]:
        _, data = first_member(members, self.members, self.name)
        return {"audio": decode_audio(data, spec)}

    def space(self, tokenizer: Tokenizer | None, spec: DecodeSpec, generator: Any = None) -> TokenSpace:
        if tokenizer is None:
            raise ValueError("audio needs a stage-1 tokenizer; none was loaded")
        return TokenSpace(self, tuple(tokenizer.code_shape), tokenizer.quantizer.codebook_size, tokenizer)

    def condition_encoder(self, space: TokenSpace, generator: Any, width: int, heads: int, spec: DecodeSpec) -> nn.Module:
        return CodeEncoder(space.vocab, space.shape, width, generator.cond_depth, heads, patch=generator.patch_size)

    def items(self, outputs: torch.Tensor) -> list[np.ndarray]:
        return list(outputs.float().cpu().numpy())

    def write(self, path: Path, item: np.ndarray, spec: DecodeSpec) -> Path:
        return media.save_wav(path.with_suffix(self.suffix), item, spec.sample_rate)

    def read(self, path: Path) -> np.ndarray:
        wave, _ = sf.read(path, dtype="float32", always_2d=True)
        return wave.mean(axis=1)

    def media(self, items: Sequence[np.ndarray], spec: DecodeSpec, key: str, limit: int | None = None) -> dict[str, tuple]:
        waves = [np.asarray(w, dtype=np.float32) for w in items[: limit or MEDIA_SOUNDS]]
        picture = np.concatenate([media.spectrogram_image(w) for w in waves], axis=1)
        return {key: ("audio", waves, spec.sample_rate), f"{key}_spectrograms": ("image", picture)}

    def describe_item(self, item: np.ndarray) -> str:
        return f"sound of {len(item)} samples"
