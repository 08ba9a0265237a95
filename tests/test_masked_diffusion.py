"""Absorbing mask diffusion: schedule, masked-only loss, MaskGIT sampling, guidance, a tiny fit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_vqdiff.diffusion.masked import SCHEDULES, MaskedDiffusion, MaskSchedule, gumbel_noise
from lit_vqdiff.nn.dit import Condition
from lit_vqdiff.nn.dit import DiT

VOCAB = 10
MASK = VOCAB


@pytest.fixture
def one_thread():
    """Small models run faster on one thread than on two contended ones."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def oracle(target: torch.Tensor, scale: float = 30.0):
    """A model_fn whose logits are a scaled one-hot of ``target`` (plus a mask-id column)."""

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        logits = F.one_hot(target.expand(x.shape[0], *target.shape[1:]), VOCAB + 1).float() * scale
        logits[..., MASK] = 1e4  # the sampler must never pick the mask id, however likely
        return logits

    return model_fn


@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedule_endpoints_and_monotonicity(kind):
    schedule = MaskSchedule(kind)
    t = torch.linspace(0, 1, 1001)
    gamma = schedule(t)
    assert gamma[0].item() == pytest.approx(0.0, abs=1e-7) and gamma[-1].item() == pytest.approx(1.0, abs=1e-7)
    assert (gamma.diff() > 0).all()
    assert gamma.dtype == torch.float32


def test_cosine_schedule_is_maskgit_cosine():
    t = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    torch.testing.assert_close(MaskSchedule("cosine")(t), torch.cos(math.pi / 2 * (1 - t)))
    with pytest.raises(ValueError, match="cosine"):
        MaskSchedule("square")


def test_gumbel_noise_is_finite_with_the_gumbel_mean():
    noise = gumbel_noise((200_000,), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.isfinite(noise).all()
    assert noise.mean().item() == pytest.approx(0.5772, abs=0.01)  # Euler-Mascheroni constant


def test_loss_counts_masked_positions_only():
    diffusion = MaskedDiffusion(VOCAB, MASK)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, VOCAB, (6, 4, 5), generator=g)
    logits = torch.randn(6, 4, 5, VOCAB + 1, generator=g, requires_grad=True)
    seen = {}

    def model_fn(x, t, cond):
        seen["x"], seen["t"] = x, t
        return logits

    loss, stats = diffusion.loss(model_fn, x0, t=torch.full((6,), 0.5), generator=g)
    masked = seen["x"] == MASK
    assert seen["x"].shape == x0.shape and masked.any(dim=(1, 2)).all()
    assert torch.equal(seen["x"][~masked], x0[~masked])
    torch.testing.assert_close(seen["t"], MaskSchedule()(torch.full((6,), 0.5)))
    expected = F.cross_entropy(logits[..., :VOCAB][masked], x0[masked])
    torch.testing.assert_close(loss, expected)
    assert stats["mask_ratio"].item() == pytest.approx(masked.float().mean().item())
    loss.backward()
    assert torch.count_nonzero(logits.grad[~masked]) == 0
    assert torch.count_nonzero(logits.grad[masked][:, :VOCAB]) > 0


def test_loss_masks_at_least_one_position_and_validates_codes():
    diffusion = MaskedDiffusion(VOCAB, MASK, label_smoothing=0.1)
    x0 = torch.randint(0, VOCAB, (8, 16))
    seen = {}

    def model_fn(x, t, cond):
        seen["x"] = x
        return torch.zeros(*x.shape, VOCAB, requires_grad=True)

    loss, _ = diffusion.loss(model_fn, x0, t=torch.zeros(8))  # gamma(0) = 0 masks nothing by itself
    assert ((seen["x"] == MASK).sum(1) == 1).all()
    assert loss.item() == pytest.approx(math.log(VOCAB), rel=1e-5)
    with pytest.raises(ValueError, match="x0 codes"):
        diffusion.loss(model_fn, torch.full((2, 3), VOCAB))
    with pytest.raises(ValueError, match="mask_id"):
        MaskedDiffusion(VOCAB, mask_id=3)


@pytest.mark.parametrize("shape", [(3, 12), (2, 4, 4)])
def test_oracle_sampling_reproduces_target_without_mask_tokens(shape):
    target = torch.randint(0, VOCAB, (1, *shape[1:]), generator=torch.Generator().manual_seed(1))
    out = MaskedDiffusion(VOCAB).sample(oracle(target), shape, steps=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == shape and (out != MASK).all()
    assert torch.equal(out, target.expand(shape))


@pytest.mark.parametrize(("kind", "steps"), [("cosine", 1), ("cosine", 7), ("linear", 16), ("arccos", 4)])
def test_sampling_makes_exactly_steps_calls_following_the_schedule(kind, steps):
    length = 16
    diffusion = MaskedDiffusion(VOCAB, schedule=kind)
    masked_counts, ratios = [], []
    target = torch.randint(0, VOCAB, (1, length))

    def model_fn(x, t, cond):
        masked_counts.append((x == MASK).sum(1))
        ratios.append(t)
        return oracle(target, scale=1.0)(x, t, cond)

    out = diffusion.sample(model_fn, (2, length), steps=steps, generator=torch.Generator().manual_seed(0))
    assert len(masked_counts) == steps and (out != MASK).all()
    counts = [int(c[0]) for c in masked_counts]
    expected = [length]
    for k in range(1, steps):
        gamma = float(MaskSchedule(kind)(torch.tensor(1 - k / steps, dtype=torch.float64)))
        expected.append(max(0, min(expected[-1] - 1, math.floor(length * gamma))))
    assert counts == expected and all(a > b for a, b in zip(counts, counts[1:]))
    if kind == "linear":
        assert counts == list(range(length, 0, -1))  # one code decided per step
    for count, ratio in zip(masked_counts, ratios):
        torch.testing.assert_close(ratio, count.float() / length)
    with pytest.raises(ValueError, match="steps"):
        diffusion.sample(model_fn, (2, length), steps=length + 1)


def test_left_to_right_order_commits_a_growing_prefix_whatever_the_confidence():
    length, steps = 12, 5
    target = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(2))
    seen = []

    def model_fn(x, t, cond):
        seen.append(x.clone())
        logits = oracle(target, scale=1.0)(x, t, cond)
        # The last position is the most confident: "confidence" order would take it first.
        logits[..., -1, :] *= 10
        return logits

    out = MaskedDiffusion(VOCAB).sample(model_fn, (2, length), steps=steps, temperature=0.0, order="left_to_right")
    assert torch.equal(out, target.expand(2, length))
    for x in seen[1:]:
        decided = (x != MASK).int()
        assert decided.any() and (decided.diff(dim=1) <= 0).all()  # decided positions form a prefix
    seen.clear()
    MaskedDiffusion(VOCAB).sample(model_fn, (2, length), steps=steps, temperature=0.0, choice_temperature=0.0)
    assert (seen[1][:, -1] != MASK).all()  # the confident last position goes first by default
    with pytest.raises(ValueError, match="order"):
        MaskedDiffusion(VOCAB).sample(model_fn, (2, length), steps=steps, order="random")


def test_guidance_zero_equals_unconditional_and_requires_uncond():
    g = torch.Generator().manual_seed(0)
    table_cond = torch.randn(3, 8, VOCAB, generator=g) * 2
    table_uncond = torch.randn(3, 8, VOCAB, generator=g) * 2

    def model_fn(x, t, cond):
        # Depends on the partly decoded codes too, so the whole trajectory must match.
        return cond + 0.7 * F.one_hot(x.clamp(max=VOCAB - 1), VOCAB).float().roll(1, dims=1)

    diffusion = MaskedDiffusion(VOCAB)

    def run(**kwargs):
        return diffusion.sample(model_fn, (3, 8), steps=4, generator=torch.Generator().manual_seed(5), **kwargs)

    unconditional = run(cond=table_uncond)
    assert torch.equal(run(cond=table_cond, uncond=table_uncond, guidance=0.0), unconditional)
    assert torch.equal(run(cond=table_cond, uncond=table_uncond, guidance=1.0), run(cond=table_cond))
    assert not torch.equal(run(cond=table_cond, uncond=table_uncond, guidance=4.0), unconditional)
    with pytest.raises(ValueError, match="uncond"):
        run(cond=table_cond, guidance=2.0)


@pytest.mark.slow
def test_tiny_dit_learns_two_class_conditional_sequences(one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    length = 16
    sequences = torch.randint(0, VOCAB, (2, length), generator=g)
    model = DiT(width=64, depth=2, heads=4, vocab_size=VOCAB, seq_shape=(length,), num_classes=2)
    diffusion = MaskedDiffusion(VOCAB, model.mask_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(250):
        labels = torch.randint(0, 2, (32,), generator=g)
        loss, _ = diffusion.loss(model, sequences[labels], Condition(labels=labels), generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    labels = torch.arange(64) % 2
    generator = torch.Generator().manual_seed(1)
    samples = diffusion.sample(model, (64, length), Condition(labels=labels), steps=8, generator=generator)
    exact = (samples == sequences[labels]).all(dim=1).float().mean().item()
    assert exact >= 0.95
