"""Performance probes: how long training waits for data, and how long it has run."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class DataWaitTimer(L.Callback):
    """Share of training wall time spent waiting for the next batch.

    Between the end of one training step and the start of the next, the loop fetches the
    next batch and does its own per-step bookkeeping (learning-rate schedulers, logging,
    the module's batch-end hook); validation is left out of both sides. A train loader
    with a ``fetch_seconds`` counter (``StreamLoader`` has one) says how much of that gap
    was spent blocked on it: that is the data wait, the rest is ``loop_s``. For other
    loaders the whole gap counts as waiting, an upper bound. The start-up of a new epoch's
    loader workers counts as waiting: a researcher pays for it too. A step ends when the
    last callback is done with it (``closer``, which build_trainer puts at the end of the
    list): EMA updates or checkpoint saves are training work, not data waits.
    Logged as ``perf/data_wait_fraction`` at each logging step.
    """

    def __init__(self) -> None:
        self.wait_s = 0.0  # blocked on the train loader
        self.loop_s = 0.0  # the rest of the gaps between steps
        self.step_s = 0.0
        self._start: float | None = None  # start of the open step
        self._end: float | None = None  # latest end mark of the open (or last) step
        self._fetched_at_end: float | None = None  # the loader's fetch_seconds at that mark
        self.closer = StepEndMark(self)

    @property
    def train_s(self) -> float:
        """Training wall time the probe saw: steps plus the gaps between them."""
        return self.wait_s + self.loop_s + self.step_s

    @property
    def fraction(self) -> float:
        return self.wait_s / self.train_s if self.train_s > 0 else 0.0

    @property
    def loop_fraction(self) -> float:
        return self.loop_s / self.train_s if self.train_s > 0 else 0.0

    def mark_end(self, trainer: L.Trainer) -> None:
        """The step is (so far) done now; a later mark for the same step moves its end."""
        now = time.perf_counter()
        if self._start is not None:
            self.step_s += now - (self._start if self._end is None else self._end)
        self._end = now
        self._fetched_at_end = fetch_seconds(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._end is not None:
            gap = now - self._end
            fetched = fetch_seconds(trainer)
            waited = gap
            if fetched is not None and self._fetched_at_end is not None:
                waited = min(gap, max(0.0, fetched - self._fetched_at_end))
            self.wait_s += waited
            self.loop_s += gap - waited
        self._start, self._end = now, None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.mark_end(trainer)
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            pl_module.log("perf/data_wait_fraction", self.fraction, on_step=True, rank_zero_only=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end = None  # the wait for the first batch after validation is not a data wait


def fetch_seconds(trainer: L.Trainer) -> float | None:
    """Seconds the train loader has spent producing batches, when it keeps count."""
    seconds = getattr(trainer.train_dataloader, "fetch_seconds", None)
    return float(seconds) if seconds is not None else None


class StepEndMark(L.Callback):
    """Moves its DataWaitTimer's end of step to after every callback listed before it."""

    def __init__(self, timer: DataWaitTimer) -> None:
        self.timer = timer

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.timer.mark_end(trainer)


class Stopwatch(L.Callback):
    """Logs ``time/minutes``, the wall time since training started (validations included),
    with every validation: its figures against minutes give a run's time-to-quality curve.
    The time travels in checkpoints, so a resumed run's curve goes on where it stopped."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._before = 0.0  # seconds trained by the processes this run resumed from

    @property
    def seconds(self) -> float:
        return self._before + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None and not trainer.sanity_checking:
            pl_module.log("time/minutes", self.seconds / 60.0, rank_zero_only=True)

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self._before = float(state_dict.get("seconds", 0.0))


# On a CPU, bf16 autocast pays only where the cores multiply bf16 at least this much faster
# than fp32 (AVX512-BF16 or AMX); CPUs that emulate it run bf16 matmuls slower than fp32.
BF16_SPEEDUP_NEEDED = 1.3
_cpu_bf16_speedup: float | None = None


def cpu_bf16_speedup(size: int = 512, seconds: float = 0.1) -> float:
    """How much faster this CPU multiplies bf16 matrices than fp32 ones (measured once per process)."""
    global _cpu_bf16_speedup
    if _cpu_bf16_speedup is None:
        rates = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            a @ b  # warm-up: oneDNN picks its kernel on the first call
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                a @ b
                count += 1
            rates[dtype] = count / (time.perf_counter() - start)
        _cpu_bf16_speedup = rates[torch.bfloat16] / rates[torch.float32]
    return _cpu_bf16_speedup


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16-mixed on a GPU, and on a CPU whose bf16 matmuls pay (see
    BF16_SPEEDUP_NEEDED), else 32-true. Any other value is returned as it is."""
    if precision != "auto":
        return precision
    if accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed"
    return "bf16-mixed" if cpu_bf16_speedup() >= BF16_SPEEDUP_NEEDED else "32-true"
