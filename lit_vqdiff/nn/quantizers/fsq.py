"""Finite scalar quantization: a codebook-free quantizer (nothing to initialize, update
or restart, so nothing to synchronize across ranks)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Quantizer, remap_table, used_codes
from .collectives import nearest_code


class FSQ(Quantizer):
    """Finite scalar quantization: each lookup channel rounded to one of its levels.

    Code index is mixed radix, first channel fastest: d0 + L0 * (d1 + L1 * (d2 + ...)).
    Code vectors put the digits of each channel evenly on [-1, 1]. ``prune`` keeps a
    subset of the grid; lookups then go to the nearest kept grid point.
    """

    num_codebooks = 1

    def __init__(self, dim: int, levels: Sequence[int] = (8, 5, 5, 5)) -> None:
        levels = tuple(levels)
        if not levels or not all(isinstance(level, int) and level >= 2 for level in levels):
            raise ValueError(f"levels must be a non-empty list of ints >= 2, got {levels!r}")
        super().__init__(dim, len(levels))
        self.levels = levels
        radix = torch.tensor((1, *levels[:-1])).cumprod(0)
        self.register_buffer("level_counts", torch.tensor(levels), persistent=False)
        self.register_buffer("radix", radix, persistent=False)
        # Grid indices still in use, in new-code order; persistent so a pruned FSQ reloads.
        self.register_buffer("kept", torch.arange(math.prod(levels)))

    @property
    def codebook_size(self) -> int:
        return self.kept.numel()

    def prune(self, counts: Tensor) -> Tensor:
        """Drop codes whose count is 0; returns the old -> new table shaped like counts (-1: dropped)."""
        keep = used_codes(counts, self.codebook_size)
        self.kept = self.kept[keep]
        return remap_table(keep, counts.numel()).view(counts.shape)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # A pruned checkpoint holds a shorter `kept`: take its size before loading.
        kept = state_dict.get(prefix + "kept")
        if kept is not None:
            self.kept = torch.empty_like(kept, device=self.kept.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _digit_vectors(self, digits: Tensor) -> Tensor:
        return digits * 2.0 / (self.level_counts - 1) - 1.0

    def _bounded_vectors(self, rows: Tensor) -> Tensor:
        """Continuous code vectors: each channel squashed onto (-0.5, L - 0.5), then scaled like digits."""
        # The half-level margins give every level an equal-width rounding bin.
        return self._digit_vectors(torch.sigmoid(rows) * self.level_counts - 0.5)

    def _quantize(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        source = self._bounded_vectors(rows)
        codes = self._snap_rows(source.detach())
        return source, self._vectors_of(codes), codes, rows.new_zeros(())

    def _encode_rows(self, rows: Tensor) -> Tensor:
        return self._snap_rows(self._bounded_vectors(rows))

    def _snap_rows(self, vectors: Tensor) -> Tensor:
        if self.codebook_size < math.prod(self.levels):
            every_code = torch.arange(self.codebook_size, device=vectors.device)[:, None]
            return nearest_code(vectors, self._vectors_of(every_code))[:, None]
        digits = ((vectors + 1.0) * (self.level_counts - 1) / 2.0).round()
        digits = torch.minimum(digits.clamp_min(0), self.level_counts - 1).long()
        return (digits * self.radix).sum(1, keepdim=True)

    def _vectors_of(self, codes: Tensor) -> Tensor:
        digits = (self.kept[codes[:, 0]][:, None] // self.radix) % self.level_counts
        return self._digit_vectors(digits.float())
