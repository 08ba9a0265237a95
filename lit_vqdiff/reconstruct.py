"""How a tokenizer's reconstructions are scored, and `lit-vqdiff reconstruct`.

``ReconstructionMetrics`` is what every stage-1 validation epoch reports: fidelity (PSNR
and SSIM for images; SI-SNR and log-spectral distance for sounds), codebook health over
all the codes seen (usage, perplexity, dead codes; per codebook for residual VQ) and, on
shapes-v1, the share of reconstructions whose verifier attributes equal the input's.

``reconstruct_command`` runs a tokenizer artifact over validation inputs, writes them to
``orig/`` and their reconstructions to ``recon/`` under the same names, and returns the
same figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from . import audio, media
from .artifact import load_tokenizer
from .data import shapes, verify
from .data.prepare import SHAPES, shards_present
from .metrics import CodebookUsage
from .nn.tokenizer import Tokenizer

DEFAULT_ARTIFACTS = {"image": "runs/latest-stage1", "audio": "runs/latest-stage1-audio"}
SHAPES_VAL_SEED = 1  # shapes-v1's default validation seed (data.shapes.val_seed)
BATCH = 64


def verifier_agreement(modality: str, inputs: Tensor, recon: Tensor, sample_rate: int) -> Tensor:
    """1.0 where the verifier reads all four attributes from both and they are equal, else 0.0."""
    if modality == "image":
        read_in = verify.verify_images(media.to_uint8_images(inputs))
        read_out = verify.verify_images(media.to_uint8_images(recon))
    else:
        read_in = verify.verify_sounds(inputs.float().cpu().numpy(), sample_rate)
        read_out = verify.verify_sounds(recon.float().cpu().numpy(), sample_rate)
    # An attribute the verifier cannot read on either side is no agreement.
    agree = [a == b and None not in a.values() for a, b in zip(read_in, read_out)]
    return torch.tensor(agree, dtype=torch.float32, device=inputs.device)


class ReconstructionMetrics(nn.Module):
    """Fidelity, codebook health and verifier agreement, accumulated over batches.

    torchmetrics objects inside, so ``compute`` reduces across ranks by itself.
    ``verifier=False`` leaves out verifier agreement (data sets other than shapes-v1).
    """

    def __init__(self, modality: str, num_codes: int, num_codebooks: int, sample_rate: int, verifier: bool = True):
        super().__init__()
        if modality not in ("image", "audio"):
            raise ValueError(f"modality must be 'image' or 'audio', got {modality!r}")
        self.modality, self.sample_rate, self.verifier = modality, int(sample_rate), verifier
        self.usage = CodebookUsage(num_codes, num_codebooks)
        self.agreement = MeanMetric()
        if modality == "image":
            self.psnr = PeakSignalNoiseRatio(data_range=2.0)  # images live in [-1, 1]
            self.ssim = StructuralSimilarityIndexMeasure(data_range=2.0)
        else:
            self.si_snr, self.lsd = MeanMetric(), MeanMetric()

    def update(self, inputs: Tensor, recon: Tensor, codes: Tensor) -> None:
        """Add a batch: inputs and reconstructions as signals (images or waveforms), codes as encoded."""
        inputs, recon = inputs.float(), recon.float()
        self.usage.update(codes)
        if self.modality == "image":
            self.psnr.update(recon, inputs)
            self.ssim.update(recon, inputs)
        else:
            self.si_snr.update(audio.si_snr(recon, inputs))
            self.lsd.update(audio.log_spectral_distance(recon, inputs))
        if self.verifier:
            self.agreement.update(verifier_agreement(self.modality, inputs, recon, self.sample_rate))

    def compute(self) -> tuple[dict[str, Tensor], Tensor]:
        """(figures by name, the (num_codebooks, num_codes) code histogram)."""
        usage = self.usage.compute()
        out = {"codebook_usage": usage["usage"].float().mean(), "perplexity": usage["perplexity"].float().mean(),
               "dead_codes": usage["dead"].float().sum()}
        if usage["usage"].dim():  # residual VQ: one figure per codebook too
            for i in range(usage["usage"].numel()):
                out[f"codebook_usage_{i}"] = usage["usage"][i].float()
                out[f"perplexity_{i}"] = usage["perplexity"][i].float()
                out[f"dead_codes_{i}"] = usage["dead"][i].float()
        if self.modality == "image":
            out["psnr"], out["ssim"] = self.psnr.compute(), self.ssim.compute()
        else:
            out["si_snr"], out["lsd"] = self.si_snr.compute(), self.lsd.compute()
        if self.verifier:
            out["verifier_agreement"] = self.agreement.compute()
        return out, usage["histogram"]

    def reset(self) -> None:
        for metric in self.children():
            metric.reset()


def histogram_picture(histogram: Tensor) -> np.ndarray:
    """One usage bar chart per codebook, stacked top to bottom."""
    rows = [media.histogram_image(row.cpu().numpy()) for row in histogram]
    gap = np.full((4, rows[0].shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([part for row in rows for part in (row, gap)][:-1], axis=0)


# ---------------------------------------------------------------------- the command


def artifact_location(ckpt: str | None, modality: str) -> Path:
    """The artifact to use: ``ckpt`` (a tokenizer.pt or a run folder), else the latest of ``modality``."""
    if ckpt is None:
        if modality not in DEFAULT_ARTIFACTS:
            raise ValueError(f"--modality must be one of {sorted(DEFAULT_ARTIFACTS)}, got {modality!r}")
        ckpt = DEFAULT_ARTIFACTS[modality]
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {ckpt}: train one (`lit-vqdiff train stage1 modality={modality}`) or pass --ckpt")
    return path.resolve()


def training_data(meta: dict[str, Any]) -> Any | None:
    """The data config the tokenizer was trained with, from its artifact (None in artifacts that predate it)."""
    from omegaconf import OmegaConf

    from .config import DataConfig

    data = (meta.get("config") or {}).get("data")
    return None if data is None else OmegaConf.merge(OmegaConf.structured(DataConfig), data)


def shard_inputs(data: Any, modality: str, n: int) -> tuple[Tensor, list[str]] | None:
    """The first n validation samples of a data set, or None when its shards are absent."""
    from .data.datamodule import ShardDataModule  # Lightning: imported only when shards are read

    if not data.val and not shards_present(Path(data.root), "val"):
        return None
    data.num_workers, data.val_batch_size = 0, min(n, 256)
    inputs, keys = [], []
    for batch in ShardDataModule(data, (modality,)).val_dataloader():
        valid = batch["valid"].tolist()
        inputs.append(batch[modality][batch["valid"]])
        keys += [key for key, ok in zip(batch["key"], valid) if ok]
        if len(keys) >= n:
            break
    return torch.cat(inputs)[:n], keys[:n]


def rendered_inputs(tokenizer: Tokenizer, n: int, seed: int) -> tuple[Tensor, list[str]]:
    """n shapes-v1 validation samples rendered from ``seed``, keyed as the shards key them."""
    signal = tokenizer.signal
    fits = (signal["image_size"] == shapes.IMAGE_SIZE if tokenizer.modality == "image"
            else signal["audio_samples"] == shapes.NUM_SAMPLES and signal["sample_rate"] == shapes.SAMPLE_RATE)
    if not fits:
        raise ValueError(f"this tokenizer's inputs ({signal}) are not shapes-v1's, so shapes-v1 renders cannot stand in "
                         "for its validation data: write that data set's shards first")
    samples = [shapes.make_sample(seed, i) for i in range(n)]
    if tokenizer.modality == "image":
        x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    else:
        x = torch.from_numpy(np.stack([s.sound for s in samples]))
    return x, [f"val-{seed:04d}-{i:07d}" for i in range(n)]


def write_signal(folder: Path, name: str, modality: str, signal: Tensor, sample_rate: int) -> None:
    """One image (3, H, W) in [-1, 1] as <name>.png, or one waveform (T,) as 16-bit <name>.wav."""
    if modality == "image":
        media.save_png(folder / f"{name}.png", media.to_uint8_images(signal[None])[0])
    else:
        media.save_wav(folder / f"{name}.wav", signal.float().cpu().numpy(), sample_rate)


@torch.no_grad()
def reconstruct_command(n: int, out: str | Path, ckpt: str | None = None, modality: str = "image") -> dict[str, Any]:
    """Reconstruct n validation inputs into ``out``/orig and ``out``/recon; returns the figures.

    ``modality`` only picks the default artifact: a given ``ckpt`` brings its own. Inputs
    come from the validation split of the data set the tokenizer was trained on (the
    config inside the artifact); when those shards are not on disk, shapes-v1 validation
    renders stand in (for shapes-v1 the very same samples: shards render the same seed).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"--n must be a positive integer, got {n!r}")
    path = artifact_location(ckpt, modality)
    tokenizer, meta = load_tokenizer(path)
    modality, artifact_path = tokenizer.modality, Path(meta["path"])
    data = training_data(meta)
    found = shard_inputs(data, modality, n) if data is not None else None
    if found is not None:
        (inputs, keys), source = found, f"{data.root} (val)"
    elif data is not None and data.name != SHAPES:
        raise FileNotFoundError(f"no validation shards of {data.name} under {data.root}: write them first, or run from "
                                "the folder the tokenizer was trained in")
    else:
        seed = int(data.shapes.val_seed) if data is not None else SHAPES_VAL_SEED
        (inputs, keys), source = rendered_inputs(tokenizer, n, seed), f"shapes-v1 renders (seed {seed})"
    q = tokenizer.quantizer
    rate = int(tokenizer.signal["sample_rate"])
    on_shapes = data is None or data.name == SHAPES
    metrics = ReconstructionMetrics(modality, q.codebook_size, q.num_codebooks, rate, verifier=on_shapes)
    out = Path(out)
    for start in range(0, len(keys), BATCH):
        x = inputs[start : start + BATCH]
        codes = tokenizer.encode(x)
        recon = tokenizer.decode(codes)
        metrics.update(x, recon, codes)
        for key, original, rebuilt in zip(keys[start : start + BATCH], x, recon):
            write_signal(out / "orig", key, modality, original, rate)
            write_signal(out / "recon", key, modality, rebuilt, rate)
    figures, _ = metrics.compute()
    return {"n": len(keys), "modality": modality, "artifact": str(artifact_path), "checksum": meta["checksum"],
            "inputs": source, "out": str(out), **{k: round(float(v), 4) for k, v in figures.items()}}
