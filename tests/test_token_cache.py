"""The token cache: codes equal on-the-fly encoding, and a cache never serves another tokenizer."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_stage1, resolved

from lit_vqdiff.config import load_config
from lit_vqdiff.data.datamodule import ShardDataModule
from lit_vqdiff.data.decode import DecodeSpec, decode_sample
from lit_vqdiff.data.shards import read_sizes
from lit_vqdiff.data.tokens import TokenCacheError, build_cache, cache_name, check_cache
from lit_vqdiff.nn.tokenizer import Tokenizer


def members_of(tar_path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return out


@pytest.fixture
def image_tokenizer(shapes_root: Path, tmp_path: Path) -> tuple[Tokenizer, object]:
    cfg = resolved("stage1", tiny_stage1(shapes_root, tmp_path / "runs", "tokenizer.channels=16"))
    return Tokenizer.from_config(cfg).eval(), cfg.data


def test_cache_holds_the_codes_of_every_sample(shapes_root, tmp_path, image_tokenizer):
    tokenizer, data = image_tokenizer
    out = tmp_path / "cache"
    summary = build_cache(data, {"image": tokenizer}, {"image": "a" * 64}, out, batch_size=50, progress=False)
    assert summary["splits"]["train"]["samples"] == 512 and summary["splits"]["val"]["samples"] == 128
    assert read_sizes(out) == read_sizes(shapes_root) | {}  # one token shard per source shard, same counts
    source = members_of(shapes_root / "val-000000.tar")
    cached = members_of(out / "val-000000.tar")
    assert list(cached) == list(source)  # same keys, same order
    spec = DecodeSpec.from_config(data, ("image",))
    key = next(iter(source))
    expected = tokenizer.encode(decode_sample(source[key], spec)["image"][None])[0]
    codes = np.load(io.BytesIO(cached[key]["image_codes.npy"]))
    assert codes.dtype == np.int16 and torch.equal(torch.from_numpy(codes).long(), expected)
    assert cached[key]["txt"] == source[key]["txt"] and "png" not in cached[key] and "wav" not in cached[key]


def test_cache_is_refused_by_another_tokenizer(shapes_root, tmp_path, image_tokenizer):
    tokenizer, data = image_tokenizer
    out = tmp_path / "cache"
    assert not check_cache(out, {"image": "a" * 64})  # absent: to be built
    build_cache(data, {"image": tokenizer}, {"image": "a" * 64}, out, progress=False)
    assert check_cache(out, {"image": "a" * 64})
    with pytest.raises(TokenCacheError, match=r"different image tokenizer \(cache: aaaaaaaaaaaa, loaded: bbbbbbbbbbbb\)"):
        check_cache(out, {"image": "b" * 64})
    assert cache_name({"image": "a" * 64}) != cache_name({"image": "b" * 64})


def test_stream_reads_cached_codes(shapes_root, tmp_path, image_tokenizer, tiny_config):
    tokenizer, data = image_tokenizer
    out = tmp_path / "cache"
    build_cache(data, {"image": tokenizer}, {"image": "a" * 64}, out, progress=False)
    dm = ShardDataModule(tiny_config(out, val_batch_size=8), ("text", "image_codes"))
    batch = next(iter(dm.val_dataloader()))
    assert batch["image_codes"].shape == (8, 8, 8) and batch["image_codes"].dtype == torch.long
    assert batch["text"].shape == (8, 48)


def test_cache_holds_sentence_states_equal_to_encoding_now(shapes_root, tmp_path, image_tokenizer, tiny_config):
    """With generator.text_encoder=minilm the cache keeps each caption's token states (fp16)."""
    from lit_vqdiff.modalities.text import encode_sentences

    tokenizer, data = image_tokenizer
    data.text_bytes = 48  # a stage-1 config leaves the caption length to stage 2
    out = tmp_path / "cache"
    build_cache(data, {"image": tokenizer}, {"image": "a" * 64, "text": "minilm"}, out, progress=False, sentence_states=True)
    dm = ShardDataModule(tiny_config(out, val_batch_size=8), ("text_states", "image_codes"))
    batch = next(iter(dm.val_dataloader()))
    assert batch["text_states"].shape == (8, 50, 384) and batch["text_states_mask"].dtype == torch.bool
    source = members_of(shapes_root / "val-000000.tar")
    captions = [source[k]["txt"].decode() for k in batch["key"]]
    states, mask = encode_sentences(captions, DecodeSpec.from_config(data, ("text",)))
    assert torch.equal(batch["text_states_mask"], mask[:, :50])
    assert torch.allclose(batch["text_states"][mask], states[mask], atol=2e-3)  # float16 in the cache
