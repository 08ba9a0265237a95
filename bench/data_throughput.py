"""Does the loader keep up? Samples/s a loader sustains per worker, what an epoch's restart
costs, the share of real default runs' wall time spent waiting for the next batch, and a
prediction of that share from the first two.

Loaders (``--batches`` batches each, after a first batch timed apart), with 0, 1 and 2
worker processes:
- stage 1: the default image tokenizer's loader over shapes-v1 (and Fashion-MNIST when
  data/fashion-mnist exists or can be written), batch 64;
- stage 2: the default text->image loader at batch 128, over the token cache (captions and
  cached codes, what a default run reads) and over the raw shards (``tokenizers.cache=false``).
  The cache is built from a part of shapes-v1 with an untrained default tokenizer: its
  weights do not change what the loader reads.
``epoch_restart_s`` is the gap between an epoch's last batch and the next epoch's first:
the train loader's workers are not persistent, so every epoch stops them and starts new ones.

The prediction (``prediction`` in the JSON), for a run that consumes C samples/s when
never waiting (batch B, E samples per epoch), fed by w workers of r samples/s each (w = 0:
the training process decodes every batch itself at r samples/s) that restart in s0
seconds at each epoch:

    t_step = B / C;  t_wait = B / r (w = 0), else max(0, B / (w r) - t_step)
    wait ~ (N t_wait + R s0) / (N (t_step + t_wait) + R s0)

over N steps with R = ceil(N B / E) - 1 epoch restarts (the first epoch's start-up is not
counted as waiting); per epoch of a long run N = E / B and R = 1. Without restarts it is
1 - w r / C when the workers are slower than the step, else 0. It is checked
against the default stage-1 run measured here, and applied to the GPU runs recorded in
bench/results/gpu/summary_stage*.json with this machine's per-worker rates.

    .venv/bin/python bench/data_throughput.py [--steps 300] [--batches 60]
    .venv/bin/python bench/data_throughput.py --quick          # smoke test: 30 steps, 10 batches
    .venv/bin/python bench/data_throughput.py --device cuda    # on a GPU: the default runs' data wait, with variants

With ``--device cuda`` it measures the data wait of the default stage-1 and stage-2 runs
(trainer=gpu, the GPU checks' 8000-sample shapes-v1 render) with 4 workers, with 8, and
with one epoch for the whole run (resampled, so no worker restarts), plus the loader rates
there; results go to ``data_throughput_gpu.json`` (``--quick`` on the CPU: data_throughput_quick.json).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import write_result

from lit_vqdiff.config import load_config
from lit_vqdiff.data.datamodule import ShardDataModule
from lit_vqdiff.data.prepare import ensure_dataset
from lit_vqdiff.data.tokens import build_cache
from lit_vqdiff.nn.tokenizer import Tokenizer
from lit_vqdiff.perf import DataWaitTimer
from lit_vqdiff.pipeline import resolve

REPO = Path(__file__).resolve().parent.parent
GPU_RESULTS = REPO / "bench" / "results" / "gpu"
FORMULA = ("t_step = B/C; t_wait = B/r if w == 0 else max(0, B/(w*r) - t_step); "
           "wait = (N*t_wait + R*s0) / (N*(t_step + t_wait) + R*s0), R = ceil(N*B/E) - 1 epoch restarts in N steps "
           "(a long run: N = E/B, R = 1)   [C: samples/s the step consumes when never waiting, B: batch, "
           "E: samples per epoch, w: workers, r: samples/s per worker (w = 0: of the training process), "
           "s0: epoch_restart_s; resampled with one epoch per run: R = 0]")
GPU_TRAINER = "trainer=gpu"
# The GPU checks' shapes-v1 render (bench/gpu_checks.sh): shards of 500 so that 4-8 workers each get some.
GPU_DATA = ["data.root=data/shapes-v1-gpu-checks", "data.name=shapes-v1", "data.shapes.train_samples=8000", "data.shapes.val_samples=2000",
            "data.shapes.shard_size=500"]


def loader_rate(data_cfg, modalities: tuple[str, ...], workers: int, batches: int) -> dict[str, float]:
    """Samples/s of a train loader alone: the first batch (worker start-up) timed apart, then
    ``batches`` batches, then the restart into the next epoch."""
    data_cfg = data_cfg.copy()
    # An epoch of exactly the batches measured (resampled), so that the restart comes next.
    data_cfg.num_workers, data_cfg.mode, data_cfg.batches_per_epoch = workers, "resampled", batches + 1
    dm = ShardDataModule(data_cfg, modalities)
    dm.set_epoch(0)
    loader = dm.train_dataloader()
    start = time.perf_counter()
    batches_of = iter(loader)
    next(batches_of)
    first = time.perf_counter() - start
    count, start = 0, time.perf_counter()
    for _, batch in zip(range(batches), batches_of):
        count += len(batch["key"])
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    for _ in batches_of:  # the end of the epoch: its workers stop
        pass
    dm.set_epoch(1)
    next(iter(loader))
    restart = time.perf_counter() - start
    loader.close()
    return {"samples_per_s": round(count / elapsed, 1), "first_batch_s": round(first, 3), "epoch_restart_s": round(restart, 3),
            "samples": count, "batch_size": int(data_cfg.batch_size)}


def loader_table(data_cfg, modalities: tuple[str, ...], workers: tuple[int, ...], batches: int) -> dict[str, Any]:
    runs = {f"workers_{w}": loader_rate(data_cfg, modalities, w, batches) for w in workers}
    one = runs.get("workers_1")
    if one is not None:
        runs["per_worker_samples_per_s"] = one["samples_per_s"]
        if "workers_2" in runs:  # 1.0: two workers deliver twice one worker's samples
            runs["two_worker_scaling"] = round(runs["workers_2"]["samples_per_s"] / (2 * one["samples_per_s"]), 2)
    return runs


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


def untrained_cache(stage2_cfg, out: Path, train_shards: int | None) -> Any:
    """The data config of a token cache of ``stage2_cfg``'s data (its first ``train_shards``
    train shards, every val shard) made by an untrained default image tokenizer, and the
    tokenizer's meta for a GeneratorModule."""
    stage1 = resolve(load_config("stage1", [f"data.root={stage2_cfg.data.root}", f"data.image_size={stage2_cfg.data.image_size}",
                                            f"data.channels={stage2_cfg.data.channels}"])).cfg
    torch.manual_seed(0)
    tok = Tokenizer.from_config(stage1).eval()
    data = stage2_cfg.data.copy()
    if train_shards is not None:
        shards = sorted(Path(data.root).glob("train-*.tar"))[:train_shards]
        data.train = " ".join(str(s) for s in shards)
    start = time.perf_counter()
    summary = build_cache(data, {"image": tok}, {"image": "untrained"}, out, progress=False)
    seconds = time.perf_counter() - start
    cached = stage2_cfg.data.copy()
    cached.root, cached.train, cached.val, cached.sizes = str(out), "", "", ""
    dim = tok.quantizer.lookup_dim
    meta = {"image": {"spec": tok.spec(), "checksum": "untrained", "path": "", "latent_mean": [0.0] * dim, "latent_std": [1.0] * dim}}
    samples = sum(s["samples"] for s in summary["splits"].values())
    return cached, meta, tok, {"samples": samples, "seconds": round(seconds, 2), "samples_per_s": round(samples / seconds, 1)}


def fit_wait(cfg, module, datamodule, run_dir: Path) -> dict[str, float]:
    """Fit ``module`` for cfg.trainer.max_steps steps; the probe's figures."""
    from lit_vqdiff.training import build_trainer

    timer = DataWaitTimer()
    trainer = build_trainer(cfg, run_dir, [timer])
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    wall = time.perf_counter() - start
    steps, batch = trainer.global_step, int(cfg.data.batch_size)
    return {
        "steps": steps,
        "batch_size": batch,
        "num_workers": int(cfg.data.num_workers),
        "mode": str(cfg.data.mode),
        "train_samples_per_s": round(steps * batch / timer.train_s, 1),
        # What the step alone would consume: the loader has to match this.
        "consume_samples_per_s": round(steps * batch / timer.step_s, 1),
        "data_wait_fraction": round(timer.fraction, 4),
        "data_wait_s": round(timer.wait_s, 2),
        # The rest of the gaps between steps: Lightning's per-step bookkeeping, logging.
        "loop_fraction": round(timer.loop_fraction, 4),
        "loop_s": round(timer.loop_s, 2),
        "step_s": round(timer.step_s, 2),
        "fit_wall_s": round(wall, 1),
    }


def stage1_wait(steps: int, extra: list[str] = (), modality: str = "image") -> dict[str, float]:
    """A real default stage-1 run (its config, its data, its workers) for ``steps`` steps."""
    from lit_vqdiff.stages.tokenizer import TokenizerModule

    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve(load_config("stage1", [f"modality={modality}", f"run.root={tmp}", "logger=none", f"trainer.max_steps={steps}",
                                             f"trainer.val_every_steps={10 * steps}", "trainer.checkpoint_every_minutes=0",
                                             *extra])).cfg
        ensure_dataset(cfg.data)
        out = fit_wait(cfg, TokenizerModule(cfg), ShardDataModule(cfg.data, (cfg.modality,), seed=cfg.run.seed), Path(tmp))
    out["samples_per_epoch"] = samples_per_epoch(cfg)
    return out


def stage2_wait(steps: int, extra: list[str], cache: tuple[Any, dict] | None = None) -> dict[str, float]:
    """A default text->image stage-2 run from the token cache (of an untrained tokenizer) for ``steps`` steps."""
    from lit_vqdiff.modalities import parse_task
    from lit_vqdiff.stages.generator import GeneratorModule

    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve(load_config("stage2", [f"run.root={tmp}", "logger=none", f"trainer.max_steps={steps}",
                                             f"trainer.val_every_steps={10 * steps}", "trainer.checkpoint_every_minutes=0",
                                             "sampling.val_n=0", *extra])).cfg
        ensure_dataset(cfg.data)
        if cache is None:
            data, meta, *_ = untrained_cache(cfg, Path(tmp) / "tokens", None)
        else:
            data, meta = cache
            data = data.copy()
            for key in ("num_workers", "mode", "batches_per_epoch", "batch_size"):
                data[key] = cfg.data[key]
        module = GeneratorModule(cfg, meta)
        out = fit_wait(cfg, module, ShardDataModule(data, parse_task(cfg.task).inputs(True), seed=cfg.run.seed), Path(tmp))
    out["samples_per_epoch"] = samples_per_epoch(cfg)
    return out


def samples_per_epoch(cfg) -> int:
    d = cfg.data
    if d.mode == "resampled" and d.batches_per_epoch > 0:
        return int(d.batches_per_epoch * d.batch_size)
    return int(d.shapes.train_samples) if not d.train else 0


def predicted_wait(consume: float, batch: int, workers: int, rate: float, restart_s: float, epoch_samples: int,
                   steps: int | None = None) -> float:
    """The data-wait share FORMULA predicts: for a run of ``steps`` steps, or per epoch of a long run (None)."""
    t_step = batch / consume
    t_wait = batch / rate if workers == 0 else max(0.0, batch / (workers * rate) - t_step)
    if steps is None:
        steps, restarts = epoch_samples / batch, 1
    else:  # the first epoch's start is not counted as waiting (DataWaitTimer starts at the first step)
        restarts = max(0, math.ceil(steps * batch / epoch_samples) - 1) if epoch_samples else 0
    return round((steps * t_wait + restarts * restart_s) / (steps * (t_step + t_wait) + restarts * restart_s), 4)


def predict_run(run: dict[str, Any], table: dict[str, Any]) -> dict[str, Any]:
    """FORMULA for a measured run, from the loader table of its data (same machine): predicted against measured."""
    w = run["num_workers"]
    rate = table["per_worker_samples_per_s"] if w else table["workers_0"]["samples_per_s"]
    measured_workers = sorted(int(k.split("_")[1]) for k in table if k.startswith("workers_"))
    nearest = max([n for n in measured_workers if n <= max(w, 0)] or [0])
    restart = 0.0 if run["mode"] == "resampled" else table[f"workers_{nearest}"]["epoch_restart_s"]
    return {"consume_samples_per_s": run["consume_samples_per_s"], "workers": w, "per_worker_samples_per_s": rate,
            "epoch_restart_s": restart, "restart_measured_with_workers": nearest, "samples_per_epoch": run["samples_per_epoch"],
            "predicted": predicted_wait(run["consume_samples_per_s"], run["batch_size"], w, rate, restart, run["samples_per_epoch"],
                                        run["steps"]),
            "measured": run["data_wait_fraction"]}


def prediction(loaders: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """FORMULA for this machine's default stage-1 run, and for the GPU runs on record."""
    stage1 = loaders["stage1"]["shapes-v1"]
    out: dict[str, Any] = {"formula": FORMULA, "this_cpu_stage1_run": predict_run(run, stage1)}
    # The GPU runs of bench/gpu_checks.sh (4 workers, 8000 samples per epoch): their step rate
    # counts validation too, so the consumption is an estimate; this CPU's worker rates stand in
    # for the GPU host's (one worker's restart time for four starting in parallel on 16 cores).
    for stage, loader, batch in (("stage1", stage1, 64), ("stage2", loaders["stage2_cached"]["shapes-v1"], 128)):
        path = GPU_RESULTS / f"summary_{stage}.json"
        if not path.is_file() or "per_worker_samples_per_s" not in loader:
            continue
        summary = json.loads(path.read_text())
        consume = summary["steps_per_s"] * batch / max(1e-6, 1 - summary["data_wait_fraction"])
        rate, restart = loader["per_worker_samples_per_s"], loader["workers_1"]["epoch_restart_s"]
        out[f"gpu_{stage}"] = {
            "consume_samples_per_s": round(consume, 1), "workers": 4, "samples_per_epoch": 8000,
            "per_worker_samples_per_s": rate, "epoch_restart_s": restart,
            "steps": summary["global_step"],
            "predicted": predicted_wait(consume, batch, 4, rate, restart, 8000, summary["global_step"]),
            "predicted_without_restarts": predicted_wait(consume, batch, 4, rate, 0.0, 8000, summary["global_step"]),
            "measured": summary["data_wait_fraction"], "source": str(path.relative_to(REPO)),
        }
    return out


def loaders_of(workers: tuple[int, ...], batches: int, extra: list[str] = (), fashion: bool = True) -> dict[str, Any]:
    """Every loader table: stage 1 (shapes-v1, Fashion-MNIST), stage 2 cached and raw."""
    cfg = resolve(load_config("stage1", list(extra))).cfg
    ensure_dataset(cfg.data)
    out: dict[str, Any] = {"stage1": {"shapes-v1": loader_table(cfg.data, ("image",), workers, batches)}}
    root = fashion_root() if fashion else None
    if root is not None:
        data = resolve(load_config("stage1", [f"data.root={root}"])).cfg.data
        out["stage1"]["fashion-mnist"] = loader_table(data, ("image",), workers, batches)
    stage2 = resolve(load_config("stage2", list(extra))).cfg
    with tempfile.TemporaryDirectory() as tmp:
        cached, _, _, build = untrained_cache(stage2, Path(tmp) / "tokens", 2)
        out["stage2_cached"] = {"shapes-v1": loader_table(cached, ("text", "image_codes"), workers, batches), "cache_build": build}
    out["stage2_raw"] = {"shapes-v1": loader_table(stage2.data, ("text", "image"), workers, batches)}
    return out


def gpu_main(steps: int, batches: int) -> None:
    """The default runs' data wait on a GPU, with variants; written after each run."""
    results: dict[str, Any] = {"formula": FORMULA, "loaders": loaders_of((0, 1, 2, 4), batches, GPU_DATA, fashion=False),
                               "stage1": {}, "stage2": {}}
    variants = {"workers_4": ["data.num_workers=4"], "workers_8": ["data.num_workers=8"],
                # One epoch for the whole run: no worker restarts (what persistent workers would give).
                "workers_4_one_epoch": ["data.num_workers=4", "data.mode=resampled", f"data.batches_per_epoch={steps}"]}
    common = [GPU_TRAINER, *GPU_DATA]
    with tempfile.TemporaryDirectory() as tmp:
        stage2 = resolve(load_config("stage2", common)).cfg
        ensure_dataset(stage2.data)
        cached, meta, _, build = untrained_cache(stage2, Path(tmp) / "tokens", None)
        results["stage2_cache_build"] = build
        tables = {"stage1": results["loaders"]["stage1"]["shapes-v1"], "stage2": results["loaders"]["stage2_cached"]["shapes-v1"]}
        for name, extra in variants.items():
            for stage in ("stage1", "stage2"):
                run = stage1_wait(steps, [*common, *extra]) if stage == "stage1" else stage2_wait(steps, [*common, *extra], (cached, meta))
                run["prediction"] = predict_run(run, tables[stage])  # from the loader rates measured here first
                results[stage][name] = run
                write_result("data_throughput_gpu", results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="steps of each default run to time")
    parser.add_argument("--batches", type=int, default=60, help="batches per loader measurement")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="smoke test: 30 steps, 10 batches, no audio run")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batches = 30, 10
    if args.device == "cuda":
        gpu_main(args.steps, args.batches)
        return

    loaders = loaders_of((0, 1, 2), args.batches)
    wait = stage1_wait(args.steps)
    # The audio tokenizer's default run: same measurement, its own loader (WAV decode).
    audio_wait = None if args.quick else stage1_wait(args.steps, modality="audio")
    cfg = load_config("stage1")
    write_result("data_throughput_quick" if args.quick else "data_throughput", {
        "loader_samples_per_s": {name: {k: v["samples_per_s"] for k, v in runs.items() if k.startswith("workers_")}
                                 for name, runs in loaders["stage1"].items()},
        "per_worker_samples_per_s": {f"{stage}/{name}": runs["per_worker_samples_per_s"]
                                     for stage, tables in loaders.items() for name, runs in tables.items()
                                     if isinstance(runs, dict) and "per_worker_samples_per_s" in runs},
        "loader_detail": loaders,
        "train_samples_per_s": wait["train_samples_per_s"],
        "data_wait_fraction": wait["data_wait_fraction"],
        "training_run": wait,
        "audio_training_run": audio_wait,
        "prediction": prediction(loaders, wait),
        "config": {"stage": "stage1", "modality": cfg.modality, "batch_size": cfg.data.batch_size, "num_workers": cfg.data.num_workers,
                   "stage2_batch_size": load_config("stage2").data.batch_size, "threads": torch.get_num_threads()},
    })


if __name__ == "__main__":
    main()
