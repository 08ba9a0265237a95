"""The LightningDataModule over WebDataset shards: sources, skip accounting, resume.

Sources (``data.train`` / ``data.val``): a brace pattern of paths, a folder (every
``*.tar`` in it), ``pipe:`` commands or ``http(s)://`` URLs; empty means
``data.root/<split>-*.tar``. Sample counts come from the ``sizes.json`` beside the
shards (for ``pipe:``, beside the last ``.tar`` argument) unless ``data.sizes`` names one.

Batches are built inside DataLoader workers (``batch_size=None``); the main process
takes their bookkeeping off in ``StreamTracker.record``: which worker, which of its
batches, and the samples it had to skip. That gives

- ``skipped()``: counts per reason for ``data/skipped_<reason>``, warnings once per
  shard and reason, and a ``DataQualityError`` naming the worst shards once an epoch's
  skips pass ``data.max_skip_fraction`` of the samples the rank reads in it;
- ``state_dict()``: the epoch and the batches consumed from each worker, on every rank,
  so that a run resumed mid-epoch continues exactly where it stopped.
"""

from __future__ import annotations

import atexit
import glob
import json
import logging
import multiprocessing
import multiprocessing.util  # noqa: F401  (registers its exit handler before ours)
import os
import shlex
import signal
import time
import weakref
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urljoin, urlparse

import braceexpand
import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from ..errors import SKIP_REASONS, STOP_SIGNALS
from .decode import DecodeSpec
from .stream import Shard, ShardStream, is_url, open_url, usable_workers
from .shards import SIZES_FILE

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- sources


def tar_path(url: str) -> str:
    """The .tar a shard URL reads: the URL itself, or the last .tar argument of a pipe: command."""
    if not url.startswith("pipe:"):
        return url
    tars = [token for token in url[len("pipe:") :].split() if ".tar" in token]
    return tars[-1] if tars else url


def shard_name(url: str) -> str:
    path = tar_path(url)
    return os.path.basename(urlparse(path).path if is_url(path) else path)


def beside(url: str, filename: str) -> str:
    """Where a file beside a shard's .tar sits (sizes.json, dataset.json): a path or a URL."""
    path = tar_path(url)
    return urljoin(path, filename) if is_url(path) else str(Path(path).parent / filename)


def sizes_location(url: str) -> str:
    """Where sizes.json sits for a shard: beside its .tar file."""
    return beside(url, SIZES_FILE)


GLOB_CHARS = set("*?[")


def expand_shards(spec: str) -> list[str]:
    """The shards a spec names, in order. The same rules wherever shards are named
    (``data.train``, ``data.val``, ``shards check``): a ``pipe:`` command is one entry;
    otherwise whitespace separates entries (quotes group), and each is an http(s) URL, a
    folder (its ``*.tar``), a glob, or a path, brace patterns expanded in all of them.
    Paths that do not exist are kept, for the caller to report."""
    if spec.startswith("pipe:"):
        return list(braceexpand.braceexpand(spec))
    out: list[str] = []
    for entry in shlex.split(spec):
        for item in braceexpand.braceexpand(entry):
            if is_url(item):
                out.append(item)
            elif os.path.isdir(item):
                found = sorted(glob.glob(os.path.join(item, "*.tar")))
                if not found:
                    raise FileNotFoundError(f"{item!r} is a folder without *.tar shards")
                out += found
            elif GLOB_CHARS & set(item):
                found = sorted(glob.glob(item))
                if not found:
                    raise FileNotFoundError(f"{item!r} matches no file")
                out += found
            else:
                out.append(item)
    return list(dict.fromkeys(out))


def shard_urls(spec: str, root: str, split: str) -> list[str]:
    """Shard URLs of a split: ``spec`` as ``expand_shards`` reads it, or root/<split>-*.tar when empty."""
    if not spec:
        found = sorted(glob.glob(os.path.join(root, f"{split}-*.tar")))
        if not found:
            raise FileNotFoundError(f"data.{split} is empty and data.root={root!r} holds no {split}-*.tar shards")
        return found
    try:
        urls = expand_shards(spec)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.{split}={spec!r}: {err}") from None
    missing = [u for u in urls if not is_url(u) and not u.startswith("pipe:") and not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(
            f"data.{split}={spec!r}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}"
        )
    return urls


def load_sizes(location: str) -> dict[str, int] | None:
    """Shard name -> sample count from a sizes.json path or URL; None when there is none."""
    try:
        if is_url(location):
            with open_url(location) as response:
                text = response.read().decode("utf-8")
        else:
            text = Path(location).read_text()
    except OSError:  # a missing file, an HTTP error status
        return None
    try:
        sizes = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{location}: not valid JSON ({err})") from None
    if not isinstance(sizes, dict) or not all(isinstance(v, int) and v >= 0 for v in sizes.values()):
        raise ValueError(f"{location}: expected a mapping of shard name to sample count")
    return sizes


def resolve_shards(spec: str, root: str, split: str, sizes: str = "") -> list[Shard]:
    """The shards of a split with their sizes (``sizes``: a sizes.json path or URL; "" = beside them)."""
    urls = shard_urls(spec, root, split)
    known: dict[str, int] = {}
    for location in [sizes] if sizes else sorted({sizes_location(u) for u in urls}):
        found = load_sizes(location)
        if found is None and sizes:
            raise FileNotFoundError(f"data.sizes={sizes!r} cannot be read")
        known |= found or {}
    return [Shard(u, shard_name(u), known.get(shard_name(u))) for u in urls]


# ----------------------------------------------------------------------------- accounting


TRUNCATED = "truncated_captions"  # counted like a skip reason, but the sample is used


class DataQualityError(RuntimeError):
    """More samples were skipped than ``data.max_skip_fraction`` allows."""


def gather_across_ranks(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (a collective: every rank must call it)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


class StreamTracker:
    """Main-process record of one split's stream on one rank: position, skips, warnings."""

    def __init__(self, split: str, max_skip_fraction: float, resumable: bool):
        self.split, self.max_skip_fraction, self.resumable = split, max_skip_fraction, resumable
        self.epoch, self.rank, self.world, self.planned = 0, 0, 1, 0
        self.consumed: list[int] = []  # batches taken from each worker share this epoch
        self.next_worker = 0  # the share whose batch comes next, round robin
        self.epoch_skips: Counter[tuple[str, str]] = Counter()  # (shard, reason) -> count, this epoch
        self.totals: Counter[str] = Counter()  # reason -> count, whole run
        self.warned: set[tuple[str, str]] = set()
        self.pending: dict[str, Any] | None = None

    def start(self, epoch: int, stream: ShardStream) -> None:
        """Set ``stream`` up for a pass over ``epoch``: from its start, or where a loaded state stopped."""
        pending, self.pending = self.pending, None
        self.epoch, self.rank, self.world, self.planned = epoch, stream.rank, stream.world, stream.per_rank
        self.consumed, self.next_worker, self.epoch_skips = [0] * stream.workers, 0, Counter()
        if pending is not None and pending["epoch"] == epoch:
            if (pending["world"], pending["workers"]) != (stream.world, stream.workers):
                raise ValueError(
                    f"cannot resume the {self.split} stream mid-epoch: saved with {pending['world']} ranks x"
                    f" {pending['workers']} workers, now {stream.world} x {stream.workers}"
                )
            self.consumed, self.next_worker = list(pending["consumed"]), pending["next_worker"]
            self.epoch_skips = Counter({(shard, reason): n for shard, reason, n in pending["epoch_skips"]})
        stream.epoch, stream.resume, stream.first_worker = epoch, list(self.consumed), self.next_worker

    def record(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Take the bookkeeping off a batch and account for it; raises past the skip budget."""
        worker, index, skips = batch.pop("worker"), batch.pop("worker_batch"), batch.pop("skips")
        self.consumed[worker], self.next_worker = index + 1, (worker + 1) % len(self.consumed)
        truncated = batch.pop("truncated_captions", 0)
        if truncated:
            self.totals[TRUNCATED] += truncated
            if TRUNCATED not in self.warned:
                self.warned.add(TRUNCATED)
                log.warning("%s: %d caption(s) in this batch are longer than data.text_bytes and were cut; "
                            "further ones are counted as data/truncated_captions", self.split, truncated)
        for reason, shard, key, detail in skips:
            self.totals[reason] += 1
            self.epoch_skips[(shard, reason)] += 1
            if (shard, reason) not in self.warned:
                self.warned.add((shard, reason))
                log.warning(
                    "%s: skipped a sample (%s) in %s, key %s: %s; further ones in this shard are only counted",
                    self.split, reason, shard, key, detail,
                )
        if skips:
            self.check_budget()
        return batch

    def check_budget(self) -> None:
        """Stop once this epoch's skips exceed the share of its planned samples that is allowed."""
        skipped = sum(self.epoch_skips.values())
        budget = int(self.max_skip_fraction * self.planned)
        if skipped <= budget:
            return
        per_shard: dict[str, Counter[str]] = {}
        for (shard, reason), n in self.epoch_skips.items():
            per_shard.setdefault(shard, Counter())[reason] += n
        worst = sorted(per_shard.items(), key=lambda kv: -sum(kv[1].values()))[:3]
        named = "; ".join(f"{shard} ({', '.join(f'{r} {n}' for r, n in c.most_common())})" for shard, c in worst)
        raise DataQualityError(
            f"{self.split}: {skipped} of the {self.planned} samples of epoch {self.epoch} on rank {self.rank} were"
            f" skipped, more than data.max_skip_fraction={self.max_skip_fraction} allows ({budget});"
            f" worst shards: {named}"
        )

    def state_dict(self) -> dict[str, Any]:
        position = {"epoch": self.epoch, "world": self.world, "workers": len(self.consumed)}
        position |= {"consumed": self.consumed, "next_worker": self.next_worker}
        skips = [[shard, reason, n] for (shard, reason), n in sorted(self.epoch_skips.items())]
        return {"totals": dict(self.totals), "epoch_skips": skips} | (position if self.resumable else {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals = Counter(state["totals"])
        self.pending = state if self.resumable and "consumed" in state and state["consumed"] else None


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's start: SIGTERM, SIGINT and SIGUSR1 are the trainer's to answer.

    A signal sent to the whole process group (``timeout``, ``scancel``, Ctrl-C, a pod stop)
    reaches the workers too; one that died of it would take the trainer down with a
    traceback before it could save. The signals were blocked while the worker started
    (``stop_signals_blocked``), so none slips in before this.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold SIGTERM, SIGINT and SIGUSR1 back in this thread while loader workers start: they
    inherit the mask, and a signal held back is delivered here once the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StreamLoader:
    """A sized iterable of batches: a DataLoader over a ShardStream, recorded by a StreamTracker.

    Deliberately not a DataLoader subclass: Lightning then neither re-instantiates it nor
    warns about an IterableDataset with ``__len__``; ``state_dict``/``load_state_dict``
    make it resumable in Lightning's loops too. Its length stays the full epoch's when
    resuming, because Lightning counts the batches it already ran.
    """

    def __init__(
        self,
        stream: ShardStream,
        tracker: StreamTracker,
        num_workers: int,
        persistent: bool,
        epoch_fn: Callable[[], int],
    ):
        self.stream, self.tracker, self.epoch_fn = stream, tracker, epoch_fn
        self.fetch_seconds = 0.0  # blocked on the loader, read by perf.DataWaitTimer
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=persistent and num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
        )
        self._batches: weakref.ref | None = None  # the iterator of the current pass
        if num_workers > 0:
            OPEN_LOADERS.add(self)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Set up before iter(DataLoader): workers take a copy of the stream when they start.
        self.tracker.start(self.epoch_fn(), self.stream)
        start = time.perf_counter()
        with stop_signals_blocked():
            batches = iter(self.loader)  # starts the workers of a non-persistent loader
        self._batches = weakref.ref(batches)
        self.fetch_seconds += time.perf_counter() - start
        return map(self.tracker.record, self._timed(batches))

    def _timed(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The batches, adding the time spent waiting for each to ``fetch_seconds``."""
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.fetch_seconds += time.perf_counter() - start
            yield batch

    def close(self) -> None:
        """Stop the workers now; Lightning does it at teardown only for DataLoader objects,
        and never when the fit ends with an exception (a stop signal included)."""
        current = self._batches() if self._batches is not None else None
        for iterator in (self.loader._iterator, current):  # the DataLoader keeps a persistent one to reuse its workers
            if isinstance(iterator, _MultiProcessingDataLoaderIter):
                iterator._shutdown_workers()
        self.loader._iterator, self._batches = None, None

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": gather_across_ranks(self.tracker.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(own_rank_state(state["ranks"], self.stream.rank, self.stream.world))


# Loaders with workers, so that the workers are stopped before the interpreter exits:
# multiprocessing's own exit handler sends them SIGTERM, which they ignore
# (ignore_stop_signals), and would then wait for them forever.
OPEN_LOADERS: weakref.WeakSet[StreamLoader] = weakref.WeakSet()


@atexit.register  # after multiprocessing.util's own handler (imported above): atexit runs last-in first-out
def close_open_loaders() -> None:
    for loader in list(OPEN_LOADERS):
        try:
            loader.close()
        except Exception as err:  # one broken loader must not leave the others' workers behind
            log.warning("could not stop a loader's workers cleanly: %s", err)
    # Workers of a loader that is gone but whose iterator lingers (a reference cycle not yet
    # collected) are still daemonic children; SIGTERM would not stop them, SIGKILL does.
    lingering = [child for child in multiprocessing.active_children() if child.daemon and child.is_alive()]
    if lingering:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report these deaths as worker failures
    for child in lingering:
        child.kill()
        child.join(timeout=5)


def own_rank_state(states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
    """This rank's entry of a state gathered from every rank, checking the rank count."""
    if len(states) != world:
        raise ValueError(f"the data state was saved by {len(states)} ranks; this run has {world}")
    return states[rank]


class ShardDataModule(L.LightningDataModule):
    """Train and val streams over shards for a stage that needs ``modalities``.

    Train: epoch-seeded shard order, ``data.mode`` exact or resampled, shuffle buffer.
    Val: exact, in shard order, no shuffling; padding repeats are marked ``valid`` False.
    Without a Trainer, ``set_epoch`` picks the train epoch.
    """

    def __init__(self, cfg: Any, modalities: tuple[str, ...], seed: int = 0):
        super().__init__()
        self.cfg, self.seed, self.epoch = cfg, int(seed), 0
        self.spec = DecodeSpec.from_config(cfg, tuple(modalities))
        check_data_config(cfg)
        fraction = float(cfg.max_skip_fraction)
        self.trackers = {
            "train": StreamTracker("train", fraction, resumable=True),
            "val": StreamTracker("val", fraction, resumable=False),
        }
        self._shards: dict[str, list[Shard]] = {}
        self._reported = False
        self._loaders: list[StreamLoader] = []  # a Trainer's loaders, to stop at teardown

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shards(self, split: str) -> list[Shard]:
        """The shards of ``train`` or ``val``, resolved once (sizes.json may come over HTTP)."""
        if split not in self._shards:
            spec = str(self.cfg.train if split == "train" else self.cfg.val)
            self._shards[split] = resolve_shards(spec, str(self.cfg.root), split, str(self.cfg.sizes))
        return self._shards[split]

    def rank_world(self) -> tuple[int, int]:
        """(rank, world size) from the Trainer, else torch.distributed, else (0, 1)."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def train_stream(self, rank: int, world: int, workers: int) -> ShardStream:
        cfg = self.cfg
        shards = self.shards("train")
        return ShardStream(
            shards, self.spec, batch_size=int(cfg.batch_size), rank=rank, world=world, workers=workers,
            seed=self.seed, mode=str(cfg.mode), shuffle=True, shuffle_buffer=int(cfg.shuffle_buffer),
            drop_last=bool(cfg.drop_last), batches_per_epoch=int(cfg.batches_per_epoch),
        )  # fmt: skip

    def train_dataloader(self) -> StreamLoader:
        rank, world = self.rank_world()
        num_workers = int(self.cfg.num_workers)
        shards = len(self.shards("train"))
        if self.cfg.mode == "exact" and num_workers > 0:
            num_workers = usable_workers(shards, world, num_workers)
        stream = self.train_stream(rank, world, max(1, num_workers))
        if rank == 0 and not self._reported:
            self._reported = True
            if num_workers < int(self.cfg.num_workers):
                log.warning("train: %d shard(s) for %d rank(s) x %d workers: reading with %d worker(s) per rank; "
                            "write smaller shards to use more", shards, world, self.cfg.num_workers, num_workers)
            if stream.padding or stream.dropped:
                change = f"{stream.padding} repeated as padding" if stream.padding else f"{stream.dropped} dropped"
                log.warning("train: %d samples on %d ranks, %s: each reads %d", stream.total, world, change, stream.per_rank)
        # Not persistent: each epoch's workers must start from the stream with its new epoch.
        loader = StreamLoader(stream, self.trackers["train"], num_workers, persistent=False, epoch_fn=self.current_epoch)
        if self.trainer is not None:
            self._loaders.append(loader)
        return loader

    def val_dataloader(self) -> StreamLoader:
        rank, world = self.rank_world()
        shards = self.shards("val")
        # Validation sets are small: fewer workers when shards are few.
        num_workers = min(int(self.cfg.num_workers), len(shards) // world)
        stream = ShardStream(
            shards, self.spec, batch_size=int(self.cfg.val_batch_size), rank=rank, world=world,
            workers=max(1, num_workers), seed=self.seed, mode="exact", shuffle=False,
        )  # fmt: skip
        # Persistent workers are safe here: every validation pass reads the same stream.
        loader = StreamLoader(stream, self.trackers["val"], num_workers, persistent=True, epoch_fn=lambda: 0)
        if self.trainer is not None:  # a loader its user drops shuts its workers down as garbage
            self._loaders.append(loader)
        return loader

    def teardown(self, stage: str) -> None:
        """Stop the workers of the Trainer's loaders (persistent ones would outlive it)."""
        for loader in self._loaders:
            loader.close()
        self._loaders.clear()

    def current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else self.epoch

    def samples_per_epoch(self, rank: int, world: int) -> int:
        """Train samples rank ``rank`` of ``world`` reads per epoch, padding included."""
        if not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        return self.train_stream(rank, world, 1).per_rank

    def skipped(self) -> dict[str, int]:
        """Samples skipped on this rank so far, per reason (every reason, zeros included)."""
        totals = self.trackers["train"].totals + self.trackers["val"].totals
        return {reason: totals[reason] for reason in SKIP_REASONS}

    def truncated_captions(self) -> int:
        """Captions cut to data.text_bytes on this rank so far (their samples were used)."""
        return self.trackers["train"].totals[TRUNCATED] + self.trackers["val"].totals[TRUNCATED]

    def state_dict(self) -> dict[str, Any]:
        """Every rank's stream position and skip counts; a collective under torch.distributed."""
        return {split: gather_across_ranks(t.state_dict()) for split, t in self.trackers.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank, world = self.rank_world()
        for split, tracker in self.trackers.items():
            tracker.load_state_dict(own_rank_state(state_dict[split], rank, world))
        # Without a Trainer the next train pass continues the saved epoch (a Trainer sets its own).
        self.epoch = int(state_dict["train"][rank].get("epoch", self.epoch))


def check_data_config(cfg: Any) -> None:
    """Errors naming the data.* value at fault, for what the stream cannot work with."""
    if cfg.mode not in ("exact", "resampled"):
        raise ValueError(f"data.mode={cfg.mode!r}: expected 'exact' or 'resampled'")
    for key in ("batch_size", "val_batch_size"):
        if int(getattr(cfg, key)) <= 0:
            raise ValueError(f"data.{key}={getattr(cfg, key)}: must be positive")
    for key in ("num_workers", "shuffle_buffer", "batches_per_epoch"):
        if int(getattr(cfg, key)) < 0:
            raise ValueError(f"data.{key}={getattr(cfg, key)}: must be >= 0")
    if not 0.0 <= float(cfg.max_skip_fraction) <= 1.0:
        raise ValueError(f"data.max_skip_fraction={cfg.max_skip_fraction}: must be in [0, 1]")
