"""Writing WebDataset shards: reproducible tar files of fixed size plus a sizes.json index.

Shards are plain tar files, one sample per key, members named ``<key>.<ext>``. Headers
carry fixed owner, mode and mtime so that the same samples give byte-identical shards.
``sizes.json`` beside the shards maps each shard's file name to its sample count; the
exact-epoch loader needs it to split samples evenly across ranks. ``dataset.json``
describes the samples (see ``description.py``), ``source.json`` records what a shard set
was written from, with which settings and the checksums of the files read.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import soundfile as sf
from PIL import Image
from ..progress import progress as progress_of

from ..media import encode_png, encode_wav
from . import shapes
from .description import Describer, read_description

SIZES_FILE = "sizes.json"
SOURCE_FILE = "source.json"
MIN_SHARDS = 8  # a written split has at least this many shards when it has the samples
MAX_SHARD_SIZE = 2000


def png_of_file(path: Path) -> bytes:
    """PNG of an image file, kept grayscale (L) or RGB; other modes become RGB, alpha dropped."""
    with Image.open(path) as image:
        image.load()
        if image.mode == "1":
            image = image.convert("L")
        elif image.mode not in ("L", "RGB"):
            # Via RGBA: palette images with a transparent index convert without a warning.
            image = image.convert("RGBA").convert("RGB")
        return encode_png(np.asarray(image))


def wav_of_file(path: Path) -> tuple[bytes, dict[str, int]]:
    """16-bit mono WAV of a sound file (channels averaged), at the file's own sample rate."""
    wave, rate = sf.read(path, dtype="float32", always_2d=True)
    return encode_wav(wave.mean(axis=1), rate), {"sample_rate": rate, "channels": wave.shape[1]}


def tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = "lit_vqdiff"
    return info


class ShardWriter:
    """Writes records into ``<out_dir>/<prefix>-000000.tar, ...`` with ``shard_size`` samples each."""

    def __init__(self, out_dir: Path | str, prefix: str, shard_size: int, describer: Describer | None = None):
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.out_dir, self.prefix, self.shard_size = Path(out_dir), prefix, shard_size
        self.describer = describer
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._count = 0

    def write(self, key: str, members: Mapping[str, bytes]) -> None:
        """Add one sample: ``members`` maps an extension (``png``, ``txt``...) to its bytes."""
        if self._tar is None or self._count == self.shard_size:
            self._open_next()
        assert self._tar is not None
        for ext in sorted(members):
            data = members[ext]
            self._tar.addfile(tar_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self._count += 1
        self.sizes[self._name] = self._count
        if self.describer is not None:
            self.describer.add(members, split=self.prefix)

    def _open_next(self) -> None:
        self._close_current()
        self._name = f"{self.prefix}-{len(self.sizes):06d}.tar"
        # Written to a temporary name first: an interrupted run never leaves a short shard
        # under a final name.
        self._tar = tarfile.open(self.out_dir / (self._name + ".tmp"), "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            (self.out_dir / (self._name + ".tmp")).replace(self.out_dir / self._name)
            self._tar = None

    def close(self) -> dict[str, int]:
        """Finish the last shard and merge this writer's counts into sizes.json."""
        self._close_current()
        update_sizes(self.out_dir, self.sizes)
        return dict(self.sizes)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_sizes(directory: Path | str) -> dict[str, int]:
    """Shard name -> sample count from ``sizes.json`` (empty when there is none)."""
    path = Path(directory) / SIZES_FILE
    if not path.exists():
        return {}
    try:
        sizes = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(sizes, dict) or not all(isinstance(v, int) and v >= 0 for v in sizes.values()):
        raise ValueError(f"{path}: expected a mapping of shard name to sample count")
    return sizes


def update_sizes(directory: Path | str, sizes: Mapping[str, int]) -> None:
    merged = read_sizes(directory) | dict(sizes)
    path = Path(directory) / SIZES_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")
    tmp.replace(path)


@contextmanager
def staged_directory(out_dir: Path | str) -> Iterator[Path]:
    """Yield an empty hidden sibling of ``out_dir`` to fill; when the block succeeds it replaces ``out_dir`` whole.

    An interrupted or failed write leaves ``out_dir`` as it was (absent or the previous data
    set), never a half-written folder under the final name.
    """
    out_dir = Path(out_dir).resolve()
    stage = out_dir.parent / f".{out_dir.name}.partial"
    old = out_dir.parent / f".{out_dir.name}.old"
    shutil.rmtree(stage, ignore_errors=True)  # left behind by a run that was killed
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.replace(old)
    stage.replace(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def write_set(
    out_dir: Path | str, params: Mapping[str, Any], fill: Callable[[Path, Describer], Mapping[str, Any]], name: str,
    class_names: Sequence[str] | None = None, overwrite: bool = False,
) -> dict[str, int] | None:
    """Run ``fill(stage_dir, describer)`` (it writes the shards through writers that feed
    ``describer``, and returns file checksums), then publish it as ``out_dir`` with its
    ``dataset.json``, ``sizes.json`` and ``source.json``.

    Returns the shard sizes, or None when ``out_dir`` already holds a set written with the
    same ``params`` and ``overwrite`` is off. Raises FileExistsError rather than replace a
    folder that is not a shard set (no sizes.json), or, without ``overwrite``, a set written
    with other settings or with none recorded.
    """
    out_dir = Path(out_dir)
    params = json.loads(json.dumps(dict(params)))  # tuples -> lists, as the saved copy has them
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not (out_dir / SIZES_FILE).is_file():
            raise FileExistsError(f"{out_dir} exists and has no {SIZES_FILE}, so it is not a shard set; refusing to replace it")
        old = (read_source(out_dir) or {}).get("params") or {}
        if old == params and read_sizes(out_dir) and read_description(out_dir) and not overwrite:
            return None
        if not overwrite:
            changed = ", ".join(k for k in sorted(set(old) | set(params)) if old.get(k) != params.get(k))
            why = (f"changed: {changed}" if changed else "no dataset.json or sizes.json") if old else f"no {SOURCE_FILE} records them"
            raise FileExistsError(f"{out_dir} holds a shard set written with other settings ({why}); pass --overwrite")
    with staged_directory(out_dir) as stage:
        describer = Describer(name, class_names)
        files = fill(stage, describer)
        describer.write(stage)
        record = {"params": params, "files": dict(files)}
        (stage / SOURCE_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return read_sizes(out_dir)


def read_source(directory: Path | str) -> dict[str, Any] | None:
    """The ``source.json`` record of a shard set, or None when absent or unreadable."""
    path = Path(directory) / SOURCE_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def auto_shard_size(total: int, shards: int = MIN_SHARDS, largest: int = MAX_SHARD_SIZE) -> int:
    """Samples per shard for a split of ``total``: at least ``shards`` shards when the split is
    big enough, so that every rank and loader worker of a run gets its own, and at most
    ``largest`` samples per shard."""
    return max(1, min(largest, -(-total // shards)))


def write_split(
    out_dir: Path, split: str, samples: Iterable[Mapping[str, bytes]], total: int, shard_size: int | None,
    describer: Describer | None = None, progress: bool = False,
) -> dict[str, int]:
    """Write ``samples`` (member dicts) as ``<split>-NNNNNN.tar`` with keys ``<split>-NNNNNNN``
    (``shard_size`` None: ``auto_shard_size(total)``)."""
    size = shard_size or auto_shard_size(total)
    with ShardWriter(out_dir, split, size, describer) as writer:
        for i, members in enumerate(progress_of(samples, split, total=total, unit="sample", enabled=progress)):
            writer.write(f"{split}-{i:07d}", members)
    return writer.sizes


def write_shapes(
    out_dir: Path | str, split: str, seed: int, count: int, shard_size: int, describer: Describer | None = None,
    progress: bool = False, excluded: tuple[int, ...] = (),
) -> dict[str, int]:
    """Render ``count`` shapes-v1 samples with ``seed`` (no ``excluded`` labels) into ``<split>-NNNNNN.tar`` shards."""
    indices: Iterable[int] = range(count)
    if progress:
        indices = progress_of(indices, f"shapes-v1 {split}", total=count, unit="sample")
    with ShardWriter(out_dir, split, shard_size, describer) as writer:
        for i in indices:
            writer.write(f"{split}-{seed:04d}-{i:07d}", shapes.members(shapes.make_sample(seed, i, excluded=excluded)))
    return writer.sizes


def write_shapes_set(
    out_dir: Path | str, train_samples: int, val_samples: int, train_seed: int, val_seed: int, shard_size: int,
    overwrite: bool = False, progress: bool = False, holdout: str = "none",
) -> dict[str, int] | None:
    """shapes-v1 train and val splits from disjoint seeds, published as one set (see ``write_set``).

    ``holdout`` (a key of ``shapes.HOLDOUTS``) removes its combinations from train only:
    val keeps all 72, so that they can be scored.
    """
    if train_seed == val_seed:
        raise ValueError(f"train_seed and val_seed must differ (both {train_seed}): the splits would hold the same samples")
    if train_samples <= 0 or val_samples < 0:
        raise ValueError(f"need train_samples > 0 and val_samples >= 0, got {train_samples} and {val_samples}")
    if holdout not in shapes.HOLDOUTS:
        raise ValueError(f"holdout must be one of {list(shapes.HOLDOUTS)}, got {holdout!r}")
    params = {"source": shapes.NAME, "train_samples": train_samples, "val_samples": val_samples,
              "train_seed": train_seed, "val_seed": val_seed, "shard_size": shard_size}
    if holdout != "none":
        params["holdout"] = holdout  # absent otherwise: sets written before hold-outs existed stay up to date

    def fill(stage: Path, describer: Describer) -> dict[str, Any]:
        write_shapes(stage, "train", train_seed, train_samples, shard_size, describer, progress, shapes.HOLDOUTS[holdout])
        write_shapes(stage, "val", val_seed, val_samples, shard_size, describer, progress)
        return {}

    name = shapes.NAME if holdout == "none" else f"{shapes.NAME}-{holdout}"  # another data set: its own tokenizers
    return write_set(out_dir, params, fill, name, shapes.class_names(), overwrite)
