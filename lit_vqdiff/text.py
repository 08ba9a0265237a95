"""Text as UTF-8 bytes: the one encoding shared by the data pipeline and the models.

A caption becomes ``max_bytes`` byte values (0..255) right-padded with ``PAD_ID`` (256),
so a byte-level model has a vocabulary of ``BYTE_VOCAB`` = 257 and can generate padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

PAD_ID = 256
BYTE_VOCAB = 257  # byte values 0..255, then the pad id


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
            # Cut at a character boundary so the kept bytes still decode.
            data = data[:max_bytes].decode("utf-8", errors="ignore").encode("utf-8")
        tokens[row, : len(data)] = torch.tensor(list(data), dtype=torch.long)
    return tokens, tokens != PAD_ID


def decode_text(tokens: Tensor) -> list[str]:
    """Strings from (B, L) byte ids: read up to the first non-byte id (pad or mask); bad UTF-8 is replaced."""
    texts = []
    for row in tokens.tolist():
        end = next((i for i, value in enumerate(row) if not 0 <= value < 256), len(row))
        texts.append(bytes(row[:end]).decode("utf-8", errors="replace"))
    return texts
