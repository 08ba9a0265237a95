"""Writing WebDataset shards: reproducible tar files of fixed size plus a sizes.json index.

Shards are plain tar files, one sample per key, members named ``<key>.<ext>``. Headers
carry fixed owner, mode and mtime so that the same samples give byte-identical shards.
``sizes.json`` beside the shards maps each shard's file name to its sample count; the
exact-epoch loader needs it to split samples evenly across ranks.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import soundfile as sf
from PIL import Image

from . import shapes

SIZES_FILE = "sizes.json"


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of an (H, W, 3) or (H, W) uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_wav(wave: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV bytes of a mono float waveform in [-1, 1]."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = "lit_vqdiff"
    return info


class ShardWriter:
    """Writes records into ``<out_dir>/<prefix>-000000.tar, ...`` with ``shard_size`` samples each."""

    def __init__(self, out_dir: Path | str, prefix: str, shard_size: int):
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.out_dir, self.prefix, self.shard_size = Path(out_dir), prefix, shard_size
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
            self._tar.addfile(_tar_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self._count += 1
        self.sizes[self._name] = self._count

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


def shapes_members(sample: shapes.Sample) -> dict[str, bytes]:
    """The five members of a shapes-v1 sample, as the spec lists them."""
    meta = sample.attributes.as_dict() | {"seed": sample.seed, "index": sample.index}
    return {
        "png": encode_png(sample.image),
        "wav": encode_wav(sample.sound, shapes.SAMPLE_RATE),
        "txt": sample.caption.encode("utf-8"),
        "cls": str(sample.label).encode("ascii"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def write_shapes(out_dir: Path | str, split: str, seed: int, count: int, shard_size: int, progress: bool = False) -> dict[str, int]:
    """Render ``count`` shapes-v1 samples with ``seed`` into ``<split>-NNNNNN.tar`` shards."""
    indices: Iterable[int] = range(count)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"shapes-v1 {split}", unit="sample", leave=False)
    with ShardWriter(out_dir, split, shard_size) as writer:
        for i in indices:
            writer.write(f"{split}-{seed:04d}-{i:07d}", shapes_members(shapes.make_sample(seed, i)))
    return writer.sizes
