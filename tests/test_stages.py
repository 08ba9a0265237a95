"""fast_dev_run of both stages: one training and one validation batch through every path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_stage1, tiny_stage2, resolved

from lit_vqdiff.config import load_config
from lit_vqdiff.data.datamodule import ShardDataModule
from lit_vqdiff.nn.tokenizer import Tokenizer
from lit_vqdiff.eval.conditions import from_val_shards
from lit_vqdiff.modalities import parse_task
from lit_vqdiff.pipeline import _check_generator, stage1_overrides
from lit_vqdiff.stages.generator import GeneratorModule
from lit_vqdiff.stages.tokenizer import TokenizerModule
from lit_vqdiff.training import build_trainer


def fast_dev_fit(cfg, module, modalities, run_dir: Path):
    trainer = build_trainer(cfg, run_dir)
    trainer.fit(module, datamodule=ShardDataModule(cfg.data, modalities, seed=0))
    return trainer


@pytest.mark.parametrize(
    "extra, expected",
    [
        ((), "val/psnr"),
        (("modality=audio", "tokenizer.channels=16"), "val/si_snr"),
        (("modality=audio", "tokenizer.frontend=wave", "tokenizer.channels=8", "tokenizer.channel_mult=[1,2,2]",
          "tokenizer.downsample=[8,10]", "tokenizer.num_res_blocks=1"), "val/lsd"),
    ],
    ids=["image", "audio-spectrogram", "audio-wave"],
)
def test_stage1_fast_dev_run(shapes_root, tmp_path, extra, expected):
    cfg = resolved("stage1", tiny_stage1(shapes_root, tmp_path / "runs", "trainer.fast_dev_run=true", *extra))
    module = TokenizerModule(cfg, verifier=True)
    trainer = fast_dev_fit(cfg, module, (cfg.modality,), tmp_path)
    assert trainer.global_step == 1
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"]))
    assert 0.0 < float(metrics["val/codebook_usage"]) <= 1.0
    assert math.isfinite(float(metrics[expected]))
    assert 0.0 <= float(metrics["val/verifier_agreement"]) <= 1.0


def random_tokenizers(modalities, root: Path) -> tuple[dict, dict]:
    """Untrained tokenizers with made-up latent statistics: enough to run stage 2's code paths."""
    tokenizers, meta = {}, {}
    for modality in modalities:
        cfg = resolved("stage1", tiny_stage1(root, root / "unused", f"modality={modality}", "tokenizer.channels=16"))
        tok = Tokenizer.from_config(cfg).eval()
        tokenizers[modality] = tok
        dim = tok.quantizer.lookup_dim
        meta[modality] = {"spec": tok.spec(), "checksum": "0" * 64, "path": "", "latent_mean": [0.0] * dim, "latent_std": [1.0] * dim}
    return tokenizers, meta


@pytest.mark.parametrize(
    "extra",
    [("task=text->image",), ("task=text->image", "generator.text_encoder=minilm"),
     ("task=text->image", "generator.objective=uniform", "generator.discrete.num_steps=100"),
     ("task=class->image", "generator.objective=mask_replace", "generator.discrete.hybrid=1.0"),
     ("task=class->image", "generator.objective=gaussian", "sampling.ddim_steps=3"),
     ("task=image->text", "sampling.steps=4"), ("task=audio->image",), ("task=image->audio", "generator.patch_size=2"),
     ("task=text->audio", "generator.objective=gaussian", "sampling.sampler=ddpm", "sampling.ddpm_steps=4")],
    ids=["text-image-mask", "text-image-minilm", "text-image-uniform", "class-image-mask-replace", "class-image-gaussian", "image-text", "audio-image", "image-audio-grouped", "text-audio-gaussian-ddpm"],
)
def test_stage2_fast_dev_run(shapes_root, tmp_path, extra):
    cfg = resolved("stage2", tiny_stage2(shapes_root, tmp_path / "runs", "trainer.fast_dev_run=true", *extra))
    needed = [m for m in cfg.task.split("->") if m in ("image", "audio")]
    tokenizers, meta = random_tokenizers(needed, shapes_root)
    module = GeneratorModule(cfg, meta)
    module.load_tokenizers(tokenizers)
    task = parse_task(cfg.task)
    module.validation_set = from_val_shards(cfg.data, task, cfg.sampling.val_n)
    before = {m: {k: v.clone() for k, v in tok.state_dict().items()} for m, tok in tokenizers.items()}
    trainer = fast_dev_fit(cfg, module, task.inputs(cached=False), tmp_path)
    assert trainer.global_step == 1
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and math.isfinite(float(metrics["val/loss"]))
    # an untrained model is scored, not skipped: the verifier read its samples
    assert 0.0 <= float(metrics["val/exact_match"]) <= 1.0
    for m, tok in module.tokenizers.items():  # frozen: neither the optimizer nor a codebook update touched them
        assert not tok.training and not any(p.requires_grad for p in tok.parameters())
        assert all(torch.equal(v, before[m][k]) for k, v in tok.state_dict().items())


@pytest.mark.parametrize("objective", ["mask", "uniform", "mask_replace", "gaussian"])
def test_every_objective_passes_the_plans_dry_build(shapes_root, tmp_path, objective):
    # The plan builds the generator on the meta device before any work; a process whose
    # tables were made there could not be checked (`train stage2 generator.objective=uniform` failed).
    cfg = resolved("stage2", tiny_stage2(shapes_root, tmp_path / "runs", f"generator.objective={objective}"))
    _, meta = random_tokenizers(["image"], shapes_root)
    _check_generator(cfg, {"image": meta["image"]["spec"]})


# torch.compile's first import touches torch.jit internals that warn about their own deprecation.
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
def test_compile_switch_keeps_checkpoint_names():
    """trainer.compile wraps the conv stacks in place: a compiled module's state dict loads
    into an eager one and back, so checkpoints do not depend on the switch."""
    eager = TokenizerModule(resolved("stage1", ["tokenizer.channels=16"]))
    compiled = TokenizerModule(resolved("stage1", ["tokenizer.channels=16", "trainer.compile=true"]))
    assert compiled.tokenizer.encoder._compiled_call_impl is not None
    assert eager.tokenizer.encoder._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    eager.load_state_dict(compiled.state_dict())


@pytest.mark.parametrize("task, trunk_tokens", [("image->text", 12), ("text->image", 16)])
def test_text_patch_size_groups_caption_bytes_as_a_target_too(shapes_root, tmp_path, task, trunk_tokens):
    cfg = resolved("stage2", tiny_stage2(shapes_root, tmp_path / "runs", f"task={task}", "data.text_bytes=48",
                                            "generator.patch_size=2", "generator.text_patch_size=4"))
    _, meta = random_tokenizers(["image"], shapes_root)
    module = GeneratorModule(cfg, meta)
    assert math.prod(module.dit.grid) == trunk_tokens  # 48 bytes / 4, or an 8x8 code grid / 2x2
    if task == "text->image":
        assert module.cond_encoder.patch == 4


def test_channels_last_image_tokenizer_computes_what_the_contiguous_one_does(shapes_root, tmp_path):
    modules = {}
    for flag in ("true", "false"):
        cfg = resolved("stage1", tiny_stage1(shapes_root, tmp_path / "runs", f"trainer.channels_last={flag}"))
        torch.manual_seed(0)
        modules[flag] = TokenizerModule(cfg).eval()
    fast, plain = modules["true"], modules["false"]
    conv = next(m for m in fast.tokenizer.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    inputs = fast.inputs({"image": images})
    assert inputs.is_contiguous(memory_format=torch.channels_last)
    out_fast, out_plain = fast.tokenizer(inputs), plain.tokenizer(images)
    assert torch.allclose(out_fast[1], out_plain[1], atol=1e-5)  # the reconstructions
    # an audio tokenizer has no 2D layout to change
    audio = TokenizerModule(resolved("stage1", tiny_stage1(shapes_root, tmp_path / "runs", "modality=audio", "tokenizer.channels=16")))
    assert not audio.channels_last


def test_stage2_hands_its_data_hardware_and_logger_settings_to_the_stage1_run_it_starts(tmp_path):
    # Empty strings, spaces, quotes and number-like strings must reach stage 1 unchanged
    # (an empty data.train used to arrive as null and fail the config).
    root = tmp_path / "it's a 007 dir"
    stage2 = load_config("stage2", [f"data.root={root}", "data.num_workers=0", "trainer.threads=1", "logger=csv",
                                    f"run.root={tmp_path / 'runs'}", "run.seed=7", "task=image->audio", "data.image_size=64",
                                    "data.sample_rate=16000", "data.audio_samples=32000", "data.shapes.val_seed=9"])
    assert stage2.data.train == ""
    stage1 = load_config("stage1", stage1_overrides(stage2, "audio"))
    assert stage1.modality == "audio"
    for key in ("name", "root", "train", "val", "num_workers", "image_size", "sample_rate", "audio_samples", "channels"):
        assert stage1.data[key] == stage2.data[key], key
    assert (stage1.data.image_size, stage1.data.sample_rate, stage1.data.shapes.val_seed) == (64, 16000, 9)
    assert stage1.data.batch_size != stage2.data.batch_size  # stage 1 keeps its own batch size
    for key in ("accelerator", "devices", "num_nodes", "strategy", "threads"):
        assert stage1.trainer[key] == stage2.trainer[key], key
    # ...but not stage 2's precision (auto: bf16 where it pays): the tokenizer trains at stage 1's own.
    assert (stage2.trainer.precision, stage1.trainer.precision) == ("auto", load_config("stage1").trainer.precision)
    assert stage1.trainer.precision == "32-true"
    assert dict(stage1.logger) == dict(stage2.logger)
    assert (stage1.run.root, stage1.run.seed) == (str(tmp_path / "runs"), 7)
