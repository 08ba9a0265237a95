"""Quantizers (single process) and the codebook-usage metric."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lit_vqdiff.metrics import CodebookUsage
from lit_vqdiff.nn.quantizers import (
    FSQ,
    QUANTIZERS,
    ResidualVQ,
    VectorQuantizer,
    build_quantizer,
)


def blobs(n: int, dim: int, centers: int, seed: int, offset: float = 0.0, spread: float = 0.1) -> Tensor:
    """n vectors (n, dim) around `centers` fixed random centres; seed draws the samples."""
    means = torch.randn(centers, dim, generator=torch.Generator().manual_seed(centers)) * 3 + offset
    g = torch.Generator().manual_seed(seed)
    return means[torch.randint(centers, (n,), generator=g)] + spread * torch.randn(n, dim, generator=g)


def as_grid(rows: Tensor, side: int = 4) -> Tensor:
    """(B * side * side, C) rows -> channels-first (B, C, side, side)."""
    return rows.reshape(-1, side, side, rows.shape[1]).permute(0, 3, 1, 2).contiguous()


def plain_vq(**kwargs) -> VectorQuantizer:
    """VQ with every training-time mechanism off unless asked for."""
    options = dict(kmeans_init=False, restart_dead=False, l2_normalize=False)
    return VectorQuantizer(**{**options, **kwargs})


@pytest.mark.parametrize("kind", ["vq", "rvq", "fsq"])
def test_straight_through_gradient_reaches_z(kind):
    options = {"vq": dict(dim=8, codebook_size=16), "rvq": dict(num_quantizers=2, dim=8, codebook_size=16),
               "fsq": dict(dim=8, levels=[5, 4, 3])}[kind]
    torch.manual_seed(0)
    quantizer = build_quantizer(kind, **options)
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = quantizer(z)
    (out.quantized * torch.randn_like(out.quantized)).sum().backward()
    assert out.quantized.shape == z.shape
    assert z.grad is not None and z.grad.abs().sum() > 0
    if kind != "fsq":
        assert out.loss.item() > 0


def test_identity_straight_through_copies_the_gradient():
    quantizer = plain_vq(dim=6, codebook_size=8)
    z = torch.randn(3, 6, 5, requires_grad=True)
    upstream = torch.randn(3, 6, 5)
    (quantizer(z).quantized * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)


@pytest.mark.parametrize("l2", [False, True])
def test_codes_are_the_nearest_code(l2):
    quantizer = plain_vq(dim=8, codebook_size=64, l2_normalize=l2).eval()
    z = torch.randn(4, 8, 6, 6)
    rows = z.movedim(1, -1).reshape(-1, 8)
    codebook = quantizer.embedding
    if l2:
        rows, codebook = F.normalize(rows, dim=-1), F.normalize(codebook, dim=-1)
    brute = torch.cdist(rows, codebook).argmin(1).reshape(4, 6, 6)
    assert torch.equal(quantizer(z).codes, brute)
    assert torch.equal(quantizer.encode(z), brute)


@pytest.mark.parametrize("kind", ["vq", "rvq", "fsq"])
def test_decode_codes_of_encode_equals_quantized_in_eval(kind):
    options = {"vq": dict(dim=12, codebook_size=32, lookup_dim=4),
               "rvq": dict(num_quantizers=3, dim=12, codebook_size=32, lookup_dim=4),
               "fsq": dict(dim=12, levels=[8, 5, 5, 5])}[kind]
    torch.manual_seed(1)
    quantizer = build_quantizer(kind, **options)
    quantizer.train()(torch.randn(4, 12, 16))  # k-means init and one update, so codes are not random
    quantizer.eval()
    z = torch.randn(3, 12, 16)
    out = quantizer(z)
    codes = quantizer.encode(z)
    assert torch.equal(codes, out.codes)
    torch.testing.assert_close(quantizer.decode_codes(codes), out.quantized, atol=1e-5, rtol=1e-5)


def test_l2_normalized_lookups_ignore_scale():
    quantizer = VectorQuantizer(dim=8, codebook_size=32, kmeans_init=False, restart_dead=False).eval()
    z = torch.randn(2, 8, 5, 5)
    assert torch.equal(quantizer.encode(z), quantizer.encode(7.5 * z))
    norms = quantizer.code_vectors(quantizer.encode(z)).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_projection_when_lookup_dim_is_smaller():
    quantizer = VectorQuantizer(dim=32, codebook_size=16, lookup_dim=4, kmeans_init=False, restart_dead=False)
    assert isinstance(quantizer.project_in, torch.nn.Linear) and quantizer.project_in.out_features == 4
    assert quantizer.embedding.shape == (16, 4)
    z = torch.randn(2, 32, 3, 3)
    codes = quantizer.eval().encode(z)
    assert quantizer.code_vectors(codes).shape == (2, 4, 3, 3)
    assert quantizer.decode_codes(codes).shape == z.shape
    # Gaussian diffusion's path: vectors near a code snap back onto it.
    vectors = quantizer.code_vectors(codes) + 1e-3 * torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(quantizer.decode_vectors(vectors), quantizer.decode_codes(codes))


def test_ema_moves_used_codes_toward_their_vectors():
    quantizer = plain_vq(dim=4, codebook_size=8, ema_decay=0.9)
    rows = blobs(256, 4, centers=8, seed=0)
    before = quantizer.embedding.clone()
    codes = quantizer.eval().encode(as_grid(rows)).flatten()
    quantizer.train()(as_grid(rows))
    for code in codes.unique():
        mean = rows[codes == code].mean(0)
        assert (quantizer.embedding[code] - mean).norm() < (before[code] - mean).norm()
    unused = torch.ones(8, dtype=torch.bool)
    unused[codes.unique()] = False
    # Unused codes only feel the Laplace smoothing: they barely move.
    torch.testing.assert_close(quantizer.embedding[unused], before[unused], atol=1e-3, rtol=1e-3)


def test_grad_mode_puts_gradients_on_used_codes_only():
    quantizer = plain_vq(dim=4, codebook_size=32, update="grad")
    assert isinstance(quantizer.embedding, torch.nn.Parameter)
    out = quantizer(torch.randn(1, 4, 3))
    out.loss.backward()
    has_grad = quantizer.embedding.grad.abs().sum(1) > 0
    assert torch.equal(has_grad, out.counts[0] > 0)


def test_kmeans_init_fits_the_data():
    rows = blobs(1024, 6, centers=12, seed=2, offset=10.0, spread=0.5)
    z = as_grid(rows)
    quantizer = VectorQuantizer(dim=6, codebook_size=32, l2_normalize=False, restart_dead=False)
    assert quantizer.codebook().min() < rows.min()  # the random start is nowhere near the data
    quantizer(z)
    codebook = quantizer.codebook()
    assert bool(quantizer.initialized)
    assert (codebook >= rows.min(0).values).all() and (codebook <= rows.max(0).values).all()
    usage = quantizer.eval()(z).usage.item()
    assert usage >= 0.9


def skewed_stream(quantizer: VectorQuantizer, steps: int) -> float:
    """Train on a stream far from a bad start; return usage on a fresh batch."""
    with torch.no_grad():
        quantizer.embedding.copy_(torch.randn(quantizer.codebook_size, 4) * 0.1 + 20.0)
        quantizer.embed_sum.copy_(quantizer.embedding)
    for step in range(steps):
        quantizer(as_grid(blobs(256, 4, centers=16, seed=100 + step, spread=0.3)))
    return quantizer.eval()(as_grid(blobs(256, 4, centers=16, seed=999, spread=0.3))).usage.item()


def test_dead_code_restart_revives_codes_and_off_they_stay_dead():
    dead = plain_vq(dim=4, codebook_size=32)
    revived = plain_vq(dim=4, codebook_size=32, restart_dead=True, dead_after=3, restart_buffer=256)
    usage_dead, usage_revived = skewed_stream(dead, 12), skewed_stream(revived, 12)
    assert usage_dead <= 2 / 32
    assert usage_revived >= 0.6
    assert int(revived.restarts) >= 31 and int(dead.restarts) == 0


def test_grad_mode_restart_replaces_parameter_rows():
    quantizer = plain_vq(dim=4, codebook_size=16, update="grad", restart_dead=True, dead_after=1)
    with torch.no_grad():
        quantizer.embedding.add_(50.0)
    stream = [as_grid(blobs(64, 4, centers=4, seed=s)) for s in range(3)]
    for z in stream:
        quantizer(z).loss.backward()
    assert int(quantizer.restarts) >= 15
    assert quantizer.embedding.abs().max() < 20


@pytest.mark.parametrize("kind", ["vq", "rvq", "fsq"])
def test_autocast_bf16_keeps_float32_inside(kind):
    options = {"vq": dict(dim=16, codebook_size=64, lookup_dim=8),
               "rvq": dict(num_quantizers=2, dim=16, codebook_size=64, lookup_dim=8),
               "fsq": dict(dim=16, levels=[8, 8, 8])}[kind]
    torch.manual_seed(3)
    quantizer = build_quantizer(kind, **options).train()
    quantizer(torch.randn(8, 16, 4, 4))  # initialize outside autocast
    quantizer.eval()
    for dtype in (torch.float32, torch.bfloat16):
        z = torch.randn(4, 16, 4, 4).to(dtype)
        reference = quantizer(z.float())
        vectors = quantizer.code_vectors(reference.codes) + 0.01 * torch.randn(4, quantizer.lookup_dim, 4, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = quantizer(z)
            codes = quantizer.encode(z)
            snapped = quantizer.decode_vectors(vectors)
        assert out.quantized.dtype == dtype and out.loss.dtype == torch.float32
        assert torch.equal(out.codes, reference.codes) and torch.equal(codes, reference.codes)
        torch.testing.assert_close(out.quantized, reference.quantized.to(dtype), atol=0, rtol=0)
        assert snapped.dtype == torch.float32
        torch.testing.assert_close(snapped, quantizer.decode_vectors(vectors), atol=0, rtol=0)


def test_residual_vq_error_falls_with_each_quantizer():
    torch.manual_seed(4)
    rows = torch.randn(2048, 8)
    z = as_grid(rows)
    quantizer = ResidualVQ(num_quantizers=4, dim=8, codebook_size=16, restart_dead=False)
    quantizer(z)
    codes = quantizer.eval().encode(z)
    errors = [(quantizer.decode_codes(codes[:, :q]) - z).pow(2).mean().item() for q in range(1, 5)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 0.5 * errors[0]


def test_residual_vq_l2_normalizes_input_and_first_layer_only():
    torch.manual_seed(8)
    z = as_grid(torch.randn(512, 8) * 5)
    quantizer = ResidualVQ(num_quantizers=3, dim=8, codebook_size=16, l2_normalize=True, restart_dead=False)
    quantizer(z)
    out = quantizer.eval()(z)
    first = quantizer.layers[0].codebook()
    torch.testing.assert_close(first.norm(dim=1), torch.ones(16))
    assert not quantizer.layers[1].l2_normalize
    unit = F.normalize(z, dim=1)  # what the residual layers approximate together
    errors = [(quantizer.decode_codes(out.codes[:, :q]) - unit).pow(2).mean().item() for q in (1, 3)]
    assert errors[1] < errors[0]
    decoded = quantizer.decode_codes(quantizer.encode(z))
    torch.testing.assert_close(decoded, out.quantized, atol=1e-5, rtol=1e-5)


def test_fsq_codes_range_round_trip_and_every_level():
    levels = [8, 5, 5, 5]
    quantizer = FSQ(dim=16, levels=levels)
    size = math.prod(levels)
    assert quantizer.codebook_size == size and quantizer.lookup_dim == 4
    torch.manual_seed(5)
    codes = quantizer.encode(torch.randn(64, 16, 32) * 4)
    assert codes.min() >= 0 and codes.max() < size
    digits, rest = [], codes
    for level in levels:  # documented mixed radix, first channel fastest
        digits.append(rest % level)
        rest = rest // level
    assert all(set(d.unique().tolist()) == set(range(level)) for d, level in zip(digits, levels))
    vectors = quantizer.code_vectors(codes)
    for channel, d in enumerate(digits):
        torch.testing.assert_close(vectors[:, channel], d.float() * 2 / (levels[channel] - 1) - 1)
    every = torch.arange(size)[None]
    assert torch.equal(quantizer.encode_vectors(quantizer.code_vectors(every)), every)


def test_fsq_loss_is_zero_and_gradient_flows_through_bound():
    quantizer = FSQ(dim=4, levels=[3, 3])
    z = torch.randn(2, 4, 7, requires_grad=True)
    out = quantizer(z)
    out.quantized.sum().backward()
    assert out.loss.item() == 0.0 and z.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["vq", "fsq"])
def test_prune_remap_round_trip(kind):
    quantizer = (plain_vq(dim=4, codebook_size=64) if kind == "vq" else FSQ(dim=4, levels=[4, 4, 4])).eval()
    torch.manual_seed(6)
    z = torch.randn(2, 4, 10)
    codes = quantizer.encode(z)
    decoded = quantizer.decode_codes(codes)
    counts = torch.bincount(codes.flatten(), minlength=64)
    if kind == "fsq":  # a CodebookUsage histogram row works too
        remap = quantizer.prune(counts[None])[0]
    else:
        remap = quantizer.prune(counts)
    used = int((counts > 0).sum())
    assert quantizer.codebook_size == used < 64
    assert torch.equal(remap[counts == 0], torch.full((64 - used,), -1))
    assert torch.equal(remap[counts > 0], torch.arange(used))
    assert torch.equal(quantizer.encode(z), remap[codes])
    torch.testing.assert_close(quantizer.decode_codes(remap[codes]), decoded)
    if kind == "fsq":  # a pruned FSQ reloads into a fresh one
        fresh = FSQ(dim=4, levels=[4, 4, 4])
        fresh.load_state_dict(quantizer.state_dict())
        assert torch.equal(fresh.eval().encode(z), remap[codes])


def test_residual_vq_prune_keeps_one_vocabulary_size():
    quantizer = ResidualVQ(num_quantizers=2, dim=4, codebook_size=16, kmeans_init=False, restart_dead=False)
    counts = torch.zeros(2, 16, dtype=torch.long)
    counts[0, [1, 5, 9]] = 4
    counts[1, [2, 3]] = 1
    z = torch.randn(1, 4, 3)
    remap = quantizer.prune(counts)
    assert quantizer.codebook_size == 3
    assert torch.equal(remap[0, [1, 5, 9]], torch.arange(3))
    assert torch.equal(remap[1, [0, 2, 3]], torch.arange(3))  # padded with the lowest unused code
    assert int((remap[1] >= 0).sum()) == 3 and quantizer.encode(z).max() < 3


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="unknown quantizer kind 'pq'.*fsq.*rvq.*vq"):
        build_quantizer("pq", dim=4)
    with pytest.raises(ValueError, match="update"):
        VectorQuantizer(dim=4, codebook_size=8, update="adam")
    with pytest.raises(ValueError, match="levels"):
        FSQ(dim=4, levels=[8, 1])
    quantizer = plain_vq(dim=4, codebook_size=8)
    with pytest.raises(ValueError, match=r"z must be channels-first \(B, 4"):
        quantizer(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 8\)"):
        quantizer.decode_codes(torch.tensor([[8]]))
    with pytest.raises(ValueError, match="counts must have shape"):
        quantizer.prune(torch.ones(9))
    assert set(QUANTIZERS) == {"vq", "rvq", "fsq"}


def test_codebook_usage_on_a_known_histogram():
    metric = CodebookUsage(num_codes=4)
    metric.update(torch.tensor([[0, 0], [1, 1]]))
    metric.update(torch.tensor([[0, 0]]))  # histogram [4, 2, 0, 0]
    stats = metric.compute()
    p = torch.tensor([4 / 6, 2 / 6])
    assert stats["usage"].item() == 0.5 and stats["dead"].item() == 2
    torch.testing.assert_close(stats["perplexity"], torch.exp(-(p * p.log()).sum()))
    assert torch.equal(stats["histogram"], torch.tensor([[4, 2, 0, 0]]))


def test_codebook_usage_per_codebook_for_residual_codes():
    metric = CodebookUsage(num_codes=3, num_codebooks=2)
    codes = torch.tensor([[[0, 1, 2], [1, 1, 1]]])  # (B=1, 2 codebooks, T=3)
    metric.update(codes)
    stats = metric.compute()
    torch.testing.assert_close(stats["usage"], torch.tensor([1.0, 1 / 3]))
    torch.testing.assert_close(stats["perplexity"], torch.tensor([3.0, 1.0]))
    assert torch.equal(stats["dead"], torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 3\)"):
        metric.update(torch.tensor([[[0], [3]]]))
    metric.reset()
    metric.update(codes[:, :, :1])
    assert torch.equal(metric.compute()["histogram"], torch.tensor([[1, 0, 0], [0, 1, 0]]))


def test_output_usage_matches_metric():
    torch.manual_seed(7)
    quantizer = VectorQuantizer(dim=4, codebook_size=16, restart_dead=False)
    out = quantizer(torch.randn(2, 4, 5, 5))
    metric = CodebookUsage(num_codes=16)
    metric.update(out.codes)
    stats = metric.compute()
    torch.testing.assert_close(out.usage[0], stats["usage"])
    torch.testing.assert_close(out.perplexity[0], stats["perplexity"])
