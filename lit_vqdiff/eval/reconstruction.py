"""How a tokenizer's reconstructions are scored, and `lit-vqdiff reconstruct`.

``ReconstructionMetrics`` is what every stage-1 validation epoch reports: fidelity (PSNR
and SSIM for images; SI-SNR and log-spectral distance for sounds), codebook health over
all the codes seen (usage, perplexity, dead codes; per codebook for residual VQ) and, on
shapes-v1, the share of reconstructions whose verifier attributes equal the input's.

``reconstruct_command`` runs a tokenizer artifact over validation inputs, writes them to
``orig/`` and their reconstructions to ``recon/`` under the same names, and returns the
same figures plus what a reader needs to judge them on any data set: the rate the codes
carry (bits per pixel, bits per second), PSNR/SSIM of the saved pictures or PESQ, STOI,
log-spectral distance and mel-cepstral distortion of the sounds, on real data the
reconstructions' Frechet distance beside the real-vs-real floor, and classic baselines
(bicubic down/up-sampling at the same and at four times the rate; Codec2 and Opus).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from omegaconf import OmegaConf
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from .. import dsp, media, runs
from ..progress import progress
from ..artifact import load_tokenizer
from ..config import DataConfig
from ..data.datamodule import ShardDataModule
from ..data.description import is_shapes
from ..data.prepare import ensure_dataset, load_description
from ..metrics import CodebookUsage
from ..modalities import MODALITIES, DecodeSpec
from . import codecs, frechet, speech
from . import shapes as shapes_verifier
from .conditions import real_items

BATCH = 64


def verifier_agreement(modality: str, inputs: Tensor, recon: Tensor, sample_rate: int) -> Tensor:
    """1.0 where the verifier reads all four attributes from both and they are equal, else 0.0."""
    m = MODALITIES[modality]
    read_in = shapes_verifier.read_items(modality, m.items(inputs), sample_rate)
    read_out = shapes_verifier.read_items(modality, m.items(recon), sample_rate)
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
            self.si_snr.update(dsp.si_snr(recon, inputs))
            self.lsd.update(dsp.log_spectral_distance(recon, inputs))
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
        if modality not in ("image", "audio"):
            raise ValueError(f"--modality must be image or audio, got {modality!r}")
        ckpt = str(Path("runs") / runs.latest_link_name("stage1", modality))
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {ckpt}: train one (`lit-vqdiff train stage1 modality={modality}`) or pass --ckpt")
    return path.resolve()


def training_data(meta: dict[str, Any]) -> Any:
    """The (resolved) data config the tokenizer was trained with, from its artifact."""
    data = (meta.get("config") or {}).get("data")
    if data is None:
        raise ValueError(f"{meta['path']}: the artifact records no data config; retrain it with this version")
    return OmegaConf.merge(OmegaConf.structured(DataConfig), data)


def shard_inputs(data: Any, modality: str, n: int) -> tuple[Tensor, list[str]]:
    """The first n validation samples of a data set (shapes-v1 renders itself if missing)."""
    ensure_dataset(data)
    data.num_workers, data.val_batch_size = 0, min(n, 256)
    inputs, keys = [], []
    for batch in ShardDataModule(data, (modality,)).val_dataloader():
        valid = batch["valid"].tolist()
        inputs.append(batch[MODALITIES[modality].batch_key][batch["valid"]])
        keys += [key for key, ok in zip(batch["key"], valid) if ok]
        if len(keys) >= n:
            break
    return torch.cat(inputs)[:n], keys[:n]


def code_rate(tokenizer: Any) -> dict[str, float]:
    """What the codes carry: bits per sample, and bits per pixel (pictures) or per second (sounds)."""
    q = tokenizer.quantizer
    positions = math.prod(tokenizer.latent_shape) * q.num_codebooks
    bits = positions * math.log2(q.codebook_size)
    signal = tokenizer.signal
    if tokenizer.modality == "image":
        return {"bits": bits, "bits_per_pixel": bits / signal["image_size"] ** 2}
    return {"bits": bits, "bits_per_second": bits / (signal["audio_samples"] / signal["sample_rate"])}


def bicubic_round_trip(picture: np.ndarray, side: int) -> np.ndarray:
    """A uint8 picture bicubically downsampled to ``side`` px and back: the classic baseline at side^2 x C x 8 bits."""
    size = picture.shape[0]
    image = Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture)
    small = image.resize((side, side), Image.Resampling.BICUBIC)
    back = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC))
    return back.reshape(picture.shape)


def bicubic_side(bits_per_pixel: float, size: int, channels: int) -> int:
    """The smallest side whose 8-bit pixels spend at least ``bits_per_pixel`` on a ``size`` px picture."""
    return min(size, math.ceil(math.sqrt(bits_per_pixel * size * size / (8 * channels)) - 1e-9))


def picture_fidelity(originals: Sequence[np.ndarray], rebuilt: Sequence[np.ndarray]) -> dict[str, float]:
    """PSNR (dB, over 0..255) and SSIM of uint8 pictures against their originals."""
    x = torch.from_numpy(np.stack(originals)).permute(0, 3, 1, 2).float()
    y = torch.from_numpy(np.stack(rebuilt)).permute(0, 3, 1, 2).float()
    return {"psnr": float(peak_signal_noise_ratio(y, x, data_range=255.0)),
            "ssim": float(structural_similarity_index_measure(y, x, data_range=255.0))}


def picture_baselines(originals: Sequence[np.ndarray], bits_per_pixel: float) -> dict[str, dict[str, float]]:
    """Bicubic down/up-sampling at the tokenizer's rate or just above it, and at four times it."""
    size, channels = originals[0].shape[0], originals[0].shape[-1]
    out = {}
    for name, factor in (("bicubic", 1), ("bicubic_4x", 4)):
        side = bicubic_side(bits_per_pixel * factor, size, channels)
        rebuilt = [bicubic_round_trip(p, side) for p in originals]
        out[name] = {"side": side, "bits_per_pixel": side * side * channels * 8 / size**2, **picture_fidelity(originals, rebuilt)}
    return out


def sound_figures(originals: Sequence[np.ndarray], rebuilt: Sequence[np.ndarray], rate: int) -> dict[str, float]:
    """Narrow-band PESQ, STOI, log-spectral distance and mel-cepstral distortion (at 8 kHz)."""
    scores = speech.score_pairs(zip(originals, rebuilt), rate)
    return {k: round(float(v), 4) for k, v in scores.items() if k in speech.METRICS}


def sound_baselines(originals: Sequence[np.ndarray], rate: int) -> dict[str, dict[str, float]]:
    """The classic codecs (Codec2 3200 and 1300 bit/s, Opus 6 kbit/s) on the same clips, at 8 kHz."""
    clips = [speech.at_rate(w, rate) for w in originals]
    out = {}
    for name, round_trip in codecs.CODECS.items():
        trips = [round_trip(w) for w in clips]
        out[name] = {"bits_per_second": round(float(np.mean([t.bit_rate for t in trips])), 1),
                     **sound_figures(clips, [t.wave for t in trips], codecs.RATE)}
    return out


# The figures of a reconstruct run, beside its orig/ and recon/ folders.
REPORT_FILE = "reconstruction.json"


@torch.no_grad()
def reconstruct_command(n: int, out: str | Path, ckpt: str | None = None, modality: str = "image",
                        baselines: bool = True) -> dict[str, Any]:
    """Reconstruct n validation inputs into ``out``/orig and ``out``/recon; returns the figures:
    fidelity and codebook health, the rate the codes carry, on real data the reconstructions'
    Frechet distance beside the floor, and classic baselines at the same or a higher rate.
    The same figures are written to ``out``/reconstruction.json.

    ``modality`` only picks the default artifact: a given ``ckpt`` brings its own. Inputs
    come from the validation split of the data set the tokenizer was trained on (the
    config inside the artifact).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"--n must be a positive integer, got {n!r}")
    tokenizer, meta = load_tokenizer(artifact_location(ckpt, modality))
    modality = tokenizer.modality
    m = MODALITIES[modality]
    data = training_data(meta)
    inputs, keys = shard_inputs(data, modality, n)
    description, _ = load_description(data)
    q = tokenizer.quantizer
    rate = int(tokenizer.signal["sample_rate"])
    metrics = ReconstructionMetrics(modality, q.codebook_size, q.num_codebooks, rate, verifier=is_shapes(description))
    out = Path(out)
    spec = DecodeSpec.from_config(data, (modality,))
    originals, rebuilt = [], []
    for start in progress(range(0, len(keys), BATCH), f"reconstructing into {out}", unit="batch"):
        x = inputs[start : start + BATCH]
        codes = tokenizer.encode(x)
        recon = tokenizer.decode(codes)
        metrics.update(x, recon, codes)
        originals += m.items(x)
        rebuilt += m.items(recon)
    for key, original, again in zip(keys, originals, rebuilt):
        m.write(out / "orig" / key, original, spec)
        m.write(out / "recon" / key, again, spec)
    figures, _ = metrics.compute()
    report: dict[str, Any] = {"n": len(keys), "modality": modality, "artifact": meta["path"], "checksum": meta["checksum"],
                              "inputs": f"{data.root} (val)", "out": str(out), **{k: round(float(v), 4) for k, v in figures.items()}}
    report["rate"] = {k: round(v, 4) for k, v in code_rate(tokenizer).items()}
    if modality == "image":
        report |= {f"{k}_uint8": round(v, 4) for k, v in picture_fidelity(originals, rebuilt).items()}
    else:
        report |= sound_figures(originals, rebuilt, rate)
    if not is_shapes(description):
        second = real_items(data, "train", m, spec, len(keys))
        report |= {k: round(float(v), 4) for k, v in frechet.report(rebuilt, originals, modality, rate, second).items()}
    if baselines:
        bits = report["rate"].get("bits_per_pixel")
        report["baselines"] = picture_baselines(originals, bits) if modality == "image" else sound_baselines(originals, rate)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
