"""Sampling cost per sample.

1. Mask decoding across grid sizes: 12-step mask decoding (the default ``sampling.steps``,
   guidance 1.5, so cond and uncond run as one batch of 2B) of text->image codes at 8x8,
   16x16 and 32x32 grids, batch 1 and batch 64, with the default stage-2 DiT (DiT-T, patch 2),
   through ``GeneratorModule.generate`` (untrained weights: the cost does not depend on
   them). In bf16 autocast, as validation samples inside a bf16-mixed run, and in fp32, as
   ``lit-vqdiff sample`` runs (it sets no autocast). Per-sample latency = batch time /
   batch; throughput = samples/s. Every call counts the condition encoder's forward calls
   and asserts it ran once per sample batch (cond, then uncond: 2 calls whatever the step
   count) while the DiT ran once per step.
2. Methods at the default 8x8 grid: mask in K steps against DDIM 50 and DDPM 250 on the same
   backbone, each in its own process (its peak resident memory is its own).

    .venv/bin/python bench/sampling_latency.py [--batch 64]
    .venv/bin/python bench/sampling_latency.py --quick         # smoke test: 8x8 and 16x16, batch 1 and 4, bf16, no methods

Results: bench/results/sampling_latency.json (``--quick``: sampling_latency_quick.json).
The machine's matmul throughput is measured in each process next to the workload, so the
ratios (mask speedup over DDIM/DDPM, latency in matmul-equivalents) hold on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import matmul_flops, timed, write_result

from lit_vqdiff.config import load_config
from lit_vqdiff.diffusion.gaussian import GaussianDiffusion
from lit_vqdiff.diffusion.masked import MaskedDiffusion
from lit_vqdiff.eval.conditions import from_prompts
from lit_vqdiff.modalities import MODALITIES
from lit_vqdiff.modalities.text import BYTE_VOCAB, PAD_ID, encode_text
from lit_vqdiff.nn.conditions import ByteTextEncoder
from lit_vqdiff.nn.dit import DiT, trunk_size
from lit_vqdiff.nn.tokenizer import Tokenizer
from lit_vqdiff.pipeline import resolve
from lit_vqdiff.stages.generator import GeneratorModule

METHODS = ("mask", "ddim_50", "ddpm_250")
GRID = (8, 8)  # the shapes-v1 image tokenizer's code grid
LATENT_CHANNELS = 8
GRIDS = (8, 16, 32)
BATCHES = (1, 64)
# Image size and tokenizer.grid that give each code grid (the image preset's auto grid is image_size / 4, at most 16).
GRID_SOURCES = {8: (32, 0), 16: (64, 0), 32: (128, 32)}
PROMPTS = ["a small red circle on the left", "a large blue triangle on the right", "a medium green square in the center"]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------- grids


def generator_at(grid: int) -> GeneratorModule:
    """The default text->image GeneratorModule over an untrained image tokenizer with ``grid`` x ``grid`` codes."""
    size, tokenizer_grid = GRID_SOURCES[grid]
    stage1 = resolve(load_config("stage1", [f"data.image_size={size}", "data.channels=3", f"tokenizer.grid={tokenizer_grid}"])).cfg
    with torch.device("meta"):
        spec = Tokenizer.from_config(stage1).spec()
    dim = int(spec["quantizer"]["lookup_dim"])
    cfg = resolve(load_config("stage2", [f"data.image_size={size}", "data.channels=3"])).cfg
    meta = {"image": {"spec": spec, "checksum": "untrained", "path": "", "latent_mean": [0.0] * dim, "latent_std": [1.0] * dim}}
    torch.manual_seed(0)
    module = GeneratorModule(cfg, meta).eval()
    if tuple(module.target.shape) != (grid, grid):
        raise AssertionError(f"expected a {grid}x{grid} code grid, got {module.target.shape}")
    return module


class CallCounter:
    """Counts forward calls of a module (a forward hook)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1


def grid_row(module: GeneratorModule, batch: int, low: bool, budget_s: float) -> dict[str, Any]:
    """Latency of ``generate`` for ``batch`` prompts; asserts the condition encoder ran once per sample batch."""
    steps = int(module.cfg.sampling.steps)
    data = from_prompts([PROMPTS[i % len(PROMPTS)] for i in range(batch)]).batch(MODALITIES["text"], module.spec)
    encoder, dit = CallCounter(module.cond_encoder), CallCounter(module.dit)
    generator = torch.Generator().manual_seed(0)

    def call() -> None:
        encoder.calls = dit.calls = 0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            codes = module.generate(data, generator=generator)
        assert codes.shape == (batch, *module.target.shape), codes.shape
        # The condition is encoded once per sample (a cond and an uncond pass over the batch), not once per step.
        assert encoder.calls == 2, f"condition encoder ran {encoder.calls} times for {steps} steps (expected 2)"
        assert dit.calls == steps, f"DiT ran {dit.calls} times for {steps} steps"

    call()  # warm-up: first calls of new shapes are slower
    times = []
    while not times or (len(times) < 3 and sum(times) < budget_s):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    for counter in (encoder, dit):
        counter.handle.remove()
    return {"batch": batch, "batch_s": round(seconds, 4), "ms_per_sample": round(1000 * seconds / batch, 2),
            "samples_per_s": round(batch / seconds, 2), "timed_calls": len(times),
            "condition_encoder_calls_per_generate": 2, "dit_calls_per_generate": steps}


def grid_table(grids: list[int], batches: list[int], precisions: list[str], budget_s: float) -> dict[str, Any]:
    rows = []
    for grid in grids:
        module = generator_at(grid)
        for precision in precisions:
            for batch in batches:
                row = grid_row(module, batch, precision == "bf16", budget_s)
                row.update({"grid": f"{grid}x{grid}", "codes": grid * grid, "trunk_tokens": (grid // module.dit.patch_size) ** 2,
                            "precision": precision})
                rows.append(row)
                print(f"{grid}x{grid} {precision} batch {batch}: {row['ms_per_sample']} ms/sample", flush=True)
    g = load_config("stage2").generator
    width, depth, heads = trunk_size(g.preset, g.width, g.depth, g.heads)
    return {"rows": rows, "reference_matmul_flops": {"fp32": matmul_flops(torch.float32), "bf16": matmul_flops(torch.bfloat16)},
            "config": {"preset": g.preset, "width": width, "depth": depth, "patch_size": g.patch_size,
                       "steps": load_config("stage2").sampling.steps, "guidance": load_config("stage2").sampling.guidance,
                       "task": "text->image", "threads": torch.get_num_threads()}}


# ---------------------------------------------------------------------- methods


def measure(method: str, batch: int) -> dict[str, Any]:
    """Latency and peak memory of one sampling method, in the calling process."""
    cfg = resolve(load_config("stage2")).cfg
    g, s = cfg.generator, cfg.sampling
    width, depth, heads = trunk_size(g.preset, g.width, g.depth, g.heads)
    text = ByteTextEncoder(width, g.cond_depth, heads, cfg.data.text_bytes, vocab=BYTE_VOCAB, pad_id=PAD_ID, patch=g.text_patch_size).eval()
    common = dict(width=width, depth=depth, heads=heads, cond_dim=width, pooled_cond_dim=width, pos=g.pos,
                  seq_shape=GRID, patch_size=g.patch_size)
    tokens = encode_text(["a small red circle on the left"] * batch, cfg.data.text_bytes)[0]
    steps = s.steps if method == "mask" else int(method.split("_")[1])
    drop = torch.ones(batch, dtype=torch.bool)
    if method == "mask":
        dit = DiT(input="tokens", vocab_size=256, **common).eval()
        diffusion = MaskedDiffusion(256, schedule=g.mask_schedule)

        def sample(c, u):  # noqa: ANN001, ANN202
            return diffusion.sample(dit, (batch, *GRID), c, u, steps=steps, guidance=s.guidance,
                                    choice_temperature=s.choice_temperature)
    else:
        dit = DiT(input="latent", in_channels=LATENT_CHANNELS, **common).eval()
        diffusion = GaussianDiffusion(g.gaussian.num_steps, g.gaussian.schedule, g.gaussian.prediction)
        shape = (batch, LATENT_CHANNELS, *GRID)
        draw = diffusion.ddim_sample if method.startswith("ddim") else diffusion.ddpm_sample

        def sample(c, u):  # noqa: ANN001, ANN202
            return draw(dit, shape, c, u, guidance=s.guidance, steps=steps)

    low = cfg.trainer.precision == "bf16-mixed"

    def call() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            sample(text(tokens), text(tokens, drop))

    seconds = timed(call, repeats=3, warmup=1)
    peak = matmul_flops(torch.bfloat16 if low else torch.float32)
    ms = 1000 * seconds / batch
    return {
        "steps": steps,
        "batch_s": round(seconds, 4),
        "ms_per_sample": round(ms, 3),
        # Latency in units of the machine's own matmul speed: GFLOP of matmul work the
        # machine could have done in that time. Comparable across noisy runs.
        "matmul_gflop_equivalent_per_sample": round(ms / 1000 * peak / 1e9, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "config": {"width": width, "depth": depth, "patch_size": g.patch_size, "guidance": s.guidance,
                   "precision": cfg.trainer.precision, "threads": torch.get_num_threads()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="batch of the methods comparison")
    parser.add_argument("--method", choices=METHODS, help="measure one method here and print JSON")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods to compare; 'none' skips the comparison")
    parser.add_argument("--grids", default=",".join(map(str, GRIDS)), help="code grid sides of the mask-decoding table")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batches of the mask-decoding table")
    parser.add_argument("--precisions", default="bf16,fp32", help="bf16 (autocast, as validation) and/or fp32 (as `sample`)")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timed calls per row before it stops (1-3 calls)")
    parser.add_argument("--quick", action="store_true", help="smoke test: grids 8 and 16, batches 1 and 4, bf16, no methods")
    args = parser.parse_args()
    if args.method:
        print(json.dumps(measure(args.method, args.batch)))
        return
    if args.quick:
        args.grids, args.batches, args.precisions, args.methods, args.budget = "8,16", "1,4", "bf16", "none", 1.0
    grids = grid_table([int(v) for v in args.grids.split(",")], [int(v) for v in args.batches.split(",")],
                       args.precisions.split(","), args.budget)
    results = {}
    methods = [m for m in args.methods.split(",") if m and m != "none"]
    for method in methods:  # one process each, so that peak memory is the method's own
        out = subprocess.run([sys.executable, str(Path(__file__)), "--method", method, "--batch", str(args.batch)],
                             check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
    payload: dict[str, Any] = {"grids": grids, "batch": args.batch, "latency": results}
    if "mask" in results:
        mask = results["mask"]["matmul_gflop_equivalent_per_sample"]
        for other in ("ddim_50", "ddpm_250"):
            if other in results:
                payload[f"mask_speedup_over_{other}"] = round(results[other]["matmul_gflop_equivalent_per_sample"] / mask, 2)
    write_result("sampling_latency_quick" if args.quick else "sampling_latency", payload)


if __name__ == "__main__":
    main()
