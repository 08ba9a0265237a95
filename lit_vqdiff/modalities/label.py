"""Class labels: ``cls`` members (decimal text) as a condition, 0..num_classes-1."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import SampleError
from ..nn.conditions import ClassCondition
from ..nn.tokenizer import Tokenizer
from .base import DecodeSpec, Modality, TokenSpace


def label_of(data: bytes, num_classes: int = 0) -> int:
    """``cls`` bytes (decimal text) -> an int in [0, num_classes) (any non-negative one when 0)."""
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SampleError("bad_label", f"cls {data[:20]!r} is not a decimal integer") from None
    if label < 0:
        raise SampleError("bad_label", f"cls {label} is negative")
    if num_classes and label >= num_classes:
        raise SampleError("bad_label", f"cls {label} is not below data.num_classes={num_classes}")
    return label


class LabelModality(Modality):
    name = "class"
    batch_key = "label"
    suffix = ".cls"
    members = ("cls",)

    def decode(self, members: Mapping[str, bytes], spec: DecodeSpec) -> dict[str, Any]:
        if "cls" not in members:
            raise SampleError("missing_member", f"class needs cls, sample has {sorted(members)}")
        return {"label": label_of(members["cls"], spec.num_classes)}

    def space(self, tokenizer: Tokenizer | None, spec: DecodeSpec, generator: Any = None) -> TokenSpace:
        return TokenSpace(self, (), spec.num_classes)

    def condition_encoder(self, space: TokenSpace, generator: Any, width: int, heads: int, spec: DecodeSpec) -> nn.Module:
        return ClassCondition(spec.num_classes)

    def dit_condition(self, width: int, spec: DecodeSpec) -> dict[str, Any]:
        # DiT embeds the label itself (with a null class for guidance): no sequence to attend to.
        return {"cond_dim": None, "pooled_cond_dim": None, "num_classes": spec.num_classes}

    def items(self, outputs: torch.Tensor) -> list[int]:
        return [int(v) for v in outputs.tolist()]

    def write(self, path: Path, item: int, spec: DecodeSpec) -> Path:
        path = path.with_suffix(self.suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{int(item)}\n")
        return path

    def read(self, path: Path) -> int:
        return label_of(path.read_bytes())

    def file_members(self, path: Path) -> dict[str, bytes]:
        return {"cls": path.read_bytes()}

    def media(self, items: Sequence[int], spec: DecodeSpec, key: str, limit: int | None = None) -> dict[str, tuple]:
        return {key: ("text", [str(i) for i in items[:limit]])}
