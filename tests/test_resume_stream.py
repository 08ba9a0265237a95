"""Resuming mid-epoch from the DataModule's state continues where the stream stopped:
no sample repeated, none skipped (exact mode), by hand and through a Lightning checkpoint."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lit_vqdiff.data.datamodule import ShardDataModule

SIZES = [7, 3, 11, 5, 2, 9]  # 37 samples, uneven shards
MODALITIES = ("class",)


def valid_keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k, v in zip(b["key"], b["valid"]) if v]


def make_dm(tiny_config, data, workers: int) -> ShardDataModule:
    return ShardDataModule(tiny_config(data.directory, num_workers=workers, max_skip_fraction=0.5), MODALITIES, seed=5)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_after", [1, 4])
def test_resume_continues_the_epoch_exactly(tiny_shards, tiny_config, workers, stop_after):
    data = tiny_shards(SIZES, edit=lambda k, m: m | {"cls": b"bad"} if k == "train-0000-0000020" else m)
    reference = make_dm(tiny_config, data, workers)
    reference.set_epoch(1)
    full = list(reference.train_dataloader())

    first = make_dm(tiny_config, data, workers)
    first.set_epoch(1)
    head = list(islice(iter(first.train_dataloader()), stop_after))
    state = first.state_dict()
    assert state["train"][0]["epoch"] == 1 and sum(state["train"][0]["consumed"]) == stop_after

    resumed = make_dm(tiny_config, data, workers)
    resumed.load_state_dict(state)
    tail = list(resumed.train_dataloader())

    assert len(head) + len(tail) == len(full)
    assert valid_keys(head) + valid_keys(tail) == valid_keys(full)  # same order, nothing repeated
    assert sorted(valid_keys(head + tail)) == sorted(set(data.all_keys) - {"train-0000-0000020"})
    assert resumed.skipped() == reference.skipped() and reference.skipped()["bad_label"] == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_stream_resumes_in_the_same_order(tiny_shards, tiny_config, workers):
    data = tiny_shards(SIZES)
    cfg = tiny_config(data.directory, num_workers=workers, mode="resampled", batches_per_epoch=7)
    full = [k for b in ShardDataModule(cfg, MODALITIES).train_dataloader() for k in b["key"]]
    first = ShardDataModule(cfg, MODALITIES)
    head = [k for b in islice(iter(first.train_dataloader()), 3) for k in b["key"]]
    resumed = ShardDataModule(cfg, MODALITIES)
    resumed.load_state_dict(first.state_dict())
    tail = [k for b in resumed.train_dataloader() for k in b["key"]]
    assert len(full) == 7 * 4 and head + tail == full


def test_resume_refuses_another_worker_count(tiny_shards, tiny_config):
    data = tiny_shards(SIZES)
    first = make_dm(tiny_config, data, 2)
    next(iter(first.train_dataloader()))
    resumed = make_dm(tiny_config, data, 0)
    resumed.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="2 workers, now 1 x 1"):
        iter(resumed.train_dataloader())


class KeyRecorder(L.LightningModule):
    """Records the keys of the batches it trains and validates on."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.keys: list[str] = []
        self.val_keys: list[str] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.keys += [k for k, v in zip(batch["key"], batch["valid"]) if v]
        return (self.weight * batch["label"].float()).pow(2).mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_keys += [k for k, v in zip(batch["key"], batch["valid"]) if v]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SaveAtStep(L.Callback):
    """Saves a checkpoint inside the epoch, as a preemption handler or a step-based save does."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False)
    options |= dict(enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(default_root_dir=tmp_path, **(options | kwargs))


def test_lightning_checkpoint_resumes_mid_epoch(tiny_shards, tiny_config, tmp_path):
    data = tiny_shards(SIZES)
    val = tiny_shards([5, 4], split="val", seed=1)
    first, ckpt = KeyRecorder(), tmp_path / "mid.ckpt"
    # A checkpoint saved after fit() returns marks the epoch finished: save inside it.
    trainer(tmp_path, max_steps=3, callbacks=[SaveAtStep(3, ckpt)]).fit(first, datamodule=make_dm(tiny_config, data, 2))
    saved = torch.load(ckpt, weights_only=False)["ShardDataModule"]
    assert sum(saved["train"][0]["consumed"]) == 3

    second = KeyRecorder()
    trainer(tmp_path).fit(second, datamodule=make_dm(tiny_config, data, 2), ckpt_path=ckpt)
    assert len(first.keys) == 12
    assert sorted(first.keys + second.keys) == sorted(data.all_keys)
    assert sorted(second.val_keys) == sorted(val.all_keys)  # the end-of-epoch validation, in full
