"""Running a stage: prepare data and prerequisites, build the Trainer, fit, export.

`train(cfg)` is what `lit-vqdiff train stage1|stage2` calls. It resolves the run folder
(new, or an existing one to resume), writes the resolved config there, and wires the
callbacks every run gets: periodic/preemption checkpoints, per-step seeds, a check
that every rank runs the same config, media.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
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
from .config import ConfigError, config_hash, load_config, load_saved, save_config
from .loggers import SafeWandbLogger, build_logger
from .perf import DataWaitTimer

# Lets the ranks Lightning re-launches for DDP join the run folder rank 0 made (one
# variable per stage: `train stage2` may run stage 1 first in the same process).
# Lightning's advertisement for its cloud logger and a deprecation inside Lightning itself
# are noise in every run's output; neither is actionable here.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "litlogger" not in record.getMessage())
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)

DEFAULT_THREADS = torch.get_num_threads()

RUN_DIR_ENV = "LIT_VQDIFF_RUN_DIR_{}"


def is_global_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def _cluster_run_name(cfg: DictConfig) -> str | None:
    """A run name every rank of a multi-process launch agrees on, without talking."""
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        value = os.environ.get(var)
        if value and value != "none":
            tag = cfg.stage if cfg.stage == "stage2" or cfg.modality == "image" else f"stage1-{cfg.modality}"
            return f"{tag}-job{value}"
    return None


def resolve_run(cfg: DictConfig) -> tuple[Path, Path | None]:
    """The run folder for ``cfg`` (created if new) and the checkpoint to resume, if any."""
    env = RUN_DIR_ENV.format(cfg.stage.upper() if cfg.stage == "stage2" else f"STAGE1_{cfg.modality.upper()}")
    joined = os.environ.get(env)
    if joined:
        run_dir = Path(joined)
    elif cfg.run.dir:
        run_dir = Path(cfg.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    elif (name := _cluster_run_name(cfg)) is not None:
        run_dir = Path(cfg.run.root) / name
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = runs.new_run_dir(cfg.run.root, cfg.stage, cfg.get("modality"))
    os.environ[env] = str(run_dir)
    ckpt = runs.checkpoint_path(run_dir)
    previous = ckpt.with_name(ckpt.name + ".prev")
    resume = ckpt if ckpt.exists() else (ckpt if previous.exists() else None)
    if is_global_zero():
        save_config(cfg, run_dir / runs.CONFIG_FILE)
    return run_dir, resume


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


def train(cfg: DictConfig) -> Path:
    """Train the stage ``cfg.stage`` names; returns the run folder."""
    # Seeded before the module is built: its initial weights are part of a reproducible run.
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    if cfg.stage == "stage1":
        from .stages.tokenizer import train_stage1

        return train_stage1(cfg)
    from .stages.generator import train_stage2

    return train_stage2(cfg)


def fit(cfg: DictConfig, module: L.LightningModule, datamodule: L.LightningDataModule, run_dir: Path, resume: Path | None, callbacks: list[L.Callback] | None = None) -> L.Trainer:
    """Fit, resuming from ``resume`` when given. A run stopped by SIGTERM/SIGUSR1 (after
    saving) raises Preempted: the process exits with status 0 and the caller's export,
    sampling and summary do not run."""
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    trainer = build_trainer(cfg, run_dir, callbacks)
    module.config_hash = config_hash(cfg)
    started = time.monotonic()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    finally:
        for logger in trainer.loggers:
            if isinstance(logger, SafeWandbLogger):
                logger.close()  # also under ddp_spawn, where this process made the run the ranks attached to
    module.train_seconds = time.monotonic() - started
    for key in [k for k, v in os.environ.items() if k.startswith("LIT_VQDIFF_RUN_DIR_") and v == str(run_dir)]:
        del os.environ[key]  # launched: a later run in this process must not join this one
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


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Final figures of a run as JSON beside its config (rank 0)."""
    if is_global_zero():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def stage_config_for(stage: str, overrides: list[str]) -> DictConfig:
    """Load a stage's config; used when one stage has to run another (stage 2 -> stage 1)."""
    try:
        return load_config(stage, overrides)
    except ConfigError as err:
        raise ConfigError(f"while preparing {stage}: {err}") from None


__all__ = ["train", "fit", "build_trainer", "resolve_run", "write_summary", "load_saved", "stage_config_for"]
