"""Images: grey or RGB pictures, centre-cropped to a square and resized to ``image_size``;
tensors (C, H, W) in [-1, 1], items (H, W, C) uint8, files PNG."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .. import media
from ..errors import SampleError
from ..nn.conditions import CodeEncoder
from ..nn.tokenizer import Tokenizer
from .base import DecodeSpec, Modality, TokenSpace, first_member

MEDIA_ITEMS = 16


def decode_image(data: bytes, size: int, channels: int = 3) -> torch.Tensor:
    """Image bytes -> (channels, size, size) float in [-1, 1], centre-cropped to a square first."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            # Palette images go through RGBA: Pillow warns on each direct P -> RGB with transparency.
            picture = (img.convert("RGBA") if img.mode == "P" else img).convert("L" if channels == 1 else "RGB")
    except Exception as err:  # Pillow raises many types for bad bytes
        raise SampleError("bad_image", f"{type(err).__name__}: {err}") from None
    width, height = picture.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = picture.crop((left, top, left + side, top + side))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)  # Pillow filters when shrinking
    pixels = torch.from_numpy(np.asarray(square, dtype=np.uint8).copy())
    pixels = pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)
    return pixels.float().div(127.5).sub(1.0)


class ImageModality(Modality):
    name = "image"
    batch_key = "image"
    suffix = ".png"
    coded = True
    members = ("png", "jpg", "jpeg", "webp", "bmp")
    cached_forms = ("codes",)

    def decode(self, members: Mapping[str, bytes], spec: DecodeSpec) -> dict[str, Any]:
        _, data = first_member(members, self.members, self.name)
        return {"image": decode_image(data, spec.image_size, spec.channels)}

    def space(self, tokenizer: Tokenizer | None, spec: DecodeSpec, generator: Any = None) -> TokenSpace:
        if tokenizer is None:
            raise ValueError("image needs a stage-1 tokenizer; none was loaded")
        return TokenSpace(self, tuple(tokenizer.code_shape), tokenizer.quantizer.codebook_size, tokenizer)

    def condition_encoder(self, space: TokenSpace, generator: Any, width: int, heads: int, spec: DecodeSpec) -> nn.Module:
        # Codes as a condition are grouped like codes as a target.
        return CodeEncoder(space.vocab, space.shape, width, generator.cond_depth, heads, patch=generator.patch_size)

    def items(self, outputs: torch.Tensor) -> list[np.ndarray]:
        return list(media.to_uint8_images(outputs))

    def write(self, path: Path, item: np.ndarray, spec: DecodeSpec) -> Path:
        return media.save_png(path.with_suffix(self.suffix), item)

    def read(self, path: Path) -> np.ndarray:
        with Image.open(path) as img:
            picture = np.asarray(img.convert("L") if img.mode in ("L", "1", "I;16") else img.convert("RGB"))
        return picture[..., None] if picture.ndim == 2 else picture

    def media(self, items: Sequence[np.ndarray], spec: DecodeSpec, key: str, limit: int | None = None) -> dict[str, tuple]:
        return {key: ("image", media.image_grid(np.stack(items[: limit or MEDIA_ITEMS]), ncols=8))}

    def describe_item(self, item: np.ndarray) -> str:
        return f"image {item.shape[1]}x{item.shape[0]}"
