"""A run's data set before training starts: where its description is, and shapes-v1
rendering itself on first use (any other data set must already be written, with
`lit-vqdiff shards write ...`, or described, with `lit-vqdiff shards check --describe`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from . import shapes
from .datamodule import beside, shard_urls
from .description import DESCRIPTION_FILE, read_description, shapes_description
from .shards import SIZES_FILE, read_sizes, read_source, write_shapes_set
from .stream import is_url, open_url


def shards_present(root: Path, split: str) -> bool:
    sizes = read_sizes(root)
    return any(name.startswith(f"{split}-") for name in sizes) and any(root.glob(f"{split}-*.tar"))


def renders_shapes(data: Any) -> bool:
    """True for the data config of shapes-v1 rendered into ``data.root`` (the default one)."""
    explicit = bool(data.train or data.val)
    return not explicit and (data.name == shapes.NAME or (not data.name and Path(data.root).name == shapes.NAME))


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
        deadline = time.monotonic() + wait_s
        while not (shards_present(root, "train") and shards_present(root, "val")):
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {wait_s:.0f}s for rank 0 to write shapes-v1 shards under {root}")
            time.sleep(1.0)
        return
    s = data.shapes
    print(f"writing shapes-v1 shards to {root} ({s.train_samples} train, {s.val_samples} val)")
    write_shapes_set(root, s.train_samples, s.val_samples, s.train_seed, s.val_seed, s.shard_size, progress=True)


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
        return shapes_description(data.shapes.train_samples, data.shapes.val_samples), where
    return None, where
