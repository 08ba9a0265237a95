"""Sampling cost: the condition is encoded once per sample, not once per denoising step."""

from __future__ import annotations

import pytest
import torch
from conftest import resolved, tiny_stage1, tiny_stage2

from lit_vqdiff.eval.conditions import from_val_shards
from lit_vqdiff.modalities import parse_task
from lit_vqdiff.nn.tokenizer import Tokenizer
from lit_vqdiff.stages.generator import GeneratorModule


def untrained_meta(modalities, root):
    """Untrained tokenizers' specs with made-up latent statistics: enough to sample."""
    meta = {}
    for modality in modalities:
        cfg = resolved("stage1", tiny_stage1(root, root / "unused", f"modality={modality}", "tokenizer.channels=16"))
        tok = Tokenizer.from_config(cfg)
        dim = tok.quantizer.lookup_dim
        meta[modality] = {"spec": tok.spec(), "checksum": "0" * 64, "path": "", "latent_mean": [0.0] * dim, "latent_std": [1.0] * dim}
    return meta


def forward_calls(module: torch.nn.Module) -> list[int]:
    """A one-element list that counts ``module``'s forward calls from now on."""
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    "extra, steps_key",
    [(("task=text->image",), "sampling.steps"),
     (("task=image->audio", "generator.patch_size=2"), "sampling.steps"),
     (("task=class->image", "generator.objective=gaussian"), "sampling.ddim_steps")],
    ids=["text-image-mask", "image-audio-mask", "class-image-ddim"],
)
def test_condition_encoder_runs_once_per_sample_not_per_step(shapes_root, tmp_path, extra, steps_key):
    counts = {}
    for steps in (2, 6):
        cfg = resolved("stage2", tiny_stage2(shapes_root, tmp_path / "runs", *extra, f"{steps_key}={steps}"))
        task = parse_task(cfg.task)
        module = GeneratorModule(cfg, untrained_meta(task.tokenized, shapes_root)).eval()
        conditions = from_val_shards(cfg.data, task, 3)
        batch = conditions.batch(task.source, module.spec)
        encoder, dit = forward_calls(module.cond_encoder), forward_calls(module.dit)
        source_tokenizer = module.tokenizers[task.source.name].encoder if task.source.coded else None
        source_encodes = forward_calls(source_tokenizer) if source_tokenizer is not None else None
        out = module.generate(batch, generator=torch.Generator().manual_seed(0))
        assert out.shape[0] == 3
        counts[steps] = (encoder[0], dit[0], source_encodes[0] if source_encodes else None)
    for steps, (encoder_calls, dit_calls, source_calls) in counts.items():
        assert dit_calls == steps  # the hooks do see every step's call
        # A conditional and an unconditional pass, each over the whole batch, before the loop.
        assert encoder_calls == 2, f"{encoder_calls} condition-encoder calls for {steps} steps"
        if source_calls is not None:  # a coded source (a picture) is tokenized once too
            assert source_calls == 1
