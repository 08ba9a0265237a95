"""What both stage modules share: the config they were built from, optimizers with
warmup + cosine decay, and the guard that skips steps with a non-finite loss."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import lightning as L
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from ..callbacks import LastCheckpoint
from ..config import saved_config
from ..errors import NonFiniteLossError


class StageModule(L.LightningModule):
    """Base LightningModule: ``self.cfg`` is the resolved run config."""

    max_nonfinite_in_row = 5

    def __init__(self, config: DictConfig | dict[str, Any], extra_hparams: dict[str, Any] | None = None):
        super().__init__()
        # A checkpoint's hyper-parameters hold the config as plain data (load_from_checkpoint).
        cfg = config if isinstance(config, DictConfig) else saved_config(dict(config), source="checkpoint hyper-parameters")
        self.cfg = cfg
        # Saved in every checkpoint, so that `Module.load_from_checkpoint(path)` and `sample`
        # rebuild the module from a file alone: the keys are the constructor's arguments.
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True), **(extra_hparams or {})})
        self.media: dict[str, tuple] = {}
        self.nonfinite_in_row = 0
        self.register_buffer("skipped_nonfinite", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ optimization

    def build_optimizer(self, params: Iterable[torch.nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
        o = self.cfg.optim
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]  # norms and biases are not weight-decayed
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # foreach kernels: one launch per parameter group rather than one per tensor
        return torch.optim.AdamW(groups, lr=lr or o.lr, betas=tuple(o.betas), foreach=True)

    def lr_lambda(self, step: int) -> float:
        """Linear warmup, then cosine decay to 10% at trainer.max_steps (or constant)."""
        o, total = self.cfg.optim, max(1, self.cfg.trainer.max_steps)
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    def scheduler(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda), "interval": "step"}

    # ------------------------------------------------------------------ data health

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step % max(1, self.cfg.trainer.log_every_steps) == 0:
            self.log_skipped_samples()

    def log_skipped_samples(self) -> None:
        """``data/skipped_<reason>``: samples the stream skipped so far, summed over ranks."""
        skipped = getattr(self.trainer.datamodule, "skipped", None)
        if skipped is None:
            return
        counts = {f"data/skipped_{reason}": float(n) for reason, n in skipped().items()}
        counts["data/truncated_captions"] = float(self.trainer.datamodule.truncated_captions())
        self.log_dict(counts, on_step=True, on_epoch=False, sync_dist=True, reduce_fx="sum")

    # ------------------------------------------------------------------ guards

    def finite_or_skip(self, loss: torch.Tensor, undo: Callable[[], None] | None = None) -> torch.Tensor | None:
        """The loss, or None (the step is skipped) when it is NaN/Inf on any rank.

        All ranks must agree, or DDP's gradient all-reduce would wait forever for the
        rank that skipped. ``undo`` puts back what the forward changed outside the
        optimizer (a codebook's EMA statistics): it runs before anything else sees a
        skipped step, the stop-and-save after too many of them included.
        """
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        finite = bad.item() == 0
        self.nonfinite_in_row = 0 if finite else self.nonfinite_in_row + 1
        self.skipped_nonfinite += 0 if finite else 1
        # Logged on every step, so that it reads as a running total on any logger.
        self.log("train/skipped_nonfinite", self.skipped_nonfinite.float(), on_step=True, rank_zero_only=True)
        if finite:
            return loss
        if undo is not None:
            undo()
        if self.nonfinite_in_row >= self.max_nonfinite_in_row:
            self._stop_on_nonfinite()
        return None

    def _stop_on_nonfinite(self) -> None:
        saver = next((c for c in self.trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        where = "no checkpoint callback"
        if saver is not None:
            saver.save(self.trainer)  # weights are still those of the last good step: bad steps were skipped
            where = str(saver.path)
        raise NonFiniteLossError(
            f"{self.nonfinite_in_row} non-finite losses in a row at step {self.global_step} "
            f"({int(self.skipped_nonfinite)} skipped in all); saved the last good state to {where}. "
            "Lower optim.lr, raise optim.warmup_steps or use trainer.precision=32-true."
        )
