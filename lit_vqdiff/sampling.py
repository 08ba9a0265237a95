"""`lit-vqdiff sample`: generate from a stage-2 checkpoint into files plus manifest.jsonl.

Conditions are shapes-v1 validation samples (seed ``data.shapes.val_seed``, indices
0..n-1), so every output can be scored by `lit-vqdiff eval` against the attributes of
the sample it was conditioned on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from . import media, runs
from .callbacks import load_checkpoint_file
from .config import ConfigError, Stage2Config, apply_overrides, saved_config
from .data import shapes
from .evaluate import MANIFEST
from .nn.tokenizer import Tokenizer
from .tasks import OUTPUT_SUFFIX, raw_batch

DEFAULT_RUN = "runs/latest-stage2"


def load_generator(path: Path | str | None = None, map_location: str = "cpu") -> Any:
    """A GeneratorModule (EMA weights, eval mode) from a checkpoint or a run folder."""
    from .stages.generator import GeneratorModule

    path = Path(path or DEFAULT_RUN)
    if path.is_dir() or (path.is_symlink() and path.resolve().is_dir()):
        path = runs.checkpoint_path(runs.resolve_run_dir(path))
    if not path.exists() and not path.with_name(path.name + ".prev").exists():
        raise FileNotFoundError(f"no stage-2 checkpoint at {path}; train one with `make train-stage2` or pass --ckpt")
    ckpt = load_checkpoint_file(path, map_location=map_location)
    hp = ckpt.get("hyper_parameters") or {}
    if "config" not in hp or hp["config"].get("stage") != "stage2":
        raise ValueError(f"{path}: not a stage-2 checkpoint (no stage2 config in its hyper-parameters)")
    saved = hp["config"]
    cfg = saved_config(OmegaConf.to_container(saved) if OmegaConf.is_config(saved) else dict(saved), source=str(path))
    tokenizers = {m: Tokenizer.from_spec(meta["spec"]) for m, meta in hp.get("tokenizers", {}).items()}
    module = GeneratorModule(cfg, tokenizers, hp.get("tokenizers", {}))
    # "state_dict" holds the EMA weights (the weight-averaging callback puts them there).
    module.load_state_dict(ckpt["state_dict"])
    module.checkpoint_path = str(path)
    return module.eval()


def condition_entry(sample: shapes.Sample, modality: str, cond_file: str | None) -> dict[str, Any]:
    if modality == "text":
        return {"text": sample.caption}
    if modality == "class":
        return {"class": sample.label}
    return {modality: cond_file}


def write_output(path: Path, modality: str, output: Any, sample_rate: int) -> None:
    if modality == "image":
        media.save_png(path, output)
    elif modality == "audio":
        media.save_wav(path, output, sample_rate)
    else:
        path.write_text(output, encoding="utf-8")


@torch.no_grad()
def sample_to_dir(module: Any, n: int, out: Path | str, batch_size: int = 100, seed: int = 0) -> dict[str, Any]:
    """Generate ``n`` samples for the module's task into ``out`` with a manifest."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = module.cfg
    src, tgt = module.source_modality, module.target_modality
    rate = cfg.data.sample_rate
    samples = [shapes.make_sample(cfg.data.shapes.val_seed, i) for i in range(n)]
    generator = torch.Generator(module.device).manual_seed(seed)
    lines = []
    for start in range(0, n, batch_size):
        chunk = samples[start : start + batch_size]
        batch = {k: v.to(module.device) for k, v in raw_batch(chunk, src, cfg.data.text_bytes).items()}
        outputs = module.decode(module.generate(batch, generator=generator))
        if tgt == "image":
            outputs = media.to_uint8_images(outputs)
        elif tgt == "audio":
            outputs = outputs.float().cpu().numpy()
        for sample, output in zip(chunk, outputs):
            ident = f"{sample.index:06d}"
            cond_file = None
            if src == "image":
                cond_file = f"cond/{ident}.png"
                media.save_png(out / cond_file, sample.image)
            elif src == "audio":
                cond_file = f"cond/{ident}.wav"
                media.save_wav(out / cond_file, sample.sound, rate)
            name = ident + OUTPUT_SUFFIX[tgt]
            write_output(out / name, tgt, output, rate)
            lines.append({"id": ident, "task": cfg.task, "condition": condition_entry(sample, src, cond_file),
                          "attributes": sample.attributes.as_dict(), "output": name})
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tmp.replace(out / MANIFEST)
    s = cfg.sampling
    decoding = module.decoding()
    settings = {"guidance": s.guidance, "temperature": decoding["temperature"]}
    if tgt == "text":
        settings["order"] = decoding["order"]
    settings.update({"sampler": s.sampler, "ddim_steps": s.ddim_steps} if cfg.generator.objective == "gaussian" else {"steps": s.steps})
    return {"out": str(out), "task": cfg.task, "n": n, "objective": cfg.generator.objective, **settings}


def sample_command(task: str | None, n: int, out: str, ckpt: str | None, overrides: list[str]) -> dict[str, Any]:
    """What `lit-vqdiff sample` does: load, apply sampling.* overrides, generate, write."""
    bad = [o for o in overrides if not o.startswith("sampling.")]
    if bad:
        raise ConfigError(f"sample takes only sampling.* overrides, got {bad}")
    apply_overrides(OmegaConf.structured(Stage2Config), overrides)  # fail on bad values before loading anything
    module = load_generator(ckpt)
    if task and task != module.cfg.task:
        raise ValueError(f"checkpoint {module.checkpoint_path} was trained for {module.cfg.task}, not {task}; "
                         f"pass its run with --ckpt, or train this task with `make train-stage2 ARGS=\"task={task}\"`")
    module.cfg = apply_overrides(module.cfg, overrides)
    summary = sample_to_dir(module, n, out)
    summary["checkpoint"] = module.checkpoint_path
    return summary

