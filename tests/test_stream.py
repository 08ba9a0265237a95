"""Decoding (image, audio, text, class) and the exact-epoch plan across ranks and workers."""

from __future__ import annotations

import io
import json
import math
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from lit_vqdiff.data import stream as pipeline
from lit_vqdiff.data.decode import check_spec, decode_sample
from lit_vqdiff.errors import SampleError
from lit_vqdiff.modalities import DecodeSpec
from lit_vqdiff.modalities.audio import decode_audio
from lit_vqdiff.modalities.image import decode_image
from lit_vqdiff.modalities.text import PAD_ID as TEXT_PAD
from lit_vqdiff.modalities.text import decode_text as decode_texts
from lit_vqdiff.modalities.text import encode_text as encode_texts
from lit_vqdiff.data.stream import (
    Failure,
    Shard,
    ShardStream,
    fill_failures,
    make_rng,
    plan_segments,
    rank_share,
    shuffled,
    worker_range,
)

SPEC = DecodeSpec(modalities=("image", "audio", "text", "class"))


def encode_text(text: str, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = encode_texts([text], max_bytes, truncate=True)
    return ids[0], mask[0]


def decode_text(ids: torch.Tensor, mask: torch.Tensor | None = None) -> str:
    return decode_texts((ids if mask is None else ids.masked_fill(~mask.bool(), TEXT_PAD))[None])[0]


def image_bytes(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def banded(width: int, height: int) -> np.ndarray:
    """Green in the centered square, red and blue bands where the center crop cuts."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:] = (40, 180, 60)
    side = min(width, height)
    left = (width - side) // 2
    pixels[:, :left] = (220, 40, 40)
    pixels[:, left + side :] = (50, 80, 220)
    return pixels


@pytest.mark.parametrize("fmt, tolerance", [("PNG", 1e-6), ("JPEG", 0.08), ("WEBP", 0.08)])
def test_images_are_center_cropped_resized_and_scaled(fmt, tolerance):
    out = decode_image(image_bytes(banded(72, 48), fmt), size=32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    green = torch.tensor([40, 180, 60], dtype=torch.float32) / 127.5 - 1
    # Away from the edges (where lossy codecs ring) every pixel is the centre's green.
    inner = out[:, 2:-2, 2:-2]
    assert (inner - green[:, None, None]).abs().max() < tolerance


def test_image_values_map_exactly_to_minus_one_one():
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:16] = 255
    out = decode_image(image_bytes(pixels, "PNG"), size=32)
    assert out[:, :16].eq(1.0).all() and out[:, 16:].eq(-1.0).all()
    gray = decode_image(image_bytes(pixels[:, :, 0], "PNG"), size=32)
    assert torch.equal(gray, out)


def test_palette_image_with_transparency_decodes_without_warnings():
    img = Image.new("P", (8, 8))  # every pixel is palette entry 0: red, half transparent
    img.putpalette([255, 0, 0] + [0] * 765)
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=bytes([128] + [255] * 255))
    out = decode_image(buf.getvalue(), size=4)  # filterwarnings=error turns any warning into a failure
    assert out[0].eq(1.0).all() and out[1:].eq(-1.0).all()


def flac_bytes(frames: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, frames, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def test_stereo_flac_at_16k_becomes_mono_8k_of_the_right_length():
    rate, seconds, freq = 16000, 0.75, 440.0
    t = np.arange(int(rate * seconds)) / rate
    tone = np.sin(2 * np.pi * freq * t)
    stereo = np.stack([0.5 * tone, 0.3 * tone], axis=1)
    out = decode_audio(flac_bytes(stereo, rate), SPEC)
    assert out.shape == (8000,) and out.dtype == torch.float32
    kept = int(8000 * seconds)  # 6000 resampled samples, then zeros
    assert out[kept:].eq(0).all()
    t8 = np.arange(kept) / 8000
    expected = 0.4 * np.sin(2 * np.pi * freq * t8)
    middle = slice(200, kept - 200)  # away from the filter's edge effects
    assert np.abs(out[middle].numpy() - expected[middle]).max() < 0.01


def test_long_audio_is_cropped_from_the_start():
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, 12000)
    buf = io.BytesIO()
    sf.write(buf, wave, 8000, format="WAV", subtype="FLOAT")
    out = decode_audio(buf.getvalue(), SPEC)
    assert torch.allclose(out, torch.from_numpy(wave[:8000]).float())


@pytest.mark.parametrize("text", ["a large blue triangle on the right", "café ☕ naïve", ""])
def test_text_round_trips_through_bytes(text):
    ids, mask = encode_text(text, 48)
    raw = text.encode("utf-8")
    assert ids.shape == mask.shape == (48,) and ids.dtype == torch.long
    assert ids[: len(raw)].tolist() == list(raw) and ids[len(raw) :].eq(TEXT_PAD).all()
    assert int(mask.sum()) == len(raw)
    assert decode_text(ids) == decode_text(ids, mask) == text


def test_long_text_is_cut_at_a_character_boundary():
    ids, mask = encode_text("ééé", 5)  # 6 bytes: the third é would be split
    assert int(mask.sum()) == 4 and ids[4] == TEXT_PAD
    assert decode_text(ids, mask) == "éé"


def test_text_comes_from_json_caption_and_label_from_cls():
    members = {"json": json.dumps({"caption": "a small red circle on the left"}).encode(), "cls": b" 7\n"}
    out = decode_sample(members, DecodeSpec(modalities=("text", "class")))
    assert decode_text(out["text"], out["text_mask"]) == "a small red circle on the left"
    assert out["label"] == 7


@pytest.mark.parametrize(
    "members, modalities, reason",
    [
        ({"txt": b"x"}, ("image",), "missing_member"),
        ({"png": b"not an image"}, ("image",), "bad_image"),
        ({"wav": b"RIFF....WAVEjunk"}, ("audio",), "bad_audio"),
        ({"txt": b"\xff\xfe"}, ("text",), "bad_text"),
        ({"cls": b"seven"}, ("class",), "bad_label"),
    ],
)
def test_bad_members_raise_sample_errors_with_a_reason(members, modalities, reason):
    with pytest.raises(SampleError) as info:
        decode_sample(members, DecodeSpec(modalities=modalities))
    assert info.value.reason == reason


def test_unknown_modality_is_rejected_by_name():
    with pytest.raises(ValueError, match="'video'"):
        check_spec(DecodeSpec(modalities=("video",)))


# ----------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("total, world, workers, batch", [(37, 2, 2, 4), (10, 3, 1, 4), (5, 4, 2, 2), (64, 2, 3, 8)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_and_workers_cover_the_epoch_evenly(total, world, workers, batch, drop_last):
    per_rank = rank_share(total, world, drop_last)
    assert per_rank == (total // world if drop_last else math.ceil(total / world))
    positions = []
    for rank in range(world):
        spans = [worker_range(per_rank, batch, w, workers) for w in range(workers)]
        assert spans[0][0] == 0 and spans[-1][1] == per_rank
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        # Only the last batch of a rank may be short.
        assert all((stop - start) % batch == 0 for start, stop in spans[:-1])
        positions += [rank * per_rank + p for p in range(per_rank)]
    assert positions == list(range(per_rank * world))


def test_segments_wrap_into_padding_and_skip_empty_shards():
    sizes = [3, 0, 2, 4]
    order = [2, 1, 0, 3]  # laid out: shard 2 (2), shard 1 (0), shard 0 (3), shard 3 (4) = 9 samples
    runs = plan_segments(1, 12, order, sizes)
    got = [(r.shard, r.start, r.stop, r.padding) for r in runs]
    assert got == [(2, 1, 2, False), (0, 0, 3, False), (3, 0, 4, False), (2, 0, 2, True), (0, 0, 1, True)]


def test_epoch_order_is_a_seeded_permutation():
    a, b = pipeline.epoch_order(20, seed=3, epoch=0), pipeline.epoch_order(20, seed=3, epoch=1)
    assert sorted(a) == sorted(b) == list(range(20))
    assert a != b and a == pipeline.epoch_order(20, seed=3, epoch=0)


def test_shuffle_buffer_permutes_deterministically():
    items = list(range(50))
    out = list(shuffled(items, 10, make_rng(1, 2)))
    assert sorted(out) == items and out != items
    assert out == list(shuffled(items, 10, make_rng(1, 2)))
    assert list(shuffled(items, 0, make_rng(1))) == items


def test_failures_are_replaced_one_for_one():
    fail = Failure("bad_image", "s.tar", "k", "broken")
    a, b = {"key": "a"}, {"key": "b"}
    out = list(fill_failures([fail, (a, True), fail, (b, True), fail]))
    assert [(s["key"], v, f is not None) for s, v, f in out] == [
        ("a", True, False), ("a", False, True), ("a", False, True), ("b", True, False), ("b", False, True),
    ]  # fmt: skip
    with pytest.raises(RuntimeError, match="s.tar"):
        list(fill_failures([fail, fail]))


@pytest.mark.parametrize("world, workers, drop_last", [(1, 1, False), (2, 2, False), (3, 2, False), (3, 2, True)])
def test_stream_reads_each_sample_once_apart_from_padding(tiny_shards, monkeypatch, world, workers, drop_last):
    data = tiny_shards([7, 3, 11, 5, 2, 9])  # 37 samples
    shards = [Shard(str(data.directory / n), n, len(k)) for n, k in zip(data.names, data.keys)]
    spec = DecodeSpec(modalities=("class",))
    seen, valid_keys, lengths = [], [], set()
    for rank in range(world):
        stream = ShardStream(
            shards, spec, batch_size=4, rank=rank, world=world, workers=workers, shuffle_buffer=5, drop_last=drop_last
        )
        lengths.add(len(stream))
        batches = []
        for worker in range(workers):
            monkeypatch.setattr(pipeline, "worker_identity", lambda w=worker: (w, workers))
            batches += list(stream)
        assert len(batches) == len(stream)
        for batch in batches:
            seen += batch["key"]
            valid_keys += [k for k, v in zip(batch["key"], batch["valid"]) if v]
    assert len(lengths) == 1
    if drop_last:  # 37 = 3 x 12 + 1: one sample left out, nothing repeated
        assert stream.dropped == 1 and stream.padding == 0
        assert len(seen) == len(set(seen)) == 36 and set(seen) < set(data.all_keys)
        return
    assert sorted(valid_keys) == sorted(data.all_keys)
    assert set(seen) == set(data.all_keys)
    assert len(seen) - len(data.all_keys) == stream.padding == rank_share(37, world, False) * world - 37
    assert all(n == 2 for n in Counter(seen).values() if n > 1)
