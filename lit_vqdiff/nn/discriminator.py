"""PatchGAN discriminator (1D or 2D), hinge losses and VQGAN's adaptive GAN weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as add_spectral_norm

from lit_vqdiff.nn.conv import conv_nd, group_norm

MAX_WIDTH_MULT = 8


class PatchDiscriminator(nn.Module):
    """Fully convolutional critic: one real/fake logit per receptive-field patch.

    ``num_layers`` stride-2 convs (kernel 4) halve every spatial size, then two stride-1
    convs (kernel 4, padding 1) each take one off it. A 32x32 image with ``num_layers=2``
    gives a 6x6 logit map; 8000 samples with ``num_layers=3`` give 998 logits.

    Spectral norm (the default) bounds each layer's Lipschitz constant, which keeps the
    hinge game stable without normalization layers, so logits never depend on which
    other samples share the batch (BatchNorm would, and would need SyncBatchNorm under
    DDP). ``spectral_norm=False`` gives a plain critic with GroupNorm instead.
    """

    def __init__(
        self, dims: int, in_channels: int, channels: int = 64, num_layers: int = 3, spectral_norm: bool = True
    ):
        super().__init__()
        if dims not in (1, 2):
            raise ValueError(f"dims must be 1 or 2, got {dims!r}")
        if num_layers < 1 or channels < 1 or in_channels < 1:
            raise ValueError(
                f"need num_layers, channels and in_channels >= 1; got {num_layers}, {channels}, {in_channels}"
            )
        widths = [channels * min(2**i, MAX_WIDTH_MULT) for i in range(num_layers + 1)]
        strides = [2] * num_layers + [1]
        layers: list[nn.Module] = []
        width_in = in_channels
        for i, (width, stride) in enumerate(zip(widths, strides)):
            layers.append(self.wrap(conv_nd(dims, width_in, width, 4, stride=stride, padding=1), spectral_norm))
            # No feature norm on the first layer (as in pix2pix): it would erase input contrast.
            if i > 0 and not spectral_norm:
                layers.append(group_norm(width))
            layers.append(nn.LeakyReLU(0.2))
            width_in = width
        layers.append(self.wrap(conv_nd(dims, width_in, 1, 4, stride=1, padding=1), spectral_norm))
        self.net = nn.Sequential(*layers)
        self.dims, self.in_channels = dims, in_channels

    @staticmethod
    def wrap(conv: nn.Module, spectral_norm: bool) -> nn.Module:
        """The conv, spectrally normalized when asked."""
        return add_spectral_norm(conv) if spectral_norm else conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PatchDiscriminator expects (B, {self.in_channels}, {'L' if self.dims == 1 else 'H, W'}), "
                f"got {tuple(x.shape)}"
            )
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss, 0.5 * (E[relu(1 - real)] + E[relu(1 + fake)]) as in VQGAN."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -E[fake logits]."""
    return -fake_logits.mean()


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor, max: float = 1e4
) -> torch.Tensor:
    """||d rec_loss / d W|| / ||d g_loss / d W|| at the decoder's last weight W, clamped to [0, max].

    Scales the GAN term so that its gradient at the output is as large as the
    reconstruction gradient (VQGAN). The gradients are taken with ``autograd.grad``
    (nothing is accumulated into ``.grad``), without a graph of their own, and the result
    is detached; the losses' graphs are retained for the caller's backward pass. Each
    rank computes its own weight under DDP (no all-reduce).
    """
    if not (rec_loss.requires_grad and g_loss.requires_grad):
        raise ValueError("adaptive_weight needs rec_loss and g_loss that require grad (call it in a training step)")
    rec_grad = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max).detach()
