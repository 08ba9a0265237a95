"""Convolutional encoder and decoder shared by the image (2D) and audio (1D) tokenizers.

One code path serves both modalities: ``dims`` picks Conv1d or Conv2d. An image of
32x32 with ``channel_mult=[1, 2, 2]`` becomes an 8x8 latent grid; a waveform of 8000
samples with ``downsample=[4, 4, 5, 5]`` becomes 20 latent steps. The decoder mirrors
the encoder level by level, so ``Decoder(Encoder(x))`` has the shape of ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The decoder's output conv starts with weights this much smaller than PyTorch's default,
# so a fresh decoder outputs about 0: mid-range for images in [-1, 1], silence for audio.
OUTPUT_INIT_SCALE = 0.01
MAX_GROUPS = 32
HEAD_DIM = 64
# Widths of the full-resolution layers of the patch stem and head: kept narrow, since
# every layer at full resolution costs patch^2 times one on the patch grid. ``patch_width``
# replaces both where the input is wide (an stft frame has 3 x 129 channels, and the head
# predicts each frame from HEAD_CHANNELS numbers).
STEM_CHANNELS, HEAD_CHANNELS = 32, 16


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """Conv1d or Conv2d by ``dims``."""
    return (nn.Conv1d if dims == 1 else nn.Conv2d)(*args, **kwargs)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that always divide ``channels``."""
    return nn.GroupNorm(math.gcd(MAX_GROUPS, channels), channels, eps=1e-6)


def check_architecture(
    dims: int, channels: int, channel_mult: Sequence[int], num_res_blocks: int, downsample: Sequence[int] | None
) -> list[int]:
    """Validate the shared constructor arguments; return the per-level strides."""
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims!r}")
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels!r}")
    if not channel_mult or any(int(m) < 1 for m in channel_mult):
        raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {channel_mult!r}")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks!r}")
    strides = [2] * (len(channel_mult) - 1) if downsample is None else [int(s) for s in downsample]
    if len(strides) != len(channel_mult) - 1:
        raise ValueError(
            f"downsample needs one stride per level transition ({len(channel_mult) - 1} for "
            f"channel_mult={list(channel_mult)}), got {downsample!r}"
        )
    if any(s < 1 for s in strides):
        raise ValueError(f"downsample strides must be >= 1, got {downsample!r}")
    return strides


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (1x1-projected when needed) skip."""

    def __init__(self, dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv_nd(dims, in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = conv_nd(dims, out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else conv_nd(dims, in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over all positions of a 1D or 2D feature map."""

    def __init__(self, dims: int, channels: int):
        super().__init__()
        # 64-dim heads when the width allows it, one head otherwise (VQGAN uses one).
        self.num_heads = channels // HEAD_DIM if channels % HEAD_DIM == 0 else 1
        self.norm = group_norm(channels)
        self.qkv = conv_nd(dims, channels, 3 * channels, 1)
        self.proj = conv_nd(dims, channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, -1)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (b, heads, positions, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(x.shape))


class Downsample(nn.Module):
    """Strided conv that divides the length (or height and width) exactly by ``stride``."""

    def __init__(self, dims: int, channels: int, stride: int):
        super().__init__()
        # kernel = stride + 2 * (stride // 2) with padding stride // 2 maps L to exactly
        # L / stride for odd strides too (stride 5: kernel 9, padding 2); stride 2 gives 4/1.
        kernel = stride + 2 * (stride // 2)
        self.conv = conv_nd(dims, channels, channels, kernel, stride=stride, padding=stride // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour repeat by ``stride`` followed by a 3-wide conv.

    Chosen over a transposed conv: a transposed conv whose kernel is not a multiple of its
    stride paints the checkerboard pattern (uneven overlap), audible as a tone at
    sr / stride and visible on flat image backgrounds; repeat + conv cannot.
    """

    def __init__(self, dims: int, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.stride, mode="nearest"))


def middle(dims: int, channels: int, attention: bool, enabled: bool = True) -> nn.Module:
    """The block at the lowest resolution: res, (attention), res; or nothing."""
    if not enabled:
        return nn.Identity()
    layers = [ResBlock(dims, channels, channels)]
    if attention:
        layers.append(SelfAttention(dims, channels))
    layers.append(ResBlock(dims, channels, channels))
    return nn.Sequential(*layers)


def shuffle_up(x: torch.Tensor, patch: int, dims: int) -> torch.Tensor:
    """(B, C * p^d, *S) -> (B, C, *S * p): channels become the positions inside each patch."""
    if dims == 2:
        return F.pixel_shuffle(x, patch)
    b, cp, t = x.shape
    return x.view(b, cp // patch, patch, t).transpose(2, 3).reshape(b, cp // patch, t * patch)


class PatchStem(nn.Module):
    """Full-resolution conv, then a p x p (or p) strided conv: the input enters the network
    directly at the patch grid, so no layer runs wide at full resolution."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, patch: int, width: int = STEM_CHANNELS):
        super().__init__()
        self.conv = conv_nd(dims, in_channels, width, 3, padding=1)
        self.patchify = conv_nd(dims, width, out_channels, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patchify(F.silu(self.conv(x)))


class PatchHead(nn.Module):
    """Each grid cell predicts its p x p patch (sub-pixel conv), then two narrow
    full-resolution convs let neighbouring patches agree on edges."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, patch: int, width: int = HEAD_CHANNELS):
        super().__init__()
        self.dims, self.patch = dims, patch
        self.norm = group_norm(in_channels)
        self.expand = conv_nd(dims, in_channels, width * patch**dims, 1)
        self.refine = conv_nd(dims, width, width, 3, padding=1)
        self.conv_out = conv_nd(dims, width, out_channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = shuffle_up(self.expand(F.silu(self.norm(h))), self.patch, self.dims)
        return self.conv_out(F.silu(self.refine(F.silu(h))))


class Encoder(nn.Module):
    """Conv encoder: (B, in_channels, *S) -> (B, z_channels, *S / factor).

    Level i holds ``num_res_blocks`` residual blocks at ``channels * channel_mult[i]``
    channels; between levels i and i+1 a strided conv divides every spatial size by
    ``downsample[i]`` (default 2). ``factor`` is the product of the strides: every spatial
    size of the input must be a multiple of it. ``patch_width`` > 0 sets the width of the
    patch stem's full-resolution conv (default ``STEM_CHANNELS``).
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        downsample: Sequence[int] | None = None,
        attention: bool = False,
        patch: int = 1,
        mid: bool = True,
        patch_width: int = 0,
    ):
        super().__init__()
        strides = check_architecture(dims, channels, channel_mult, num_res_blocks, downsample)
        self.dims, self.in_channels, self.strides = dims, in_channels, strides
        self.factor = math.prod(strides) * patch
        if patch > 1:
            self.conv_in: nn.Module = PatchStem(dims, in_channels, channels, patch, patch_width or STEM_CHANNELS)
        else:
            self.conv_in = conv_nd(dims, in_channels, channels, 3, padding=1)
        blocks: list[nn.Module] = []
        width = channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(dims, width, channels * mult))
                width = channels * mult
            if level < len(strides) and strides[level] > 1:
                blocks.append(Downsample(dims, width, strides[level]))
        self.down = nn.Sequential(*blocks)
        self.mid = middle(dims, width, attention, mid)
        self.norm_out = group_norm(width)
        self.conv_out = conv_nd(dims, width, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"Encoder expects x of shape (B, {self.in_channels}, {'L' if self.dims == 1 else 'H, W'}), "
                f"got {tuple(x.shape)}"
            )
        bad = [s for s in x.shape[2:] if s % self.factor]
        if bad:
            raise ValueError(
                f"Encoder input sizes {tuple(x.shape[2:])} must be multiples of the downsample factor "
                f"{self.factor} (strides {self.strides}); pad or crop the input first"
            )
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Mirror of ``Encoder``: (B, z_channels, *S) -> (B, out_channels, *S * factor).

    Takes the same arguments as the encoder it mirrors, with ``out_channels`` in place of
    ``in_channels``. The output is left unbounded (no tanh): the reconstruction loss and
    the caller decide the range.
    """

    def __init__(
        self,
        dims: int,
        out_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        downsample: Sequence[int] | None = None,
        attention: bool = False,
        patch: int = 1,
        mid: bool = True,
        patch_width: int = 0,
    ):
        super().__init__()
        strides = check_architecture(dims, channels, channel_mult, num_res_blocks, downsample)
        self.dims, self.z_channels, self.strides = dims, z_channels, strides
        self.factor = math.prod(strides) * patch
        width = channels * channel_mult[-1]
        self.conv_in = conv_nd(dims, z_channels, width, 3, padding=1)
        self.mid = middle(dims, width, attention, mid)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(channel_mult))):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(dims, width, channels * channel_mult[level]))
                width = channels * channel_mult[level]
            if level > 0 and strides[level - 1] > 1:
                blocks.append(Upsample(dims, width, strides[level - 1]))
        self.up = nn.Sequential(*blocks)
        self.head: PatchHead | None = None
        if patch > 1:
            self.head = PatchHead(dims, width, out_channels, patch, patch_width or HEAD_CHANNELS)
        else:
            self.norm_out = group_norm(width)
            self.conv_out = conv_nd(dims, width, out_channels, 3, padding=1)
        with torch.no_grad():
            self.output_conv.weight.mul_(OUTPUT_INIT_SCALE)
            self.output_conv.bias.zero_()

    @property
    def output_conv(self) -> nn.Module:
        return self.head.conv_out if self.head is not None else self.conv_out

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the output conv: where the adaptive GAN weight compares gradient norms."""
        return self.output_conv.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != self.dims + 2 or z.shape[1] != self.z_channels:
            raise ValueError(
                f"Decoder expects z of shape (B, {self.z_channels}, {'L' if self.dims == 1 else 'H, W'}), "
                f"got {tuple(z.shape)}"
            )
        h = self.up(self.mid(self.conv_in(z)))
        if self.head is not None:
            return self.head(h)
        return self.conv_out(F.silu(self.norm_out(h)))
