"""Text: captions as a condition or as a target.

A caption becomes ``text_bytes`` byte values (0..255) right-padded with ``PAD_ID`` (256),
so a byte-level model has a vocabulary of ``BYTE_VOCAB`` = 257 and can generate padding.
A caption longer than ``text_bytes`` is cut at a character boundary; the batch says so
(``text_truncated``) and the data stream counts and reports it.

As a condition, a caption is read either from its bytes by a network stage 2 learns
(``generator.text_encoder=bytes``) or by a frozen pretrained sentence encoder
(``minilm``, see ``nn/minilm.py``) whose token states a token cache keeps
(``text_states.npy``), so that training pays nothing per step for it.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import SampleError
from ..nn.conditions import ByteTextEncoder, StateEncoder
from ..nn.minilm import MiniLM, model_dir
from ..packaged import sha256_of
from ..nn.tokenizer import Tokenizer
from .base import DecodeSpec, Modality, TokenSpace, first_member

PAD_ID = 256
BYTE_VOCAB = 257  # byte values 0..255, then the pad id
MEDIA_ROWS = 16
STATE_DIM = 384  # MiniLM's hidden size
MAX_STATE_TOKENS = 256  # MiniLM's own limit


def state_tokens(spec: DecodeSpec) -> int:
    """Word pieces kept of a caption for the sentence encoder: its bytes bound them (plus [CLS], [SEP])."""
    return min(MAX_STATE_TOKENS, spec.text_bytes + 2)


@functools.cache
def sentence_encoder() -> MiniLM:
    """The frozen sentence encoder, loaded once per process."""
    return MiniLM()


@functools.cache
def sentence_encoder_checksum() -> str:
    """sha256 of the sentence encoder's weights: a token cache of its states is keyed by it."""
    return sha256_of(model_dir() / "model.safetensors")


def encode_sentences(captions: Sequence[str], spec: DecodeSpec, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(states (B, T, 384) float, mask (B, T) bool) of captions by the sentence encoder."""
    encoder = sentence_encoder().to(device)
    return encoder.encode(list(captions), state_tokens(spec))


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


@dataclass
class SentenceSpace(TokenSpace):
    """Captions as the sentence encoder's token states: cached when the batch has them, else encoded now."""

    def tokens(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        if "text_states" in batch:
            return batch["text_states"].float(), batch["text_states_mask"].bool()
        ids = batch["text"]
        return encode_sentences(decode_text(ids), self.spec, ids.device)

    def batch_size(self, batch: Mapping[str, Any]) -> int:
        return len(batch["text_states"] if "text_states" in batch else batch["text"])


class TextModality(Modality):
    name = "text"
    batch_key = "text"
    suffix = ".txt"
    members = ("txt", "json")
    cached_forms = ("states",)

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

    def decode_cached(self, form: str, members: Mapping[str, bytes], spec: DecodeSpec) -> dict[str, Any]:
        if form != "states":
            raise ValueError(f"text has no cached form {form!r}; it has {list(self.cached_forms)}")
        try:
            states = np.load(io.BytesIO(first_member(members, ("text_states.npy",), "text_states")[1]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise SampleError("bad_codes", f"text_states: {type(err).__name__}: {err}") from None
        length = state_tokens(spec)
        if states.ndim != 2 or states.shape[1] != STATE_DIM or len(states) > length:
            raise SampleError("bad_codes", f"text_states of shape {states.shape}, expected (<= {length}, {STATE_DIM})")
        padded = torch.zeros(length, STATE_DIM)
        padded[: len(states)] = torch.from_numpy(states.astype(np.float32))
        return {"text_states": padded, "text_states_mask": torch.arange(length) < len(states)}

    def cached_form(self, generator: Any) -> str | None:
        # As a condition read by the sentence encoder, its states are worth caching; bytes are not.
        return "states" if generator is not None and generator.text_encoder == "minilm" else None

    def space(self, tokenizer: Tokenizer | None, spec: DecodeSpec, generator: Any = None) -> TokenSpace:
        if generator is not None and generator.text_encoder == "minilm":
            return SentenceSpace(self, (state_tokens(spec), STATE_DIM), 0, spec=spec)
        return TokenSpace(self, (spec.text_bytes,), BYTE_VOCAB)

    def detokenize(self, tokens: Tensor, tokenizer: Tokenizer | None) -> list[str]:
        return decode_text(tokens)

    def condition_encoder(self, space: TokenSpace, generator: Any, width: int, heads: int, spec: DecodeSpec) -> nn.Module:
        if isinstance(space, SentenceSpace):
            return StateEncoder(STATE_DIM, state_tokens(spec), width, generator.cond_depth, heads)
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
