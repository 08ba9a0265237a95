"""Sampling latency per sample: mask diffusion in K steps against DDIM 50 and DDPM 250 on
the same backbone (the default stage-2 DiT at text->image shapes), with the peak resident
memory of each method measured in its own process.

    .venv/bin/python bench/sampling_latency.py [--batch 64]

The machine's matmul throughput is measured in each process next to the workload, so the
ratios (mask speedup over DDIM/DDPM, latency in matmul-equivalents) hold on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from common import matmul_flops, timed, write_result

from lit_vqdiff.config import load_config
from lit_vqdiff.diffusion.gaussian import GaussianDiffusion
from lit_vqdiff.diffusion.masked import MaskedDiffusion
from lit_vqdiff.nn.conditions import ByteTextEncoder
from lit_vqdiff.nn.dit import DiT, trunk_size
from lit_vqdiff.modalities.text import BYTE_VOCAB, PAD_ID, encode_text
from lit_vqdiff.pipeline import resolve

METHODS = ("mask", "ddim_50", "ddpm_250")
GRID = (8, 8)  # the shapes-v1 image tokenizer's code grid
LATENT_CHANNELS = 8


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--method", choices=METHODS, help="measure one method here and print JSON")
    args = parser.parse_args()
    if args.method:
        print(json.dumps(measure(args.method, args.batch)))
        return
    results = {}
    for method in METHODS:  # one process each, so that peak memory is the method's own
        out = subprocess.run([sys.executable, str(Path(__file__)), "--method", method, "--batch", str(args.batch)],
                             check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
    mask = results["mask"]["matmul_gflop_equivalent_per_sample"]
    write_result("sampling_latency", {
        "batch": args.batch,
        "latency": results,
        "mask_speedup_over_ddim_50": round(results["ddim_50"]["matmul_gflop_equivalent_per_sample"] / mask, 2),
        "mask_speedup_over_ddpm_250": round(results["ddpm_250"]["matmul_gflop_equivalent_per_sample"] / mask, 2),
    })


if __name__ == "__main__":
    main()
