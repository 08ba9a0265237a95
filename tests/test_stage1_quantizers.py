"""Every quantizer option trains end to end through TokenizerModule, in every precision."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_stage1, resolved
from PIL import Image

from lit_vqdiff.config import load_config
from lit_vqdiff.data.datamodule import ShardDataModule
from lit_vqdiff.nn.tokenizer import Tokenizer
from lit_vqdiff.stages.tokenizer import TokenizerModule
from lit_vqdiff.training import build_trainer

STEPS = 3


def short_fit(shapes_root: Path, tmp_path: Path, *extra: str) -> tuple[TokenizerModule, dict[str, float]]:
    """Train STEPS steps and validate once on one batch; returns the module and its val/train figures."""
    overrides = tiny_stage1(shapes_root, tmp_path / "runs", f"trainer.max_steps={STEPS}", f"trainer.val_every_steps={STEPS}",
                            "trainer.limit_val_batches=1", "trainer.log_every_steps=1", "logger=none", *extra)
    cfg = resolved("stage1", overrides)
    module = TokenizerModule(cfg)
    trainer = build_trainer(cfg, tmp_path / "run")
    trainer.fit(module, datamodule=ShardDataModule(cfg.data, (cfg.modality,), seed=0))
    assert trainer.global_step == STEPS
    return module, {k: float(v) for k, v in trainer.callback_metrics.items()}


def val_inputs(modality: str, n: int = 4) -> torch.Tensor:
    """A few inputs of the right shape (the tokenizer's geometry is what is under test)."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1 if modality == "image" else 0.3 * torch.randn(n, 8000, generator=g)


@pytest.mark.parametrize(
    "extra, code_shape",
    [
        ((), (8, 8)),
        (("tokenizer.quantizer.update=grad",), (8, 8)),
        (("tokenizer.quantizer.kind=rvq", "tokenizer.quantizer.num_quantizers=2"), (2, 8, 8)),
        (("tokenizer.quantizer.kind=fsq", "tokenizer.quantizer.levels=[4,4,4]"), (8, 8)),
        (("modality=audio", "tokenizer.channels=16", "tokenizer.quantizer.kind=rvq", "tokenizer.quantizer.num_quantizers=2"),
         (2, 32)),
    ],
    ids=["vq-ema", "vq-grad", "rvq", "fsq", "audio-rvq"],
)
def test_quantizer_kinds_train_end_to_end(shapes_root, tmp_path, extra, code_shape):
    module, metrics = short_fit(shapes_root, tmp_path, *extra)
    tokenizer = module.tokenizer.eval()
    codes = tokenizer.encode(val_inputs(tokenizer.modality))
    assert tokenizer.code_shape == code_shape and tuple(codes.shape) == (4, *code_shape)
    assert math.isfinite(metrics["train/loss"]) and 0.0 < metrics["val/codebook_usage"] <= 1.0
    q = tokenizer.quantizer
    per_codebook = sorted(k for k in metrics if k.startswith(("val/codebook_usage_", "val/dead_codes_")))
    if q.num_codebooks > 1:
        assert per_codebook == ["val/codebook_usage_0", "val/codebook_usage_1", "val/dead_codes_0", "val/dead_codes_1"]
        assert metrics["val/dead_codes_0"] + metrics["val/dead_codes_1"] == metrics["val/dead_codes"]
        for i in range(2):  # usage and dead codes describe the same histogram
            assert metrics[f"val/codebook_usage_{i}"] == pytest.approx(1 - metrics[f"val/dead_codes_{i}"] / q.codebook_size)
    else:
        assert per_codebook == []
    # The usage picture: one bar chart per codebook, dead codes as red columns.
    picture = np.asarray(Image.open(tmp_path / "run" / "media" / "val_code_usage" / f"step-{STEPS:07d}.png"))
    n = q.num_codebooks
    assert picture.shape == (128 * n + 4 * (n - 1), q.codebook_size, 3)
    top_rows = picture[[132 * i for i in range(n)]]
    assert int((top_rows == (230, 60, 60)).all(-1).sum()) == metrics["val/dead_codes"]
    if module.cfg.tokenizer.quantizer.kind == "fsq":
        assert not hasattr(q, "restarts") and "train/restarts" not in metrics  # nothing to restart
    else:
        assert "train/restarts" in metrics


@pytest.mark.parametrize("update", ["ema", "grad"])
def test_codebook_update_modes(shapes_root, tmp_path, update):
    """With k-means and restarts off, the codebook moves only by EMA, or only by the optimizer."""
    module, _ = short_fit(shapes_root, tmp_path, f"tokenizer.quantizer.update={update}", "tokenizer.quantizer.kmeans_init=false",
                          "tokenizer.quantizer.restart_dead=false")
    q = module.tokenizer.quantizer
    seeded = Tokenizer.from_config(module.cfg).quantizer.embedding
    assert not torch.equal(q.embedding.detach(), seeded.detach())
    optimized = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    assert (id(q.embedding) in optimized) == (update == "grad")
    assert isinstance(q.embedding, torch.nn.Parameter) == (update == "grad")


def codebook_tensors(module: TokenizerModule) -> dict[str, torch.Tensor]:
    """Codebook state of every VQ layer: vectors and EMA statistics."""
    q = module.tokenizer.quantizer
    layers = getattr(q, "layers", [q])
    names = ("embedding", "cluster_size", "embed_sum")
    return {f"{i}.{name}": getattr(layer, name) for i, layer in enumerate(layers) for name in names}


@pytest.mark.parametrize("kind", ["vq", "rvq"])
def test_bf16_mixed_keeps_the_codebook_float32(shapes_root, tmp_path, kind):
    # A random codebook and dead_after=1: codes get restarted under autocast too.
    module, metrics = short_fit(shapes_root, tmp_path, "trainer.precision=bf16-mixed", f"tokenizer.quantizer.kind={kind}",
                                "tokenizer.quantizer.num_quantizers=2", "tokenizer.quantizer.kmeans_init=false",
                                "tokenizer.quantizer.dead_after=1")
    for name, tensor in codebook_tensors(module).items():
        assert tensor.dtype == torch.float32, name
        assert torch.isfinite(tensor).all(), name
    assert int(module.tokenizer.quantizer.restarts) > 0
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/psnr"])


def test_float16_autocast_keeps_the_quantizer_float32(shapes_root):
    """What 16-mixed does to a step, on CPU: the convs run in float16, the quantizer in float32."""
    cfg = resolved("stage1", tiny_stage1(shapes_root, shapes_root / "unused"))
    tokenizer = Tokenizer.from_config(cfg).train()
    with torch.autocast("cpu", dtype=torch.float16):
        _, recon, q = tokenizer(val_inputs("image", 8))
    assert recon.dtype == torch.float16 and q.quantized.dtype == torch.float16
    assert q.loss.dtype == torch.float32 and torch.isfinite(q.loss)
    assert tokenizer.quantizer.embedding.dtype == torch.float32 and torch.isfinite(tokenizer.quantizer.embedding).all()
    (recon.float().pow(2).mean() + q.loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in tokenizer.encoder.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a GPU (the config rejects it on CPU)")
def test_16_mixed_on_gpu_keeps_the_codebook_float32(shapes_root, tmp_path):
    module, metrics = short_fit(shapes_root, tmp_path, "trainer.accelerator=gpu", "trainer.precision=16-mixed")
    for name, tensor in codebook_tensors(module).items():
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), name
    assert math.isfinite(metrics["train/loss"])
