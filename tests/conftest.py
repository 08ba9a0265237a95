"""Shared test fixtures."""

from __future__ import annotations

# ----------------------------------------------------------------------------- tiny shards (data pipeline)

import io
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Optional

import pytest

from lit_vqdiff.config import DataConfig
from lit_vqdiff.data import shapes, shards

Members = dict[str, bytes]
SHAPES_SIZES = dict(image_size=32, channels=3, sample_rate=8000, audio_samples=8000, text_bytes=48, num_classes=72)


@dataclass(frozen=True)
class TinyShards:
    directory: Path
    names: list[str]  # shard file names, in order
    keys: list[list[str]]  # sample keys per shard, in order

    @property
    def all_keys(self) -> list[str]:
        return [k for shard in self.keys for k in shard]


def write_tar(path: Path, samples: list[tuple[str, Mapping[str, bytes]]]) -> None:
    """A plain tar with one ``<key>.<ext>`` member per sample member."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(members[ext])
                tar.addfile(info, io.BytesIO(members[ext]))


@pytest.fixture
def tiny_shards(tmp_path: Path) -> Callable[..., TinyShards]:
    """Factory: shapes-v1 shards of the given sizes (uneven allowed) plus sizes.json.

    ``edit(key, members)`` may change or drop members to make broken samples.
    """

    def make(
        sizes: list[int],
        split: str = "train",
        seed: int = 0,
        directory: Optional[Path] = None,
        edit: Optional[Callable[[str, Members], Members]] = None,
    ) -> TinyShards:
        out = directory or tmp_path / "shards"
        out.mkdir(parents=True, exist_ok=True)
        names, keys, index = [], [], 0
        for number, size in enumerate(sizes):
            samples = []
            for _ in range(size):
                key = f"{split}-{seed:04d}-{index:07d}"
                members = shapes.members(shapes.make_sample(seed, index))
                samples.append((key, edit(key, members) if edit else members))
                index += 1
            name = f"{split}-{number:06d}.tar"
            write_tar(out / name, samples)
            names.append(name)
            keys.append([k for k, _ in samples])
        shards.update_sizes(out, dict(zip(names, sizes)))
        return TinyShards(out, names, keys)

    return make


@pytest.fixture
def tiny_config() -> Callable[..., DataConfig]:
    """Factory: a DataConfig over ``root`` with small batches, no workers, a small shuffle buffer
    (and shapes-v1's sizes, as a run would resolve them from its description)."""

    def make(root: Path | str, **overrides: object) -> DataConfig:
        base = DataConfig(root=str(root), batch_size=4, val_batch_size=4, num_workers=0, shuffle_buffer=8, **SHAPES_SIZES)
        return replace(base, **overrides)

    return make


# ----------------------------------------------------------------------------- runs (stages, CLI)

import os  # noqa: E402


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B never reaches a server in tests and writes only inside the test's folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in [k for k in os.environ if k.startswith("LIT_VQDIFF_RUN_DIR_")]:
        monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shapes-v1 shard set (512 train, 128 val) shared by the stage tests."""
    root = tmp_path_factory.mktemp("shapes-v1")
    shards.write_shapes_set(root, train_samples=512, val_samples=128, train_seed=0, val_seed=1, shard_size=128)
    return root


def tiny_stage1(root: Path, runs: Path, *extra: str) -> list[str]:
    """Overrides for a stage-1 run that takes seconds."""
    return [f"data.root={root}", f"run.root={runs}", "data.batch_size=16", "data.val_batch_size=64", "data.num_workers=0",
            "tokenizer.channels=32", "tokenizer.num_res_blocks=1", "tokenizer.quantizer.codebook_size=64",
            "trainer.max_steps=30", "trainer.val_every_steps=30", "logger=csv", "trainer.threads=1", *extra]


def tiny_stage2(root: Path, runs: Path, *extra: str) -> list[str]:
    """Overrides for a stage-2 run that takes seconds (tokenizers from ``runs``)."""
    return [f"data.root={root}", f"run.root={runs}", "data.batch_size=16", "data.val_batch_size=64", "data.num_workers=0",
            f"tokenizers.image={runs}/latest-stage1", f"tokenizers.audio={runs}/latest-stage1-audio",
            "tokenizers.train_if_missing=false", "generator.depth=2", "generator.width=64", "generator.heads=2",
            "generator.cond_depth=1", "sampling.steps=4", "sampling.val_n=4", "sampling.n=8",
            "trainer.max_steps=30", "trainer.val_every_steps=30", "trainer.limit_val_batches=1", "logger=csv",
            "trainer.threads=1", *extra]


def resolved(stage: str, overrides: list[str] | tuple[str, ...] = ()):
    """A stage's config with its auto values filled from the data set's description, as a run
    sees it (``pipeline.resolve``): for tests that build modules and data modules directly."""
    from lit_vqdiff.config import load_config
    from lit_vqdiff.pipeline import resolve

    return resolve(load_config(stage, overrides)).cfg
