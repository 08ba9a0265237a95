"""Quantizers for the stage-1 tokenizers: VQ (EMA or gradient codebook), residual VQ, FSQ.

Inputs are channels-first encoder outputs, (B, C, H, W) or (B, C, T). Everything inside
runs in float32 whatever the surrounding autocast says; ``quantized`` comes back in the
input's dtype.

Under torch.distributed a training-mode forward of VectorQuantizer / ResidualVQ is a
collective: k-means init, EMA statistics and dead-code restarts are shared so that
every rank holds the same codebook. Every rank must therefore run the same number of
training-mode forwards (eval-mode forwards, ``encode`` and the decoders never
communicate).
"""

from __future__ import annotations

from .base import Quantizer, QuantizerOutput
from .fsq import FSQ
from .vq import ResidualVQ, VectorQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {"vq": VectorQuantizer, "rvq": ResidualVQ, "fsq": FSQ}


def build_quantizer(kind: str, **kwargs) -> Quantizer:
    """Build a quantizer by registry name ('vq', 'rvq', 'fsq') with its constructor kwargs."""
    if kind not in QUANTIZERS:
        raise ValueError(f"unknown quantizer kind {kind!r}; valid kinds: {sorted(QUANTIZERS)}")
    return QUANTIZERS[kind](**kwargs)


__all__ = ["FSQ", "QUANTIZERS", "Quantizer", "QuantizerOutput", "ResidualVQ", "VectorQuantizer", "build_quantizer"]
