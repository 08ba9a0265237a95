"""Conv encoder/decoder: shapes, gradients, memory formats, autocast, and that they learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_vqdiff.data.shapes import make_sample
from lit_vqdiff.nn.conv import Decoder, Encoder

AUDIO_STRIDES = [4, 4, 5, 5]


def image_pair(attention: bool = False, channels: int = 32) -> tuple[Encoder, Decoder]:
    arch = dict(channels=channels, channel_mult=[1, 2, 2], num_res_blocks=1, z_channels=8, attention=attention)
    return Encoder(2, 3, **arch), Decoder(2, 3, **arch)


def audio_pair(attention: bool = False) -> tuple[Encoder, Decoder]:
    arch = dict(
        channels=16, channel_mult=[1, 1, 2, 2, 4], num_res_blocks=1, z_channels=8,
        downsample=AUDIO_STRIDES, attention=attention,
    )  # fmt: skip
    return Encoder(1, 1, **arch), Decoder(1, 1, **arch)


@pytest.mark.parametrize("attention", [False, True])
def test_image_shapes_32_to_8_and_back(attention: bool) -> None:
    enc, dec = image_pair(attention)
    z = enc(torch.randn(2, 3, 32, 32))
    assert enc.factor == dec.factor == 4
    assert z.shape == (2, 8, 8, 8)
    assert dec(z).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("attention", [False, True])
def test_audio_shapes_8000_to_20_and_back(attention: bool) -> None:
    enc, dec = audio_pair(attention)
    z = enc(torch.randn(2, 1, 8000))
    assert enc.factor == 4 * 4 * 5 * 5
    assert z.shape == (2, 8, 20)
    assert dec(z).shape == (2, 1, 8000)


def test_spectrogram_path_treats_bins_as_channels() -> None:
    arch = dict(channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, z_channels=4)
    enc, dec = Encoder(1, 129, **arch), Decoder(1, 129, **arch)
    z = enc(torch.randn(3, 129, 124))  # 129 bins (n_fft 256), 124 frames
    assert z.shape == (3, 4, 31)
    assert dec(z).shape == (3, 129, 124)


@pytest.mark.parametrize("length", [7999, 8001, 8010])
def test_length_not_multiple_of_factor_is_rejected(length: int) -> None:
    enc, _ = audio_pair()
    with pytest.raises(ValueError, match="multiples of the downsample factor 400"):
        enc(torch.randn(1, 1, length))


def test_bad_arguments_are_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="downsample"):
        Encoder(1, 1, 16, [1, 2, 2], 1, 8, downsample=[4, 4, 5])
    with pytest.raises(ValueError, match="dims"):
        Decoder(3, 3, 16, [1, 2], 1, 8)
    with pytest.raises(ValueError, match="channel_mult"):
        Encoder(2, 3, 16, [], 1, 8)
    enc, dec = image_pair()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        dec(torch.randn(2, 4, 8, 8))


def test_decoder_starts_near_zero_and_exposes_last_layer() -> None:
    enc, dec = image_pair()
    out = dec(enc(torch.randn(4, 3, 32, 32)))
    assert out.abs().mean() < 0.05
    assert dec.last_layer is dec.conv_out.weight


@pytest.mark.parametrize("attention", [False, True])
def test_gradients_reach_every_parameter(attention: bool) -> None:
    enc, dec = image_pair(attention)
    F.mse_loss(dec(enc(torch.randn(2, 3, 32, 32))), torch.randn(2, 3, 32, 32)).backward()
    for name, p in [*enc.named_parameters(), *dec.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("attention", [False, True])
def test_channels_last_matches_contiguous(attention: bool) -> None:
    torch.manual_seed(0)
    enc, dec = image_pair(attention)
    x = torch.randn(2, 3, 32, 32)
    expected = dec(enc(x))
    enc_cl = enc.to(memory_format=torch.channels_last)
    dec_cl = dec.to(memory_format=torch.channels_last)
    z = enc_cl(x.to(memory_format=torch.channels_last))
    got = dec_cl(z)
    assert z.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 2])
def test_bf16_autocast_forward_is_finite_and_close(dims: int) -> None:
    torch.manual_seed(0)
    enc, dec = image_pair(attention=True) if dims == 2 else audio_pair(attention=True)
    x = torch.randn(2, 3, 32, 32) if dims == 2 else torch.randn(2, 1, 8000)
    z32 = enc(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z16 = enc(x)
        out = dec(z16)
    assert z16.dtype == torch.bfloat16
    assert torch.isfinite(out).all() and out.shape == x.shape
    # bf16 keeps ~3 significant digits: the latents agree to a few percent of their scale.
    assert (z16.float() - z32).abs().max() < 0.05 * z32.abs().max()


def shapes_images(count: int) -> torch.Tensor:
    """shapes-v1 images scaled to [-1, 1], (count, 3, 32, 32)."""
    images = np.stack([make_sample(seed=7, index=i).image for i in range(count)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB for signals in [-1, 1] (peak-to-peak 2)."""
    return float(10 * torch.log10(4.0 / F.mse_loss(pred, target)))


@pytest.mark.slow
def test_tiny_autoencoder_overfits_shapes_images() -> None:
    torch.manual_seed(0)
    images = shapes_images(8)
    enc, dec = image_pair(channels=16)
    params = [*enc.parameters(), *dec.parameters()]
    optimizer = torch.optim.Adam(params, lr=2e-3)
    with torch.no_grad():
        start = psnr(dec(enc(images)), images)
    for _ in range(250):
        loss = F.mse_loss(dec(enc(images)), images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        end = psnr(dec(enc(images)), images)
    assert start < 15 < 25 < end
