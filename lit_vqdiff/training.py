"""The Lightning Trainer of a run and the fit itself.

``build_trainer`` wires the callbacks every run gets: periodic and preemption
checkpoints, per-step seeds, a check that every rank runs the same config, media,
progress lines and the data-wait probe. ``fit`` runs it, resuming when asked, and turns
a stop by a signal into ``Preempted``.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from . import runs
from .callbacks import AtomicCheckpointIO, CloseProcessGroup, ConfigConsistency, LastCheckpoint, MediaLogger, Preempted, ProgressPrinter, StepSeed
from .config import config_hash
from .loggers import SafeWandbLogger, build_logger
from .perf import DataWaitTimer

# Lightning's advertisement for its cloud logger and a deprecation inside Lightning itself
# are noise in every run's output; neither is actionable here.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "litlogger" not in record.getMessage())
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)


DEFAULT_THREADS = torch.get_num_threads()


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback] | None = None) -> L.Trainer:
    """A Lightning Trainer from ``cfg.trainer`` with the callbacks every run gets."""
    t = cfg.trainer
    # Process-wide: a stage that ran earlier in this process (stage 1 before stage 2) may
    # have changed it, so 0 restores the count torch chose at start-up.
    torch.set_num_threads(t.threads if t.threads > 0 else DEFAULT_THREADS)
    last = LastCheckpoint(runs.checkpoint_path(run_dir), every_minutes=t.checkpoint_every_minutes, every_steps=t.checkpoint_every_steps)
    callbacks = list(callbacks or [])
    # One data-wait probe per run: the caller's, when it passes one to read afterwards.
    timer = next((c for c in callbacks if isinstance(c, DataWaitTimer)), None) or DataWaitTimer()
    callbacks = [c for c in callbacks if c is not timer]
    all_callbacks: list[L.Callback] = [timer, StepSeed(cfg.run.seed), ConfigConsistency(),
                                       MediaLogger(run_dir, every=cfg.logger.media_every_val)]
    interactive = sys.stdout.isatty()
    if not interactive:
        all_callbacks.append(ProgressPrinter(every=max(t.log_every_steps, t.max_steps // 20)))
    # last: its saves include what the others did with the batch; then the probe's end of
    # step, so that callback work counts as training, not as waiting for data.
    all_callbacks += [*callbacks, CloseProcessGroup(), last, timer.closer]
    logger = build_logger(cfg, run_dir) if not t.fast_dev_run else False
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        max_time=dt.timedelta(minutes=t.max_minutes) if t.max_minutes > 0 else None,
        gradient_clip_val=cfg.optim.grad_clip or None,
        val_check_interval=t.val_every_steps,
        check_val_every_n_epoch=None,  # validation is scheduled in steps: epochs of a stream are arbitrary
        limit_val_batches=t.limit_val_batches or None,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_steps,
        logger=logger,
        callbacks=all_callbacks,
        enable_checkpointing=False,  # LastCheckpoint owns last.ckpt
        plugins=[AtomicCheckpointIO()],
        deterministic=t.deterministic,
        fast_dev_run=t.fast_dev_run,
        default_root_dir=str(run_dir),
        enable_model_summary=False,
        enable_progress_bar=interactive,
    )


def fit(cfg: DictConfig, module: L.LightningModule, datamodule: L.LightningDataModule, run_dir: Path, resume: Path | None, callbacks: list[L.Callback] | None = None) -> L.Trainer:
    """Fit, resuming from ``resume`` when given. A run stopped by SIGTERM/SIGUSR1 (after
    saving) raises Preempted: the process exits with status 0 and the caller's export,
    sampling and summary do not run."""
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    trainer = build_trainer(cfg, run_dir, callbacks)
    module.config_hash = config_hash(cfg)
    started = time.monotonic()
    try:
        with warnings.catch_warnings():
            # Logging runs on global steps across epochs: a small data set's short epochs lose nothing.
            warnings.filterwarnings("ignore", message="The number of training batches .* is smaller than the logging interval")
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    finally:
        for logger in trainer.loggers:
            if isinstance(logger, SafeWandbLogger):
                logger.close()  # also under ddp_spawn, where this process made the run the ranks attached to
    module.train_seconds = time.monotonic() - started
    runs.leave_run(run_dir)
    if any(isinstance(c, LastCheckpoint) and c.preempted for c in trainer.callbacks):
        message = f"stopped by a signal at step {trainer.global_step}; resume with `lit-vqdiff train {cfg.stage} run.dir={run_dir}`"
        if trainer.is_global_zero:
            print(message, flush=True)
        raise Preempted(message)
    return trainer


def data_wait_fraction(trainer: L.Trainer) -> float | None:
    """Share of the run's training wall time spent waiting for batches (see DataWaitTimer)."""
    for callback in trainer.callbacks:
        if isinstance(callback, DataWaitTimer):
            return round(callback.fraction, 4)
    return None


def run_figures(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
    """Speed and memory of a finished fit, for its summary.json.

    ``steps_per_s`` is global steps over the whole fit's wall time (validation included),
    what a researcher plans a budget with; ``peak_gpu_memory_gib`` is this process's peak
    of allocated GPU memory, present only when the run trained on a GPU.
    """
    seconds = float(module.train_seconds)
    figures: dict[str, Any] = {
        "global_step": trainer.global_step,
        "train_seconds": round(seconds, 1),
        "steps_per_s": round(trainer.global_step / seconds, 2) if seconds > 0 else None,
        "data_wait_fraction": data_wait_fraction(trainer),
    }
    device = trainer.strategy.root_device
    if device.type == "cuda":
        figures["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return figures
