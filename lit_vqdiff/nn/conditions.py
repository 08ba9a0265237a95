"""Condition encoders: class labels, UTF-8 captions, a pretrained text encoder's token states
and frozen-tokenizer codes -> ``Condition``.

Classifier-free guidance needs one network that predicts both with and without its
condition. So every encoder swaps the condition of the rows flagged in ``drop`` (B,) for a
learned null condition: during training ``drop`` comes from ``drop_mask(batch, p)``, so the
network also learns the unconditional task; at sampling time an all-True ``drop`` gives the
unconditional branch that guidance extrapolates away from.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .dit import Condition
from .layers import Attention, GroupEmbedding, Mlp, group_codes, sincos_positions



def drop_mask(
    batch_size: int, p: float, *, device: torch.device | str | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Bool (B,) with each row True (condition dropped) with probability p."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability p must be in [0, 1], got {p!r}")
    return torch.rand(batch_size, device=device, generator=generator) < p


def _check_drop(drop: Tensor | None, batch: int) -> None:
    """Raise unless drop is None or a bool (batch,) tensor."""
    if drop is not None and (drop.dtype != torch.bool or drop.shape != (batch,)):
        raise ValueError(f"drop must be a bool tensor of shape ({batch},), got {drop.dtype} {tuple(drop.shape)}")


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer encoder block with a key-padding mask."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout=dropout)
        self.mlp = Mlp(width, int(width * mlp_ratio), dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), key_mask=mask)
        return x + self.mlp(self.norm2(x))


class SequenceEncoder(nn.Module):
    """Shared trunk of the sequence encoders: blocks, final norm, masked mean pool, null condition."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(EncoderBlock(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        # The null condition is a single real position holding a learned vector.
        self.null = nn.Parameter(torch.randn(width) * 0.02)

    def encode(self, h: Tensor, mask: Tensor, drop: Tensor | None) -> Condition:
        """Run the blocks over embedded tokens h (B, S, W) and apply ``drop``."""
        _check_drop(drop, h.shape[0])
        for block in self.blocks:
            h = block(h, mask)
        seq = self.norm(h)
        weights = mask.unsqueeze(-1).to(seq.dtype)
        pooled = (seq * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        if drop is None:
            return Condition(seq=seq, mask=mask, pooled=pooled)
        length = seq.shape[1]
        null_seq = torch.cat([self.null.view(1, 1, -1), seq.new_zeros(1, length - 1, self.width)], dim=1)
        null_mask = torch.arange(length, device=mask.device) == 0
        return Condition(
            seq=torch.where(drop[:, None, None], null_seq, seq),
            mask=torch.where(drop[:, None], null_mask, mask),
            pooled=torch.where(drop[:, None], self.null, pooled),
        )


class ByteTextEncoder(SequenceEncoder):
    """Captions as byte ids -> a condition sequence with learned positions.

    ``vocab`` ids per byte position, ``pad_id`` marks the positions after the caption's end.
    With ``patch`` > 1, each run of ``patch`` bytes is one position (see GroupEmbedding):
    a shorter sequence for the encoder and for every cross-attention that reads it.
    """

    def __init__(
        self, width: int, depth: int, heads: int, max_bytes: int, *, vocab: int, pad_id: int, mlp_ratio: float = 4.0,
        dropout: float = 0.0, patch: int = 1,
    ):
        super().__init__(width, depth, heads, mlp_ratio, dropout)
        if max_bytes < 1 or patch < 1 or max_bytes % patch:
            raise ValueError(f"need max_bytes >= 1 divisible by patch >= 1, got {max_bytes!r} and {patch!r}")
        self.max_bytes, self.patch, self.pad_id = max_bytes, patch, pad_id
        self.byte_embed = GroupEmbedding(vocab, patch, width)
        self.pos_embed = nn.Parameter(torch.randn(1, max_bytes // patch, width) * 0.02)

    def forward(self, tokens: Tensor, drop: Tensor | None = None) -> Condition:
        """tokens (B, max_bytes) from ``encode_text``; drop (B,) bool rows get the null condition."""
        if tokens.dtype != torch.long or tokens.ndim != 2 or tokens.shape[1] != self.max_bytes:
            raise ValueError(
                f"tokens must be long of shape (B, {self.max_bytes}), got {tokens.dtype} {tuple(tokens.shape)}"
            )
        groups = tokens.view(tokens.shape[0], -1, self.patch)
        mask = (groups != self.pad_id).any(dim=-1)  # a position is real when any of its bytes is
        return self.encode(self.byte_embed(groups) + self.pos_embed, mask, drop)


class StateEncoder(SequenceEncoder):
    """Token states of a frozen pretrained text encoder (B, T, state_dim) with their mask ->
    a condition sequence: a projection to ``width``, learned positions, then the blocks."""

    def __init__(self, state_dim: int, max_tokens: int, width: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0):
        super().__init__(width, depth, heads, mlp_ratio, dropout)
        self.max_tokens = max_tokens
        self.project = nn.Linear(state_dim, width)
        self.pos_embed = nn.Parameter(torch.randn(1, max_tokens, width) * 0.02)

    def forward(self, source: tuple[Tensor, Tensor], drop: Tensor | None = None) -> Condition:
        """source = (states (B, T <= max_tokens, state_dim) float, mask (B, T) bool)."""
        states, mask = source
        if states.ndim != 3 or states.shape[1] > self.max_tokens or mask.shape != states.shape[:2]:
            raise ValueError(f"states must be (B, T <= {self.max_tokens}, D) with a (B, T) mask, "
                             f"got {tuple(states.shape)} and {tuple(mask.shape)}")
        h = self.project(states.to(self.project.weight.dtype)) + self.pos_embed[:, : states.shape[1]]
        return self.encode(h, mask.bool(), drop)


class CodeEncoder(SequenceEncoder):
    """Codes of a frozen tokenizer (1D or 2D grid) -> a condition sequence with sincos positions."""

    def __init__(
        self,
        vocab_size: int,
        seq_shape: tuple[int, ...],
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        patch: int = 1,
    ):
        super().__init__(width, depth, heads, mlp_ratio, dropout)
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size!r}")
        self.seq_shape = tuple(int(s) for s in seq_shape)
        if patch < 1 or any(s % patch for s in self.seq_shape):
            raise ValueError(f"seq_shape {self.seq_shape} must be divisible by patch {patch}")
        self.patch = patch
        self.code_embed = GroupEmbedding(vocab_size, patch ** len(self.seq_shape), width)
        grid = tuple(s // patch for s in self.seq_shape)
        self.register_buffer("pos_embed", sincos_positions(grid, width)[None], persistent=False)

    def forward(self, codes: Tensor, drop: Tensor | None = None) -> Condition:
        """codes (B, L) or (B, *seq_shape) long; drop (B,) bool rows get the null condition."""
        length = math.prod(self.seq_shape)
        if codes.dtype != torch.long or tuple(codes.shape[1:]) not in (self.seq_shape, (length,)):
            raise ValueError(
                f"codes must be long of shape (B, {length}) or (B, *{self.seq_shape}), "
                f"got {codes.dtype} {tuple(codes.shape)}"
            )
        h = self.code_embed(group_codes(codes, self.seq_shape, self.patch)) + self.pos_embed
        mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        return self.encode(h, mask, drop)


class ClassCondition(nn.Module):
    """Class labels -> Condition.labels (null class for dropped rows), plus an embedding when width is set.

    With ``DiT(num_classes=...)`` the DiT embeds the labels itself: use ``width=None`` so no
    table here goes unused. With a width, the learned embedding also fills ``pooled`` and a
    one-position ``seq``, for a DiT that reads those instead.
    """

    def __init__(self, num_classes: int, width: int | None = None):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes + 1, width) if width else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, labels: Tensor, drop: Tensor | None = None) -> Condition:
        """labels (B,) long in [0, num_classes); drop (B,) bool rows become the null class."""
        if labels.dtype != torch.long or labels.ndim != 1:
            raise ValueError(f"labels must be a long (B,) tensor, got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            low, high = int(labels.min()), int(labels.max())
            raise ValueError(f"labels must be in [0, {self.num_classes}), got range [{low}, {high}]")
        _check_drop(drop, labels.shape[0])
        if drop is not None:
            labels = labels.masked_fill(drop, self.num_classes)
        if self.embed is None:
            return Condition(labels=labels)
        pooled = self.embed(labels)
        mask = torch.ones(labels.shape[0], 1, dtype=torch.bool, device=labels.device)
        return Condition(seq=pooled[:, None], mask=mask, pooled=pooled, labels=labels)
