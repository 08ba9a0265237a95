"""Does the loader keep up? Loader samples/s against what training consumes, and the share
of a real default stage-1 run's wall time spent waiting for the next batch.

    .venv/bin/python bench/data_throughput.py [--steps 300]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_result

from lit_vqdiff.config import load_config
from lit_vqdiff.data.datamodule import ShardDataModule
from lit_vqdiff.data.prepare import ensure_dataset
from lit_vqdiff.perf import DataWaitTimer
from lit_vqdiff.pipeline import resolve

REPO = Path(__file__).resolve().parent.parent


def loader_rate(data_cfg, modalities: tuple[str, ...], workers: int, batches: int) -> dict[str, float]:
    """Samples/s of the stage-1 train loader alone (first batch, i.e. worker start-up, timed apart)."""
    data_cfg = data_cfg.copy()
    data_cfg.num_workers = workers
    dm = ShardDataModule(data_cfg, modalities)
    dm.set_epoch(0)
    loader = iter(dm.train_dataloader())
    start = time.perf_counter()
    next(loader)
    first = time.perf_counter() - start
    count, start = 0, time.perf_counter()
    for _, batch in zip(range(batches), loader):
        count += len(batch["key"])
    elapsed = time.perf_counter() - start
    return {"samples_per_s": round(count / elapsed, 1), "first_batch_s": round(first, 3), "samples": count}


def fashion_root() -> Path | None:
    """data/fashion-mnist, written on first use when the Debian package can be fetched."""
    root = REPO / "data" / "fashion-mnist"
    if not (root / "sizes.json").exists():
        cli = Path(sys.executable).with_name("lit-vqdiff")
        done = subprocess.run([str(cli), "shards", "write", "fashion", "--no-progress"], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"Fashion-MNIST not available: {done.stderr.strip()}")
            return None
    return root


def training_wait(steps: int, modality: str = "image") -> dict[str, float]:
    """A real default stage-1 run (its config, its data, its workers) for ``steps`` steps."""
    from lit_vqdiff.stages.tokenizer import TokenizerModule
    from lit_vqdiff.training import build_trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve(load_config("stage1", [f"modality={modality}", f"run.root={tmp}", "logger=none", f"trainer.max_steps={steps}",
                                             f"trainer.val_every_steps={steps}", "trainer.limit_val_batches=1"])).cfg
        ensure_dataset(cfg.data)
        timer = DataWaitTimer()
        trainer = build_trainer(cfg, Path(tmp), [timer])
        start = time.perf_counter()
        trainer.fit(TokenizerModule(cfg), datamodule=ShardDataModule(cfg.data, (cfg.modality,), seed=cfg.run.seed))
        wall = time.perf_counter() - start
    return {
        "steps": steps,
        "batch_size": cfg.data.batch_size,
        "num_workers": cfg.data.num_workers,
        "train_samples_per_s": round(steps * cfg.data.batch_size / timer.train_s, 1),
        "data_wait_fraction": round(timer.fraction, 4),
        "data_wait_s": round(timer.wait_s, 2),
        # The rest of the gaps between steps: Lightning's per-step bookkeeping, logging.
        "loop_fraction": round(timer.loop_fraction, 4),
        "loop_s": round(timer.loop_s, 2),
        "step_s": round(timer.step_s, 2),
        "fit_wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="steps of the default stage-1 run to time")
    parser.add_argument("--batches", type=int, default=60, help="batches per loader measurement")
    args = parser.parse_args()

    cfg = load_config("stage1")
    ensure_dataset(cfg.data)
    loaders: dict[str, dict[str, dict[str, float]]] = {"shapes-v1": {}}
    for workers in (0, 2):
        loaders["shapes-v1"][f"workers_{workers}"] = loader_rate(cfg.data, ("image",), workers, args.batches)
    fashion = fashion_root()
    if fashion is not None:
        data = cfg.data.copy()
        data.root, data.name = str(fashion), "fashion-mnist"
        loaders["fashion-mnist"] = {f"workers_{w}": loader_rate(data, ("image",), w, args.batches) for w in (0, 2)}
    wait = training_wait(args.steps)
    audio_wait = training_wait(args.steps, "audio")
    write_result("data_throughput", {
        "loader_samples_per_s": {name: {k: v["samples_per_s"] for k, v in runs.items()} for name, runs in loaders.items()},
        "loader_detail": loaders,
        "train_samples_per_s": wait["train_samples_per_s"],
        "data_wait_fraction": wait["data_wait_fraction"],
        "training_run": wait,
        # The audio tokenizer's default run: same measurement, its own loader (WAV decode).
        "audio_training_run": audio_wait,
        "config": {"stage": "stage1", "modality": cfg.modality, "batch_size": cfg.data.batch_size, "num_workers": cfg.data.num_workers},
    })


if __name__ == "__main__":
    main()
