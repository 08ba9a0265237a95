"""The optional PatchGAN critic: disjoint gradients in one loss, and a start step that holds."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import tiny_stage1, resolved

from lit_vqdiff.config import load_config
from lit_vqdiff.data.datamodule import ShardDataModule
from lit_vqdiff.nn.discriminator import adaptive_weight, hinge_d_loss, hinge_g_loss
from lit_vqdiff.stages.tokenizer import TokenizerModule
from lit_vqdiff.training import build_trainer

GAN = ("tokenizer.discriminator.enabled=true", "tokenizer.discriminator.channels=8", "tokenizer.discriminator.layers=2")


class CriticSnapshots(L.Callback):
    """The critic's parameters before training and after every optimizer step."""

    def __init__(self) -> None:
        self.snapshots: list[list[torch.Tensor]] = []

    def take(self, module: TokenizerModule) -> None:
        self.snapshots.append([p.detach().clone() for p in module.disc.parameters()])

    def on_train_start(self, trainer: L.Trainer, pl_module: TokenizerModule) -> None:
        self.take(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.take(pl_module)


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_critic_trains_only_from_its_start_step(shapes_root, tmp_path):
    cfg = resolved("stage1", tiny_stage1(shapes_root, tmp_path / "runs", *GAN, "tokenizer.discriminator.start_step=2",
                                            "trainer.max_steps=4", "trainer.val_every_steps=4", "trainer.limit_val_batches=1",
                                            "trainer.log_every_steps=1", "logger=none"))
    probe = CriticSnapshots()
    module = TokenizerModule(cfg)
    trainer = build_trainer(cfg, tmp_path / "run", [probe])
    trainer.fit(module, datamodule=ShardDataModule(cfg.data, (cfg.modality,), seed=0))
    start, *after = probe.snapshots
    assert len(after) == 4
    assert same(after[0], start) and same(after[1], start)  # steps 0 and 1: the critic is held
    assert not same(after[2], after[1]) and not same(after[3], after[2])  # steps 2 and 3: it learns
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/g_loss"])) and math.isfinite(float(metrics["train/d_loss"]))
    assert float(metrics["train/gan_weight"]) > 0


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_adversarial_terms_give_each_player_only_its_own_gradient(shapes_root, monkeypatch, modality):
    cfg = resolved("stage1", tiny_stage1(shapes_root, shapes_root / "unused", f"modality={modality}", *GAN,
                                            "tokenizer.discriminator.start_step=0", "tokenizer.channels=16"))
    module = TokenizerModule(cfg)
    monkeypatch.setattr(module, "log_dict", lambda *args, **kwargs: None)  # no Trainer to log to
    module.disc.eval()  # spectral norm's power iteration would change the critic between calls
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1 if modality == "image" else 0.3 * torch.randn(2, 8000)
    target, recon, _ = module.tokenizer(x)
    rec = module.reconstruction_loss(target, recon)
    term = module.adversarial_terms(target, recon, rec)
    critic = list(module.disc.parameters())
    got_critic = torch.autograd.grad(term, critic, retain_graph=True)
    got_recon = torch.autograd.grad(term, recon, retain_graph=True)[0]

    d_loss = hinge_d_loss(module.disc(target), module.disc(recon.detach()))
    want_critic = torch.autograd.grad(d_loss, critic)
    g_loss = hinge_g_loss(module.disc(recon))
    weight = adaptive_weight(rec, g_loss, module.tokenizer.decoder.last_layer)
    want_recon = torch.autograd.grad(cfg.tokenizer.discriminator.weight * weight * g_loss, recon)[0]
    for got, want in zip(got_critic, want_critic):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_recon, want_recon)
    assert want_recon.abs().sum() > 0 and any(w.abs().sum() > 0 for w in want_critic)
