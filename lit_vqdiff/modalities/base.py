"""What a modality is to the platform: one object that owns everything modality-specific.

A ``Modality`` turns a shard sample's members into tensors (``decode``), says how its
tensors become the integer tokens stage 2 works on (``space``), builds the network that
reads it as a condition (``condition_encoder``), turns generated tensors into plain items
(uint8 pictures, float waveforms, strings, labels), writes and reads those items as files,
and shows a few of them as media. Inputs a user gives by hand (a prompt, a picture, a
class) enter as member dicts, exactly like a shard sample, so one decoding path serves
training, validation, sampling and evaluation.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import SampleError
from ..nn.tokenizer import Tokenizer

CODES_SUFFIX = "_codes"  # batch key and member name (<modality>_codes.npy) of cached codes


def codes_key(modality: str) -> str:
    """Batch key under which a token cache's codes of a modality arrive."""
    return f"{modality}{CODES_SUFFIX}"


@dataclass(frozen=True)
class DecodeSpec:
    """What a stage reads from each sample, and the formats it wants them in.

    ``modalities`` names modalities (decoded from their raw members) and ``<m>_codes``
    entries (integer codes from a token cache). Sizes are concrete here: the config's
    auto values (0) are resolved from the data set's description before a spec is made.
    """

    modalities: tuple[str, ...]
    image_size: int = 32
    channels: int = 3
    sample_rate: int = 8000
    audio_samples: int = 8000
    text_bytes: int = 48
    num_classes: int = 0  # 0: any non-negative label is accepted
    resample_audio: bool = True
    min_source_rate: int = 4000
    max_source_rate: int = 96000

    @classmethod
    def from_config(cls, cfg: Any, modalities: Sequence[str]) -> "DecodeSpec":
        """The spec of a resolved ``DataConfig`` (dataclass or OmegaConf node) for ``modalities``."""
        needed = {"image": ("image_size", "channels"), "audio": ("sample_rate", "audio_samples"), "text": ("text_bytes",)}
        forms = [name.partition("_") for name in modalities]
        keys = [k for base, _, form in forms if form != "codes" for k in needed.get(base, ())]
        unresolved = [k for k in keys if int(getattr(cfg, k)) <= 0]
        if unresolved:
            raise ValueError(f"data.{unresolved[0]}={getattr(cfg, unresolved[0])}: auto values must be resolved "
                             "from the data description first (pipeline.plan)")
        return cls(
            modalities=tuple(modalities), image_size=int(cfg.image_size), channels=int(cfg.channels),
            sample_rate=int(cfg.sample_rate), audio_samples=int(cfg.audio_samples), text_bytes=int(cfg.text_bytes),
            num_classes=int(cfg.num_classes), resample_audio=bool(cfg.resample_audio),
            min_source_rate=int(cfg.min_source_rate), max_source_rate=int(cfg.max_source_rate),
        )


@dataclass
class TokenSpace:
    """One modality as tokens: shape per sample, vocabulary, and the way in and out."""

    modality: "Modality"
    shape: tuple[int, ...]
    vocab: int
    tokenizer: Tokenizer | None = None
    spec: DecodeSpec | None = None  # the data's formats, for spaces that encode raw inputs themselves

    def tokens(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """(B, *shape) long tokens of a batch: cached codes when present, else encoded now."""
        cached = batch.get(codes_key(self.modality.name)) if self.tokenizer is not None else None
        if cached is not None:
            return cached.long()
        raw = batch[self.modality.batch_key]
        return self.tokenizer.encode(raw) if self.tokenizer is not None else raw.long()

    def batch_size(self, batch: Mapping[str, Any]) -> int:
        """Samples in a batch, read off whichever of this modality's entries it carries."""
        cached = batch.get(codes_key(self.modality.name))
        return len(cached if cached is not None else batch[self.modality.batch_key])

    def decode(self, tokens: torch.Tensor) -> Any:
        """Generated tokens -> the modality's tensors (images, waveforms) or strings."""
        return self.modality.detokenize(tokens, self.tokenizer)


class Modality:
    """Base class; see the module docstring. Subclasses set the class attributes."""

    name: str = ""
    batch_key: str = ""  # where decoded tensors sit in a batch
    suffix: str = ""  # file suffix of an item written to disk
    coded: bool = False  # tokens come from a stage-1 tokenizer's codes
    members: tuple[str, ...] = ()  # shard members it reads, in order of preference
    cached_forms: tuple[str, ...] = ()  # what a token cache may hold of it: "<name>_<form>.npy" members

    # ------------------------------------------------------------------ shards -> tensors

    def decode(self, members: Mapping[str, bytes], spec: DecodeSpec) -> dict[str, Any]:
        """Batch entries of one sample; raises SampleError for a member that cannot be used."""
        raise NotImplementedError

    def decode_cached(self, form: str, members: Mapping[str, bytes], spec: DecodeSpec) -> dict[str, Any]:
        """Batch entries of a token cache's ``<name>_<form>.npy`` member (codes, by default)."""
        key = f"{self.name}_{form}"
        if form != "codes" or form not in self.cached_forms:
            raise ValueError(f"{self.name} has no cached form {form!r}; it has {list(self.cached_forms)}")
        return {key: codes_of(first_member(members, (f"{key}.npy",), key)[1])}

    def cached_form(self, generator: Any) -> str | None:
        """The form a token cache keeps of this modality for a stage-2 run, or None (read raw)."""
        return "codes" if self.coded else None

    def present(self, members: Mapping[str, bytes]) -> bool:
        """Whether a sample carries this modality at all."""
        return any(ext in members for ext in self.members)

    # ------------------------------------------------------------------ tokens

    def space(self, tokenizer: Tokenizer | None, spec: DecodeSpec, generator: Any = None) -> TokenSpace:
        """The token space stage 2 works in; ``generator`` (its config) may choose among encoders."""
        raise NotImplementedError

    def detokenize(self, tokens: torch.Tensor, tokenizer: Tokenizer | None) -> Any:
        if tokenizer is None:
            raise ValueError(f"{self.name} tokens cannot be turned back into {self.name}s")
        return tokenizer.decode(tokens)

    def condition_encoder(self, space: TokenSpace, generator: Any, width: int, heads: int, spec: DecodeSpec) -> nn.Module:
        """The network that reads this modality as stage 2's condition."""
        raise NotImplementedError

    def dit_condition(self, width: int, spec: DecodeSpec) -> dict[str, Any]:
        """How DiT reads the condition: a sequence by cross-attention plus a pooled vector."""
        return {"cond_dim": width, "pooled_cond_dim": width, "num_classes": None}

    # ------------------------------------------------------------------ items and files

    def items(self, outputs: Any) -> list[Any]:
        """Generated tensors (or strings) -> plain items: uint8 arrays, float waves, strings, ints."""
        raise NotImplementedError

    def write(self, path: Path, item: Any, spec: DecodeSpec) -> Path:
        """Write one item to ``path`` + ``suffix``; returns the file written."""
        raise NotImplementedError

    def read(self, path: Path) -> Any:
        """An item back from a file this modality (or a user) wrote."""
        raise NotImplementedError

    def file_members(self, path: Path) -> dict[str, bytes]:
        """A user's file as the members of a sample (``--inputs DIR``)."""
        ext = path.suffix.lower().lstrip(".")
        if ext not in self.members:
            raise ValueError(f"{path}: a {self.name} input must be one of {['.' + m for m in self.members]}")
        return {ext: path.read_bytes()}

    def media(self, items: Sequence[Any], spec: DecodeSpec, key: str, limit: int | None = None) -> dict[str, tuple]:
        """The first ``limit`` items (a modality's own default when None) as W&B / disk media:
        ``{key: ("image", HxWx3) | ("audio", waves, rate) | ("text", rows)}``."""
        raise NotImplementedError

    def describe_item(self, item: Any) -> str:
        """A short human-readable stand-in for an item (for tables and logs)."""
        return str(item)


# ---------------------------------------------------------------------- shared decoding helpers


def first_member(members: Mapping[str, bytes], exts: Sequence[str], modality: str) -> tuple[str, bytes]:
    """(extension, bytes) of the first extension in ``exts`` present in the sample."""
    for ext in exts:
        if ext in members:
            return ext, members[ext]
    raise SampleError("missing_member", f"{modality} needs one of {list(exts)}, sample has {sorted(members)}")


def codes_of(data: bytes) -> torch.Tensor:
    """``.npy`` bytes of integer codes -> LongTensor."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise SampleError("bad_codes", f"{type(err).__name__}: {err}") from None
    if not np.issubdtype(array.dtype, np.integer):
        raise SampleError("bad_codes", f"codes have dtype {array.dtype}, expected integers")
    return torch.from_numpy(array.astype(np.int64))
