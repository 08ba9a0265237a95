"""Stage-2 training steps from the token cache against encoding with the tokenizer on the fly.

Two measurements, each a pair of real ``trainer.fit`` runs that differ only in
``tokenizers.cache`` (steps/s after a few warm-up steps, and the data wait):

1. The default tasks (``--tasks``) with their default configs and tokenizers
   (runs/latest-stage1-<modality>-shapes-v1; stage 1 trains them first when missing).
2. Where the cache matters: text->image at 256 px with a 16x16 code grid (``--size``),
   for two untrained image tokenizers (their weights do not change the cost): the image
   preset at 256 px (one level, a 16x16 patch stem) and a VQGAN-like one of realistic
   width (channel_mult [1, 2, 2] at 128 channels, a 4x4 stem). The data are ``data/photos``
   when it holds 256 px crops (``lit-vqdiff shards write photos --crop 256``), else a
   synthetic set of RGB pictures with captions written to a temporary folder (gradients,
   shapes and texture: ``--train``/``--val`` samples). It also reports the cache build
   (``data.tokens.build_cache``: samples/s, shards) and, outside the trainer, the frozen
   encoder's cost per sample (bf16 autocast as in a bf16-mixed step, fp32 as the cache
   build runs it) and the speedup that predicts.

    .venv/bin/python bench/token_cache.py                     # both (~5 min at 256 px on a quiet 2-core CPU, plus the default tasks)
    .venv/bin/python bench/token_cache.py --tasks none        # only the 256 px measurement
    .venv/bin/python bench/token_cache.py --quick             # smoke test: no default tasks, small set, few steps

Results: bench/results/token_cache.json (``--quick``: token_cache_quick.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from common import timed, write_result

from lit_vqdiff.config import load_config
from lit_vqdiff.data.datamodule import ShardDataModule
from lit_vqdiff.data.description import Describer, read_description
from lit_vqdiff.data.prepare import ensure_dataset
from lit_vqdiff.data.shards import ShardWriter, read_sizes, write_set
from lit_vqdiff.data.tokens import build_cache
from lit_vqdiff.media import encode_png
from lit_vqdiff.modalities import parse_task
from lit_vqdiff.nn.tokenizer import Tokenizer
from lit_vqdiff.perf import DataWaitTimer
from lit_vqdiff.pipeline import ensure_tokenizers, plan, prepare_token_cache, resolve
from lit_vqdiff.stages.generator import GeneratorModule
from lit_vqdiff.training import build_trainer

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "data" / "photos"
# The two image tokenizers of the 256 px measurement: stage-1 overrides on top of the image preset.
TOKENIZERS = {
    "preset": [],
    "wide": ["tokenizer.channel_mult=[1,2,2]", "tokenizer.channels=128"],
}
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (230, 210, 40),
          "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (235, 235, 235), "black": (25, 25, 25)}
SHAPES = ("square", "disc", "bar")


class StepMarks(L.Callback):
    """Wall-clock time at the end of every training step."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        self.marks.append(time.perf_counter())


def timed_fit(cfg: Any, module: GeneratorModule, data: Any, task: str, cached: bool, warmup: int, run_dir: Path) -> dict[str, float]:
    """Steps/s of a fit after ``warmup`` steps, and its data-wait share."""
    timer, marks = DataWaitTimer(), StepMarks()
    trainer = build_trainer(cfg, run_dir, [timer, marks])
    trainer.fit(module, datamodule=ShardDataModule(data, parse_task(task).inputs(cached), seed=0))
    timed_marks = marks.marks[warmup:]
    rate = (len(timed_marks) - 1) / (timed_marks[-1] - timed_marks[0])
    return {"steps_per_s": round(rate, 3), "step_s": round(1 / rate, 4), "samples_per_s": round(rate * cfg.data.batch_size, 1),
            "data_wait_fraction": round(timer.fraction, 4), "timed_steps": len(timed_marks) - 1}


DEFAULT_TOKENIZERS = {m: Path("runs") / f"latest-stage1-{m}-shapes-v1" for m in ("image", "audio")}


def steps_per_second(task: str, cached: bool, steps: int, warmup: int) -> dict[str, float]:
    """The default config of ``task`` with its default tokenizers, from the cache or not."""
    with tempfile.TemporaryDirectory() as tmp:
        # The repository's tokenizers when they exist (runs/latest-stage1-*), else trained into tmp.
        mine = [f"tokenizers.{m}={link}" for m, link in DEFAULT_TOKENIZERS.items() if link.exists()]
        planned = plan(load_config("stage2", [f"task={task}", f"run.root={tmp}", "logger=none", *mine,
                                              f"trainer.max_steps={warmup + steps}", f"trainer.val_every_steps={10 * (warmup + steps)}",
                                              "sampling.val_n=0", f"tokenizers.cache={str(cached).lower()}",
                                              "trainer.checkpoint_every_minutes=0"]))  # no last.ckpt save inside the timing
        cfg = planned.cfg
        ensure_dataset(cfg.data)
        tokenizers, meta = ensure_tokenizers(planned)
        data = prepare_token_cache(cfg, tokenizers, meta) if cached else cfg.data
        module = GeneratorModule(cfg, meta)
        module.load_tokenizers(tokenizers)
        return timed_fit(cfg, module, data, task, cached, warmup, Path(tmp))


# ---------------------------------------------------------------------- 256 px


def picture(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A random-but-structured RGB picture (a two-colour gradient, a few shapes, some texture) and its caption."""
    names = list(COLORS)
    back, front = rng.choice(len(names), 2, replace=False)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / size
    ramp = np.clip(0.5 + (xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle), 0, 1)[..., None]
    other = np.array(COLORS[names[rng.integers(len(names))]], dtype=np.float32)
    image = (1 - ramp) * np.array(COLORS[names[back]], dtype=np.float32) + ramp * other
    shape = SHAPES[rng.integers(len(SHAPES))]
    for i in range(int(rng.integers(1, 4))):
        color = np.array(COLORS[names[front if i == 0 else rng.integers(len(names))]], dtype=np.float32)
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        r = rng.uniform(0.06, 0.25) * size
        if shape == "disc":
            inside = (ys * size - cy) ** 2 + (xs * size - cx) ** 2 < r**2
        elif shape == "square":
            inside = (abs(ys * size - cy) < r) & (abs(xs * size - cx) < r)
        else:
            inside = (abs(ys * size - cy) < r / 3) & (abs(xs * size - cx) < 1.5 * r)
        image[inside] = color
    texture = rng.normal(0, 6, (size // 4, size // 4, 1)).repeat(4, 0).repeat(4, 1)  # coarse grain, like film
    image = np.clip(image + texture + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)
    return image, f"a {names[front]} {shape} on a {names[back]} background"


def write_pictures(out: Path, train: int, val: int, size: int, shard_size: int, seed: int = 0) -> None:
    """A shard set of synthetic pictures with captions (png, txt, json), with its description."""
    params = {"source": "bench-synthetic-pictures", "train": train, "val": val, "size": size, "seed": seed}

    def fill(stage: Path, describer: Describer) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        for split, count in (("train", train), ("val", val)):
            with ShardWriter(stage, split, shard_size, describer) as writer:
                for i in range(count):
                    image, caption = picture(rng, size)
                    writer.write(f"{split}-{i:07d}", {"png": encode_png(image), "txt": caption.encode(),
                                                      "json": json.dumps({"synthetic": True}).encode()})
        return {}

    write_set(out, params, fill, "bench-pictures")


def photos_at(size: int) -> Path | None:
    """data/photos when it holds crops of ``size`` px, else None."""
    try:
        description = read_description(PHOTOS)
    except ValueError:
        return None
    image = (description or {}).get("image")
    if image and image["short_side"]["median"] >= size and read_sizes(PHOTOS):
        return PHOTOS
    return None


def stage2_config(root: Path, run_root: Path, size: int, batch: int, steps: int, warmup: int, cached: bool) -> Any:
    """The default text->image stage-2 config on the pictures at ``root``, its auto values resolved."""
    return resolve(load_config("stage2", [
        f"data.root={root}", f"run.root={run_root}", f"data.image_size={size}", "data.channels=3", f"data.batch_size={batch}",
        "logger=none", f"trainer.max_steps={warmup + steps}", f"trainer.val_every_steps={10 * (warmup + steps)}",
        "sampling.val_n=0", f"tokenizers.cache={str(cached).lower()}", "trainer.checkpoint_every_minutes=0"])).cfg


def image_tokenizer(size: int, extra: list[str]) -> Tokenizer:
    cfg = resolve(load_config("stage1", [f"data.image_size={size}", "data.channels=3", *extra])).cfg
    torch.manual_seed(0)
    return Tokenizer.from_config(cfg).eval().requires_grad_(False)


def encode_cost(tok: Tokenizer, size: int, batch: int = 16) -> dict[str, float]:
    """Milliseconds per sample of the frozen encoder, in bf16 autocast (a bf16-mixed step) and fp32 (the cache build)."""
    x = torch.rand(batch, 3, size, size) * 2 - 1
    out = {}
    for name, low in (("bf16_autocast", True), ("fp32", False)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            out[f"encode_ms_per_sample_{name}"] = round(1000 * timed(lambda: tok.encode(x), repeats=3) / batch, 2)
    return out


def at_size(size: int, train: int, val: int, batch: int, steps: int, warmup: int, names: list[str], workdir: Path) -> dict[str, Any]:
    """The 256 px measurement (see the module docstring) for the tokenizers in ``names``."""
    task = "text->image"
    root = photos_at(size)
    if root is None:
        root = workdir / "pictures"
        start = time.perf_counter()
        write_pictures(root, train, val, size, shard_size=max(1, train // 8))
        print(f"wrote {train} + {val} synthetic {size} px pictures in {time.perf_counter() - start:.1f} s", flush=True)
    sizes = read_sizes(root)
    result: dict[str, Any] = {"data": {"root": "data/photos" if root == PHOTOS else "synthetic (temporary folder)",
                                       "train_samples": sum(v for k, v in sizes.items() if k.startswith("train")),
                                       "val_samples": sum(v for k, v in sizes.items() if k.startswith("val")),
                                       "shards": len(sizes), "image_size": size},
                              "tokenizers": {}}
    for name in names:
        tok = image_tokenizer(size, TOKENIZERS[name])
        checksum = f"untrained-{name}-{size}"
        dim = tok.quantizer.lookup_dim
        meta = {"image": {"spec": tok.spec(), "checksum": checksum, "path": "", "latent_mean": [0.0] * dim, "latent_std": [1.0] * dim}}
        runs_dir = workdir / f"runs-{name}"
        raw_cfg = stage2_config(root, runs_dir, size, batch, steps, warmup, cached=False)
        cache = workdir / f"tokens-{name}"
        start = time.perf_counter()
        summary = build_cache(raw_cfg.data, {"image": tok}, {"image": checksum}, cache, progress=False)
        build_s = time.perf_counter() - start
        encoded = sum(s["samples"] for s in summary["splits"].values())
        cached_cfg = stage2_config(root, runs_dir, size, batch, steps, warmup, cached=True)
        cached_data = copy.deepcopy(cached_cfg.data)
        cached_data.root, cached_data.train, cached_data.val, cached_data.sizes = str(cache), "", "", ""
        runs = {}
        for mode, cfg, data in (("on_the_fly", raw_cfg, raw_cfg.data), ("cached", cached_cfg, cached_data)):
            module = GeneratorModule(cfg, meta)
            module.load_tokenizers({"image": tok})
            runs[mode] = timed_fit(cfg, module, data, task, mode == "cached", warmup, runs_dir / mode)
            print(f"{name} {mode}: {runs[mode]}", flush=True)
        cost = encode_cost(tok, size)
        step_cached = runs["cached"]["step_s"]
        predicted = (step_cached + batch * cost["encode_ms_per_sample_bf16_autocast"] / 1000) / step_cached
        result["tokenizers"][name] = {
            "arch": {k: tok.arch[k] for k in ("channels", "channel_mult", "num_res_blocks", "patch", "mid", "z_channels")},
            "codes": list(tok.code_shape),
            "params": sum(p.numel() for p in tok.parameters()),
            "encoder_flops_per_sample": encoder_flops(tok, size),
            "cache_build": {"samples": encoded, "seconds": round(build_s, 2), "samples_per_s": round(encoded / build_s, 1),
                            "shards": {split: s["shards"] for split, s in summary["splits"].items()},
                            "bytes": sum(f.stat().st_size for f in cache.glob("*.tar"))},
            "on_the_fly": runs["on_the_fly"],
            "cached": runs["cached"],
            "speedup": round(runs["cached"]["steps_per_s"] / runs["on_the_fly"]["steps_per_s"], 2),
            **cost,
            # What the encoder's own cost predicts: (cached step + batch x encode) / cached step.
            "speedup_predicted_from_encode_cost": round(predicted, 2),
        }
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(runs_dir, ignore_errors=True)
    return result


def encoder_flops(tok: Tokenizer, size: int) -> float:
    """FLOPs of encoding one picture, as torch's FLOP counter sees them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        tok.encode(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="text->image,image->audio,image->text",
                        help="comma-separated default tasks to measure; 'none' skips them")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per default-task run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps per default-task run")
    parser.add_argument("--size", type=int, default=256, help="image size of the large measurement; 0 skips it")
    parser.add_argument("--tokenizers", default=",".join(TOKENIZERS), help=f"of {list(TOKENIZERS)}")
    parser.add_argument("--train", type=int, default=512, help="synthetic train pictures (when data/photos has no crops of --size)")
    parser.add_argument("--val", type=int, default=64, help="synthetic val pictures")
    parser.add_argument("--batch", type=int, default=32, help="stage-2 batch of the large measurement")
    parser.add_argument("--large-steps", type=int, default=8, help="timed steps per run of the large measurement")
    parser.add_argument("--large-warmup", type=int, default=3, help="untimed first steps per run of the large measurement")
    parser.add_argument("--quick", action="store_true", help="smoke test: no default tasks; 64 + 16 pictures, batch 8, 3 + 2 steps")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.train, args.val, args.batch, args.large_steps, args.large_warmup = "none", 64, 16, 8, 3, 2
    tasks = {}
    for task in [t for t in args.tasks.split(",") if t and t != "none"]:
        on_the_fly = steps_per_second(task, False, args.steps, args.warmup)
        cached = steps_per_second(task, True, args.steps, args.warmup)
        tasks[task] = {"cached": cached, "on_the_fly": on_the_fly,
                       "speedup": round(cached["steps_per_s"] / on_the_fly["steps_per_s"], 2)}
    large = None
    if args.size:
        with tempfile.TemporaryDirectory() as tmp:
            large = at_size(args.size, args.train, args.val, args.batch, args.large_steps, args.large_warmup,
                            args.tokenizers.split(","), Path(tmp))
    write_result("token_cache_quick" if args.quick else "token_cache", {
        "tasks": tasks,
        "config": {"stage": "stage2", "steps_timed": args.steps, "warmup_steps": args.warmup},
        "large": large,
        "large_config": {"task": "text->image", "batch": args.batch, "steps_timed": args.large_steps,
                         "warmup_steps": args.large_warmup, "precision": "bf16-mixed", "tokenizer_weights": "untrained",
                         "num_workers": load_config("stage2").data.num_workers, "threads": torch.get_num_threads()},
    })


if __name__ == "__main__":
    main()
