"""Callbacks: periodic and preemption checkpoints, atomic checkpoint files, random-state
capture for exact resume, and media (grids, sounds, code histograms) to disk and W&B."""

from __future__ import annotations

import os
import random
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loggers import WandbLogger

from . import media

PREVIOUS_SUFFIX = ".prev"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed into place; the one they replace
    is kept as ``<name>.prev`` so that a damaged file never costs the run."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, path.with_name(path.name + PREVIOUS_SUFFIX))
        os.replace(tmp, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint_file(Path(path), map_location=map_location)


def load_checkpoint_file(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load with a clear report of a damaged file and a fall back to the previous one."""
    candidates = [path, path.with_name(path.name + PREVIOUS_SUFFIX)]
    errors = []
    for candidate in candidates:
        if not candidate.exists():
            errors.append(f"{candidate}: missing")
            continue
        try:
            ckpt = torch.load(candidate, map_location=map_location, weights_only=False)
        except Exception as err:  # noqa: BLE001 - a truncated zip raises several error types
            errors.append(f"{candidate}: unreadable ({type(err).__name__}: {err})")
            warnings.warn(f"checkpoint {candidate} is damaged or truncated ({type(err).__name__}); trying the previous one", RuntimeWarning, stacklevel=2)
            continue
        if candidate != path:
            warnings.warn(f"resuming from the previous checkpoint {candidate} because {path} could not be read", RuntimeWarning, stacklevel=2)
        return ckpt
    raise RuntimeError("no usable checkpoint: " + "; ".join(errors))


class LastCheckpoint(L.Callback):
    """Refreshes ``last.ckpt`` every ``every_minutes`` of training and at the end; on
    SIGTERM or SIGUSR1 saves it and stops cleanly (the run can be resumed with run.dir=...)."""

    def __init__(self, path: Path, every_minutes: float = 2.0, every_steps: int = 0):
        self.path = Path(path)
        self.every_s = every_minutes * 60.0
        self.every_steps = every_steps
        self._last_save = time.monotonic()
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self.preempted = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed here, after Lightning's own SIGTERM handler (which would stop the run at
        # the end of the epoch without a checkpoint), so ours is the one that acts.
        self._last_save = time.monotonic()
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread (e.g. some launchers): signals stay as they are
                pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signal = signum  # acted on at the next batch boundary, where the state is consistent

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _agreed(self, trainer: L.Trainer, flag: bool) -> bool:
        """Every rank must take the same decision, or the save's collectives hang."""
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = torch.tensor([1.0 if flag else 0.0], device=trainer.strategy.root_device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item() > 0)
        return flag

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        due = time.monotonic() - self._last_save >= self.every_s
        if self.every_steps:
            due = due or trainer.global_step % self.every_steps == 0
        signalled = self._agreed(trainer, self._signal is not None)
        if self._agreed(trainer, due) or signalled:
            self.save(trainer)
        if signalled:
            self.preempted = True
            name = signal.Signals(self._signal).name if self._signal else "a signal on another rank"
            pl_module.print(f"received {name}: saved {self.path} at step {trainer.global_step}; stopping")
            trainer.should_stop = True

    def save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self._last_save = time.monotonic()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()


class RandomState(L.Callback):
    """Saves and restores the Python, numpy and torch generators so that a resumed run
    draws the same masks, noise and restarts as an uninterrupted one."""

    def state_dict(self) -> dict[str, Any]:
        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])


class MediaLogger(L.Callback):
    """Writes what a module left in ``pl_module.media`` after validation to
    ``<run>/media/<key>/step-<N>.(png|wav)`` and to W&B when it is the logger.

    A module fills ``media`` with ``{key: ("image", uint8 HxWx3)}`` or
    ``{key: ("audio", [waves], sample_rate)}``.
    """

    def __init__(self, run_dir: Path, every: int = 1):
        self.root = Path(run_dir) / "media"
        self.every = max(1, every)
        self._count = 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        items: dict[str, tuple] = getattr(pl_module, "media", {}) or {}
        pl_module.media = {}
        if trainer.sanity_checking or not trainer.is_global_zero or not items:
            return
        self._count += 1
        if (self._count - 1) % self.every:
            return
        step = trainer.global_step
        wandb = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        for key, item in items.items():
            folder = self.root / key.replace("/", "_")
            if item[0] == "image":
                media.save_png(folder / f"step-{step:07d}.png", item[1])
                if wandb is not None:
                    wandb.log_image(key, [item[1]], step=step)
            elif item[0] == "audio":
                waves, rate = item[1], item[2]
                for i, wave in enumerate(waves):
                    media.save_wav(folder / f"step-{step:07d}-{i}.wav", wave, rate)
                if wandb is not None:
                    wandb.log_audio(key, [np.asarray(w) for w in waves], step=step, sample_rate=[rate] * len(waves))
            else:
                raise ValueError(f"media item {key!r}: unknown kind {item[0]!r}; expected 'image' or 'audio'")


class ProgressPrinter(L.Callback):
    """Plain-text progress for logs and pipes (where a progress bar is noise): a line
    every ``every`` steps with speed and time left, and the metrics of each validation."""

    def __init__(self, every: int = 100):
        self.every = max(1, every)
        self._t0 = time.monotonic()
        self._step0 = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._step0 = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every or not trainer.is_global_zero:
            return
        rate = (step - self._step0) / max(time.monotonic() - self._t0, 1e-9)
        left = (trainer.max_steps - step) / rate / 60 if rate > 0 and trainer.max_steps > 0 else float("nan")
        loss = trainer.callback_metrics.get("train/loss")
        loss_text = f" loss {float(loss):.4f}" if loss is not None else ""
        print(f"step {step}/{trainer.max_steps}{loss_text} | {rate:.2f} steps/s | ~{left:.1f} min left", flush=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        print(f"validation at step {trainer.global_step}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items())), flush=True)
