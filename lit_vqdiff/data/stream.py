"""Streaming shards into batches: the per-epoch plan across ranks and workers, reading, decoding.

Exact mode (the default) lays the epoch-shuffled shards end to end as one sequence of N
samples. Rank r reads positions [r * n, (r + 1) * n) with n = ceil(N / world) (positions
past N wrap to the start: padding, as torch's DistributedSampler does) or floor(N / world)
with ``drop_last``. A rank's share is cut into whole batches, and worker w reads a
contiguous run of them, opening only the shards that overlap it. Every rank therefore
yields the same number of batches, which DDP needs to not hang.

Resampled mode draws shards with replacement (seeded per epoch, rank and worker) until
each rank has yielded a fixed number of batches.

Each output position holds exactly one sample: a sample that cannot be read or decoded
is replaced by a repeat of a good one (``valid`` False) and reported with its reason in
the batch's ``skips``. Output order is a pure function of (seed, epoch, rank, worker), so
a worker resumed at batch k replays its raw stream without decoding and continues there.
"""

from __future__ import annotations

import os
import random
import tarfile
import urllib.error
import urllib.request
from bisect import bisect_right
from contextlib import closing
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from ..errors import SampleError
from .decode import DecodeSpec, check_spec, collate, decode_sample

HTTP_TIMEOUT_S = 60
_ORDER, _BUFFER, _DRAW = 0, 1, 2  # stream tags: independent generators from the same seed


@dataclass(frozen=True)
class Shard:
    url: str  # what is opened: a path, a pipe: command or an http(s) URL
    name: str  # the tar file's name: its key in sizes.json
    size: int | None  # samples, from sizes.json


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


# ----------------------------------------------------------------------------- the epoch plan


def make_rng(*parts: int) -> random.Random:
    """A generator seeded by a tuple of ints, the same in every process (no hash seed)."""
    entropy = [int(p) % 2**32 for p in parts]
    return random.Random(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """Shard order of an epoch: the same on every rank, different from epoch to epoch."""
    order = list(range(count))
    make_rng(seed, epoch, _ORDER).shuffle(order)
    return order


def rank_share(total: int, world: int, drop_last: bool) -> int:
    """Samples each rank reads: ceil (with padding) or floor (``drop_last``) of total / world."""
    return total // world if drop_last else -(-total // world)


def worker_range(per_rank: int, batch_size: int, worker: int, workers: int) -> tuple[int, int]:
    """[start, stop) within a rank's share for one worker: a contiguous run of whole batches."""
    batches = -(-per_rank // batch_size)
    first, last = batches * worker // workers, batches * (worker + 1) // workers
    return min(first * batch_size, per_rank), min(last * batch_size, per_rank)


@dataclass(frozen=True)
class Segment:
    shard: int  # index into the shard list
    start: int  # first and past-the-last sample position inside the shard
    stop: int
    padding: bool  # positions past the epoch's end, repeated from its start


def plan_segments(start: int, stop: int, order: list[int], sizes: list[int]) -> list[Segment]:
    """Positions [start, stop) of the sequence of shards laid end to end in ``order``, as per-shard runs."""
    ordered = [sizes[i] for i in order]
    total = sum(ordered)
    offsets = np.cumsum([0] + ordered[:-1]).tolist()
    out, position = [], start
    while position < stop:
        wrapped = position % total
        k = bisect_right(offsets, wrapped) - 1  # the last shard starting at or before it (skips empty ones)
        first = wrapped - offsets[k]
        take = min(ordered[k] - first, stop - position)
        out.append(Segment(order[k], first, first + take, padding=position >= total))
        position += take
    return out


def usable_workers(shards: int, world: int, workers: int) -> int:
    """Loader workers per rank that get shards of their own (at least 1): more workers than
    shards per rank would all read, and skip through, the same files."""
    return max(1, min(workers, shards // world))


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class RawSample:
    key: str
    shard: str
    members: dict[str, bytes]
    valid: bool  # False for padding repeats


@dataclass(frozen=True)
class Failure:
    reason: str  # one of decode.SKIP_REASONS
    shard: str
    key: str
    detail: str


def open_url(url: str) -> BinaryIO:
    """An http(s) response to read from; an HTTP error status raises OSError."""
    try:
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        err.close()  # it holds the connection open otherwise
        raise OSError(f"HTTP {err.code} {err.reason} for {url}") from None


def open_stream(url: str) -> BinaryIO:
    """Open a shard for reading: http(s) with urllib, paths and pipe: commands with webdataset."""
    return open_url(url) if is_url(url) else gopen(url, "rb")


def tar_samples(stream: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a tar stream; members of a sample are adjacent."""
    key, members = None, {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            prefix, suffix = base_plus_ext(info.name)
            if not info.isreg() or prefix is None or os.path.basename(info.name).startswith("__"):
                continue
            if prefix != key:
                if key is not None:
                    yield key, members
                key, members = prefix, {}
            members[suffix.lower()] = tar.extractfile(info).read()  # type: ignore[union-attr]
    if key is not None:
        yield key, members


def close_quietly(stream: BinaryIO | None) -> None:
    if stream is None:
        return
    try:
        stream.close()
    except Exception:  # a pipe closed before its end exits on SIGPIPE; what was read already counts
        pass


def read_shard(shard: Shard, start: int, stop: int | None, valid: bool) -> Iterator[RawSample | Failure]:
    """Samples [start, stop) of a shard (all of it when ``stop`` is None); each one missing is a Failure."""
    position, error, stream = 0, None, None
    try:
        stream = open_stream(shard.url)
        with closing(tar_samples(stream)) as samples:
            for key, members in samples:
                if position >= start:
                    yield RawSample(key, shard.name, members, valid)
                position += 1
                if stop is not None and position >= stop:
                    break
    except Exception as err:  # any failure to open or read a shard becomes counted skips, never a dead worker
        error = err
    finally:
        close_quietly(stream)
    reason = "unreadable" if position == 0 else "truncated"
    if error is not None:
        detail = f"{type(error).__name__}: {error}"
    else:
        detail = f"ends after {position} samples, sizes.json says {shard.size}"
    if stop is None:
        if error is not None or position == 0:
            yield Failure(reason, shard.name, f"<sample {position}>", detail)
        return
    for missing in range(max(position, start), stop):
        yield Failure(reason, shard.name, f"<sample {missing}>", detail)


def shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Items through a shuffle buffer of ``size`` (no shuffling when size <= 1)."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def fill_failures(results: Iterable[tuple[dict, bool] | Failure]) -> Iterator[tuple[dict, bool, Failure | None]]:
    """(sample, valid, failure) per input: a failure is replaced by the last good sample.

    Before the first good sample there is nothing to repeat: failures wait and are
    repeated right after it, so the count of outputs always equals the count of inputs.
    """
    last, owed = None, []
    for result in results:
        if not isinstance(result, Failure):
            last = result[0]
            yield last, result[1], None
            for failure in owed:
                yield last, False, failure
            owed = []
        elif last is not None:
            yield last, False, result
        else:
            owed.append(result)
    if owed:
        shards = sorted({f.shard for f in owed})
        raise RuntimeError(f"no usable sample in a worker's share of the epoch; shards {shards}: {owed[0].detail}")


def worker_identity() -> tuple[int, int]:
    """(worker id, number of workers) inside a DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# ----------------------------------------------------------------------------- the dataset


class ShardStream(IterableDataset):
    """One rank's batches of decoded samples, split across DataLoader workers.

    ``epoch``, ``resume`` (batches each worker share skips) and ``first_worker`` (the share
    DataLoader worker 0 reads) are set in the main process before each ``iter(DataLoader)``:
    workers get a copy of the dataset at that moment.
    Batches carry ``valid`` (False on padding and replacements) and bookkeeping for the
    main process: ``worker``, ``worker_batch`` (index in the worker's epoch) and ``skips``.
    """

    def __init__(
        self,
        shards: list[Shard],
        spec: DecodeSpec,
        *,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        workers: int = 1,
        seed: int = 0,
        mode: str = "exact",
        shuffle: bool = True,
        shuffle_buffer: int = 0,
        drop_last: bool = False,
        batches_per_epoch: int = 0,
    ):
        if mode not in ("exact", "resampled"):
            raise ValueError(f"data.mode={mode!r}: expected 'exact' or 'resampled'")
        if batch_size <= 0 or workers <= 0 or world <= 0 or not 0 <= rank < world:
            raise ValueError(
                f"need batch_size, workers, world > 0 and 0 <= rank < world;"
                f" got batch_size={batch_size}, workers={workers}, world={world}, rank={rank}"
            )
        if not shards:
            raise ValueError("no shards to read")
        unsized = [s.name for s in shards if s.size is None]
        if unsized and (mode == "exact" or batches_per_epoch <= 0):
            need = "exact mode" if mode == "exact" else "data.batches_per_epoch=0"
            raise ValueError(
                f"{need} needs the sample count of every shard; {len(unsized)} are not in sizes.json"
                f" (e.g. {unsized[0]} from {shards[0].url}); write sizes.json or set data.sizes"
            )
        check_spec(spec)
        self.shards, self.spec, self.batch_size = shards, spec, batch_size
        self.rank, self.world, self.workers, self.seed = rank, world, workers, seed
        self.mode, self.shuffle, self.shuffle_buffer, self.drop_last = mode, shuffle, shuffle_buffer, drop_last
        self.total = sum(s.size or 0 for s in shards)
        if mode == "exact":
            self.per_rank = rank_share(self.total, world, drop_last)
            if self.per_rank == 0:
                raise ValueError(f"{self.total} samples cannot give every one of {world} ranks a sample")
            self.batches = -(-self.per_rank // batch_size)
        else:
            self.batches = batches_per_epoch if batches_per_epoch > 0 else max(1, self.total // (world * batch_size))
            self.per_rank = self.batches * batch_size
        self.epoch, self.resume, self.first_worker = 0, [0] * workers, 0

    @property
    def padding(self) -> int:
        """Samples repeated per epoch (over all ranks) to even them out; 0 in resampled mode."""
        return self.per_rank * self.world - self.total if self.mode == "exact" and not self.drop_last else 0

    @property
    def dropped(self) -> int:
        """Samples left out per epoch by ``drop_last``."""
        return self.total - self.per_rank * self.world if self.mode == "exact" and self.drop_last else 0

    def __len__(self) -> int:
        return self.batches

    def worker_span(self, worker: int) -> tuple[int, int]:
        """[start, stop) of this rank's epoch positions that ``worker`` yields."""
        if self.mode == "exact":
            return worker_range(self.per_rank, self.batch_size, worker, self.workers)
        first, last = self.batches * worker // self.workers, self.batches * (worker + 1) // self.workers
        return first * self.batch_size, last * self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        physical, workers = worker_identity()
        if workers != self.workers:
            raise RuntimeError(f"stream planned for {self.workers} workers runs under {workers}")
        # The DataLoader takes batches round robin from worker 0; a resumed epoch rotates the
        # shares so that the interleaving continues exactly where it stopped.
        worker = (physical + self.first_worker) % workers
        start, stop = self.worker_span(worker)
        raw = self._exact_raw(start, stop) if self.mode == "exact" else self._resampled_raw(worker)
        items = shuffled(raw, self.shuffle_buffer, make_rng(self.seed, self.epoch, self.rank, worker, _BUFFER))
        # Skipped positions are read (to keep the order) but never decoded.
        skip = self.resume[worker] * self.batch_size
        outputs = fill_failures(self._decoded(islice(items, skip, stop - start)))
        index = self.resume[worker]
        while chunk := list(islice(outputs, self.batch_size)):
            yield self._batch(chunk, worker, index)
            index += 1

    def _exact_raw(self, start: int, stop: int) -> Iterator[RawSample | Failure]:
        order = epoch_order(len(self.shards), self.seed, self.epoch) if self.shuffle else list(range(len(self.shards)))
        base = self.rank * self.per_rank
        sizes = [s.size or 0 for s in self.shards]
        runs = plan_segments(base + start, base + stop, order, sizes)
        return chain.from_iterable(read_shard(self.shards[r.shard], r.start, r.stop, not r.padding) for r in runs)

    def _resampled_raw(self, worker: int) -> Iterator[RawSample | Failure]:
        rng = make_rng(self.seed, self.epoch, self.rank, worker, _DRAW)
        empty_in_a_row, limit = 0, max(8, 2 * len(self.shards))
        while True:
            shard = rng.choice(self.shards)
            got = False
            for item in read_shard(shard, 0, None, True):
                got |= isinstance(item, RawSample)
                yield item
            empty_in_a_row = 0 if got else empty_in_a_row + 1
            if empty_in_a_row >= limit:
                raise RuntimeError(f"resampled mode: {limit} shards in a row gave no sample; the last was {shard.url}")

    def _decoded(self, items: Iterable[RawSample | Failure]) -> Iterator[tuple[dict, bool] | Failure]:
        for item in items:
            if isinstance(item, Failure):
                yield item
                continue
            try:
                yield decode_sample(item.members, self.spec) | {"key": item.key}, item.valid
            except SampleError as err:
                yield Failure(err.reason, item.shard, item.key, err.detail)

    def _batch(self, chunk: list[tuple[dict, bool, Failure | None]], worker: int, index: int) -> dict[str, Any]:
        batch = collate([sample for sample, _, _ in chunk])
        batch["valid"] = torch.tensor([valid for _, valid, _ in chunk], dtype=torch.bool)
        # Counted where the samples enter training: padding repeats are not counted again.
        truncated = batch.pop("text_truncated", None)
        batch["truncated_captions"] = int((truncated & batch["valid"]).sum()) if truncated is not None else 0
        batch["worker"], batch["worker_batch"] = worker, index
        batch["skips"] = [(f.reason, f.shard, f.key, f.detail) for _, _, f in chunk if f is not None]
        return batch
