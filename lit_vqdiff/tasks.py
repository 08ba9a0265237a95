"""Tasks (`source->target`) and the modalities as token spaces for stage 2.

A *token space* says how a modality becomes a grid of integers and back: images and
sounds through their frozen tokenizer's codes, text as UTF-8 bytes, a class as a label.
The generator only ever sees tokens; this module is where raw batches, cached codes
and generated outputs meet them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .data import shapes
from .text import BYTE_VOCAB, decode_text, encode_text
from .nn.tokenizer import Tokenizer

TASKS = ("class->image", "text->image", "image->audio", "audio->image", "image->text", "text->audio")
CODED = ("image", "audio")  # modalities that need a stage-1 tokenizer
OUTPUT_SUFFIX = {"image": ".png", "audio": ".wav", "text": ".txt"}


def parse_task(task: str) -> tuple[str, str]:
    """'text->image' -> ('text', 'image'), with a clear error for anything else."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    source, target = task.split("->")
    return source, target


def needed_tokenizers(task: str) -> list[str]:
    return [m for m in parse_task(task) if m in CODED]


def stage_inputs(task: str, cached: bool) -> tuple[str, ...]:
    """Batch members a task reads: raw inputs, or a token cache's codes for coded modalities."""
    return tuple(codes_key(m) if cached and m in CODED else m for m in dict.fromkeys(parse_task(task)))


def codes_key(modality: str) -> str:
    """Batch key under which cached codes of a modality arrive."""
    return f"{modality}_codes"


@dataclass
class TokenSpace:
    """One modality as tokens: shape per sample, vocabulary, and the way in and out."""

    modality: str
    shape: tuple[int, ...]
    vocab: int
    tokenizer: Tokenizer | None = None
    text_bytes: int = 0

    def tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, *shape) long tokens of a batch: cached codes when present, else encoded now."""
        if self.modality == "text":
            return batch["text"].long()
        if self.modality == "class":
            return batch["label"].long()
        cached = batch.get(codes_key(self.modality))
        if cached is not None:
            return cached.long()
        assert self.tokenizer is not None
        return self.tokenizer.encode(batch[self.modality])

    def decode(self, tokens: torch.Tensor) -> Any:
        """Generated tokens -> images (B, 3, H, W) in [-1, 1], waveforms (B, T) or strings."""
        if self.modality == "text":
            return decode_text(tokens)
        assert self.tokenizer is not None
        return self.tokenizer.decode(tokens)


def token_space(modality: str, tokenizers: dict[str, Tokenizer], text_bytes: int) -> TokenSpace:
    if modality == "text":
        return TokenSpace("text", (text_bytes,), BYTE_VOCAB, text_bytes=text_bytes)
    if modality == "class":
        return TokenSpace("class", (), shapes.NUM_CLASSES)
    if modality not in tokenizers:
        raise ValueError(f"{modality} needs a stage-1 tokenizer; none was loaded")
    tok = tokenizers[modality]
    return TokenSpace(modality, tuple(tok.code_shape), tok.quantizer.codebook_size, tokenizer=tok)


def raw_batch(samples: list[shapes.Sample], modality: str, text_bytes: int) -> dict[str, torch.Tensor]:
    """The batch entries a condition of ``modality`` reads, built from shapes-v1 samples."""
    if modality == "text":
        return {"text": encode_text([s.caption for s in samples], text_bytes)[0]}
    if modality == "class":
        return {"label": torch.tensor([s.label for s in samples], dtype=torch.long)}
    if modality == "image":
        images = torch.stack([torch.from_numpy(s.image) for s in samples]).permute(0, 3, 1, 2).float()
        return {"image": images / 127.5 - 1.0}
    if modality == "audio":
        return {"audio": torch.stack([torch.from_numpy(s.sound) for s in samples])}
    raise ValueError(f"unknown modality {modality!r}")
