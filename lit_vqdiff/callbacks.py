"""Callbacks: periodic and preemption checkpoints, atomic checkpoint files, per-step seeds
for exact resume, a check that all ranks run one config, a picklable EMA of the
weights, and media (grids, sounds, code histograms) to disk and W&B.

Also the process's answer to stop signals (``stop_on_signals``): SIGTERM, SIGINT and
SIGUSR1 become ``errors.Stopped`` where the program is, or, while training, a request
that ``LastCheckpoint`` answers at the next batch boundary with a checkpoint."""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import random
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import WandbLogger

from . import media
from .config import config_hash
from .errors import STOP_SIGNALS, Stopped, TrainingFailed
from .loggers import wandb_rows

PREVIOUS_SUFFIX = ".prev"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed into place; the one they replace
    is kept as ``<name>.prev`` so that a damaged file never costs the run. A write that
    fails (a full disk) or is interrupted leaves both files as they were.

    With ``defer_errors`` a failed write is kept in ``error`` rather than raised, so that
    ``LastCheckpoint`` can stop every rank at once (only rank 0 writes).
    """

    def __init__(self) -> None:
        super().__init__()
        self.defer_errors = False
        self.error: OSError | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        self.error = None
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            cause = os_error_in(err)
            if cause is not None and self.defer_errors:
                self.error = cause
                return
            raise
        keep_previous(path)
        os.replace(tmp, path)
        fsync_directory(path.parent)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint_file(Path(path), map_location=map_location)


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind ``err``, if any: torch.save reports a full disk as a RuntimeError
    of its zip writer, with the OSError as its context."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def keep_previous(path: Path) -> None:
    """``path``, when it exists, also as ``<name>.prev``: a hard link, so that ``path``
    itself never goes missing (a rename would leave a moment without it)."""
    if not path.exists():
        return
    previous = path.with_name(path.name + PREVIOUS_SUFFIX)
    link = path.with_name(f".{previous.name}.tmp{os.getpid()}")
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, previous)
    except OSError:  # a file system without hard links
        link.unlink(missing_ok=True)
        os.replace(path, previous)


def fsync_directory(path: Path) -> None:
    """Make the renames inside ``path`` durable (a crash of the machine keeps them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync directories
        pass
    finally:
        os.close(fd)


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


# ----------------------------------------------------------------------------- stop signals


class StopRequest:
    """What SIGTERM, SIGINT and SIGUSR1 asked of this process (see ``stop_on_signals``).

    The first signal is recorded in ``signame``. Outside training it raises ``Stopped``
    where the program is; while training (``defer``) it waits for ``LastCheckpoint``,
    which saves and stops at the next batch boundary. A repeated SIGTERM or SIGUSR1 is
    ignored (a scheduler may send several); a second SIGINT raises at once: Ctrl-C twice
    means "now, without waiting for the step".
    """

    def __init__(self) -> None:
        self.signame: str | None = None
        self.defer = False
        self.depth = 0

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        first = self.signame is None
        if first:
            self.signame = name
            if not self.defer:
                raise Stopped(name)
        elif signum == signal.SIGINT:
            raise Stopped(name, again=True)

    def install(self) -> dict[int, Any]:
        """Point the stop signals at ``handle``; returns the handlers it replaced (none off the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {signum: signal.signal(signum, self.handle) for signum in STOP_SIGNALS}


STOP = StopRequest()


def restore_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def stop_on_signals(defer: bool = False) -> Iterator[StopRequest]:
    """Within the block SIGTERM, SIGINT and SIGUSR1 stop the program cleanly (``StopRequest``);
    ``defer`` is for training, where the trainer stops at its next batch boundary.

    Nested blocks share one request; the outermost starts it afresh and puts back the
    handlers it replaced.
    """
    outermost = STOP.depth == 0
    previous: dict[int, Any] = {}
    if outermost:
        STOP.signame = None
        previous = STOP.install()
    outer_defer, STOP.defer = STOP.defer, defer
    STOP.depth += 1
    try:
        yield STOP
    finally:
        STOP.depth -= 1
        STOP.defer = outer_defer
        if outermost:
            restore_handlers(previous)


class LastCheckpoint(L.Callback):
    """Refreshes ``last.ckpt`` every ``every_minutes`` of training and/or every
    ``every_steps`` optimizer steps (a value <= 0 turns that trigger off), before each
    validation and after the last step.

    A stop signal (``stop_on_signals``) is answered at the next training batch boundary
    with a save and a clean stop; during validation, which the save before it already
    covers, by ending the fit at the next validation batch (``Stopped``): the interrupted
    validation is not logged, and the resumed run goes on from the step before it.
    ``stopped_by`` then names the signal (the same on every rank). A save that fails (a
    full disk) stops every rank with ``TrainingFailed`` and leaves the previous file as it was.

    Must come after every other callback: a save at the end of a batch then holds what
    they did with that batch (the EMA update of the weights, for one).
    """

    def __init__(self, path: Path, every_minutes: float = 2.0, every_steps: int = 0):
        self.path = Path(path)
        self.every_s = every_minutes * 60.0 if every_minutes > 0 else math.inf
        self.every_steps = max(0, every_steps)
        self._last_save = time.monotonic()
        self.saved_step: int | None = None  # the step last.ckpt holds, when known
        self.stopped_by: str | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._previous_defer = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed here, over Lightning's own SIGTERM handler (which would stop the run at the
        # end of the batch without a checkpoint, or raise SIGTERMException), so ours acts.
        self._last_save = time.monotonic()
        if trainer.ckpt_path:
            self.saved_step = trainer.global_step
        # Deferred here too, for a Trainer that fit() did not start (a ddp_spawn rank).
        self._previous_defer, STOP.defer = STOP.defer, True
        self._previous_handlers = STOP.install()

    def _restore_handlers(self) -> None:
        restore_handlers(self._previous_handlers)
        self._previous_handlers = {}
        STOP.defer = self._previous_defer

    def _due(self, trainer: L.Trainer) -> bool:
        by_time = time.monotonic() - self._last_save >= self.every_s
        return by_time or (self.every_steps > 0 and trainer.global_step % self.every_steps == 0)

    def _signalled(self, trainer: L.Trainer, *flags: bool) -> tuple[list[bool], str | None]:
        """``flags`` and the stop signal, each agreed over the ranks (a signal may reach one rank only)."""
        requested = float(signal.Signals[STOP.signame].value) if STOP.signame else 0.0
        *agreed, signum = agreed_values(trainer, *(float(f) for f in flags), requested)
        return [v > 0 for v in agreed], signal.Signals(int(signum)).name if signum > 0 else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # The last step is saved here, inside its epoch, rather than at on_train_end: a resume
        # with a larger trainer.max_steps then goes on mid-epoch, and the weights saved are
        # still the trained ones, not those an EMA callback copies in at the end.
        last_step = 0 < trainer.max_steps <= trainer.global_step
        (due,), signame = self._signalled(trainer, self._due(trainer) or last_step)
        if due or signame:
            self.save(trainer)
        if signame:
            self.stopped_by = signame
            trainer.should_stop = True
            # Lightning validates once more before an early stop: a preempted run may have
            # seconds left, and the resumed run validates on its own schedule.
            trainer.limit_val_batches = 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A stop during validation then loses no training. Saved here, before the EMA
        # callback swaps the averaged weights in for validation.
        if trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.global_step != self.saved_step:
            self.save(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        _, signame = self._signalled(trainer)
        if signame:
            self.stopped_by = signame
            raise Stopped(signame, where="during validation")

    def save(self, trainer: L.Trainer) -> None:
        io = trainer.strategy.checkpoint_io
        deferred = isinstance(io, AtomicCheckpointIO)
        if deferred:
            io.defer_errors = True
        try:
            trainer.save_checkpoint(self.path, weights_only=False)
        finally:
            if deferred:
                io.defer_errors = False
        error = io.error if deferred else None
        (failed,), _ = self._signalled(trainer, error is not None)
        if failed:
            why = f"{type(error).__name__}: {error}" if error is not None else "on rank 0"
            full = error is not None and error.errno in (errno.ENOSPC, errno.EDQUOT)
            raise TrainingFailed(f"could not write {self.path} at step {trainer.global_step} ({why}); "
                                 f"{self.holding()}; {'make room' if full else 'fix that'}")
        self._last_save = time.monotonic()
        self.saved_step = trainer.global_step

    def holding(self) -> str:
        """What last.ckpt holds now, in words."""
        if self.saved_step is not None:
            return f"{self.path} holds step {self.saved_step}"
        if self.path.exists():
            return f"{self.path} is as this run found it"
        return f"nothing was saved yet ({self.path} does not exist)"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self.saved_step:  # stopped by the clock (trainer.max_minutes) or another callback
            self.save(trainer)
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()


def agreed_values(trainer: L.Trainer, *values: float) -> list[float]:
    """Each value's maximum over the ranks: every rank must take the same decision, or the
    collectives inside a checkpoint save wait forever for the rank that skipped it."""
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        t = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()
    return list(values)


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
    ``{key: ("audio", [waves], sample_rate)}``, ``{key: ("text", [rows])}`` or
    ``{key: ("table", {"columns", "kinds", "rows", "sample_rate"})}`` (kinds: image,
    audio, text, number per column; a W&B Table, and on disk rows.jsonl with its media).
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
            elif item[0] == "table":
                self.write_table(folder / f"step-{step:07d}", item[1])
                if wandb is not None:
                    wandb.log_table(key, columns=item[1]["columns"], data=wandb_rows(item[1]))
            else:
                raise ValueError(f"media item {key!r}: unknown kind {item[0]!r}; expected 'image', 'audio', 'text' or 'table'")

    @staticmethod
    def write_table(folder: Path, table: dict[str, Any]) -> None:
        """A table as ``rows.jsonl`` with its pictures and sounds as files beside it."""
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, row in enumerate(table["rows"]):
            cells = {}
            for column, kind, cell in zip(table["columns"], table["kinds"], row):
                if kind == "image" and cell is not None:
                    cells[column] = media.save_png(folder / f"{i:03d}-{column}.png", cell).name
                elif kind == "audio" and cell is not None:
                    cells[column] = media.save_wav(folder / f"{i:03d}-{column}.wav", cell, table["sample_rate"]).name
                else:
                    cells[column] = cell
            lines.append(json.dumps(cells))
        (folder / "rows.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


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
