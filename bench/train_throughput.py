"""Training throughput and model FLOP utilization (MFU) of both stages.

MFU = achieved model FLOP/s / the machine's own matmul FLOP/s, both measured in this
process (fp32 on a CPU, bf16 on a GPU). Model FLOPs per sample are counted the standard
way: 6 x (matmul parameters applied per token) x tokens, plus 12 x layers x sequence
length x width per token for attention (forward and backward); for stage 1 (convs) they
are counted by torch's FLOP counter over one forward and backward.

    .venv/bin/python bench/train_throughput.py [--presets default,DiT-B] [--compile off,on]
    python bench/train_throughput.py --device cuda --compile on --gpu-presets DiT-XL/2,DiT-XL/2 --gpu-batches 128,256

With ``--device cuda`` it measures instead the DiT paper's setting on a GPU: class-conditional
Gaussian diffusion on 32x32x4 latents with patch 2 (256 tokens, learned sigma), bf16 autocast,
for DiT-B/2 and DiT-XL/2, with steps/s, MFU against the bf16 matmul rate measured in the same
process, and peak GPU memory; results go to ``train_throughput_gpu.json``.
"""

from __future__ import annotations

import argparse
import itertools
import math
from typing import Any

import torch
from common import matmul_flops, timed, write_result
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lit_vqdiff.config import load_config
from lit_vqdiff.diffusion.gaussian import GaussianDiffusion
from lit_vqdiff.diffusion.masked import MaskedDiffusion
from lit_vqdiff.modalities.text import BYTE_VOCAB, PAD_ID, encode_text
from lit_vqdiff.nn.conditions import ByteTextEncoder
from lit_vqdiff.nn.dit import Condition, DiT, build_dit, trunk_size
from lit_vqdiff.nn.tokenizer import Tokenizer
from lit_vqdiff.pipeline import resolve


def matmul_params(module: nn.Module) -> int:
    """Weights of every Linear in ``module`` (biases excluded, as in the usual 6N count)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def dit_flops_per_sample(dit: DiT, text: ByteTextEncoder | None) -> float:
    """6N per token over the trunk and the condition encoder (if any), plus attention terms."""
    trunk_tokens = math.prod(dit.grid)
    context = text.max_bytes // text.patch if text is not None else 0
    width, depth = dit.pos_embed.shape[-1], len(dit.blocks)
    # Per-sample (not per-token) linears: adaLN modulation and the time embedding.
    per_sample = sum(matmul_params(b.modulation) for b in dit.blocks) + matmul_params(dit.final.modulation)
    per_sample += matmul_params(dit.time_embed) + (matmul_params(dit.pooled_embed) if dit.pooled_embed else 0)
    cross_kv = sum(b.cross_attn.kv.weight.numel() for b in dit.blocks if b.cross_attn is not None)
    trunk = matmul_params(dit) - per_sample - cross_kv
    flops = 6 * (trunk * trunk_tokens + cross_kv * context + per_sample)
    flops += 12 * depth * trunk_tokens * width * trunk_tokens  # self-attention scores and values
    if text is not None:
        flops += 6 * matmul_params(text) * context
        flops += 12 * depth * context * width * trunk_tokens  # cross-attention
        flops += 12 * len(text.blocks) * context * width * context
    return float(flops)


def stage2_step(preset: str, batch: int, precision: str, compiled: bool) -> dict[str, Any]:
    """One stage-2 training step of the default text->image shapes at ``preset`` size."""
    cfg = resolve(load_config("stage2")).cfg
    g = cfg.generator
    width, depth, heads = trunk_size(g.preset, g.width, g.depth, g.heads) if preset == "default" else trunk_size(preset)
    vocab = load_config("stage1").tokenizer.quantizer.codebook_size
    dit = DiT(width=width, depth=depth, heads=heads, input="tokens", vocab_size=vocab, seq_shape=(8, 8),
              patch_size=g.patch_size, cond_dim=width, pooled_cond_dim=width, pos=g.pos)
    text = ByteTextEncoder(width, g.cond_depth, heads, cfg.data.text_bytes, vocab=BYTE_VOCAB, pad_id=PAD_ID, patch=g.text_patch_size)
    diffusion = MaskedDiffusion(vocab, schedule=g.mask_schedule)
    params = [*dit.parameters(), *text.parameters()]
    if compiled:  # what trainer.compile=true does
        dit.compile()
        text.compile()
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    x0 = torch.randint(0, vocab, (batch, 8, 8))
    tokens = encode_text(["a large blue triangle on the right"] * batch, cfg.data.text_bytes)[0]
    low = precision == "bf16-mixed"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            loss, _ = diffusion.loss(dit, x0, text(tokens))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds = timed(step, repeats=5, warmup=3 if compiled else 2)
    flops = dit_flops_per_sample(dit, text) * batch
    return {"preset": f"default ({g.preset})" if preset == "default" else preset, "width": width, "depth": depth, "batch": batch,
            "precision": precision, "compile": compiled, "step_s": round(seconds, 4), "samples_per_s": round(batch / seconds, 1),
            "model_flops_per_step": flops, "achieved_flops": flops / seconds,
            "params": sum(q.numel() for q in params)}


def latent_step_gpu(preset: str, batch: int, compiled: bool, mode: str = "default") -> dict[str, Any]:
    """One bf16 training step of a class-conditional latent DiT at 256 px (the DiT paper's setting)."""
    device = torch.device("cuda")
    with device:
        dit = build_dit(preset, input="latent", seq_shape=(32, 32), in_channels=4, num_classes=1000, learn_sigma=True)
    diffusion = GaussianDiffusion(1000, "linear", "eps", learn_sigma=True)
    model = torch.compile(dit, mode=None if mode == "default" else mode) if compiled else dit
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4, fused=True)
    x0 = torch.randn(batch, 4, 32, 32, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = diffusion.loss(model, x0, Condition(labels=labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, repeats=10, warmup=3, sync=True)
    flops = dit_flops_per_sample(dit, None) * batch
    return {"preset": preset, "batch": batch, "tokens_per_sample": math.prod(dit.grid), "precision": "bf16-mixed",
            "compile": compiled, "compile_mode": mode if compiled else None, "step_s": round(seconds, 4), "steps_per_s": round(1 / seconds, 2),
            "samples_per_s": round(batch / seconds, 1), "model_flops_per_step": flops, "achieved_flops": flops / seconds,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "params": sum(q.numel() for q in dit.parameters())}


def gpu_main(presets: list[str], batches: list[int], compile_modes: list[str], mode: str = "default") -> None:
    """The GPU measurements, written after each one so that a run cut short keeps what it had."""
    peak = matmul_flops(torch.bfloat16, size=8192, device="cuda", repeats=10)
    results: dict[str, Any] = {"matmul_flops": {"bf16": peak}, "stage2_latent": []}
    for compiled in compile_modes:
        for preset, batch in zip(presets, batches):
            r = latent_step_gpu(preset, batch, compiled == "on", mode)
            r["mfu"] = round(r["achieved_flops"] / peak, 3)
            results["stage2_latent"].append(r)
            write_result("train_throughput_gpu", results)
            torch.cuda.empty_cache()


def stage1_step(batch: int, channels_last: bool) -> dict[str, Any]:
    """One default stage-1 (image tokenizer) training step, FLOPs counted by torch."""
    cfg = resolve(load_config("stage1")).cfg
    tok = Tokenizer.from_config(cfg)
    x = torch.rand(batch, 3, 32, 32) * 2 - 1
    if channels_last:  # what trainer.channels_last=true (the default) does
        tok = tok.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-4, foreach=True)

    def step() -> None:
        target, recon, q = tok(x)
        loss = (recon - target).pow(2).mean() + q.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # k-means initialization happens on the first step
    counter = FlopCounterMode(display=False)
    with counter:
        target, recon, q = tok(x)
        ((recon - target).pow(2).mean() + q.loss).backward()
    flops = counter.get_total_flops()
    seconds = timed(step, repeats=5, warmup=2)
    return {"stage": "stage1", "batch": batch, "channels_last": channels_last, "step_s": round(seconds, 4),
            "samples_per_s": round(batch / seconds, 1),
            "model_flops_per_step": flops, "achieved_flops": flops / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", default="default,DiT-B")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--compile", default="off,on", help="eager (off) and/or torch.compile (on)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--gpu-presets", default="DiT-B/2,DiT-XL/2")
    parser.add_argument("--gpu-batches", default="256,128", help="per preset of --gpu-presets")
    parser.add_argument("--gpu-compile-mode", default="default",
                        help="torch.compile mode of the GPU runs: default, max-autotune-no-cudagraphs, ...")
    args = parser.parse_args()
    if args.device == "cuda":
        gpu_main(args.gpu_presets.split(","), [int(b) for b in args.gpu_batches.split(",")], args.compile.split(","),
                 args.gpu_compile_mode)
        return
    peak = {"fp32": matmul_flops(torch.float32), "bf16": matmul_flops(torch.bfloat16)}
    results: dict[str, Any] = {"matmul_flops": peak, "stage2": [], "stage1": []}
    for preset in args.presets.split(","):
        for precision, compiled in itertools.product(("32-true", "bf16-mixed"), args.compile.split(",")):
            r = stage2_step(preset, args.batch, precision, compiled == "on")
            limit = peak["bf16"] if precision == "bf16-mixed" else peak["fp32"]
            r["mfu"] = round(r["achieved_flops"] / limit, 3)
            r["mfu_vs_fp32_matmul"] = round(r["achieved_flops"] / peak["fp32"], 3)
            results["stage2"].append(r)
    for channels_last in (False, True):
        s1 = stage1_step(64, channels_last)
        # Not called MFU: oneDNN's convolutions can outrun the torch.mm reference (ratio > 1),
        # so for the conv tokenizer this is throughput relative to that reference only.
        s1["throughput_vs_fp32_matmul"] = round(s1["achieved_flops"] / peak["fp32"], 3)
        results["stage1"].append(s1)
    write_result("train_throughput", results)


if __name__ == "__main__":
    main()
