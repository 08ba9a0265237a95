"""`lit-vqdiff export RUN --out DIR`: a run's weights as safetensors beside its resolved config.

An export holds what inference needs and nothing that runs code when loaded:
``weights.safetensors`` (stage 2: the generator's EMA weights with its frozen tokenizers;
stage 1: the tokenizer's weights), ``config.yaml`` (the run's resolved config) and
``export.json`` (format, stage, where the weights came from, and the tokenizer specs and
latent statistics that rebuild the modules). ``lit_vqdiff.load_generator`` and
``load_tokenizer`` take an export folder as well as a run folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import runs
from .artifact import read_artifact
from .callbacks import load_checkpoint_file
from .config import load_saved, save_config

FORMAT = "lit_vqdiff.export/1"
WEIGHTS, META = "weights.safetensors", "export.json"


def is_export(path: Path | str) -> bool:
    return (Path(path) / META).is_file()


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors can store: on the CPU, contiguous, none sharing memory with another."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def export_run(run: Path | str, out: Path | str, checkpoint: str = runs.LAST_CKPT) -> dict[str, Any]:
    """Export a run folder (or a runs/latest-* link) into ``out``; returns what was written."""
    run_dir = runs.resolve_run_dir(run)
    cfg = load_saved(run_dir / runs.CONFIG_FILE)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"format": FORMAT, "stage": cfg.stage, "run": str(run_dir)}
    if cfg.stage == "stage1":
        artifact = read_artifact(run_dir / runs.TOKENIZER_ARTIFACT)
        state = artifact["state_dict"]
        meta |= {"source": artifact["path"], "checksum": artifact["checksum"], "spec": artifact["spec"],
                 "latent_mean": artifact["latent_mean"].tolist(), "latent_std": artifact["latent_std"].tolist(),
                 "metrics": artifact["metrics"]}
    else:
        path = run_dir / runs.CHECKPOINT_DIR / checkpoint
        ckpt = load_checkpoint_file(path)
        state = ckpt["state_dict"]  # the EMA weights: the averaging callback keeps them there
        meta |= {"source": str(path), "global_step": int(ckpt.get("global_step", 0)),
                 "tokenizers": ckpt["hyper_parameters"]["tokenizers"]}
    save_file(_plain(state), str(out / WEIGHTS), metadata={"format": FORMAT, "stage": cfg.stage})
    save_config(cfg, out / runs.CONFIG_FILE)
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")
    return {"out": str(out), "stage": cfg.stage, "tensors": len(state), "source": meta["source"],
            "files": sorted(p.name for p in out.iterdir())}


def read_export(path: Path | str) -> tuple[dict[str, Any], Any, dict[str, torch.Tensor]]:
    """(export.json, the config, the weights) of an export folder."""
    path = Path(path)
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / META}: not a {FORMAT} export (format={meta.get('format')!r})")
    return meta, load_saved(path / runs.CONFIG_FILE), load_file(str(path / WEIGHTS))
