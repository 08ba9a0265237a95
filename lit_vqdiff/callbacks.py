"""Callbacks: periodic and preemption checkpoints, atomic checkpoint files, per-step seeds
for exact resume, a check that all ranks run one config, a picklable EMA of the
weights, and media (grids, sounds, code histograms) to disk and W&B."""

from __future__ import annotations

import functools
import math
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
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import WandbLogger

from . import media
from .config import config_hash

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


class Preempted(SystemExit):
    """Raised after a preemption signal was answered with a checkpoint: the process exits
    with status 0, and what follows training (export, sampling) does not run on a half-trained model."""

    def __init__(self, message: str):
        super().__init__(0)
        self.message = message

    def __str__(self) -> str:
        return self.message


class LastCheckpoint(L.Callback):
    """Refreshes ``last.ckpt`` every ``every_minutes`` of training and/or every
    ``every_steps`` optimizer steps (a value <= 0 turns that trigger off), and after the
    last step; on SIGTERM or SIGUSR1 saves it and stops cleanly (the run resumes with
    run.dir=...).

    Must come after every other callback: a save at the end of a batch then holds what
    they did with that batch (the EMA update of the weights, for one).
    """

    def __init__(self, path: Path, every_minutes: float = 2.0, every_steps: int = 0):
        self.path = Path(path)
        self.every_s = every_minutes * 60.0 if every_minutes > 0 else math.inf
        self.every_steps = max(0, every_steps)
        self._last_save = time.monotonic()
        self._saved_step = -1
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

    def _due(self, trainer: L.Trainer) -> bool:
        by_time = time.monotonic() - self._last_save >= self.every_s
        return by_time or (self.every_steps > 0 and trainer.global_step % self.every_steps == 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # The last step is saved here, inside its epoch, rather than at on_train_end: a resume
        # with a larger trainer.max_steps then goes on mid-epoch, and the weights saved are
        # still the trained ones, not those an EMA callback copies in at the end.
        last_step = 0 < trainer.max_steps <= trainer.global_step
        due, signalled = agreed_flags(trainer, self._due(trainer) or last_step, self._signal is not None)
        if due or signalled:
            self.save(trainer)
        if signalled:
            self.preempted = True
            name = signal.Signals(self._signal).name if self._signal else "a signal on another rank"
            pl_module.print(f"received {name}: saved {self.path} at step {trainer.global_step}; stopping")
            trainer.should_stop = True

    def save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self._last_save = time.monotonic()
        self._saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._saved_step:  # stopped by the clock (trainer.max_minutes) or another callback
            self.save(trainer)
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()


def agreed_flags(trainer: L.Trainer, *flags: bool) -> list[bool]:
    """Each flag OR-ed over the ranks: every rank must take the same decision, or the
    collectives inside a checkpoint save wait forever for the rank that skipped it."""
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        t = torch.tensor([float(f) for f in flags], device=trainer.strategy.root_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v > 0) for v in t.tolist()]
    return list(flags)


class ConfigConsistency(L.Callback):
    """Checks at the start of fit that every rank resolved the same config (a node with
    other files, code or environment would silently train another model) and keeps the
    digests each rank saw in ``pl_module.rank_config_hashes``."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cfg = getattr(pl_module, "cfg", None)
        if cfg is None:
            return
        own = config_hash(cfg)
        # 16 hex digits as two 32-bit halves: collectives move numbers, not strings.
        halves = torch.tensor([int(own[:8], 16), int(own[8:], 16)], dtype=torch.long, device=trainer.strategy.root_device)
        parts = [halves]
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            parts = [torch.zeros_like(halves) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, halves)
        hashes = [f"{a:08x}{b:08x}" for a, b in (p.tolist() for p in parts)]
        pl_module.rank_config_hashes = hashes
        if len(set(hashes)) > 1:
            listing = ", ".join(f"rank {r}: {h}" for r, h in enumerate(hashes))
            raise RuntimeError(f"the ranks resolved different configs ({listing}); launch every rank with the same files and overrides")


class StepSeed(L.Callback):
    """Reseeds torch, numpy and Python's generators at the start of every training batch
    from (run seed, rank, step).

    A resumed run then draws the same masks, noise and dropout as an uninterrupted one,
    whatever consumed random numbers in between (validation, a new data iterator), and
    the ranks of a multi-process run draw different ones.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        seed = step_seed(self.seed, trainer.global_rank, trainer.global_step)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed mixed from a run seed, a rank and a step (neighbours give unrelated seeds)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> np.uint64(1))

def ema_step(averaged: torch.Tensor, current: torch.Tensor, num_averaged: Any, decay: float) -> torch.Tensor:
    """One EMA update as a lerp: ``averaged + (1 - decay) * (current - averaged)``.

    Unlike ``decay * averaged + (1 - decay) * current``, it leaves a constant weight (a
    frozen tokenizer's) exactly as it is, so that the module's frozen parts stay bit-equal
    to the artifact they were loaded from.
    """
    return torch.lerp(averaged, current, 1.0 - decay)


class EMAWeights(WeightAveraging):
    """An EMA of the weights, updated after every optimizer step with ``ema_step``. Its
    averaging function is a partial of a module-level function, so the callback pickles:
    ddp_spawn sends the callbacks to its ranks that way."""

    def __init__(self, decay: float = 0.999, use_buffers: bool = False):
        super().__init__(use_buffers=use_buffers, avg_fn=functools.partial(ema_step, decay=decay))
        self.decay = decay
class MediaLogger(L.Callback):
    """Writes what a module left in ``pl_module.media`` after validation to
    ``<run>/media/<key>/step-<N>.(png|wav)`` and to W&B when it is the logger.

    W&B gets no explicit step: its step_sync files the media under the step of the
    validation scalars just logged (Lightning logs those at global_step - 1).

    A module fills ``media`` with ``{key: ("image", uint8 HxWx3)}``,
    ``{key: ("audio", [waves], sample_rate)}`` or ``{key: ("text", [rows])}``.
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
                    wandb.log_image(key, [item[1]])
            elif item[0] == "audio":
                waves, rate = item[1], item[2]
                for i, wave in enumerate(waves):
                    media.save_wav(folder / f"step-{step:07d}-{i}.wav", wave, rate)
                if wandb is not None:
                    wandb.log_audio(key, [np.asarray(w) for w in waves], sample_rate=[rate] * len(waves))
            elif item[0] == "text":
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"step-{step:07d}.txt").write_text("".join(f"{row}\n" for row in item[1]), encoding="utf-8")
                if wandb is not None:
                    wandb.log_text(key, columns=["text"], data=[[row] for row in item[1]])
            else:
                raise ValueError(f"media item {key!r}: unknown kind {item[0]!r}; expected 'image', 'audio' or 'text'")


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


class CloseProcessGroup(L.Callback):
    """Ends a multi-process run's process group on every rank once the ranks are done.

    Lightning leaves a gloo group open at exit; a rank that exits while its peer's gloo
    threads still hold their connection can abort the peer ("terminate called without an
    active exception"). A barrier, then an orderly destroy, ends them together.
    """

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
