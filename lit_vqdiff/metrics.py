"""Metrics computed on our own outputs (no pretrained judges).

Codebook health: how many codes a tokenizer actually uses. A histogram row per codebook
(one for VQ/FSQ, one per quantizer for residual VQ) feeds every number below.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def histogram_usage(histogram: Tensor) -> Tensor:
    """Share of codes used at least once, per row of a (..., num_codes) histogram."""
    return (histogram > 0).float().mean(-1)


def histogram_perplexity(histogram: Tensor) -> Tensor:
    """exp(entropy) of each row's code distribution: 1 when one code takes all, num_codes when uniform."""
    counts = histogram.float()
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    # xlogy makes 0 * log 0 = 0, so unused codes add no entropy (and an empty row gives 1).
    return torch.exp(-torch.special.xlogy(p, p).sum(-1))


def histogram_dead(histogram: Tensor) -> Tensor:
    """Number of codes never used, per row."""
    return (histogram == 0).sum(-1)


class CodebookUsage(Metric):
    """Code histogram accumulated over an epoch (summed across ranks).

    ``compute()`` returns ``usage``, ``perplexity`` and ``dead``: scalars for one
    codebook, shape (num_codebooks,) for several, plus the ``histogram`` itself
    (num_codebooks, num_codes) for a usage plot.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_codes: int, num_codebooks: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_codes < 1:
            raise ValueError(f"num_codes must be >= 1, got {num_codes}")
        if num_codebooks < 1:
            raise ValueError(f"num_codebooks must be >= 1, got {num_codebooks}")
        self.num_codes, self.num_codebooks = num_codes, num_codebooks
        self.add_state(
            "histogram", torch.zeros(num_codebooks, num_codes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, codes: Tensor) -> None:
        """Count codes: (B, *spatial) for one codebook, (B, num_codebooks, *spatial) for several."""
        if codes.is_floating_point() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if self.num_codebooks == 1:
            rows = codes.reshape(1, -1)
        elif codes.dim() < 2 or codes.shape[1] != self.num_codebooks:
            raise ValueError(
                f"codes must have shape (B, {self.num_codebooks}, *spatial), got {tuple(codes.shape)}"
            )
        else:
            rows = codes.movedim(1, 0).reshape(self.num_codebooks, -1)
        if rows.numel():
            low, high = torch.aminmax(rows)
            if bool((low < 0) | (high >= self.num_codes)):  # one device sync, not two
                raise ValueError(f"codes must lie in [0, {self.num_codes}), got range [{low}, {high}]")
        offsets = torch.arange(self.num_codebooks, device=rows.device)[:, None] * self.num_codes
        counts = torch.bincount((rows.long() + offsets).flatten(), minlength=self.histogram.numel())
        self.histogram += counts.view_as(self.histogram)

    def compute(self) -> dict[str, Tensor]:
        """usage, perplexity, dead (per codebook) and the histogram."""
        stats = {
            "usage": histogram_usage(self.histogram),
            "perplexity": histogram_perplexity(self.histogram),
            "dead": histogram_dead(self.histogram),
        }
        if self.num_codebooks == 1:
            stats = {name: value.squeeze(0) for name, value in stats.items()}
        return {**stats, "histogram": self.histogram.clone()}
