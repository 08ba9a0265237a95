"""The Python API: trained models as plain objects that take and return plain items.

    from lit_vqdiff import load_generator, load_tokenizer
    generator = load_generator("runs/latest-stage2")
    images = generator.generate(prompts=["a small red circle on the left"], n=2)  # uint8 (H, W, C) arrays
    tokenizer = load_tokenizer("runs/latest-stage1")
    codes = tokenizer.encode(images)            # (N, 8, 8) long codes
    again = tokenizer.decode(codes)             # uint8 pictures again (sounds: float waveforms)

Items are what the modality writes to files: uint8 pictures (H, W, C), float32 waveforms
(T,) at the model's sample rate, strings, class ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import runs
from .artifact import load_tokenizer as load_tokenizer_artifact
from .data.prepare import load_description
from .export import is_export, read_export
from .eval.conditions import Conditions, from_classes, from_files, from_inputs, from_prompts, from_val_shards
from .modalities import MODALITIES, DecodeSpec, Modality
from .nn.tokenizer import Tokenizer
from .pipeline import load_generator_module
from .stages.generator import GeneratorModule


class Generator:
    """A trained stage-2 model (EMA weights) that generates items from conditions."""

    def __init__(self, module: GeneratorModule):
        self.module = module
        self.task = module.task.name
        self.sample_rate = module.spec.sample_rate

    @torch.no_grad()
    def generate(self, prompts: Sequence[str] | None = None, classes: Sequence[int | str] | None = None,
                 inputs: Sequence[str | Path] | str | Path | None = None, n: int = 1, seed: int = 0,
                 **sampling: Any) -> list[Any]:
        """``n`` items per condition: captions (``prompts``), classes (ids or names), or
        input files (a folder, or a list of paths); with none, ``n`` held-out conditions of
        the run's data set. ``sampling`` overrides sampling settings (guidance=3, steps=8)."""
        conditions = self._conditions(prompts, classes, inputs, n)
        module = self.module
        saved = module.cfg.sampling.copy()
        try:
            for key, value in sampling.items():
                if key not in module.cfg.sampling:
                    raise ValueError(f"unknown sampling setting {key!r}; one of {sorted(module.cfg.sampling)}")
                module.cfg.sampling[key] = value
            generator = torch.Generator(module.device).manual_seed(seed)
            return module.sample_items(conditions, generator=generator)
        finally:
            module.cfg.sampling = saved

    def _conditions(self, prompts: Any, classes: Any, inputs: Any, n: int) -> Conditions:
        given = [x is not None for x in (prompts, classes, inputs)]
        if sum(given) > 1:
            raise ValueError("pass one of prompts, classes or inputs")
        cfg = self.module.cfg
        if prompts is not None:
            return from_prompts(list(prompts)).repeated(n)
        if classes is not None:
            description, _ = load_description(cfg.data)
            return from_classes(",".join(map(str, classes)), cfg.data.num_classes, description).repeated(n)
        if inputs is not None:
            return _input_conditions(inputs, self.module.task.source).repeated(n)
        description, _ = load_description(cfg.data)
        return from_val_shards(cfg.data, self.module.task, n, description).cycled(n)


def _input_conditions(inputs: Sequence[str | Path] | str | Path, modality: Modality) -> Conditions:
    if isinstance(inputs, (str, Path)):
        return from_inputs(inputs, modality) if Path(inputs).is_dir() else from_files([Path(inputs)], modality)
    return from_files([Path(p) for p in inputs], modality)


def load_generator(run: str | Path | None = None, device: str = "cpu") -> Generator:
    """The generator of a stage-2 run folder, checkpoint or export folder (default: runs/latest-stage2)."""
    if run is not None and is_export(run):
        meta, cfg, weights = read_export(run)
        if meta["stage"] != "stage2":
            raise ValueError(f"{run}: a {meta['stage']} export; load_generator needs a stage-2 one (load_tokenizer reads it)")
        module = GeneratorModule(cfg, meta["tokenizers"])
        module.load_state_dict(weights)
        module.checkpoint_path = str(run)
        return Generator(module.eval().to(device))
    return Generator(load_generator_module(run, map_location=device).to(device))


class TokenizerModel:
    """A frozen stage-1 tokenizer that encodes items (or tensors) to codes and decodes codes to items."""

    def __init__(self, tokenizer: Tokenizer, meta: dict[str, Any]):
        self.module, self.meta = tokenizer, meta
        self.modality = MODALITIES[tokenizer.modality]
        signal = tokenizer.signal
        self.spec = DecodeSpec((tokenizer.modality,), image_size=int(signal.get("image_size", 32)),
                               channels=int(signal.get("channels", 3)), sample_rate=int(signal.get("sample_rate", 8000)),
                               audio_samples=int(signal.get("audio_samples", 8000)))

    @torch.no_grad()
    def encode(self, items: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        """Codes (N, *code_shape) of items (uint8 pictures, waveforms) or of model-ready tensors."""
        return self.module.encode(items if isinstance(items, torch.Tensor) else self.to_tensor(items))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> list[Any]:
        """Items back from codes."""
        return self.modality.items(self.module.decode(codes))

    def to_tensor(self, items: Sequence[Any]) -> torch.Tensor:
        """Pictures (H, W, C) uint8 in [0, 255] or waveforms (T,) -> the tensor the tokenizer reads."""
        if self.modality.name == "image":
            pictures = np.stack([np.asarray(p).reshape(*np.asarray(p).shape[:2], -1) for p in items])
            return torch.from_numpy(pictures).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return torch.from_numpy(np.stack([np.asarray(w, dtype=np.float32) for w in items]))


def load_tokenizer(run: str | Path | None = None) -> TokenizerModel:
    """The tokenizer of a stage-1 run folder, tokenizer.pt or export folder (default: runs/latest-stage1)."""
    path = Path(run) if run is not None else Path("runs") / runs.latest_link_name("stage1", "image")
    if is_export(path):
        meta, _, weights = read_export(path)
        if meta["stage"] != "stage1":
            raise ValueError(f"{path}: a {meta['stage']} export; load_tokenizer needs a stage-1 one")
        tokenizer = Tokenizer.from_spec(meta["spec"])
        tokenizer.load_state_dict(weights)
        return TokenizerModel(tokenizer.eval().requires_grad_(False), meta)
    return TokenizerModel(*load_tokenizer_artifact(path))
