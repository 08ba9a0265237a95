"""Bad data is skipped, replaced one for one, counted per reason, warned once per shard, and
stops the run past data.max_skip_fraction."""

from __future__ import annotations

import io
import logging
import tarfile

import numpy as np
import pytest
import soundfile as sf

from lit_vqdiff.data.datamodule import DataQualityError, ShardDataModule

SIZES = [6, 6, 6, 6]


def run_epoch(dm: ShardDataModule) -> tuple[list[str], list[str], int]:
    """(every key, keys marked valid, batch count) of one train epoch."""
    keys, valid, batches = [], [], 0
    for batch in dm.train_dataloader():
        batches += 1
        keys += batch["key"]
        valid += [k for k, v in zip(batch["key"], batch["valid"]) if v]
    return keys, valid, batches


def corrupt(targets: dict[str, dict[str, bytes | None]]):
    """An ``edit`` for tiny_shards: members set to new bytes, or dropped (None), for some keys."""

    def edit(key: str, members: dict[str, bytes]) -> dict[str, bytes]:
        for ext, data in targets.get(key, {}).items():
            if data is None:
                members.pop(ext)
            else:
                members[ext] = data
        return members

    return edit


def wav_at(rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(rate // 2), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def key(index: int) -> str:
    return f"train-0000-{index:07d}"


def check_replaced(dm, data, bad: list[str], reason: str, count: int) -> None:
    keys, valid, batches = run_epoch(dm)
    total = sum(SIZES)
    assert batches == len(dm.train_dataloader()) == total // 4
    assert len(keys) == total  # every slot filled: ranks stay even
    assert sorted(valid) == sorted(set(data.all_keys) - set(bad))
    skipped = dm.skipped()
    assert skipped[reason] == count and sum(skipped.values()) == count


@pytest.mark.parametrize("workers", [0, 2])
def test_undecodable_image(tiny_shards, tiny_config, workers):
    bad = [key(1), key(14)]
    data = tiny_shards(SIZES, edit=corrupt({k: {"png": b"\x89PNG garbage"} for k in bad}))
    dm = ShardDataModule(tiny_config(data.directory, num_workers=workers, max_skip_fraction=0.5), ("image", "class"))
    check_replaced(dm, data, bad, "bad_image", 2)


def test_undecodable_sound(tiny_shards, tiny_config):
    bad = [key(7)]
    data = tiny_shards(SIZES, edit=corrupt({bad[0]: {"wav": b"RIFF\x00\x00\x00\x00WAVEnot audio"}}))
    dm = ShardDataModule(tiny_config(data.directory, max_skip_fraction=0.5), ("audio",))
    check_replaced(dm, data, bad, "bad_audio", 1)


def test_missing_member(tiny_shards, tiny_config):
    bad = [key(3), key(20)]
    data = tiny_shards(SIZES, edit=corrupt({k: {"txt": None, "json": None} for k in bad}))
    dm = ShardDataModule(tiny_config(data.directory, max_skip_fraction=0.5), ("text", "class"))
    check_replaced(dm, data, bad, "missing_member", 2)


@pytest.mark.parametrize("resample, rate", [(False, 16000), (True, 2000)])
def test_wrong_sample_rate(tiny_shards, tiny_config, resample, rate):
    """Another rate is skipped when resampling is off, or when it is outside the accepted range."""
    bad = [key(9)]
    data = tiny_shards(SIZES, edit=corrupt({bad[0]: {"wav": wav_at(rate)}}))
    cfg = tiny_config(data.directory, max_skip_fraction=0.5, resample_audio=resample)
    check_replaced(ShardDataModule(cfg, ("audio",)), data, bad, "sample_rate", 1)


def test_truncated_tar(tiny_shards, tiny_config, caplog):
    data = tiny_shards(SIZES)
    path = data.directory / data.names[2]
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    # Cut inside the header of the 4th sample's first member: 3 samples survive.
    per_sample = len(members) // SIZES[2]
    cut = members[3 * per_sample].offset + 100
    path.write_bytes(path.read_bytes()[:cut])
    lost = data.keys[2][3:]
    dm = ShardDataModule(tiny_config(data.directory, max_skip_fraction=0.5), ("class",))
    with caplog.at_level(logging.WARNING, logger="lit_vqdiff.data.datamodule"):
        check_replaced(dm, data, lost, "truncated", 3)
    warned = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warned) == 1 and data.names[2] in warned[0]


def test_skips_are_warned_once_per_shard_and_reason(tiny_shards, tiny_config, caplog):
    bad = [key(12), key(13), key(15), key(2)]  # three in shard 2, one in shard 0
    data = tiny_shards(SIZES, edit=corrupt({k: {"cls": b"x"} for k in bad}))
    dm = ShardDataModule(tiny_config(data.directory, max_skip_fraction=0.5), ("class",))
    with caplog.at_level(logging.WARNING, logger="lit_vqdiff.data.datamodule"):
        check_replaced(dm, data, bad, "bad_label", 4)
    warned = sorted(r.getMessage().split(" in ")[1].split(",")[0] for r in caplog.records)
    assert warned == ["train-000000.tar", "train-000002.tar"]


def test_too_many_skips_stop_the_run_naming_the_worst_shard(tiny_shards, tiny_config):
    bad = [key(i) for i in (12, 13, 15, 16)] + [key(2)]  # 5 of 24 samples; budget 0.1 * 24 = 2
    data = tiny_shards(SIZES, edit=corrupt({k: {"png": b"broken"} for k in bad}))
    dm = ShardDataModule(tiny_config(data.directory, max_skip_fraction=0.1, shuffle_buffer=0), ("image",))
    with pytest.raises(DataQualityError, match=r"max_skip_fraction=0.1 allows \(2\); worst shards: train-000002.tar"):
        run_epoch(dm)
    assert 3 <= sum(dm.skipped().values()) < 5  # stopped at the first batch past the budget


def test_long_captions_are_cut_counted_and_warned_once(tiny_shards, tiny_config, caplog):
    long = "a caption far longer than the few bytes this run keeps of each caption"
    data = tiny_shards(SIZES, edit=corrupt({key(i): {"txt": long.encode()} for i in (1, 7, 8)}))
    dm = ShardDataModule(tiny_config(data.directory, text_bytes=40), ("text",))  # shapes-v1 captions fit
    with caplog.at_level(logging.WARNING):
        keys, valid, _ = run_epoch(dm)
    assert len(valid) == sum(SIZES)  # cut, not skipped
    assert dm.truncated_captions() == 3 and sum(dm.skipped().values()) == 0
    warnings = [r.getMessage() for r in caplog.records if "longer than data.text_bytes" in r.getMessage()]
    assert len(warnings) == 1


def test_fewer_shards_than_workers_reads_with_fewer_workers(tiny_shards, tiny_config, caplog):
    """A small set in one shard trains (with one worker per rank and a warning) instead of stopping."""
    data = tiny_shards([10])
    dm = ShardDataModule(tiny_config(data.directory, num_workers=2), ("image", "class"))
    with caplog.at_level(logging.WARNING):
        keys, valid, _ = run_epoch(dm)
    assert sorted(valid) == sorted(keys) == sorted(data.all_keys)  # each sample once
    assert any("reading with 1 worker(s) per rank" in r.getMessage() for r in caplog.records)
