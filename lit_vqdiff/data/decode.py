"""Decoding one WebDataset sample (a dict of member bytes) into model-ready tensors.

Per modality:
- ``image``: the first of ``png``/``jpg``/``jpeg``/``webp``; RGB, center-cropped to a
  square, resized to ``image_size``, float in [-1, 1], shape (3, H, W).
- ``audio``: the first of ``wav``/``flac``; mixed to mono, resampled to ``sample_rate``,
  cropped (from the start) or zero-padded (at the end) to ``audio_samples``, float32 (T,).
- ``text``: ``txt``, else the ``caption`` or ``text`` field of ``json``; UTF-8 bytes as a
  LongTensor of ``text_bytes`` values, padded with ``TEXT_PAD`` (256), plus ``text_mask``
  (True on real bytes). Text longer than ``text_bytes`` is cut at a character boundary.
- ``class``: ``cls`` as a decimal integer -> ``label``.
- ``image_codes`` / ``audio_codes``: a token cache's ``<modality>_codes.npy`` (integer
  array of a frozen tokenizer's codes) -> LongTensor.

Anything wrong with a sample raises ``SampleError`` whose ``reason`` is one of
``SKIP_REASONS``; the pipeline counts it instead of crashing.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from ..audio import resample
from ..text import PAD_ID as TEXT_PAD
from ..text import decode_text as decode_texts
from ..text import encode_text as encode_texts

CODE_MODALITIES = ("image_codes", "audio_codes")
MODALITIES = ("image", "audio", "text", "class", *CODE_MODALITIES)
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTS = ("wav", "flac")

# Every reason a sample can be skipped for, as logged under data/skipped_<reason>.
SKIP_REASONS = (
    "missing_member",  # a member the stage needs is absent
    "bad_image",  # undecodable image
    "bad_audio",  # undecodable or empty sound
    "sample_rate",  # sound at a rate the config does not accept
    "bad_text",  # text that is not UTF-8, or json that does not parse
    "bad_label",  # cls that is not a non-negative integer
    "bad_codes",  # a token-cache member that is not an integer .npy array
    "truncated",  # a shard ended (or failed) before its planned samples
    "unreadable",  # a shard that could not be opened or read at all
)


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class DecodeSpec:
    """What a stage needs from each sample, and the target formats."""

    modalities: tuple[str, ...]
    image_size: int = 32
    sample_rate: int = 8000
    audio_samples: int = 8000
    text_bytes: int = 48
    resample_audio: bool = True
    min_source_rate: int = 4000
    max_source_rate: int = 96000

    def __post_init__(self) -> None:
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if not self.modalities or unknown:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {self.modalities!r}")
        for name in ("image_size", "sample_rate", "audio_samples", "text_bytes", "min_source_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.max_source_rate < self.min_source_rate:
            raise ValueError(
                f"data.max_source_rate={self.max_source_rate} is below data.min_source_rate={self.min_source_rate}"
            )

    @classmethod
    def from_config(cls, cfg: Any, modalities: tuple[str, ...]) -> "DecodeSpec":
        """The spec of a ``DataConfig`` (dataclass or OmegaConf node) for ``modalities``."""
        return cls(
            modalities=tuple(modalities),
            image_size=int(cfg.image_size),
            sample_rate=int(cfg.sample_rate),
            audio_samples=int(cfg.audio_samples),
            text_bytes=int(cfg.text_bytes),
            resample_audio=bool(cfg.resample_audio),
            min_source_rate=int(cfg.min_source_rate),
            max_source_rate=int(cfg.max_source_rate),
        )


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """Image bytes -> (3, size, size) float in [-1, 1], center-cropped to a square first."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            # Palette images go through RGBA: Pillow warns on each direct P -> RGB with transparency.
            rgb = (img.convert("RGBA") if img.mode == "P" else img).convert("RGB")
    except Exception as err:  # Pillow raises many types for bad bytes
        raise SampleError("bad_image", f"{type(err).__name__}: {err}") from None
    width, height = rgb.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)  # Pillow filters when shrinking
    pixels = torch.from_numpy(np.asarray(square, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)


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


def fit_length(wave: torch.Tensor, length: int) -> torch.Tensor:
    """Crop (keeping the start) or zero-pad (at the end) the last axis to ``length``."""
    if wave.shape[-1] >= length:
        return wave[..., :length].contiguous()
    return torch.nn.functional.pad(wave, (0, length - wave.shape[-1]))


def encode_text(text: str, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One caption as (ids, mask), cut at a character boundary when it is too long."""
    ids, mask = encode_texts([text], max_bytes, truncate=True)
    return ids[0], mask[0]


def decode_text(ids: torch.Tensor, mask: torch.Tensor | None = None) -> str:
    """Inverse of ``encode_text`` for one (L,) row; invalid UTF-8 (e.g. generated) is replaced."""
    return decode_texts((ids if mask is None else ids.masked_fill(~mask.bool(), TEXT_PAD))[None])[0]


def text_of(members: Mapping[str, bytes]) -> str:
    """The caption of a sample: ``txt``, else ``caption`` or ``text`` in ``json``."""
    try:
        if "txt" in members:
            return members["txt"].decode("utf-8")
        if "json" in members:
            meta = json.loads(members["json"])
            for field in ("caption", "text"):
                if isinstance(meta, dict) and isinstance(meta.get(field), str):
                    return meta[field]
            raise SampleError("missing_member", "no txt member and no caption/text field in json")
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleError("bad_text", f"{type(err).__name__}: {err}") from None
    raise SampleError("missing_member", "no txt or json member")


def label_of(data: bytes) -> int:
    """``cls`` bytes (decimal text) -> a non-negative int."""
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SampleError("bad_label", f"cls {data[:20]!r} is not a decimal integer") from None
    if label < 0:
        raise SampleError("bad_label", f"cls {label} is negative")
    return label


def first_member(members: Mapping[str, bytes], exts: tuple[str, ...], modality: str) -> bytes:
    """The bytes of the first extension in ``exts`` present in the sample."""
    for ext in exts:
        if ext in members:
            return members[ext]
    raise SampleError("missing_member", f"{modality} needs one of {list(exts)}, sample has {sorted(members)}")


def decode_sample(members: Mapping[str, bytes], spec: DecodeSpec) -> dict[str, Any]:
    """Tensors for ``spec.modalities`` from one sample's members; raises ``SampleError``."""
    out: dict[str, Any] = {}
    if "image" in spec.modalities:
        out["image"] = decode_image(first_member(members, IMAGE_EXTS, "image"), spec.image_size)
    if "audio" in spec.modalities:
        out["audio"] = decode_audio(first_member(members, AUDIO_EXTS, "audio"), spec)
    if "text" in spec.modalities:
        out["text"], out["text_mask"] = encode_text(text_of(members), spec.text_bytes)
    if "class" in spec.modalities:
        if "cls" not in members:
            raise SampleError("missing_member", f"class needs cls, sample has {sorted(members)}")
        out["label"] = label_of(members["cls"])
    for modality in CODE_MODALITIES:
        if modality in spec.modalities:
            out[modality] = codes_of(first_member(members, (f"{modality}.npy",), modality))
    return out


def codes_of(data: bytes) -> torch.Tensor:
    """``.npy`` bytes of integer codes -> LongTensor."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise SampleError("bad_codes", f"{type(err).__name__}: {err}") from None
    if not np.issubdtype(array.dtype, np.integer):
        raise SampleError("bad_codes", f"codes have dtype {array.dtype}, expected integers")
    return torch.from_numpy(array.astype(np.int64))


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded samples into a batch; ``label`` becomes a LongTensor, ``key`` a list."""
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        elif name == "label":
            batch[name] = torch.tensor(values, dtype=torch.long)
        else:
            batch[name] = values
    return batch
