"""Two CPU ranks (gloo, ddp_spawn) over shards of uneven sizes: equal batch counts on both
ranks, every sample once per epoch apart from the reported padding (exact mode), fixed
batch counts (resampled mode), and a new order each epoch.

Under ddp_spawn, DataLoader workers start by spawn too (each one re-imports torch), so only
the resampled run uses workers; test_pipeline covers the split over ranks x workers.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lit_vqdiff.callbacks import CloseProcessGroup
from lit_vqdiff.data.datamodule import ShardDataModule

SIZES = [7, 3, 11, 5, 2, 9]  # 37 samples: 2 ranks x 19 with 1 padding repeat


class KeyLogger(L.LightningModule):
    """Writes, per rank and epoch, the keys of every batch and the DataModule's state."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.out_dir = out_dir
        self.batches: list[dict] = []

    def on_train_epoch_start(self) -> None:
        self.batches = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.batches.append({"keys": batch["key"], "valid": batch["valid"].tolist()})
        return (self.weight * batch["label"].float()).pow(2).mean()

    def on_train_epoch_end(self) -> None:
        state = self.trainer.datamodule.state_dict()  # gathers from both ranks: a collective
        record = {"batches": self.batches, "state": state["train"]}
        path = Path(self.out_dir) / f"rank{self.global_rank}-epoch{self.current_epoch}.json"
        path.write_text(json.dumps(record))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_two_ranks(dm: ShardDataModule, out: Path, epochs: int) -> dict[tuple[int, int], dict]:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=[CloseProcessGroup()],
    )
    trainer.fit(KeyLogger(str(out)), datamodule=dm)
    return {(r, e): json.loads((out / f"rank{r}-epoch{e}.json").read_text()) for r in (0, 1) for e in range(epochs)}


@pytest.mark.slow
def test_exact_mode_two_ranks(tiny_shards, tiny_config, tmp_path):
    data = tiny_shards(SIZES)
    dm = ShardDataModule(tiny_config(data.directory, num_workers=0, shuffle_buffer=6), ("class",), seed=3)
    runs = fit_two_ranks(dm, tmp_path, epochs=2)
    padding = 2 * dm.samples_per_epoch(0, 2) - sum(SIZES)
    assert padding == 1
    for epoch in (0, 1):
        ranks = [runs[(r, epoch)]["batches"] for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == 5  # ceil(19 / 4) on both ranks
        keys = [k for batches in ranks for b in batches for k in b["keys"]]
        valid = [k for batches in ranks for b in batches for k, v in zip(b["keys"], b["valid"]) if v]
        assert sorted(valid) == sorted(data.all_keys)  # each sample of the epoch exactly once
        assert len(keys) - len(valid) == padding
        assert sum(n - 1 for n in Counter(keys).values()) == padding  # the padding repeats a sample
        state = runs[(0, epoch)]["state"]
        assert [sum(s["consumed"]) for s in state] == [5, 5] and state == runs[(1, epoch)]["state"]
    for rank in (0, 1):
        orders = [[k for b in runs[(rank, e)]["batches"] for k in b["keys"]] for e in (0, 1)]
        assert orders[0] != orders[1]  # the epoch seeds the shard order and the shuffle
    first_epoch = {r: {k for b in runs[(r, 0)]["batches"] for k in b["keys"]} for r in (0, 1)}
    second_epoch = {r: {k for b in runs[(r, 1)]["batches"] for k in b["keys"]} for r in (0, 1)}
    assert first_epoch != second_epoch  # shards move between ranks from epoch to epoch


@pytest.mark.slow
def test_resampled_mode_two_ranks(tiny_shards, tiny_config, tmp_path):
    data = tiny_shards(SIZES)
    cfg = tiny_config(data.directory, num_workers=2, mode="resampled")
    runs = fit_two_ranks(ShardDataModule(cfg, ("class",)), tmp_path, epochs=1)
    per_rank = [runs[(r, 0)]["batches"] for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == sum(SIZES) // (2 * 4)  # from sizes.json
    assert all(len(b["keys"]) == 4 for batches in per_rank for b in batches)
    keys = [[k for b in batches for k in b["keys"]] for batches in per_rank]
    assert set(keys[0] + keys[1]) <= set(data.all_keys) and keys[0] != keys[1]


def test_padding_is_reported_once(tiny_shards, tiny_config, caplog, monkeypatch):
    data = tiny_shards(SIZES)
    dm = ShardDataModule(tiny_config(data.directory), ("class",))
    monkeypatch.setattr(dm, "rank_world", lambda: (0, 2))
    with caplog.at_level(logging.WARNING, logger="lit_vqdiff.data.datamodule"):
        for _ in range(2):
            assert len(dm.train_dataloader()) == 5
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["train: 37 samples on 2 ranks, 1 repeated as padding: each reads 19"]


def test_too_few_shards_for_ranks_and_workers_reads_with_fewer_workers(tiny_shards, tiny_config, monkeypatch, caplog):
    data = tiny_shards([10, 10, 10])
    dm = ShardDataModule(tiny_config(data.directory, num_workers=2), ("class",))
    monkeypatch.setattr(dm, "rank_world", lambda: (0, 2))
    with caplog.at_level(logging.WARNING, logger="lit_vqdiff.data.datamodule"):
        loader = dm.train_dataloader()
    assert loader.stream.workers == 1 and len(loader) == 4  # 15 samples per rank in batches of 4
    assert "3 shard(s) for 2 rank(s) x 2 workers: reading with 1 worker(s) per rank" in caplog.text
    resampled = ShardDataModule(tiny_config(data.directory, num_workers=2, mode="resampled"), ("class",))
    monkeypatch.setattr(resampled, "rank_world", lambda: (1, 2))
    assert len(resampled.train_dataloader()) == 30 // (2 * 4)
