"""The Lightning Trainer of a run and the fit itself.

``build_trainer`` wires the callbacks every run gets: periodic and preemption
checkpoints, per-step seeds, a check that every rank runs the same config, media,
progress lines and the data-wait probe. ``fit`` runs it, resuming when asked, and turns
a stop by a signal into ``Stopped`` and the faults a resume gets past (a data loader
worker that died, a checkpoint that could not be written, too much bad data) into
one-line errors that name the checkpoint and the command to resume with.
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
from lightning.pytorch.callbacks import ModelCheckpoint
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from . import runs
from .callbacks import (AtomicCheckpointIO, CloseProcessGroup, ConfigConsistency, LastCheckpoint, MediaLogger, ProgressPrinter,
                        StepSeed, stop_on_signals)
from .config import config_hash
from .data.datamodule import DataQualityError
from .errors import Stopped, TrainingFailed
from .loggers import build_logger, close_loggers, wandb_loggers
from .perf import DataWaitTimer, Stopwatch, resolve_precision

# Lightning's advertisement for its cloud logger and a deprecation inside Lightning itself
# are noise in every run's output; neither is actionable here.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "litlogger" not in record.getMessage())
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)


DEFAULT_THREADS = torch.get_num_threads()
# (stage, run folder) of the last fit that ran to its end in this process: a stop after it
# (export, sampling, evaluation) tells the user that rerunning that run only finishes it.
completed_fit: tuple[str, Path] | None = None


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
    all_callbacks: list[L.Callback] = [timer, Stopwatch(), StepSeed(cfg.run.seed), ConfigConsistency(),
                                       MediaLogger(run_dir, every=cfg.logger.media_every_val)]
    interactive = sys.stdout.isatty()
    if not interactive:
        all_callbacks.append(ProgressPrinter(every=max(t.log_every_steps, t.max_steps // 20)))
    # last: its saves include what the others did with the batch; then the probe's end of
    # step, so that callback work counts as training, not as waiting for data.
    all_callbacks += [*callbacks, CloseProcessGroup(), last, timer.closer]
    logger = build_logger(cfg, run_dir) if not t.fast_dev_run else False
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # Lightning's SLURM requeue (on SIGUSR1: an hpc_ckpt_*.ckpt of its own, then
        # `scontrol requeue`) would act behind LastCheckpoint's back; the CLI requeues instead.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=resolve_precision(t.precision, t.accelerator),
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
        # LastCheckpoint owns last.ckpt; a caller's ModelCheckpoint may keep the best one.
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in all_callbacks),
        plugins=plugins,
        deterministic=t.deterministic,
        fast_dev_run=t.fast_dev_run,
        default_root_dir=str(run_dir),
        enable_model_summary=False,
        enable_progress_bar=interactive,
    )


def fit(cfg: DictConfig, module: L.LightningModule, datamodule: L.LightningDataModule, run_dir: Path, resume: Path | None,
        callbacks: list[L.Callback] | None = None, keep_logging: bool = False) -> L.Trainer:
    """Fit, resuming from ``resume`` when given.

    A stop signal ends the fit with a saved checkpoint and raises ``Stopped`` (the process
    exits with its status, see ``errors.STOP_STATUS``); a data loader worker that dies or a
    checkpoint that cannot be written raise ``TrainingFailed``, too much bad data
    ``DataQualityError``. Each message names what last.ckpt holds and the command that
    resumes; the caller's export, sampling and summary do not run on a half-trained model.
    With ``keep_logging`` a finished fit leaves its W&B run open for the caller to log
    artifacts and final figures to, and to close (``loggers.close_loggers``).
    """
    global completed_fit
    completed_fit = None
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    trainer = build_trainer(cfg, run_dir, callbacks)
    module.config_hash = config_hash(cfg)
    saver = next(c for c in trainer.callbacks if isinstance(c, LastCheckpoint))
    for logger in wandb_loggers(trainer):
        logger.keep_open = keep_logging  # the caller logs more after a finished fit, then closes it
    finished = False
    resume_with = f"resume with `lit-vqdiff train {cfg.stage} run.dir={run_dir}`"
    started = time.monotonic()
    try:
        with stop_on_signals(defer=True) as stop, warnings.catch_warnings():
            # Logging runs on global steps across epochs: a small data set's short epochs lose nothing.
            warnings.filterwarnings("ignore", message="The number of training batches .* is smaller than the logging interval")
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
            except SIGTERMException:
                # Raised by Lightning's own SIGTERM handler, which holds until LastCheckpoint's
                # takes over at the start of training; ours recorded the same signal.
                if stop.signame is None:
                    raise
            signame = saver.stopped_by or stop.signame
            finished = signame is None
    except Stopped as err:  # during validation, or Ctrl-C twice
        where = " ".join(filter(None, [err.where, f"at step {trainer.global_step}"]))
        raise err.during(where, f"{saver.holding()}; {resume_with}") from None
    except TrainingFailed as err:  # a checkpoint that could not be written
        raise TrainingFailed(f"{err}, then {resume_with}") from None
    except DataQualityError as err:
        raise DataQualityError(f"{err}; {saver.holding()}; repair or leave out those shards (or raise "
                               f"data.max_skip_fraction), then {resume_with}") from err
    except RuntimeError as err:
        if "DataLoader worker" not in str(err):
            raise
        # A worker killed (by the OOM killer, say) raises in the middle of a step, whose state
        # is then unusable: the run stops, and the last checkpoint is where it goes on.
        raise TrainingFailed(f"training stopped at step {trainer.global_step}: a data loader worker died ({str(err).strip()}); "
                             f"{saver.holding()}; {resume_with}") from err
    finally:
        # Lightning tears the data module down only when the fit ends without an exception:
        # loader workers left running would keep the process from exiting.
        datamodule.teardown("fit")
        if not (finished and keep_logging):
            close_loggers(trainer)  # also under ddp_spawn, where this process made the run the ranks attached to
        runs.leave_run(run_dir)
    watch = next(c for c in trainer.callbacks if isinstance(c, Stopwatch))
    # Training time over every process of the run (resumes included), from the stopwatch
    # that checkpoints carry; a fit that never reached its first step counts its set-up.
    module.train_seconds = watch.seconds if watch.seconds > 0 else time.monotonic() - started
    if signame:
        raise Stopped(signame, f"stopped by {signame} at step {trainer.global_step}: saved {saver.path}; {resume_with}")
    completed_fit = (cfg.stage, Path(run_dir))
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
        "precision": str(trainer.precision),  # what trainer.precision=auto chose, too
    }
    device = trainer.strategy.root_device
    if device.type == "cuda":
        figures["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return figures
