"""Text as UTF-8 bytes: captions as a condition or as a target.

A caption becomes ``text_bytes`` byte values (0..255) right-padded with ``PAD_ID`` (256),
so a byte-level model has a vocabulary of ``BYTE_VOCAB`` = 257 and can generate padding.
A caption longer than ``text_bytes`` is cut at a character boundary; the batch says so
(``text_truncated``) and the data stream counts and reports it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import SampleError
from ..nn.conditions import ByteTextEncoder
from ..nn.tokenizer import Tokenizer
from .base import DecodeSpec, Modality, TokenSpace

PAD_ID = 256
BYTE_VOCAB = 257  # byte values 0..255, then the pad id
MEDIA_ROWS = 16


def encode_text(strings: Sequence[str], max_bytes: int, *, truncate: bool = False) -> tuple[Tensor, Tensor]:
    """UTF-8 bytes (B, max_bytes) long, right-padded with PAD_ID, and the (B, max_bytes) real-byte mask."""
    if isinstance(strings, str):
        raise TypeError("encode_text takes a sequence of strings, not one string")
    tokens = torch.full((len(strings), max_bytes), PAD_ID, dtype=torch.long)
    for row, text in enumerate(strings):
        data = text.encode("utf-8")
        if len(data) > max_bytes:
            if not truncate:
                raise ValueError(f"text {text!r} is {len(data)} UTF-8 bytes, more than max_bytes={max_bytes}")
            data = cut_utf8(data, max_bytes)
        tokens[row, : len(data)] = torch.tensor(list(data), dtype=torch.long)
    return tokens, tokens != PAD_ID


def cut_utf8(data: bytes, max_bytes: int) -> bytes:
    """The first ``max_bytes`` bytes, cut at a character boundary so that they still decode."""
    return data[:max_bytes].decode("utf-8", errors="ignore").encode("utf-8")


def decode_text(tokens: Tensor) -> list[str]:
    """Strings from (B, L) byte ids: read up to the first non-byte id (pad or mask); bad UTF-8 is replaced."""
    texts = []
    for row in tokens.tolist():
        end = next((i for i, value in enumerate(row) if not 0 <= value < 256), len(row))
        texts.append(bytes(row[:end]).decode("utf-8", errors="replace"))
    return texts


def text_of(members: Mapping[str, bytes]) -> str:
    """The caption of a sample: ``txt``, else ``caption`` or ``text`` in ``json``."""
    try:
        if "txt" in members:
            return members["txt"].decode("utf-8").strip()
        if "json" in members:
            meta = json.loads(members["json"])
            for field in ("caption", "text"):
                if isinstance(meta, dict) and isinstance(meta.get(field), str):
                    return meta[field].strip()
            raise SampleError("missing_member", "no txt member and no caption/text field in json")
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleError("bad_text", f"{type(err).__name__}: {err}") from None
    raise SampleError("missing_member", "no txt or json member")


class TextModality(Modality):
    name = "text"
    batch_key = "text"
    suffix = ".txt"
    members = ("txt", "json")

    def decode(self, members: Mapping[str, bytes], spec: DecodeSpec) -> dict[str, Any]:
        caption = text_of(members)
        ids, mask = encode_text([caption], spec.text_bytes, truncate=True)
        truncated = len(caption.encode("utf-8")) > spec.text_bytes
        return {"text": ids[0], "text_mask": mask[0], "text_truncated": torch.tensor(truncated)}

    def present(self, members: Mapping[str, bytes]) -> bool:
        try:
            text_of(members)
        except SampleError:
            return False
        return True

    def space(self, tokenizer: Tokenizer | None, spec: DecodeSpec) -> TokenSpace:
        return TokenSpace(self, (spec.text_bytes,), BYTE_VOCAB)

    def detokenize(self, tokens: Tensor, tokenizer: Tokenizer | None) -> list[str]:
        return decode_text(tokens)

    def condition_encoder(self, space: TokenSpace, generator: Any, width: int, heads: int, spec: DecodeSpec) -> nn.Module:
        return ByteTextEncoder(width, generator.cond_depth, heads, space.shape[0], vocab=BYTE_VOCAB, pad_id=PAD_ID,
                               patch=generator.text_patch_size)

    def items(self, outputs: list[str]) -> list[str]:
        return list(outputs)

    def write(self, path: Path, item: str, spec: DecodeSpec) -> Path:
        path = path.with_suffix(self.suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(item, encoding="utf-8")
        return path

    def read(self, path: Path) -> str:
        return path.read_text(encoding="utf-8", errors="replace")

    def file_members(self, path: Path) -> dict[str, bytes]:
        return {"txt": path.read_bytes()}

    def media(self, items: Sequence[str], spec: DecodeSpec, key: str, limit: int | None = None) -> dict[str, tuple]:
        return {key: ("text", list(items[: limit or MEDIA_ROWS]))}

    def describe_item(self, item: str) -> str:
        return item
