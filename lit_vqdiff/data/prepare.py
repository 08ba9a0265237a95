"""Making sure a run's data exists before training starts: shapes-v1 renders itself on
first use; any other data set must already be written (`lit-vqdiff shards write ...`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .shards import SIZES_FILE, read_sizes, write_shapes_set

SHAPES = "shapes-v1"


def shards_present(root: Path, split: str) -> bool:
    sizes = read_sizes(root)
    return any(name.startswith(f"{split}-") for name in sizes) and any(root.glob(f"{split}-*.tar"))


def ensure_dataset(data: Any, wait_s: float = 600.0) -> None:
    """Write the shapes-v1 shards under ``data.root`` if they are missing (rank 0 only;
    other processes of a multi-process launch wait for ``sizes.json``)."""
    if data.train or data.val:
        return  # explicit shard patterns: the user's data, checked when it is opened
    root = Path(data.root)
    if shards_present(root, "train") and shards_present(root, "val"):
        return
    if data.name != SHAPES:
        raise FileNotFoundError(
            f"data.root={root}: no train-*.tar/val-*.tar shards with a {SIZES_FILE}; write them first "
            f"(e.g. `lit-vqdiff shards write {data.name.split('-')[0]} --out {root}`) or set data.train/data.val"
        )
    if int(os.environ.get("RANK", "0")) != 0 or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        deadline = time.monotonic() + wait_s
        while not (shards_present(root, "train") and shards_present(root, "val")):
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {wait_s:.0f}s for rank 0 to write shapes-v1 shards under {root}")
            time.sleep(1.0)
        return
    s = data.shapes
    print(f"writing shapes-v1 shards to {root} ({s.train_samples} train, {s.val_samples} val)")
    write_shapes_set(root, s.train_samples, s.val_samples, s.train_seed, s.val_seed, s.shard_size, progress=True)
