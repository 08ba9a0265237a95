"""The stage-1 tokenizer as a plain nn.Module: frontend -> encoder -> quantizer -> decoder.

One class serves every modality; the *frontend* says what the convolutions see:
- ``pixels``: images (B, 3, H, W) in [-1, 1], 2D convs;
- ``wave``: waveforms (B, T), 1D convs on the samples themselves;
- ``spectrogram``: waveforms (B, T), 1D convs over STFT frames with the frequency bins
  as channels; the decoder predicts log magnitudes and Griffin-Lim restores a phase.
- ``stft``: as ``spectrogram``, but each bin brings three channels: its log magnitude and
  its compressed complex value (real, imaginary); the decoder predicts the same, and the
  inverse STFT of (magnitude, phase of the predicted complex pair) is the waveform:
  phases are learned, not made up, and the decoder trains through the inverse STFT.

Stage 2 uses only ``encode``/``decode`` (and the code-vector helpers for Gaussian
diffusion), so this module is all a frozen tokenizer needs: no Lightning, no losses.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import dsp
from .conv import Decoder, Encoder
from .quantizers import QuantizerOutput, build_quantizer

# Log magnitudes are clamped at this floor (about -60 dB below a loud note's peak) and
# mapped to roughly [-1, 1] so that the decoder's output range matches images'.
SPEC_LOG_FLOOR = 1e-3
SPEC_LOG_CENTER, SPEC_LOG_SCALE = -1.5, 5.5
# Loudest normalized log magnitude a decoder output is read as (real data peaks near 1.1):
# keeps exp() of an overshooting prediction, and its gradient, bounded.
SPEC_MAX_FEATURE = 1.5
# The stft frontend's phase channels hold |S|^0.3 e^{i phase}: compressed so that quiet
# bins' phases still count in the L1 term (speech |S| spans 1e-3..20, its 0.3 power 0.1..2.5).
STFT_COMPRESS = 0.3
# Added to the squared length of a predicted (re, im) pair before it is normalized to a
# phase: bounds the gradient (1 / sqrt(eps)) where the decoder predicts no phase; a bin at
# the log floor (|S| = 1e-3, pair length 0.13) still keeps 97% of its magnitude.
STFT_PHASE_EPS = 1e-3
# Sound code sequences are padded to a multiple of this, so that every patch size stage 2
# may group them by (1, 2, 4, 8) divides their length.
CODE_MULTIPLE = 8
FRONTENDS = ("pixels", "wave", "spectrogram", "stft")
ARCH_KEYS = ("channels", "channel_mult", "num_res_blocks", "z_channels", "downsample", "attention", "patch", "mid",
             "patch_width", "n_fft", "hop", "griffin_lim_iters")


class Tokenizer(nn.Module):
    def __init__(self, modality: str, frontend: str, arch: Mapping[str, Any], quantizer: Mapping[str, Any], signal: Mapping[str, int]):
        super().__init__()
        if frontend not in FRONTENDS:
            raise ValueError(f"unknown frontend {frontend!r}; expected pixels, wave, spectrogram or stft")
        self.modality, self.frontend = modality, frontend
        self.arch, self.quantizer_args, self.signal = dict(arch), dict(quantizer), dict(signal)
        self.n_fft, self.hop = int(arch.get("n_fft", 256)), int(arch.get("hop", 64))
        self.griffin_lim_iters = int(arch.get("griffin_lim_iters", 32))
        dims, channels_in = self._io_shape()
        conv_args = dict(
            channels=arch["channels"], channel_mult=list(arch["channel_mult"]), num_res_blocks=arch["num_res_blocks"],
            z_channels=arch["z_channels"], downsample=arch.get("downsample"), attention=arch.get("attention", False),
            patch=arch.get("patch", 1), mid=arch.get("mid", True), patch_width=arch.get("patch_width", 0),
        )
        self.encoder = Encoder(dims, channels_in, **conv_args)
        self.decoder = Decoder(dims, channels_in, **conv_args)
        q = dict(quantizer)
        kind = q.pop("kind")
        self.quantizer = build_quantizer(kind, dim=arch["z_channels"], **q)
        self.latent_shape = self._latent_shape()

    # --------------------------------------------------------------------- geometry

    def _io_shape(self) -> tuple[int, int]:
        if self.frontend == "pixels":
            return 2, int(self.signal.get("channels", 3))
        if self.frontend == "wave":
            return 1, 1
        return 1, (self.n_fft // 2 + 1) * (3 if self.frontend == "stft" else 1)

    @property
    def frames(self) -> int:
        """Spectrogram frames fed to the encoder: STFT frames rounded up so that the codes
        come in a multiple of CODE_MULTIPLE."""
        raw = 1 + self.signal["audio_samples"] // self.hop
        step = self.encoder.factor * CODE_MULTIPLE
        return -(-raw // step) * step

    def _latent_shape(self) -> tuple[int, ...]:
        f = self.encoder.factor
        if self.frontend == "pixels":
            return (self.signal["image_size"] // f, self.signal["image_size"] // f)
        if self.frontend == "wave":
            return (self.signal["audio_samples"] // f,)
        return (self.frames // f,)

    @property
    def code_shape(self) -> tuple[int, ...]:
        """Shape of one sample's codes: (H', W'), (T',) or (num_codebooks, T')."""
        q = self.quantizer
        return ((q.num_codebooks,) if q.stacked_codes else ()) + self.latent_shape

    # --------------------------------------------------------------------- frontend

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder sees and the decoder predicts, from a batch of inputs."""
        if self.frontend == "pixels":
            return x
        if self.frontend == "wave":
            return self._check_wave(x).unsqueeze(1)
        complex_spec = dsp.stft(self._check_wave(x), self.n_fft, self.hop)
        magnitude = complex_spec.abs()
        spec = (magnitude.clamp_min(SPEC_LOG_FLOOR).log() - SPEC_LOG_CENTER) / SPEC_LOG_SCALE
        floor = (torch.log(torch.tensor(SPEC_LOG_FLOOR)) - SPEC_LOG_CENTER) / SPEC_LOG_SCALE
        pad = self.frames - spec.shape[-1]
        spec = F.pad(spec, (0, pad), value=float(floor))
        if self.frontend == "spectrogram":
            return spec
        # |S|^p e^{i phase}; a silent bin (|S| = 0) stays 0 rather than dividing by zero.
        compressed = complex_spec * magnitude.clamp_min(1e-12).pow(STFT_COMPRESS - 1)
        return torch.cat([spec, F.pad(torch.cat([compressed.real, compressed.imag], 1), (0, pad))], 1)

    def to_signal(self, feats: torch.Tensor) -> torch.Tensor:
        """Inverse of ``features``: images in [-1, 1] or waveforms (B, T)."""
        if self.frontend == "pixels":
            return feats.clamp(-1, 1)
        if self.frontend == "wave":
            return feats.squeeze(1).clamp(-1, 1)
        if self.frontend == "stft":
            return self.waveform(feats).clamp(-1, 1)
        length = self.signal["audio_samples"]
        raw = 1 + length // self.hop
        wave = dsp.griffin_lim(self.magnitude(feats[..., :raw]), self.n_fft, self.hop, n_iter=self.griffin_lim_iters, length=length)
        return wave.clamp(-1, 1)

    def waveform(self, feats: torch.Tensor) -> torch.Tensor:
        """stft frontend: the inverse STFT of features (B, T), float32, unclipped and
        differentiable (the training loss compares it with the input).

        Magnitudes come from the log-magnitude channels, phases from the direction of the
        (re, im) pair: ``waveform(features(x))`` gives back x.
        """
        if self.frontend != "stft":
            raise ValueError(f"waveform needs the stft frontend, this tokenizer's is {self.frontend!r}")
        length = self.signal["audio_samples"]
        bins, raw = self.n_fft // 2 + 1, 1 + length // self.hop
        feats = feats[..., :raw].float()
        re, im = feats[:, bins : 2 * bins], feats[:, 2 * bins :]
        scale = self.magnitude(feats) * (re.square() + im.square() + STFT_PHASE_EPS).rsqrt()
        return dsp.istft(torch.complex(re * scale, im * scale), self.n_fft, self.hop, length=length)

    def magnitude(self, feats: torch.Tensor) -> torch.Tensor:
        """Linear STFT magnitudes (B, bins, frames) of spectrogram or stft features, float32."""
        if self.frontend not in ("spectrogram", "stft"):
            raise ValueError(f"magnitude needs the spectrogram or stft frontend, this tokenizer's is {self.frontend!r}")
        log_magnitude = feats[:, : self.n_fft // 2 + 1].float()
        return (log_magnitude.clamp(max=SPEC_MAX_FEATURE) * SPEC_LOG_SCALE + SPEC_LOG_CENTER).exp()

    def _check_wave(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.signal["audio_samples"]
        if x.dim() != 2 or x.shape[-1] != expected:
            raise ValueError(f"{self.modality} tokenizer expects waveforms (B, {expected}), got {tuple(x.shape)}")
        return x

    # --------------------------------------------------------------------- model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantizerOutput]:
        """(target features, reconstructed features, quantizer output) for a training step."""
        target = self.features(x)
        q = self.quantizer(self.encoder(target))
        return target, self.decoder(q.quantized), q

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of a batch of inputs: (B, *code_shape) long."""
        return self.quantizer.encode(self.encoder(self.features(x)))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images or waveforms from codes."""
        return self.to_signal(self.decoder(self.quantizer.decode_codes(codes)))

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Low-dimensional vectors of codes: the latents Gaussian stage 2 models."""
        return self.quantizer.code_vectors(codes)

    @torch.no_grad()
    def decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """Images or waveforms from latents: snapped to the nearest codes, then decoded."""
        return self.to_signal(self.decoder(self.quantizer.decode_vectors(vectors)))

    def prune_codes(self, counts: torch.Tensor) -> torch.Tensor:
        """Drop codes never counted in ``counts`` (num_codebooks, codebook_size); returns old -> new (-1: dropped).

        ``spec()`` follows, so the artifact rebuilds the smaller codebook.
        """
        remap = self.quantizer.prune(counts if self.quantizer.num_codebooks > 1 else counts.reshape(-1))
        if "codebook_size" in self.quantizer_args:  # FSQ keeps its levels and stores the kept grid points
            self.quantizer_args["codebook_size"] = int(self.quantizer.codebook_size)
        return remap.reshape(counts.shape)

    # --------------------------------------------------------------------- description

    def spec(self) -> dict[str, Any]:
        """Everything needed to rebuild this module (the artifact stores it)."""
        return {"modality": self.modality, "frontend": self.frontend, "arch": self.arch, "quantizer": self.quantizer_args, "signal": self.signal}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> "Tokenizer":
        return cls(spec["modality"], spec["frontend"], spec["arch"], spec["quantizer"], spec["signal"])

    @classmethod
    def from_config(cls, cfg: Any) -> "Tokenizer":
        """Build from a stage-1 config (``modality``, ``tokenizer``, ``data`` sections)."""
        t = cfg.tokenizer
        arch = {k: t[k] for k in ARCH_KEYS}
        arch["channel_mult"] = list(t.channel_mult)
        arch["downsample"] = list(t.downsample) if t.downsample is not None else None
        q = dict(t.quantizer)
        kind = q["kind"]
        quantizer = {"kind": kind}
        if kind in ("vq", "rvq"):
            quantizer.update({k: q[k] for k in ("codebook_size", "lookup_dim", "l2_normalize", "update", "ema_decay", "commitment", "kmeans_init", "restart_dead", "dead_after")})
            quantizer["seed"] = int(cfg.run.seed)
            if kind == "rvq":
                quantizer["num_quantizers"] = q["num_quantizers"]
        else:
            quantizer["levels"] = list(q["levels"])
        signal = {"image_size": cfg.data.image_size, "channels": cfg.data.channels, "audio_samples": cfg.data.audio_samples,
                  "sample_rate": cfg.data.sample_rate}
        return cls(cfg.modality, t.frontend, arch, quantizer, signal)
