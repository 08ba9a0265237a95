"""Scaling table: how a training step's time grows with the work, for both stages.

Stage 2: a text-conditioned mask-diffusion training step (the default text->image setup:
48 caption bytes through the byte text encoder, ``generator.cond_depth`` and
``text_patch_size`` as configured, patch 2 on the codes) at code grids 8x8, 16x16 and
32x32 (a 256-code image book) and at the code lengths of 1, 4 and 10 s of audio (the
default audio tokenizer at 8 kHz: 32 codes per second, padded to a multiple of 8; a
512-code book), for DiT-T, DiT-S and DiT-B; bf16 autocast as the default stage-2 config
uses, eager. Stage 1: the default image tokenizer (conf/modality/image.yaml) at 32, 64,
128 and 256 px (8x8 codes at 32 px, 16x16 from 64 px up, the patch stem taking the rest
of the stride), fp32 and channels-last as the default stage-1 config trains on a CPU.

Every row runs at one fixed batch (``--batch``, 32). FLOPs are counted by
torch.utils.flop_counter.FlopCounterMode over one real step (forward and backward), and
MFU is those FLOPs per second against the matmul rate measured in this process just
before the row (bf16 for stage 2, fp32 for stage 1, where it is called
``throughput_vs_fp32_matmul``: oneDNN's convolutions can beat the torch.mm reference).
The exponent of each family is the least-squares slope of log(step time) against
log(codes per sample) or log(pixels per sample); the slope of the FLOPs is given beside
it, and the local slope between the two largest rows.

    .venv/bin/python bench/scaling.py                   # the full table (~5 min on a quiet 2-core CPU)
    .venv/bin/python bench/scaling.py --quick           # smoke test: batch 4, DiT-T only, two sizes per family
    .venv/bin/python bench/scaling.py --device cuda --rows largest --batch 256   # the largest rows on a GPU

Results: bench/results/scaling.json (``scaling_gpu.json`` with ``--device cuda``; ``--quick`` writes
``scaling_quick.json`` and leaves the full figures alone), rewritten after every row.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, Callable

import numpy as np
import torch
from common import matmul_flops, write_result
from torch.utils.flop_counter import FlopCounterMode
from train_throughput import dit_flops_per_sample

from lit_vqdiff.config import load_config
from lit_vqdiff.diffusion.masked import MaskedDiffusion
from lit_vqdiff.modalities.text import BYTE_VOCAB, PAD_ID, encode_text
from lit_vqdiff.nn.conditions import ByteTextEncoder
from lit_vqdiff.nn.dit import DiT, trunk_size
from lit_vqdiff.nn.tokenizer import Tokenizer
from lit_vqdiff.pipeline import resolve

GRIDS = (8, 16, 32)
AUDIO_SECONDS = (1, 4, 10)
AUDIO_RATE = 8000
PRESETS = ("DiT-T", "DiT-S", "DiT-B")
IMAGE_SIZES = (32, 64, 128, 256)
PATCH = 2  # codes per trunk token along each axis: the default generator.patch_size
CAPTION = "a large blue triangle on the right"


class Timer:
    """Median seconds of a step: ``repeats`` timed calls, fewer once ``budget_s`` is spent (at least ``least``)."""

    def __init__(self, device: str, repeats: int, budget_s: float, least: int = 2):
        self.device, self.repeats, self.budget_s, self.least = device, repeats, budget_s, least

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def __call__(self, step: Callable[[], None]) -> tuple[float, int]:
        times: list[float] = []
        spent = 0.0
        while len(times) < self.repeats and (len(times) < self.least or spent < self.budget_s):
            self.sync()
            start = time.perf_counter()
            step()
            self.sync()
            times.append(time.perf_counter() - start)
            spent += times[-1]
        return sorted(times)[len(times) // 2], len(times)


def counted(step: Callable[[], None]) -> float:
    """FLOPs of one call of ``step`` (forward and backward), as torch's FLOP counter sees them."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def audio_code_lengths(seconds: tuple[int, ...]) -> dict[int, int]:
    """Codes per clip of the default audio tokenizer at AUDIO_RATE (its geometry, on the meta device)."""
    lengths = {}
    for s in seconds:
        cfg = resolve(load_config("stage1", ["modality=audio", f"data.sample_rate={AUDIO_RATE}",
                                             f"data.audio_samples={AUDIO_RATE * s}"])).cfg
        with torch.device("meta"):
            lengths[s] = math.prod(Tokenizer.from_config(cfg).code_shape)
    return lengths


def stage2_row(preset: str, family: str, size: int, seq_shape: tuple[int, ...], vocab: int, batch: int, device: str,
               precision: str, timer: Timer) -> dict[str, Any]:
    """One text-conditioned mask-diffusion training step of ``preset`` on codes of ``seq_shape``."""
    cfg = resolve(load_config("stage2")).cfg
    g, text_bytes = cfg.generator, int(cfg.data.text_bytes)
    width, depth, heads = trunk_size(preset)
    dev = torch.device(device)
    with dev:
        dit = DiT(width=width, depth=depth, heads=heads, input="tokens", vocab_size=vocab, seq_shape=seq_shape,
                  patch_size=PATCH, cond_dim=width, pooled_cond_dim=width, pos=g.pos)
        text = ByteTextEncoder(width, g.cond_depth, heads, text_bytes, vocab=BYTE_VOCAB, pad_id=PAD_ID, patch=g.text_patch_size)
    diffusion = MaskedDiffusion(vocab, schedule=g.mask_schedule)
    params = [*dit.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if device == "cuda" else {"foreach": True}))
    x0 = torch.randint(0, vocab, (batch, *seq_shape), device=dev)
    tokens = encode_text([CAPTION] * batch, text_bytes)[0].to(dev)
    low = precision == "bf16-mixed"

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=low):
            loss, _ = diffusion.loss(dit, x0, text(tokens))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    flops = counted(step)  # doubles as the warm-up step
    reference = matmul_flops(torch.bfloat16 if low else torch.float32, **reference_size(device))
    seconds, timed = timer(step)
    codes = math.prod(seq_shape)
    return {
        "stage": "stage2", "family": family, "size": size, "preset": preset, "width": width, "depth": depth,
        "codes_per_sample": codes, "trunk_tokens": codes // PATCH ** len(seq_shape), "batch": batch, "precision": precision,
        "step_s": round(seconds, 4), "timed_steps": timed, "samples_per_s": round(batch / seconds, 2),
        "flops_per_step": flops, "analytic_flops_per_step": dit_flops_per_sample(dit, text) * batch,
        "achieved_flops": flops / seconds, "matmul_flops": reference,
        "mfu": round(flops / seconds / reference, 3),
        "params": sum(p.numel() for p in params),
    }


def stage1_row(image_size: int, batch: int, device: str, precision: str, timer: Timer) -> dict[str, Any]:
    """One training step of the default image tokenizer at ``image_size`` (reconstruction + VQ losses)."""
    cfg = resolve(load_config("stage1", [f"data.image_size={image_size}", "data.channels=3"])).cfg
    dev = torch.device(device)
    tok = Tokenizer.from_config(cfg).to(dev)
    x = torch.rand(batch, 3, image_size, image_size, device=dev) * 2 - 1
    if cfg.trainer.channels_last:  # the default: what TokenizerModule does
        tok = tok.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-4, **({"fused": True} if device == "cuda" else {"foreach": True}))
    low = precision == "bf16-mixed"

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=low):
            target, recon, q = tok(x)
            loss = (recon.float() - target).pow(2).mean() + q.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # k-means initialization of the codebook happens on the first step
    flops = counted(step)
    reference = matmul_flops(torch.bfloat16 if low else torch.float32, **reference_size(device))
    seconds, timed = timer(step)
    name = "mfu" if low or device == "cuda" else "throughput_vs_fp32_matmul"
    return {
        "stage": "stage1", "family": "image", "size": image_size, "pixels_per_sample": image_size**2,
        "grid": int(cfg.tokenizer.grid), "patch": int(cfg.tokenizer.patch), "batch": batch, "precision": precision,
        "step_s": round(seconds, 4), "timed_steps": timed, "samples_per_s": round(batch / seconds, 2),
        "flops_per_step": flops, "achieved_flops": flops / seconds, "matmul_flops": reference,
        name: round(flops / seconds / reference, 3),
        "params": sum(p.numel() for p in tok.parameters()),
    }


def reference_size(device: str) -> dict[str, Any]:
    return {"size": 8192, "device": "cuda", "repeats": 10} if device == "cuda" else {"size": 2048, "device": "cpu", "repeats": 3}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x); None with fewer than two distinct x."""
    if len(set(xs)) < 2:
        return None
    return round(float(np.polyfit(np.log(xs), np.log(ys), 1)[0]), 3)


def exponents(rows: list[dict[str, Any]], work: str) -> dict[str, Any]:
    """Slopes of step time and FLOPs against ``work`` (a row key), overall and between the two largest rows."""
    rows = sorted(rows, key=lambda r: r[work])
    xs = [r[work] for r in rows]
    out = {"work": work, "values": xs, "step_time": slope(xs, [r["step_s"] for r in rows]),
           "flops": slope(xs, [r["flops_per_step"] for r in rows])}
    if len(rows) >= 2:
        out["step_time_two_largest"] = slope(xs[-2:], [r["step_s"] for r in rows[-2:]])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="samples per step, every row")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--grids", default=",".join(map(str, GRIDS)), help="code grid sides (stage 2)")
    parser.add_argument("--seconds", default=",".join(map(str, AUDIO_SECONDS)), help="audio clip lengths (stage 2)")
    parser.add_argument("--image-sizes", default=",".join(map(str, IMAGE_SIZES)), help="stage-1 image sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row at most")
    parser.add_argument("--row-budget", type=float, default=10.0,
                        help="seconds of timed steps per row before it stops early (at least 2 steps)")
    parser.add_argument("--rows", choices=("all", "largest"), default="all", help="largest: the biggest size of each family only")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 4, DiT-T, two sizes per family, 2 steps")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.presets, args.grids, args.seconds, args.image_sizes = 4, "DiT-T", "8,16", "1,4", "32,64"
        args.repeats, args.row_budget = 2, 1.0
    grids = [int(v) for v in args.grids.split(",")]
    seconds = [int(v) for v in args.seconds.split(",")]
    image_sizes = [int(v) for v in args.image_sizes.split(",")]
    if args.rows == "largest":
        grids, seconds, image_sizes = grids[-1:], seconds[-1:], image_sizes[-1:]
    trainer = ["trainer=gpu"] if args.device == "cuda" else []
    precision2 = load_config("stage2", trainer).trainer.precision
    precision1 = load_config("stage1", trainer).trainer.precision
    timer = Timer(args.device, args.repeats, args.row_budget)
    image_vocab = load_config("stage1").tokenizer.quantizer.codebook_size
    audio_vocab = load_config("stage1", ["modality=audio"]).tokenizer.quantizer.codebook_size
    lengths = audio_code_lengths(tuple(seconds))
    text_bytes = int(resolve(load_config("stage2")).cfg.data.text_bytes)
    started = time.perf_counter()
    rows2: list[dict[str, Any]] = []
    rows1: list[dict[str, Any]] = []

    def publish(final: bool) -> None:
        """Write the table so far (after every row: a run cut short keeps its rows)."""
        presets = list(dict.fromkeys(r["preset"] for r in rows2))

        def rows_of(preset: str, family: str) -> list[dict[str, Any]]:
            return [r for r in rows2 if r["preset"] == preset and family in ("all", r["family"])]

        name = ("scaling" if args.device == "cpu" else "scaling_gpu") + ("_quick" if args.quick else "")
        write_result(name, {
            "complete": final,
            "config": {"batch": args.batch, "device": args.device, "patch_size": PATCH, "stage2_precision": precision2,
                       "stage1_precision": precision1, "compile": False, "threads": torch.get_num_threads(),
                       "condition": f"text: {text_bytes} caption bytes through the byte text encoder (default stage-2 settings)",
                       "audio_rate": AUDIO_RATE, "audio_codes": {f"{s}s": n for s, n in lengths.items()}},
            "stage2": rows2,
            "stage1": rows1,
            # Per preset: image grids, audio lengths, and both together ("all"), codes per sample as the work.
            "exponents": {
                "stage2": {p: {fam: exponents(rows_of(p, fam), "codes_per_sample") for fam in ("image_grid", "audio", "all")}
                           for p in presets},
                "stage1": exponents(rows1, "pixels_per_sample") if rows1 else None,
            },
            "wall_s": round(time.perf_counter() - started, 1),
        }, echo=final)

    for preset in args.presets.split(","):
        shapes = [("image_grid", n, (n, n), image_vocab) for n in grids]
        shapes += [("audio", s, (lengths[s],), audio_vocab) for s in seconds]
        for family, size, seq_shape, vocab in shapes:
            row = stage2_row(preset, family, size, seq_shape, vocab, args.batch, args.device, precision2, timer)
            rows2.append(row)
            print(f"{preset} {family} {size}: {row['step_s']} s/step, MFU {row['mfu']}", flush=True)
            publish(False)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    for size in image_sizes:
        row = stage1_row(size, args.batch, args.device, precision1, timer)
        rows1.append(row)
        print(f"stage1 {size}px: {row['step_s']} s/step", flush=True)
        publish(False)
    publish(True)


if __name__ == "__main__":
    main()
