"""Uniform D3PM and mask-and-replace diffusion: closed forms against dense matrices, the VB
term, exact-in-distribution respaced sampling, guidance and temperature, a tiny fit."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from lit_vqdiff.diffusion.discrete import DiscreteDiffusion, categorical_kl, log_one_hot, respaced_times
from lit_vqdiff.diffusion.mask_replace import MaskReplaceDiffusion
from lit_vqdiff.diffusion.uniform import UniformDiffusion
from lit_vqdiff.nn.dit import Condition, DiT

K, T = 5, 8
PROCESSES = {
    "uniform-cosine": lambda k=K, n=T: UniformDiffusion(k, n),
    "uniform-linear": lambda k=K, n=T: UniformDiffusion(k, n, schedule="linear"),
    "mask_replace-linear": lambda k=K, n=T: MaskReplaceDiffusion(k, n),
    "mask_replace-cosine-full": lambda k=K, n=T: MaskReplaceDiffusion(k, n, schedule="cosine", replace=1.0),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors and models run faster on one thread than on two contended ones."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def one_step_matrices(diffusion) -> list[torch.Tensor]:
    """Dense Q_1..Q_T (rows: from, columns: to) from the papers' per-step coefficients."""
    k, matrices = diffusion.vocab_size, []
    if isinstance(diffusion, UniformDiffusion):
        abar = diffusion.alphas_cumprod
        for t in range(1, diffusion.num_steps + 1):
            beta = 1 - abar[t] / abar[t - 1]
            matrices.append((1 - beta) * torch.eye(k, dtype=torch.float64) + beta / k)
        return matrices
    abar, gbar = diffusion.alphas_cumprod, diffusion.gammas_cumprod
    for t in range(1, diffusion.num_steps + 1):
        alpha = abar[t] / abar[t - 1]
        gamma = 1 - (1 - gbar[t]) / (1 - gbar[t - 1])
        beta = (1 - alpha - gamma) / k
        q = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        q[:k, :k] = alpha * torch.eye(k, dtype=torch.float64) + beta
        q[:k, k] = gamma
        q[k, k] = 1.0  # the mask is absorbing
        matrices.append(q)
    return matrices


def dense_chain(diffusion) -> tuple[list[torch.Tensor], dict[tuple[int, int], torch.Tensor]]:
    """(Qbar_0..Qbar_T, Q_{s->t} for all s < t) as products of one-step matrices."""
    steps = one_step_matrices(diffusion)
    eye = torch.eye(steps[0].shape[0], dtype=torch.float64)
    qbar = [eye]
    for q in steps:
        qbar.append(qbar[-1] @ q)
    skip = {}
    for s in range(diffusion.num_steps):
        product = eye
        for t in range(s + 1, diffusion.num_steps + 1):
            product = product @ steps[t - 1]
            skip[s, t] = product
    return qbar, skip


def dense_posterior(qbar, skip, x0: int, x_t: int, s: int, t: int) -> torch.Tensor:
    """q(x_s | x_t, x0) by Bayes' rule over the dense matrices (zeros for an x_t never reached)."""
    joint = qbar[s][x0] * skip[s, t][:, x_t]
    return joint / joint.sum() if joint.sum() > 0 else joint


@pytest.mark.parametrize("name", PROCESSES)
def test_one_step_matrices_are_stochastic_and_marginals_match_their_products(name):
    diffusion = PROCESSES[name]()
    states = diffusion.states
    qbar, _ = dense_chain(diffusion)
    for q in one_step_matrices(diffusion):
        assert (q >= -1e-12).all()
        torch.testing.assert_close(q.sum(1), torch.ones(states, dtype=torch.float64))
    x0 = torch.arange(K)[:, None].expand(K, diffusion.num_steps + 1)  # rows: x0; columns: t
    t = torch.arange(diffusion.num_steps + 1).expand(K, -1)
    probs = torch.stack([diffusion.q_probs(x0[:, i : i + 1], t[:, i]) for i in range(t.shape[1])], 1)[:, :, 0]
    expected = torch.stack([m[:K] for m in qbar], 1).float()  # (x0, t, states)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
    if isinstance(diffusion, MaskReplaceDiffusion):
        # VQ-Diffusion's closed form: abar + bbar at x0, bbar elsewhere, gbar at the mask; x_T is all masks.
        abar, bbar, gbar = diffusion.alphas_cumprod, diffusion.betas_cumprod, diffusion.gammas_cumprod
        for step, m in enumerate(qbar):
            torch.testing.assert_close(m[0, 0], abar[step] + bbar[step])
            torch.testing.assert_close(m[0, 1], bbar[step])
            torch.testing.assert_close(m[0, K], gbar[step])
        assert float(gbar[-1]) == 1.0 and float(gbar[0]) == 0.0
    else:
        assert float(diffusion.alphas_cumprod[-1]) < 1e-6  # x_T is uniform noise


@pytest.mark.parametrize("name", PROCESSES)
def test_skip_transitions_match_products_of_one_step_matrices(name):
    diffusion = PROCESSES[name]()
    _, skip = dense_chain(diffusion)
    x_t = torch.arange(diffusion.states)[None]
    for (s, t), product in skip.items():
        got = diffusion.log_q_step(x_t, torch.tensor([s]), torch.tensor([t])).exp()[0]  # (x_t, x_s)
        torch.testing.assert_close(got.double(), product.T, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", PROCESSES)
def test_posteriors_are_bayes_rule_mixtures_and_sum_to_one(name):
    diffusion = PROCESSES[name]()
    qbar, skip = dense_chain(diffusion)
    p0 = torch.softmax(torch.randn(K, generator=torch.Generator().manual_seed(0)) * 2, dim=0).double()
    for s, t in skip:
        for x_t in range(diffusion.states):
            if not (qbar[t][:K, x_t] > 0).all():
                continue  # an x_t that the process never reaches at t (a code at T under full masking)
            xt = torch.tensor([[x_t]])
            st = torch.tensor([s]), torch.tensor([t])
            mixture = diffusion.log_posterior(torch.log(p0).float()[None, None], xt, *st).exp()[0, 0]
            torch.testing.assert_close(mixture.sum(), torch.tensor(1.0), atol=2e-6, rtol=0)
            expected = sum(p0[x0] * dense_posterior(qbar, skip, x0, x_t, s, t) for x0 in range(K))
            torch.testing.assert_close(mixture.double(), expected, atol=2e-6, rtol=1e-5)
            for x0 in range(K):
                bayes = diffusion.log_posterior(log_one_hot(torch.tensor([[x0]]), K), xt, *st).exp()[0, 0]
                expected = dense_posterior(qbar, skip, x0, x_t, s, t)
                torch.testing.assert_close(bayes.double(), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["uniform-cosine", "mask_replace-linear"])
def test_q_sample_draws_the_marginals(name):
    diffusion = PROCESSES[name]()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(K, (4, 20_000), generator=g)
    t = torch.tensor([1, 3, 6, T])
    x_t = diffusion.q_sample(x0, t, g)
    probs = diffusion.q_probs(x0, t)  # (4, N, states)
    for row in range(4):
        kept, masked = (x_t[row] == x0[row]).float().mean(), (x_t[row] == K).float().mean()
        expected = probs[row].gather(-1, x0[row, :, None]).mean()
        assert abs(kept.item() - expected.item()) < 0.015
        mask_share = probs[row, :, K].mean().item() if diffusion.mask_id is not None else 0.0
        assert abs(masked.item() - mask_share) < 0.015


def oracle_logits(x0: torch.Tensor, scale: float = 1e4):
    """A model_fn that predicts x0 with certainty, and records what it was given."""
    seen = {}

    def model_fn(x, t, cond):
        seen["x"], seen["t"] = x, t
        return (F.one_hot(x0, K).float() * scale).requires_grad_()

    return model_fn, seen


@pytest.mark.parametrize("name", PROCESSES)
def test_vb_is_nonnegative_and_zero_for_the_true_x0(name):
    diffusion = PROCESSES[name]()
    diffusion.hybrid = 1.0
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(K, (2 * T, 6), generator=g)
    t = torch.arange(1, T + 1).repeat(2)  # every step, both endpoints included
    model_fn, seen = oracle_logits(x0)
    _, stats = diffusion.loss(model_fn, x0, t=t, generator=g)
    assert stats["vb"].abs().item() < 1e-5 and stats["ce"].item() < 1e-5 and stats["accuracy"].item() == 1.0
    torch.testing.assert_close(seen["t"], t / T)
    assert seen["t"].dtype == torch.float32 and seen["x"].shape == x0.shape
    # Random predictions: every per-code KL is >= 0, the loss is finite and so are its gradients.
    x_t = diffusion.q_sample(x0, t, g)
    logits = torch.randn(*x0.shape, K, generator=g, requires_grad=True)
    log_q = diffusion.log_posterior(log_one_hot(x0, K), x_t, t - 1, t)
    kl = categorical_kl(log_q, diffusion.log_posterior(logits.log_softmax(-1), x_t, t - 1, t))
    assert (kl >= -1e-6).all() and (kl > 1e-3).any()
    kl.sum().backward()
    assert torch.isfinite(logits.grad).all()
    at_one = t == 1
    torch.testing.assert_close(kl[at_one], -logits.log_softmax(-1)[at_one].gather(-1, x0[at_one, :, None])[..., 0])


@pytest.mark.parametrize("hybrid", [0.0, 0.5])
def test_loss_is_cross_entropy_plus_hybrid_vb_with_gradients_through_both(hybrid):
    diffusion = MaskReplaceDiffusion(K, T, hybrid=hybrid)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(K, (8, 3, 2), generator=g)
    logits = torch.randn(8, 3, 2, K + 1, generator=g, requires_grad=True)  # an extra column is ignored
    seen = {}

    def model_fn(x, t, cond):
        seen["x"] = x
        return logits

    loss, stats = diffusion.loss(model_fn, x0, generator=g)
    assert seen["x"].shape == x0.shape
    assert set(stats) == {"loss", "ce", "accuracy", "noised"} | ({"vb"} if hybrid else set())
    ce = F.cross_entropy(logits[..., :K].reshape(-1, K), x0.reshape(-1))
    torch.testing.assert_close(stats["ce"], ce.detach())
    torch.testing.assert_close(loss, ce + hybrid * stats["vb"] if hybrid else ce)
    assert stats.get("vb", torch.tensor(0.0)).item() >= 0
    loss.backward()
    assert torch.count_nonzero(logits.grad[..., K]) == 0 and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="x0 codes"):
        diffusion.loss(model_fn, torch.full((2, 3), K))
    with pytest.raises(ValueError, match="mask_id"):
        MaskReplaceDiffusion(K, mask_id=2)


def test_constructors_check_their_arguments():
    with pytest.raises(ValueError, match="schedule"):
        UniformDiffusion(K, schedule="square")
    with pytest.raises(ValueError, match="schedule"):
        MaskReplaceDiffusion(K, schedule="square")
    with pytest.raises(ValueError, match="replace"):
        MaskReplaceDiffusion(K, replace=1.5)
    with pytest.raises(ValueError, match="hybrid"):
        UniformDiffusion(K, hybrid=-1.0)
    with pytest.raises(ValueError, match="monotonically"):
        DiscreteDiffusion(K, torch.tensor([1.0, 0.5, 0.7]), torch.zeros(3))
    assert respaced_times(10, 3) == [10, 6, 3, 0] and respaced_times(4, 4) == [4, 3, 2, 1, 0]


def test_processes_show_the_model_its_own_token_space():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(K, (T, 32), generator=g)
    t = torch.arange(1, T + 1)
    model_fn, seen = oracle_logits(x0)
    UniformDiffusion(K, T).loss(model_fn, x0, t=t, generator=g)
    assert seen["x"].max() < K  # important: uniform D3PM never shows a mask
    MaskReplaceDiffusion(K, T, mask_id=K + 3).loss(model_fn, x0, t=t, generator=g)
    assert set(seen["x"].unique().tolist()) <= set(range(K)) | {K + 3}
    assert (seen["x"][-1] == K + 3).all()  # t = T: all masks
    assert ((seen["x"] != x0) & (seen["x"] != K + 3)).any()  # replaced codes


# ----------------------------------------------------------------------------- sampling


def toy_model(vocab: int, length: int, seed: int):
    """A fixed model_fn whose x_0 logits depend strongly on the codes, on the time and on a tensor condition."""
    g = torch.Generator().manual_seed(seed)
    # (position, own state, neighbour's state, code)
    table = torch.randn(length, vocab + 1, vocab + 1, vocab, generator=g) * 2.0

    def model_fn(x, t, cond):
        logits = table[torch.arange(length)[None], x.clamp(max=vocab), x.roll(1, dims=1).clamp(max=vocab)]
        return logits * torch.cos(2.0 * t)[:, None, None] + cond

    return model_fn


def exact_sample_distribution(diffusion, model_fn, length, times, cond, uncond, guidance, temperature):
    """Exact distribution of the sampler's output over all code sequences, from dense matrices."""
    qbar, skip = dense_chain(diffusion)
    states, k = diffusion.states, diffusion.vocab_size
    sequences = torch.tensor(list(itertools.product(range(states), repeat=length)))
    start = qbar[-1][0] if diffusion.mask_id is not None else torch.full((k,), 1.0 / k, dtype=torch.float64)
    dist = start[sequences].prod(dim=1)  # prior, independent across positions
    model_x = sequences.masked_fill(sequences == k, diffusion.mask_id if diffusion.mask_id is not None else 0)
    n = len(sequences)
    for t, s in zip(times, times[1:]):
        time = torch.full((n,), t / diffusion.num_steps)
        logits = model_fn(model_x, time, cond[:1].expand(n, -1, -1))
        if guidance != 1.0:
            base = model_fn(model_x, time, uncond[:1].expand(n, -1, -1))
            logits = base + guidance * (logits - base)
        p0 = torch.softmax(logits / temperature, dim=-1).double()  # (n, L, K)
        if s == 0:
            kernel = F.pad(p0, (0, states - k))
        else:
            posterior = torch.stack([  # (x_t, x0, x_s)
                torch.stack([dense_posterior(qbar, skip, x0, x_t, s, t) for x0 in range(k)]) for x_t in range(states)
            ])
            kernel = torch.einsum("nlk,nlks->nls", p0, posterior[sequences])
        # P(next = y | now = x) = prod over positions of kernel[x, position, y_position]
        transition = kernel[:, torch.arange(length), sequences].prod(-1)  # (now, next)
        dist = dist @ transition
    return sequences, dist


@pytest.mark.parametrize("name", ["uniform-cosine", "mask_replace-linear"])
@pytest.mark.parametrize(("steps", "guidance", "temperature"), [(6, 1.0, 1.0), (3, 1.0, 1.0), (6, 2.0, 0.7)])
def test_respaced_sampling_is_exact_in_distribution(name, steps, guidance, temperature):
    """Step by step (steps = T) and respaced, the sampler's output has the exact chain's distribution.

    Sensitivity, measured: D3PM's joint form in place of the posterior mixture is off by a
    total variation of 0.04-0.12 at steps = T, one-step posteriors used for a skip by 0.08-0.12;
    sampling noise at n = 30000 is below 0.01.
    """
    vocab, length, num_steps, n = 3, 2, 6, 30_000
    diffusion = PROCESSES[name](vocab, num_steps)
    model_fn = toy_model(vocab, length, seed=3)
    g = torch.Generator().manual_seed(0)
    cond_one, uncond_one = torch.randn(2, 1, length, vocab, generator=g) * 0.5
    cond, uncond = cond_one.expand(n, -1, -1), uncond_one.expand(n, -1, -1)
    kwargs = dict(uncond=uncond, guidance=guidance) if guidance != 1.0 else {}
    out = diffusion.sample(model_fn, (n, length), cond, steps=steps, temperature=temperature,
                           generator=torch.Generator().manual_seed(1), **kwargs)
    assert out.min() >= 0 and out.max() < vocab
    times = respaced_times(num_steps, steps)
    assert len(times) == steps + 1 and times[0] == num_steps and times[-1] == 0
    sequences, exact = exact_sample_distribution(
        diffusion, model_fn, length, times, cond, uncond, guidance, temperature
    )
    codes = (sequences < vocab).all(1)
    assert exact[~codes].abs().sum() < 1e-12  # never a mask in the output
    index = (out[:, 0] * vocab + out[:, 1]).bincount(minlength=vocab**2).double() / n
    expected = exact[codes]  # same row-major order over code pairs
    total_variation = 0.5 * (index - expected).abs().sum().item()
    assert total_variation < 0.02, (index, expected)


@pytest.mark.parametrize("name", ["uniform-cosine", "mask_replace-linear"])
def test_temperature_zero_is_argmax_and_guidance_mixes_logits(name):
    diffusion = PROCESSES[name](K, 50)
    g = torch.Generator().manual_seed(0)
    table_cond, table_uncond = torch.randn(2, 3, 6, K, generator=g) * 2

    def fixed(x, t, cond):
        return cond  # ignores x and t: the last step's argmax is the answer, whatever the path

    def run(seed, **kwargs):
        return diffusion.sample(fixed, (3, 6), steps=10, generator=torch.Generator().manual_seed(seed), **kwargs)

    assert torch.equal(run(0, cond=table_cond, temperature=0.0), table_cond.argmax(-1))
    assert torch.equal(run(1, cond=table_cond, temperature=0.0), table_cond.argmax(-1))
    guided = table_uncond + 3.0 * (table_cond - table_uncond)
    assert torch.equal(run(2, cond=table_cond, uncond=table_uncond, guidance=3.0, temperature=0.0), guided.argmax(-1))
    assert not torch.equal(run(3, cond=table_cond), run(4, cond=table_cond))  # temperature 1 samples

    model_fn = toy_model(K, 6, seed=0)  # depends on the codes: the whole trajectory must match
    assert torch.equal(run(5, cond=table_cond, uncond=table_uncond, guidance=0.0), run(5, cond=table_uncond))
    with_uncond = diffusion.sample(model_fn, (3, 6), table_cond, table_uncond, guidance=1.0,
                                   generator=torch.Generator().manual_seed(6))
    alone = diffusion.sample(model_fn, (3, 6), table_cond, generator=torch.Generator().manual_seed(6))
    assert torch.equal(with_uncond, alone)
    with pytest.raises(ValueError, match="uncond"):
        run(0, cond=table_cond, guidance=2.0)
    with pytest.raises(ValueError, match="steps"):
        diffusion.sample(fixed, (3, 6), table_cond, steps=51)
    with pytest.raises(ValueError, match="temperature"):
        run(0, cond=table_cond, temperature=-1.0)


@pytest.mark.parametrize("shape", [(2, 12), (2, 3, 4)])
def test_oracle_sampling_reproduces_the_target(shape):
    target = torch.randint(0, K, (1, *shape[1:]), generator=torch.Generator().manual_seed(1))
    for diffusion in (UniformDiffusion(K), MaskReplaceDiffusion(K)):
        def model_fn(x, t, cond):
            assert x.shape == shape
            return F.one_hot(target.expand(shape), K).float() * 30

        out = diffusion.sample(model_fn, shape, steps=12, generator=torch.Generator().manual_seed(0))
        assert out.shape == shape and torch.equal(out, target.expand(shape))


# ----------------------------------------------------------------------------- a tiny fit


def fit_two_sequences(diffusion, steps: int = 300):
    """A tiny DiT trained on two fixed sequences, one per class, with 10% of labels dropped."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, 8, (2, 4), generator=g)
    model = DiT(width=32, depth=2, heads=2, vocab_size=8, seq_shape=(4,), num_classes=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        labels = torch.randint(0, 2, (32,), generator=g)
        dropped = labels.masked_fill(torch.rand(32, generator=g) < 0.1, 2)  # 2 = the null class
        loss, _ = diffusion.loss(model, sequences[labels], Condition(labels=dropped), generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), sequences


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make", "minimum"),
    [(lambda: UniformDiffusion(8, 1000, hybrid=0.0), 0.9), (lambda: MaskReplaceDiffusion(8, 1000, hybrid=1.0), 0.9)],
    ids=["uniform", "mask_replace"],
)
def test_tiny_dit_learns_two_class_conditional_sequences_with_guidance(make, minimum):
    diffusion = make()
    model, sequences = fit_two_sequences(diffusion)
    labels = torch.arange(64) % 2
    cond, uncond = Condition(labels=labels), Condition(labels=torch.full((64,), 2))
    samples = diffusion.sample(model, (64, 4), cond, uncond, steps=20, guidance=1.5,
                               generator=torch.Generator().manual_seed(1))
    exact = (samples == sequences[labels]).all(dim=1).float().mean().item()
    assert exact >= minimum  # chance: 8^-4
