"""PatchGAN discriminator shapes, hinge losses on known values, adaptive GAN weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_vqdiff.nn.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss


@pytest.mark.parametrize(
    ("num_layers", "spectral_norm", "patches"), [(2, True, (6, 6)), (3, True, (2, 2)), (3, False, (2, 2))]
)
def test_image_patch_logits(num_layers: int, spectral_norm: bool, patches: tuple[int, int]) -> None:
    disc = PatchDiscriminator(2, 3, channels=16, num_layers=num_layers, spectral_norm=spectral_norm)
    assert disc(torch.randn(4, 3, 32, 32)).shape == (4, 1, *patches)


@pytest.mark.parametrize(("in_channels", "length", "patches"), [(1, 8000, 998), (129, 124, 13)])
def test_1d_patch_logits_for_waveforms_and_spectrograms(in_channels: int, length: int, patches: int) -> None:
    disc = PatchDiscriminator(1, in_channels, channels=8, num_layers=3)
    assert disc(torch.randn(2, in_channels, length)).shape == (2, 1, patches)


def test_patches_are_local() -> None:
    """Changing one corner of the input leaves the logits of the far corner unchanged."""
    # eval(): spectral norm reuses its stored estimate; 34-pixel receptive field < 64.
    disc = PatchDiscriminator(2, 3, channels=8, num_layers=2).eval()
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[..., :4, :4] += 5.0
    dx, dy = disc(x), disc(y)
    assert torch.equal(dx[..., -1, -1], dy[..., -1, -1])
    assert not torch.equal(dx[..., 0, 0], dy[..., 0, 0])


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="dims"):
        PatchDiscriminator(3, 3)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        PatchDiscriminator(2, 3, channels=8)(torch.randn(1, 1, 32, 32))


def test_hinge_losses_on_known_values() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2.0 -> mean 2.5 / 3
    fake = torch.tensor([-3.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1.0, 2.0 -> mean 1.0
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert hinge_g_loss(fake).item() == pytest.approx(2.0 / 3)
    confident = hinge_d_loss(torch.full((5,), 1.5), torch.full((5,), -1.5))
    assert confident.item() == 0.0


def test_adaptive_weight_is_the_gradient_norm_ratio() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 4))
    features = torch.randn(5, 4)
    out = features @ weight.t()
    rec_loss = F.mse_loss(out, torch.zeros_like(out))
    g_loss = -0.1 * out.sum()
    # Closed forms: d rec / dW = 2 (out^T features) / numel, d g / dW = -0.1 * column sums.
    rec_grad = 2 * out.t() @ features / out.numel()
    g_grad = -0.1 * torch.ones(5, 3).t() @ features
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)
    got = adaptive_weight(rec_loss, g_loss, weight)
    torch.testing.assert_close(got, expected.detach())
    assert adaptive_weight(rec_loss, 1e-9 * g_loss, weight, max=50.0) == 50.0


def test_adaptive_weight_leaves_no_graph_and_no_grads() -> None:
    weight = torch.nn.Parameter(torch.randn(2, 2))
    out = torch.randn(3, 2) @ weight
    rec_loss, g_loss = out.pow(2).mean(), -out.mean()
    got = adaptive_weight(rec_loss, g_loss, weight)
    assert not got.requires_grad and got.grad_fn is None
    assert weight.grad is None  # autograd.grad does not accumulate into .grad
    (rec_loss + got * g_loss).backward()  # the caller's graph is still there
    assert torch.isfinite(weight.grad).all()
    with torch.no_grad():
        frozen = (torch.randn(3, 2) @ weight).mean()
    with pytest.raises(ValueError, match="require grad"):
        adaptive_weight(frozen, frozen, weight)


def test_adaptive_weight_on_decoder_and_discriminator() -> None:
    from lit_vqdiff.nn.conv import Decoder

    torch.manual_seed(0)
    decoder = Decoder(2, 3, channels=8, channel_mult=[1, 2], num_res_blocks=1, z_channels=4)
    disc = PatchDiscriminator(2, 3, channels=8, num_layers=2)
    target = torch.randn(2, 3, 16, 16)
    recon = decoder(torch.randn(2, 4, 8, 8))
    weight = adaptive_weight(F.l1_loss(recon, target), hinge_g_loss(disc(recon)), decoder.last_layer)
    assert torch.isfinite(weight) and 0 < weight < 1e4
