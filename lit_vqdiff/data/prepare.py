"""A run's data set before training starts: where its description is, and shapes-v1
rendering itself on first use (any other data set must already be written, with
`lit-vqdiff shards write ...`, or described, with `lit-vqdiff shards check --describe`).

Also how the processes of a multi-process launch share what one of them builds (the
shapes-v1 shards here, the token cache in the pipeline): rank 0 builds it inside
``reported_to_waiters``, which leaves a failure marker beside it when the build fails or
is stopped; the others ``wait_for_rank_zero``, which ends at the marker with rank 0's
error, or at a deadline.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import RankZeroFailed, Stopped
from . import shapes
from .datamodule import beside, shard_urls
from .description import DESCRIPTION_FILE, read_description, shapes_description
from .shards import SIZES_FILE, read_sizes, read_source, write_shapes_set
from .stream import is_url, open_url


def shards_present(root: Path, split: str) -> bool:
    sizes = read_sizes(root)
    return any(name.startswith(f"{split}-") for name in sizes) and any(root.glob(f"{split}-*.tar"))


def renders_shapes(data: Any) -> bool:
    """True for the data config of shapes-v1 rendered into ``data.root`` (the default one, or
    the folder of a hold-out beside it)."""
    explicit = bool(data.train or data.val)
    names = {shapes.NAME} | {f"{shapes.NAME}-{h}" for h in shapes.HOLDOUTS if h != "none"}
    return not explicit and (data.name in names or (not data.name and Path(data.root).name in names))


FAILED_SUFFIX = ".failed"
CLOCK_SLACK_S = 5.0  # how far the clocks of the nodes sharing a file system may disagree
WAIT_POLL_S = 1.0


def failure_marker(target: Path) -> Path:
    """Where rank 0 reports that building ``target`` failed: a hidden file beside it."""
    return target.parent / f".{target.name}{FAILED_SUFFIX}"


@contextmanager
def reported_to_waiters(target: Path) -> Iterator[None]:
    """Rank 0 building ``target`` for every rank: an error or a stop inside the block is
    written to ``failure_marker(target)`` before it propagates, so the waiting ranks end
    at once with it; a marker from an earlier attempt is removed first."""
    marker = failure_marker(Path(target))
    marker.unlink(missing_ok=True)
    try:
        yield
    except BaseException as err:
        record = {"error": f"{type(err).__name__}: {err}", "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
        tmp = marker.with_name(marker.name + f".tmp{os.getpid()}")
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record) + "\n")
            tmp.replace(marker)
        except OSError:  # a full disk may be what failed; the waiters then meet their deadline
            tmp.unlink(missing_ok=True)
        raise


def process_start_time() -> float:
    """When this process started (wall clock), from /proc; the import of this module elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return IMPORTED_AT


IMPORTED_AT = time.time()


def rank_zero_failure(target: Path) -> str | None:
    """Rank 0's error from the failure marker of ``target``, if it wrote one during this launch.

    A marker older than this process is from an earlier attempt that rank 0 will clear:
    every process of a launch starts before rank 0 can fail.
    """
    marker = failure_marker(Path(target))
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if float(record.get("time", 0.0)) < process_start_time() - CLOCK_SLACK_S:
        return None
    return f"{record.get('error')} (host {record.get('host')}, pid {record.get('pid')})"


def wait_for_rank_zero(ready: Callable[[], bool], target: Path, what: str, wait_s: float) -> None:
    """Wait until ``ready()``: rank 0 builds ``what`` at ``target``. Ends with RankZeroFailed
    as soon as rank 0 reports a failure, or with TimeoutError after ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while not ready():
        failure = rank_zero_failure(target)
        if failure is not None:
            raise RankZeroFailed(f"rank 0 failed to build {what}: {failure}; this rank stops too")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {wait_s:.0f}s for rank 0 to build {what}, and it reported no failure "
                               f"({failure_marker(Path(target))}); is rank 0 still running?")
        time.sleep(WAIT_POLL_S)


def ensure_dataset(data: Any, wait_s: float = 600.0) -> None:
    """Write the shapes-v1 shards under ``data.root`` if they are missing (rank 0 only;
    other processes of a multi-process launch wait for ``sizes.json``)."""
    if data.train or data.val:
        return  # explicit shard patterns: the user's data, checked when it is opened
    root = Path(data.root)
    if shards_present(root, "train") and shards_present(root, "val"):
        return
    if not renders_shapes(data):
        raise FileNotFoundError(
            f"data.root={root}: no train-*.tar/val-*.tar shards with a {SIZES_FILE}; write them first "
            f"(`lit-vqdiff shards write images|sounds|mnist|fashion --out {root}`) or set data.train/data.val"
        )
    if int(os.environ.get("RANK", "0")) != 0 or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        wait_for_rank_zero(lambda: shards_present(root, "train") and shards_present(root, "val"), root,
                           f"the shapes-v1 shards under {root}", wait_s)
        return
    s = data.shapes
    print(f"writing shapes-v1 shards to {root} ({s.train_samples} train, {s.val_samples} val)")
    try:
        with reported_to_waiters(root):
            write_shapes_set(root, s.train_samples, s.val_samples, s.train_seed, s.val_seed, s.shard_size, progress=True,
                             holdout=s.holdout)
    except Stopped as stop:
        raise stop.during(f"while writing the shapes-v1 shards under {root}", "nothing was kept; the next run writes them again") from None


def description_location(data: Any) -> str:
    """Where the data set's dataset.json is: beside the first train shard, else under data.root."""
    if data.train:
        return beside(shard_urls(str(data.train), str(data.root), "train")[0], DESCRIPTION_FILE)
    return str(Path(data.root) / DESCRIPTION_FILE)


def load_description(data: Any) -> tuple[dict[str, Any] | None, str]:
    """The data set's description and where it was looked for.

    shapes-v1 needs none on disk: its description is known before it is rendered (and
    older shapes-v1 sets, written before descriptions existed, are recognized by their
    source.json). None when a user's shards have not been described.
    """
    where = description_location(data)
    if is_url(where):
        try:
            with open_url(where) as response:
                description = json.loads(response.read().decode("utf-8"))
        except OSError:
            description = None
        return description, where
    description = read_description(Path(where))
    if description is not None:
        return description, where
    folder = Path(where).parent
    written_as = ((read_source(folder) or {}).get("params") or {}).get("source")
    if written_as == shapes.NAME or (renders_shapes(data) and not shards_present(folder, "train")):
        return shapes_description(data.shapes.train_samples, data.shapes.val_samples, data.shapes.holdout), where
    return None, where


def holdout_root(data: Any) -> str:
    """Where shapes-v1 with a hold-out renders: beside the full set (``data/shapes-v1-compositional``),
    never over it; any other root stays as it is."""
    if renders_shapes(data) and data.shapes.holdout != "none" and Path(data.root).name == shapes.NAME:
        return f"{data.root}-{data.shapes.holdout}"
    return str(data.root)
