"""Two CPU ranks (gloo, ddp_spawn) must hold identical codebooks at every step, and
restarts must draw from the recent vectors of both ranks.

Each rank gets its own data. The stream changes region half-way, so the codes k-means
fitted on the first batches go unused and get restarted from recent vectors of both
ranks. Each rank writes its codebook snapshots to a file that the test compares. The
restart test keeps DDP's buffer broadcast on, as the `ddp` preset does.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lit_vqdiff.nn.quantizers import build_quantizer

STEPS, SWITCH_AT, DIM, LENGTH, BATCH = 12, 5, 4, 16, 4
OPTIONS = {
    "vq": dict(dim=DIM, codebook_size=16, dead_after=3, restart_buffer=64, ema_decay=0.9),
    "rvq": dict(num_quantizers=2, dim=DIM, codebook_size=16, dead_after=3, restart_buffer=64, ema_decay=0.9),
}


def rank_batch(rank: int, step: int) -> torch.Tensor:
    """(BATCH, DIM, LENGTH) vectors around this rank's centres, mirrored from step SWITCH_AT on."""
    centres = torch.randn(6, DIM, generator=torch.Generator().manual_seed(10 + rank)) + 3.0
    if step >= SWITCH_AT:
        centres = -centres
    g = torch.Generator().manual_seed(1000 * rank + step)
    picks = torch.randint(6, (BATCH * LENGTH,), generator=g)
    rows = centres[picks] + 0.2 * torch.randn(BATCH * LENGTH, DIM, generator=g)
    return rows.reshape(BATCH, LENGTH, DIM).transpose(1, 2).contiguous()


class QuantizerProbe(L.LightningModule):
    """A 1x1-conv encoder in front of a quantizer; records the codebooks it sees."""

    def __init__(self, kind: str, out_dir: str) -> None:
        super().__init__()
        self.encoder = nn.Conv1d(DIM, DIM, 1)
        with torch.no_grad():
            self.encoder.weight.copy_(torch.eye(DIM)[:, :, None])
            self.encoder.bias.zero_()
        self.quantizer = build_quantizer(kind, **OPTIONS[kind])
        self.out_dir = out_dir
        self.snapshots: dict[str, object] = {}

    def codebooks(self) -> torch.Tensor:
        layers = getattr(self.quantizer, "layers", [self.quantizer])
        return torch.stack([layer.embedding.detach().clone() for layer in layers])

    def train_dataloader(self) -> Iterator[torch.Tensor]:
        # A plain iterator: no sampler to inject, so each rank keeps its own stream.
        return iter([rank_batch(self.global_rank, step) for step in range(STEPS)])

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = self.quantizer(self.encoder(batch))
        # Snapshot right after the quantizer's own updates, before anything else touches them.
        if batch_idx == 0:
            self.snapshots["init"] = self.codebooks()
        if int(self.quantizer.restarts) > 0 and "restart" not in self.snapshots:
            self.snapshots["restart"] = (batch_idx, self.codebooks())
        return F.mse_loss(out.quantized, batch) + out.loss

    def on_train_end(self) -> None:
        self.snapshots["end"] = self.codebooks()
        self.snapshots["restarts"] = int(self.quantizer.restarts)
        torch.save(self.snapshots, Path(self.out_dir) / f"rank{self.global_rank}.pt")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vq", "rvq"])
def test_ranks_hold_identical_codebooks(kind, tmp_path):
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        # ddp_spawn, but without DDP re-broadcasting buffers from rank 0 before every
        # step: that would paper over any desynchronization in the quantizer itself.
        # A desynchronized collective then fails the test instead of hanging it.
        strategy=DDPStrategy(start_method="spawn", forward_sync_buffers=False, timeout=timedelta(seconds=60)),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(QuantizerProbe(kind, str(tmp_path)))
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert torch.equal(first["init"], second["init"])
    assert first["restarts"] > 0 and first["restarts"] == second["restarts"]
    assert first["restart"][0] == second["restart"][0]  # the same step on both ranks
    assert torch.equal(first["restart"][1], second["restart"][1])
    assert torch.equal(first["end"], second["end"])
    assert not torch.equal(first["init"], first["end"])  # the codebooks did move


class RestartProbe(QuantizerProbe):
    """Also records, for every dead-code restart, the rows it drew (the same on every rank)
    and the ring of recent vectors this rank wrote up to the step before."""

    def setup(self, stage: str) -> None:
        # Wrapped here, in each rank's process: ddp_spawn pickles the module, and a closure does not pickle.
        quantizer, restart = self.quantizer, self.quantizer._restart_dead_codes

        def recording_restart() -> None:
            before = quantizer.embedding.clone()
            restart()
            changed = (quantizer.embedding != before).any(1)
            if bool(changed.any()):
                self.snapshots.setdefault("draws", []).append((quantizer.embedding[changed].clone(), self.written[-1]))

        quantizer._restart_dead_codes = recording_restart
        self.written: list[torch.Tensor] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        q = self.quantizer
        self.written.append(q.recent[: min(q.recent_count, q.recent.shape[0])].clone())
        return loss


def rows_in(rows: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """For each row of ``rows``: whether it equals some row of ``pool``."""
    return (rows[:, None, :] == pool[None, :, :]).all(-1).any(1)


@pytest.mark.slow
def test_restarts_draw_from_every_rank_with_buffer_broadcast_on(tmp_path):
    """The `ddp` preset's DDP broadcasts buffers from rank 0 before every forward: the ring of
    recent vectors must not be one of them, or every restart draws rank 0's vectors only."""
    probe = RestartProbe("vq", str(tmp_path))
    assert "recent" not in dict(probe.quantizer.named_buffers())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),  # broadcast_buffers=True, the default
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(probe)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert first["restarts"] > 0 and torch.equal(first["end"], second["end"])
    assert len(first["draws"]) == len(second["draws"]) > 0
    drawn_from = [0, 0]
    for (drawn, ring0), (drawn_too, ring1) in zip(first["draws"], second["draws"]):
        assert torch.equal(drawn, drawn_too)
        assert not bool(rows_in(ring0, ring1).any())  # the ranks saw different data
        from_rank = [rows_in(drawn, ring0), rows_in(drawn, ring1)]
        assert bool((from_rank[0] | from_rank[1]).all())  # every restarted code is a recent vector of some rank
        drawn_from = [drawn_from[r] + int(from_rank[r].sum()) for r in (0, 1)]
    assert drawn_from[0] > 0 and drawn_from[1] > 0, drawn_from  # and both ranks' vectors were drawn
