"""Decoding one WebDataset sample (a dict of member bytes) into model-ready tensors.

Each name in ``DecodeSpec.modalities`` is either a modality, decoded from its own members
by its ``Modality`` object (see ``lit_vqdiff.modalities``), or ``<modality>_<form>``: what
a token cache keeps of it (``image_codes``: a frozen tokenizer's codes; ``text_states``: a
pretrained text encoder's token states), decoded by the same object. Anything wrong with a sample raises
``SampleError`` whose ``reason`` is one of ``SKIP_REASONS``; the stream counts it instead
of crashing.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import SKIP_REASONS, SampleError
from ..modalities import MODALITIES, DecodeSpec


def check_spec(spec: DecodeSpec) -> None:
    """Raise unless every name in ``spec.modalities`` is a modality or a cached form of one."""
    known = [*MODALITIES, *(f"{name}_{form}" for name, m in MODALITIES.items() for form in m.cached_forms)]
    unknown = [m for m in spec.modalities if m not in known]
    if not spec.modalities or unknown:
        raise ValueError(f"modalities must be a non-empty subset of {known}, got {spec.modalities!r}")


def decode_sample(members: Mapping[str, bytes], spec: DecodeSpec) -> dict[str, Any]:
    """Tensors for ``spec.modalities`` from one sample's members; raises ``SampleError``."""
    out: dict[str, Any] = {}
    for name in spec.modalities:
        base, _, form = name.partition("_")
        modality = MODALITIES[base]
        out |= modality.decode_cached(form, members, spec) if form else modality.decode(members, spec)
    return out


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded samples into a batch; ``label`` becomes a LongTensor, ``key`` a list."""
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        elif name == "label":
            batch[name] = torch.tensor(values, dtype=torch.long)
        else:
            batch[name] = values
    return batch


__all__ = ["DecodeSpec", "SKIP_REASONS", "SampleError", "check_spec", "collate", "decode_sample"]
