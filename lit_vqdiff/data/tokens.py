"""The token cache: a shard set encoded once by frozen tokenizers, for stage 2.

Each source shard becomes a token shard of the same name and sample count, holding per
sample ``<modality>_codes.npy`` for every tokenizer (``text_states.npy``, a pretrained
sentence encoder's token states of the caption, when stage 2 reads captions that way)
plus the source's small members (``txt``, ``cls``, ``json``). The cache lives in ``<data.root>/tokens/<name>`` where the
name carries a digest of the tokenizers' checksums and of the data it encoded (the
shards, their sizes and files, the decode settings), and ``tokens.json`` records both: a
cache made by other tokenizers, or from other data, is never used by mistake.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..errors import SampleError
from ..modalities import codes_key
from ..progress import progress as progress_of
from ..modalities.text import encode_sentences, text_of
from .datamodule import resolve_shards
from .decode import DecodeSpec, decode_sample
from .stream import RawSample, is_url, read_shard
from .shards import SIZES_FILE, tar_member, staged_directory, update_sizes

META_FILE = "tokens.json"
FORMAT = "lit_vqdiff.tokens/1"
KEPT_MEMBERS = ("txt", "cls", "json")  # small source members stage 2 may condition on


class TokenCacheError(ValueError):
    """A cache that does not belong to the tokenizers at hand."""


DECODE_KEYS = ("image_size", "channels", "sample_rate", "audio_samples", "resample_audio", "min_source_rate", "max_source_rate")


def data_fingerprint(data: Any) -> dict[str, Any]:
    """What a cache encoded: every shard of both splits (URL, size, and for local files their
    byte count and modification time) and the settings that decode them."""
    splits = {}
    for split in ("train", "val"):
        rows = []
        for shard in resolve_shards(getattr(data, split), data.root, split, data.sizes):
            row: list[Any] = [shard.url, shard.size]
            if not is_url(shard.url) and not shard.url.startswith("pipe:"):
                stat = Path(shard.url).stat()
                row += [stat.st_size, stat.st_mtime_ns]
            rows.append(row)
        splits[split] = rows
    return {"shards": splits, "decode": {k: getattr(data, k) for k in DECODE_KEYS}}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def cache_name(checksums: dict[str, str], fingerprint: dict[str, Any] | None = None) -> str:
    """``image-<digest>``, ``audio+image-<digest>``: modalities and a digest of their tokenizers and the data."""
    keyed = {"tokenizers": {m: checksums[m] for m in sorted(checksums)}, "data": fingerprint}
    return f"{'+'.join(sorted(checksums))}-{_digest(keyed)}"


def default_cache_dir(data: Any, checksums: dict[str, str], fingerprint: dict[str, Any]) -> Path:
    return Path(data.root) / "tokens" / cache_name(checksums, fingerprint)


def read_meta(cache: Path) -> dict[str, Any] | None:
    path = cache / META_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TokenCacheError(f"{path}: not valid JSON ({err})") from None


def check_cache(cache: Path, checksums: dict[str, str], fingerprint: dict[str, Any] | None = None) -> bool:
    """True when ``cache`` is complete and made by exactly these tokenizers from this data;
    False when absent; an error naming what differs when it was made otherwise."""
    meta = read_meta(cache)
    if meta is None:
        return False
    made_by = meta.get("checksums", {})
    for modality, checksum in checksums.items():
        if made_by.get(modality) != checksum:
            raise TokenCacheError(
                f"token cache {cache} was made by a different {modality} tokenizer "
                f"(cache: {str(made_by.get(modality))[:12]}, loaded: {checksum[:12]}); "
                "delete it, point tokenizers.cache_dir elsewhere, or set tokenizers.cache=false"
            )
    if fingerprint is not None and meta.get("data") != fingerprint:
        raise TokenCacheError(
            f"token cache {cache} was made from other data (data digest {_digest(meta.get('data'))} here, "
            f"{_digest(fingerprint)} now: other shards, sizes or decode settings); delete it or point "
            "tokenizers.cache_dir elsewhere"
        )
    return True


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def smallest_int_dtype(max_value: int) -> np.dtype:
    return np.dtype(np.int16) if max_value < 2**15 else np.dtype(np.int32)


def batched(items: Iterable[RawSample], size: int) -> Iterable[list[RawSample]]:
    batch: list[RawSample] = []
    for item in items:
        if isinstance(item, RawSample):
            batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def encode_shard(shard: Any, tar: tarfile.TarFile, tokenizers: dict[str, Any], spec: DecodeSpec, batch_size: int,
                 sentence_states: bool = False) -> tuple[int, int]:
    """Encode one source shard into ``tar``; returns (written, skipped)."""
    written = skipped = 0
    dtype = smallest_int_dtype(max(t.quantizer.codebook_size for t in tokenizers.values()))
    for chunk in batched(read_shard(shard, 0, None, True), batch_size):
        decoded, kept = [], []
        for sample in chunk:
            try:
                decoded.append(decode_sample(sample.members, spec))
                kept.append(sample)
            except SampleError:
                skipped += 1  # the stream counts and reports bad samples when it reads the source
        if not kept:
            continue
        codes = {m: tok.encode(torch.stack([d[m] for d in decoded])).cpu().numpy().astype(dtype) for m, tok in tokenizers.items()}
        states = lengths = None
        if sentence_states:
            states, mask = encode_sentences([text_of(s.members) for s in kept], spec)
            states, lengths = states.numpy().astype(np.float16), mask.sum(1).tolist()
        for i, sample in enumerate(kept):
            members = {f"{codes_key(m)}.npy": npy_bytes(c[i]) for m, c in codes.items()}
            if states is not None:
                members["text_states.npy"] = npy_bytes(states[i, : lengths[i]])  # real tokens only
            members |= {k: v for k, v in sample.members.items() if k in KEPT_MEMBERS}
            for ext in sorted(members):
                tar.addfile(tar_member(f"{sample.key}.{ext}", len(members[ext])), io.BytesIO(members[ext]))
            written += 1
    return written, skipped


def build_cache(
    data: Any, tokenizers: dict[str, Any], checksums: dict[str, str], out: Path, batch_size: int = 256, progress: bool = True,
    fingerprint: dict[str, Any] | None = None, sentence_states: bool = False,
) -> dict[str, Any]:
    """Encode the train and val splits of ``data`` into ``out`` (written whole, or not at all):
    every tokenizer's codes and, with ``sentence_states``, the sentence encoder's token states
    of each caption."""
    spec = DecodeSpec.from_config(data, tuple(sorted(tokenizers)) + (("text",) if sentence_states else ()))
    summary: dict[str, Any] = {"format": FORMAT, "checksums": dict(checksums), "source": str(data.root),
                               "data": fingerprint if fingerprint is not None else data_fingerprint(data), "splits": {}}
    for tok in tokenizers.values():
        tok.eval()
    with staged_directory(out) as stage:
        for split in ("train", "val"):
            shards = resolve_shards(data.get(split, ""), data.root, split, data.get("sizes", ""))
            sizes, skipped = {}, 0
            for shard in progress_of(shards, f"tokenize {split}", unit="shard", enabled=progress):
                with tarfile.open(stage / shard.name, "w", format=tarfile.USTAR_FORMAT) as tar:
                    written, bad = encode_shard(shard, tar, tokenizers, spec, batch_size, sentence_states)
                sizes[shard.name], skipped = written, skipped + bad
            update_sizes(stage, sizes)
            summary["splits"][split] = {"shards": len(sizes), "samples": sum(sizes.values()), "skipped": skipped}
        (stage / META_FILE).write_text(json.dumps(summary, indent=1) + "\n")  # last: marks the cache complete
    return summary


__all__ = ["build_cache", "check_cache", "data_fingerprint", "default_cache_dir", "cache_name", "TokenCacheError", "SIZES_FILE"]
