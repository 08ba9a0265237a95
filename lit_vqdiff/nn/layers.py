"""Transformer building blocks shared by DiT and the condition encoders: attention, MLP,
position and timestep features, patching, and embeddings of code groups."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FREQ_DIM = 256


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """Fixed sine/cosine features (N, dim) of 1D positions."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_positions(grid: tuple[int, ...], dim: int) -> Tensor:
    """Fixed position table (prod(grid), dim) for a 1D or 2D grid in row-major token order."""
    if len(grid) == 1:
        if dim % 2:
            raise ValueError(f"1D sincos positions need an even width, got {dim}")
        return sincos_1d(torch.arange(grid[0]), dim)
    if dim % 4:
        raise ValueError(f"2D sincos positions need a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    # Half the channels encode the column, half the row.
    return torch.cat([sincos_1d(cols.flatten(), dim // 2), sincos_1d(rows.flatten(), dim // 2)], dim=1)


def timestep_features(t: Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features (B, dim) of float timesteps (B,), as in DDPM/DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def patchify(x: Tensor, patch: int) -> Tensor:
    """(B, C, *S) -> (B, prod(S / patch), C * patch^d) patch tokens, row-major."""
    batch, channels, *sizes = x.shape
    d = len(sizes)
    grid = [s // patch for s in sizes]
    x = x.reshape(batch, channels, *[v for g in grid for v in (g, patch)])
    order = [0, *[2 + 2 * i for i in range(d)], 1, *[3 + 2 * i for i in range(d)]]
    return x.permute(order).reshape(batch, math.prod(grid), channels * patch**d)


def unpatchify(tokens: Tensor, grid: tuple[int, ...], patch: int, channels: int) -> Tensor:
    """Inverse of ``patchify``: (B, prod(grid), C * patch^d) -> (B, C, *(grid * patch))."""
    batch, d = tokens.shape[0], len(grid)
    x = tokens.reshape(batch, *grid, channels, *[patch] * d)
    order = [0, d + 1, *[v for i in range(d) for v in (1 + i, d + 2 + i)]]
    return x.permute(order).reshape(batch, channels, *[g * patch for g in grid])


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: per-sample affine of normalized tokens (B, N, W) by (B, W) shift and scale."""
    return x * (1 + scale[:, None]) + shift[:, None]


class GroupEmbedding(nn.Module):
    """Embedding of groups of codes (B, N, slots) -> (B, N, width): the sum of a per-slot
    embedding of each code, so that the same code at two places of a group differs."""

    def __init__(self, vocab: int, slots: int, width: int):
        super().__init__()
        self.vocab, self.slots = vocab, slots
        self.table = nn.Embedding(slots * vocab, width)
        self.register_buffer("offset", torch.arange(slots) * vocab, persistent=False)

    def forward(self, groups: Tensor) -> Tensor:
        return self.table(groups + self.offset).sum(dim=-2)


def group_codes(codes: Tensor, seq_shape: tuple[int, ...], patch: int) -> Tensor:
    """(B, *seq_shape) or (B, L) codes -> (B, N, patch^d) groups, row-major like ``patchify``."""
    return patchify(codes.reshape(codes.shape[0], 1, *seq_shape), patch)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout: float = 0.0) -> Tensor:
    """scaled_dot_product_attention, except for reduced precision on the CPU.

    There the fused CPU kernel is slower than three plain matmuls for the short
    sequences used here, because the matmuls reach the bf16 units and the fused kernel
    does not (docs/experiments.md, stage 2).
    """
    if q.device.type != "cpu" or q.dtype == torch.float32 or dropout > 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head attention through SDPA: self-attention, or cross-attention when kv_dim is set."""

    def __init__(self, width: int, heads: int, kv_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.is_cross = kv_dim is not None
        if self.is_cross:
            self.q = nn.Linear(width, width)
            self.kv = nn.Linear(kv_dim, 2 * width)
        else:
            self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        """x (B, N, W); context (B, S, kv_dim) for cross-attention; key_mask (B, S) True = attend."""
        batch, length, width = x.shape
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention needs a context sequence")
            q, (k, v) = self.q(x), self.kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.reshape(batch, -1, self.heads, width // self.heads).transpose(1, 2) for z in (q, k, v))
        attn_mask = empty = None
        if key_mask is not None:
            # A row with no valid key would softmax over nothing (NaN): let it attend
            # everywhere, then zero its result, so it reads as "no context".
            empty = ~key_mask.any(dim=1)
            attn_mask = (key_mask | empty[:, None])[:, None, None, :]
        dropout = self.dropout if self.training else 0.0
        out = attention(q, k, v, attn_mask=attn_mask, dropout=dropout)
        out = out.transpose(1, 2).reshape(batch, length, width)
        if empty is not None:
            out = out.masked_fill(empty[:, None, None], 0.0)
        return self.proj(out)


class Mlp(nn.Module):
    """Linear -> tanh-GELU -> Linear."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x), approximate="tanh")))
