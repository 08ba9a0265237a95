"""Stage 1: the VQ tokenizer as a LightningModule.

A training step reconstructs a batch through the quantizer and minimizes
reconstruction (+ a magnitude-spectrum term for audio) + codebook/commitment (+ optional
hinge GAN) loss. A validation epoch measures fidelity (PSNR/SSIM or SI-SNR/log-spectral
distance), the share of reconstructions whose verifier attributes equal the input's,
and codebook health over the whole epoch (usage, perplexity, dead codes; per codebook
for residual VQ), all through ``eval.reconstruction.ReconstructionMetrics``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.func import functional_call

from .. import dsp
from ..data.datamodule import gather_across_ranks
from ..eval.reconstruction import ReconstructionMetrics, histogram_picture
from ..modalities import MODALITIES, DecodeSpec
from ..nn.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from ..nn.tokenizer import Tokenizer
from .base import StageModule

RINGS_KEY = "quantizer_rings"  # checkpoint key: each rank's dead-code restart rings

MEDIA_ITEMS = 16
# Magnitude exponent of the spectrogram frontend's spectral-convergence term: below 1, so
# quiet notes and weak harmonics still weigh (docs/experiments.md, audio tokenizer).
SPECTRAL_POWER = 0.5


class TokenizerModule(StageModule):
    """One tokenizer (and an optional critic) for any modality, trained on reconstruction."""

    def __init__(self, config: DictConfig, verifier: bool = False):
        """``config``: the resolved stage-1 config; ``verifier``: the data carry shapes-v1
        attributes, so validation also reports verifier agreement."""
        super().__init__(config, extra_hparams={"verifier": verifier})
        cfg = self.cfg
        self.modality = cfg.modality
        self.spec = DecodeSpec.from_config(cfg.data, (cfg.modality,))
        self.tokenizer = Tokenizer.from_config(cfg)
        if cfg.trainer.compile:
            # The conv stacks only: the quantizer's data-dependent k-means and restarts stay eager.
            self.tokenizer.encoder.compile()
            self.tokenizer.decoder.compile()
        d = cfg.tokenizer.discriminator
        q = self.tokenizer.quantizer
        self.disc = None
        if d.enabled:
            # The critic sees what the decoder predicts: pixels, waveforms or spectrogram frames.
            encoder = self.tokenizer.encoder
            self.disc = PatchDiscriminator(encoder.dims, encoder.in_channels, d.channels, d.layers)
        self.val_metrics = ReconstructionMetrics(self.modality, q.codebook_size, q.num_codebooks, cfg.data.sample_rate,
                                                 verifier=verifier)
        self._media_batch: dict[str, torch.Tensor] | None = None
        # NHWC lets oneDNN (and cuDNN) skip layout conversions around every convolution
        # (docs/experiments.md, image tokenizer).
        self.channels_last = cfg.trainer.channels_last and self.modality == "image"
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def inputs(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's samples of this modality, in the tokenizer's memory layout."""
        x = batch[MODALITIES[self.modality].batch_key]
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # ------------------------------------------------------------------ training

    def reconstruction_loss(self, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        t = self.cfg.tokenizer
        recon = recon.float()
        loss = F.l1_loss(recon, target) if t.recon_loss == "l1" else F.mse_loss(recon, target)
        if t.stft_weight > 0 and self.tokenizer.frontend == "wave":
            # A waveform's meaning lives in its magnitude spectrum; sample-wise error alone
            # drives a compressed reconstruction toward silence.
            loss = loss + t.stft_weight * dsp.multi_resolution_stft_loss(recon.squeeze(1), target.squeeze(1))
        elif t.stft_weight > 0 and self.tokenizer.frontend == "spectrogram":
            # Error in log magnitude weighs every bin alike, so a blurred harmonic comb costs
            # little there; spectral convergence weighs bins by their energy, which is what
            # pitch, timbre and loudness are read from. Taken on compressed magnitudes, so a
            # quiet note's weak 3rd harmonic (the triangle's mark) still counts.
            pred, true = (self.tokenizer.magnitude(f).pow(SPECTRAL_POWER) for f in (recon, target))
            loss = loss + t.stft_weight * dsp.spectral_convergence(pred, true)
        elif t.stft_weight > 0 and self.tokenizer.frontend == "stft":
            # Through the inverse STFT: predicted phases that disagree between overlapping
            # frames cancel in the waveform and show up at every resolution.
            pred, true = self.tokenizer.waveform(recon), self.tokenizer.waveform(target)
            loss = loss + t.stft_weight * dsp.multi_resolution_stft_loss(pred, true)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        # The quantizer updates its codebook inside the forward, before the loss is known:
        # a step skipped for a non-finite loss (a NaN batch) puts it back as it was.
        quantizer = self.tokenizer.quantizer
        before = quantizer.training_state()
        target, recon, q = self.tokenizer(self.inputs(batch))
        rec = self.reconstruction_loss(target, recon)
        loss = rec + q.loss
        if self.disc is not None:
            loss = loss + self.adversarial_terms(target, recon, rec)
        self.log_dict(
            {"train/loss": loss.detach(), "train/recon_loss": rec.detach(), "train/quant_loss": q.loss.detach(),
             "train/perplexity": q.perplexity.float().mean(), "train/batch_usage": q.usage.float().mean()},
            prog_bar=False, on_step=True, on_epoch=False,
        )
        if hasattr(self.tokenizer.quantizer, "restarts"):
            self.log("train/restarts", self.tokenizer.quantizer.restarts.float().sum(), on_step=True)
        return self.finite_or_skip(loss, undo=lambda: quantizer.load_training_state(before))

    def adversarial_terms(self, target: torch.Tensor, recon: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """Hinge GAN: generator and discriminator terms in one loss with disjoint gradients.

        The generator term sees the discriminator through detached weights, and the
        discriminator term sees a detached reconstruction, so one backward pass gives each
        player exactly the gradient of its own loss, and one optimizer step updates both
        simultaneously (both from this batch's state, rather than the critic seeing the
        already-updated decoder as alternating steps would).
        """
        d = self.cfg.tokenizer.discriminator
        active = float(self.global_step >= d.start_step)
        frozen = {k: v.detach() for k, v in self.disc.named_parameters()}
        g_loss = hinge_g_loss(functional_call(self.disc, frozen, (recon,)))
        d_loss = hinge_d_loss(self.disc(target.detach()), self.disc(recon.detach()))
        weight = adaptive_weight(rec, g_loss, self.tokenizer.decoder.last_layer) if active else torch.zeros(())
        self.log_dict({"train/g_loss": g_loss.detach(), "train/d_loss": d_loss.detach(), "train/gan_weight": weight}, on_step=True)
        # Before start_step both terms are multiplied by 0 but still computed, so that DDP
        # sees every discriminator parameter used on every step.
        return active * (d.weight * weight * g_loss + d_loss)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = self.build_optimizer(self.tokenizer.parameters())
        if self.disc is not None:
            d = self.cfg.tokenizer.discriminator
            opt.add_param_group({"params": list(self.disc.parameters()), "lr": d.lr, "weight_decay": 0.0})
        return {"optimizer": opt, "lr_scheduler": self.scheduler(opt)}

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every rank's restart ring (restarts draw from all of them): the state dict holds
        # one copy of what the ranks share, so the rings travel beside it. A collective:
        # Lightning calls this hook on every rank.
        checkpoint[RINGS_KEY] = gather_across_ranks(self.tokenizer.quantizer.ring_state())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rings = checkpoint.get(RINGS_KEY)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        # On another rank count the rings start empty and refill within a few steps.
        if rings is not None and len(rings) == world:
            self.tokenizer.quantizer.load_ring_state(rings[rank])

    # ------------------------------------------------------------------ validation

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = self.inputs(batch)
        valid = batch.get("valid")
        if valid is not None:
            x = x[valid.bool()]
        _, recon_feats, q = self.tokenizer(x)
        recon = self.tokenizer.to_signal(recon_feats)
        self.val_metrics.update(x, recon, q.codes)
        if batch_idx == 0:
            self._media_batch = {"input": x[:MEDIA_ITEMS].detach().cpu(), "recon": recon[:MEDIA_ITEMS].detach().cpu()}

    def on_validation_epoch_end(self) -> None:
        figures, histogram = self.val_metrics.compute()
        self.val_metrics.reset()
        # torchmetrics already reduced across ranks: no sync_dist.
        self.log_dict({f"val/{name}": value for name, value in figures.items()}, sync_dist=False)
        self.collect_media(histogram.cpu())

    def collect_media(self, histogram: torch.Tensor) -> None:
        self.media["val/code_usage"] = ("image", histogram_picture(histogram))
        if self._media_batch is None:
            return
        m = MODALITIES[self.modality]
        x, y = self._media_batch["input"], self._media_batch["recon"]
        pairs = torch.stack([x, y], dim=1).flatten(0, 1)  # input, reconstruction, input, ...
        # input, reconstruction pairs: 8 pictures' worth, or 4 sounds'
        self.media.update(m.media(m.items(pairs), self.spec, "val/reconstructions", limit=2 * (8 if m.name == "image" else 4)))
        self.media["val/table"] = ("table", self.reconstruction_table(x, y))
        self._media_batch = None

    def reconstruction_table(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """Inputs beside their reconstructions with a per-sample score (PSNR in dB, or log-spectral distance)."""
        m = MODALITIES[self.modality]
        x, y = x.float(), y.float()
        if self.modality == "image":
            mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            name, scores = "psnr", (10 * torch.log10(4.0 / mse)).tolist()  # pictures span [-1, 1]: a range of 2
        else:
            name, scores = "lsd", dsp.log_spectral_distance(y, x).tolist()
        rows = [[a, b, round(float(v), 3)] for a, b, v in zip(m.items(x), m.items(y), scores)]
        return {"columns": ["input", "reconstruction", name], "kinds": [m.name, m.name, "number"], "rows": rows,
                "sample_rate": self.spec.sample_rate}
