"""Decoding one WebDataset sample (a dict of member bytes) into model-ready tensors.

Each name in ``DecodeSpec.modalities`` is either a modality, decoded from its own members
by its ``Modality`` object (see ``lit_vqdiff.modalities``), or ``<modality>_codes``: a
token cache's ``<modality>_codes.npy`` integer array. Anything wrong with a sample raises
``SampleError`` whose ``reason`` is one of ``SKIP_REASONS``; the stream counts it instead
of crashing.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import SKIP_REASONS, SampleError
from ..modalities import CODES_SUFFIX, MODALITIES, DecodeSpec
from ..modalities.base import codes_of, first_member


def check_spec(spec: DecodeSpec) -> None:
    """Raise unless every name in ``spec.modalities`` is a modality or a coded modality's codes."""
    coded = [f"{name}{CODES_SUFFIX}" for name, m in MODALITIES.items() if m.coded]
    known = [*MODALITIES, *coded]
    unknown = [m for m in spec.modalities if m not in known]
    if not spec.modalities or unknown:
        raise ValueError(f"modalities must be a non-empty subset of {known}, got {spec.modalities!r}")


def decode_sample(members: Mapping[str, bytes], spec: DecodeSpec) -> dict[str, Any]:
    """Tensors for ``spec.modalities`` from one sample's members; raises ``SampleError``."""
    out: dict[str, Any] = {}
    for name in spec.modalities:
        if name.endswith(CODES_SUFFIX):
            out[name] = codes_of(first_member(members, (f"{name}.npy",), name)[1])
        else:
            out |= MODALITIES[name].decode(members, spec)
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
