"""What every quantizer shares: its output record, in/out projections, channels-first
<-> rows, float32 inside autocast, validated code layouts, and the prune remap table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_vqdiff.metrics import histogram_perplexity, histogram_usage


@dataclass
class QuantizerOutput:
    """What a quantizer's forward returns."""

    quantized: Tensor  # like the input z (shape, dtype); straight-through gradient to z
    codes: Tensor  # long: (B, *spatial), or (B, num_quantizers, *spatial) for residual VQ
    loss: Tensor  # float32 scalar: codebook + commitment terms (0 for FSQ)
    counts: Tensor  # long (num_codebooks, codebook_size): this rank's histogram of the batch

    @property
    def usage(self) -> Tensor:
        """Share of each codebook's codes used in this batch, (num_codebooks,)."""
        return histogram_usage(self.counts)

    @property
    def perplexity(self) -> Tensor:
        """exp(entropy) of each codebook's code distribution in this batch, (num_codebooks,)."""
        return histogram_perplexity(self.counts)


def no_autocast(t: Tensor) -> torch.autocast:
    """Turn autocast off on t's device: distances, EMA and losses must stay float32."""
    return torch.autocast(t.device.type, enabled=False)


def project(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply a projection in float32 even when its weights are stored in lower precision."""
    if isinstance(layer, nn.Linear):
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x, layer.weight.float(), bias)
    return x


def to_rows(z: Tensor, dim: int, name: str = "z") -> tuple[Tensor, tuple[int, ...]]:
    """(B, dim, *spatial) -> float32 rows (B * prod(spatial), dim), and the shape (B, *spatial)."""
    if z.dim() < 3 or z.shape[1] != dim:
        raise ValueError(f"{name} must be channels-first (B, {dim}, *spatial), got shape {tuple(z.shape)}")
    return z.float().movedim(1, -1).reshape(-1, dim), (z.shape[0], *z.shape[2:])


def from_rows(rows: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of to_rows: (N, C) -> (B, C, *spatial)."""
    return rows.reshape(*shape, rows.shape[-1]).movedim(-1, 1)


def used_codes(counts: Tensor, codebook_size: int) -> Tensor:
    """Indices of codes with a nonzero count; counts (codebook_size,) or (1, codebook_size)."""
    if tuple(counts.shape) not in ((codebook_size,), (1, codebook_size)):
        expected = f"({codebook_size},) or (1, {codebook_size})"
        raise ValueError(f"counts must have shape {expected}, got {tuple(counts.shape)}")
    keep = (counts.reshape(-1) > 0).nonzero().squeeze(1)
    if keep.numel() == 0:
        raise ValueError("counts: no code was ever used, nothing to keep")
    return keep


def remap_table(keep: Tensor, codebook_size: int) -> Tensor:
    """Old -> new code index after keeping only `keep` (in order); -1 for dropped codes."""
    table = torch.full((codebook_size,), -1, dtype=torch.long, device=keep.device)
    table[keep] = torch.arange(keep.numel(), device=keep.device)
    return table


def check_positive(name: str, value: int) -> None:
    """Raise unless value is a positive int."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class Quantizer(nn.Module):
    """Shared plumbing: in/out projections, channels-first <-> rows, float32, code layouts.

    Subclasses work on float32 rows in the lookup space and implement ``_quantize``,
    ``_encode_rows``, ``_vectors_of`` (codes (N, q) -> vectors) and ``prune``.
    """

    stacked_codes = False  # codes (B, num_codebooks, *spatial) instead of (B, *spatial)

    def __init__(self, dim: int, lookup_dim: int) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("lookup_dim", lookup_dim)
        self.dim, self.lookup_dim = dim, lookup_dim
        projected = lookup_dim != dim
        self.project_in = nn.Linear(dim, lookup_dim) if projected else nn.Identity()
        self.project_out = nn.Linear(lookup_dim, dim) if projected else nn.Identity()

    def training_state(self) -> dict[str, Any]:
        """Clones of what a training forward changes outside the optimizer (codebooks and their
        statistics), so that a skipped step can be undone; nothing for a stateless quantizer."""
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Put back what ``training_state`` returned."""

    def ring_state(self) -> list[tuple[Tensor, int]]:
        """This rank's rings of recent inputs for dead-code restarts (none here)."""
        return []

    def load_ring_state(self, rings: list[tuple[Tensor, int]]) -> None:
        """Put back what ``ring_state`` returned."""

    def forward(self, z: Tensor) -> QuantizerOutput:
        with no_autocast(z):
            rows, shape = to_rows(z, self.dim)
            source, target, codes, loss = self._quantize(project(self.project_in, rows))
            # Straight-through: the value of the code, the gradient of the encoder output.
            quantized = project(self.project_out, source + (target - source).detach())
        return QuantizerOutput(
            quantized=from_rows(quantized, shape).to(z.dtype),
            codes=self._codes_out(codes, shape),
            loss=loss,
            counts=self._histogram(codes),
        )

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """Codes of z, without any codebook update (safe on a frozen tokenizer)."""
        with no_autocast(z):
            rows, shape = to_rows(z, self.dim)
            return self._codes_out(self._encode_rows(project(self.project_in, rows)), shape)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Quantized z (B, dim, *spatial) of codes; equals ``forward(z).quantized`` for codes = encode(z)."""
        rows, shape = self._codes_in(codes)
        with no_autocast(rows):
            return from_rows(project(self.project_out, self._vectors_of(rows)), shape)

    def code_vectors(self, codes: Tensor) -> Tensor:
        """Low-dimensional code vectors (B, lookup_dim, *spatial): what Gaussian latent diffusion models."""
        rows, shape = self._codes_in(codes)
        with no_autocast(rows):
            return from_rows(self._vectors_of(rows), shape)

    @torch.no_grad()
    def encode_vectors(self, vectors: Tensor) -> Tensor:
        """Codes of the codes nearest to lookup-space vectors (B, lookup_dim, *spatial)."""
        with no_autocast(vectors):
            rows, shape = to_rows(vectors, self.lookup_dim, name="vectors")
            return self._codes_out(self._snap_rows(rows), shape)

    def decode_vectors(self, vectors: Tensor) -> Tensor:
        """Snap lookup-space vectors to their nearest codes, then project out to (B, dim, *spatial)."""
        return self.decode_codes(self.encode_vectors(vectors))

    def _snap_rows(self, vectors: Tensor) -> Tensor:
        return self._encode_rows(vectors)

    def _codes_out(self, codes: Tensor, shape: Sequence[int]) -> Tensor:
        return from_rows(codes, shape) if self.stacked_codes else codes.reshape(shape)

    def _codes_in(self, codes: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """Validate user codes; return rows (N, q) and the shape (B, *spatial)."""
        if codes.is_floating_point() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if self.stacked_codes:
            if codes.dim() < 3 or not 1 <= codes.shape[1] <= self.num_codebooks:
                raise ValueError(
                    f"codes must have shape (B, q, *spatial) with 1 <= q <= {self.num_codebooks}, "
                    f"got {tuple(codes.shape)}"
                )
            rows, shape = codes.movedim(1, -1).reshape(-1, codes.shape[1]), (codes.shape[0], *codes.shape[2:])
        else:
            if codes.dim() < 2:
                raise ValueError(f"codes must have shape (B, *spatial), got {tuple(codes.shape)}")
            rows, shape = codes.reshape(-1, 1), tuple(codes.shape)
        if rows.numel():
            low, high = torch.aminmax(rows)
            if bool((low < 0) | (high >= self.codebook_size)):  # one device sync, not two
                raise ValueError(f"codes must lie in [0, {self.codebook_size}), got range [{low}, {high}]")
        return rows.long(), shape

    def _histogram(self, codes: Tensor) -> Tensor:
        """(N, num_codebooks) codes -> (num_codebooks, codebook_size) counts."""
        num, size = codes.shape[1], self.codebook_size
        offsets = torch.arange(num, device=codes.device) * size
        return torch.bincount((codes + offsets).flatten(), minlength=num * size).view(num, size)
