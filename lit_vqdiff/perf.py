"""Performance probes: how long training waits for data, and model FLOPs for MFU."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class DataWaitTimer(L.Callback):
    """Share of training wall time spent waiting for the next batch.

    The gap between the end of one training step and the start of the next is where the
    loop fetches the next batch; validation is left out of both sides. The start-up of a
    new epoch's loader workers counts as waiting: a researcher pays for it too. Logged as
    ``perf/data_wait_fraction`` at each logging step.
    """

    def __init__(self) -> None:
        self.wait_s = 0.0
        self.step_s = 0.0
        self._last_end: float | None = None
        self._start = 0.0

    @property
    def fraction(self) -> float:
        total = self.wait_s + self.step_s
        return self.wait_s / total if total > 0 else 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self.wait_s += now - self._last_end
        self._start = now

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self.step_s += now - self._start
        self._last_end = now
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            pl_module.log("perf/data_wait_fraction", self.fraction, on_step=True, rank_zero_only=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None  # the wait for the first batch after validation is not a data wait
