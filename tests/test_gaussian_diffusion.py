"""Gaussian diffusion: schedules, conversions, oracle samplers, hybrid loss, guidance, a tiny fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_vqdiff.diffusion.gaussian import GaussianDiffusion, Tables
from lit_vqdiff.nn.dit import Condition
from lit_vqdiff.nn.dit import DiT, timestep_features


@pytest.fixture
def one_thread():
    """Small models run faster on one thread than on two contended ones."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def point_mass_oracle(diffusion: GaussianDiffusion, x_star: torch.Tensor):
    """The exact eps (or v) prediction when all data equals x_star, plus zero variance values."""

    def model_fn(x_t, t, cond):
        x0 = x_star.expand_as(x_t)
        eps = diffusion.eps_from_x0(x_t, t, x0)
        prediction = eps if diffusion.prediction == "eps" else diffusion.v_from_x0_eps(x0, eps, t)
        return torch.cat([prediction, torch.zeros_like(x_t)], dim=1) if diffusion.learn_sigma else prediction

    return model_fn


def test_linear_schedule_endpoints():
    diffusion = GaussianDiffusion(1000, "linear")
    abar = diffusion.alphas_cumprod
    betas = diffusion.tables.betas
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert abar[0].item() == pytest.approx(1 - 1e-4, abs=1e-12)
    assert 1e-5 < abar[-1].item() < 1e-4  # about 4e-5: the last step is nearly pure noise
    assert (abar.diff() < 0).all()
    # Rescaled betas keep the endpoint whatever the number of steps.
    assert GaussianDiffusion(100, "linear").alphas_cumprod[-1].item() == pytest.approx(abar[-1].item(), rel=0.5)


def test_cosine_schedule_endpoints():
    abar = GaussianDiffusion(1000, "cosine").alphas_cumprod
    assert abar[0].item() > 0.9999 and abar[-1].item() < 1e-6
    assert (abar.diff() < 0).all()
    t = torch.tensor([250, 500, 750])
    def f(step):
        return torch.cos((torch.as_tensor(step) / 1000 + 0.008) / 1.008 * torch.pi / 2) ** 2

    expected = f(t + 1) / f(0)  # abar after steps 0..t
    torch.testing.assert_close(abar[t].float(), expected.float(), rtol=1e-4, atol=1e-6)


def test_eps_x0_v_conversions_invert_each_other():
    diffusion = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 900, 999])
    x_t = diffusion.q_sample(x0, t, eps)
    v = diffusion.v_from_x0_eps(x0, eps, t)
    torch.testing.assert_close(diffusion.x0_from_eps(x_t, t, eps), x0)
    torch.testing.assert_close(diffusion.eps_from_x0(x_t, t, x0), eps)
    torch.testing.assert_close(diffusion.x0_from_v(x_t, t, v), x0)
    torch.testing.assert_close(diffusion.eps_from_v(x_t, t, v), eps)


@pytest.mark.parametrize(("prediction", "learn_sigma"), [("eps", False), ("v", False), ("eps", True)])
def test_oracle_recovers_point_mass_with_ddim_and_ddpm(prediction, learn_sigma):
    diffusion = GaussianDiffusion(1000, "linear", prediction=prediction, learn_sigma=learn_sigma)
    x_star = torch.tensor([[1.5, -0.7], [0.2, 2.0]]).reshape(1, 2, 2)
    model_fn = point_mass_oracle(diffusion, x_star)
    g = torch.Generator().manual_seed(0)
    ddim = diffusion.ddim_sample(model_fn, (4, 2, 2), steps=50, eta=0.0, generator=g)
    torch.testing.assert_close(ddim, x_star.expand(4, 2, 2), rtol=0, atol=1e-4)
    for steps in (None, 100):
        ddpm = diffusion.ddpm_sample(model_fn, (4, 2, 2), steps=steps, generator=g)
        torch.testing.assert_close(ddpm, x_star.expand(4, 2, 2), rtol=0, atol=1e-4)


def test_ddim_eta_zero_is_deterministic_given_the_start_noise():
    diffusion = GaussianDiffusion(200, "cosine")

    def model_fn(x, t, cond):
        return torch.tanh(x) * (t.float()[:, None] / 200)

    x_T = torch.randn(3, 4)

    def run(eta: float, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return diffusion.ddim_sample(model_fn, (3, 4), steps=20, eta=eta, x_T=x_T, generator=generator)

    first = run(eta=0.0, seed=0)
    assert torch.equal(first, run(eta=0.0, seed=1))
    assert (run(eta=1.0, seed=1) - first).abs().max() > 1e-3


def test_respacing_keeps_the_noisiest_step_and_full_spacing_is_identity():
    diffusion = GaussianDiffusion(1000)
    assert diffusion.timesteps(1).tolist() == [999]
    spaced = diffusion.timesteps(50)
    assert spaced[0].item() == 0 and spaced[-1].item() == 999 and (spaced.diff() > 0).all()
    full = Tables.from_alphas_cumprod(diffusion.alphas_cumprod[diffusion.timesteps(1000)])
    torch.testing.assert_close(full.betas, diffusion.tables.betas)
    with pytest.raises(ValueError, match="steps"):
        diffusion.timesteps(1001)


def test_hybrid_loss_is_finite_and_vb_term_does_not_train_the_mean():
    diffusion = GaussianDiffusion(1000, learn_sigma=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=g)
    output = torch.randn(6, 6, 4, 4, generator=g).mul(0.5).requires_grad_()
    t = torch.tensor([0, 1, 10, 100, 500, 999])
    loss, stats = diffusion.loss(lambda x, t, c: output, x0, t=t, generator=g)
    assert torch.isfinite(loss) and stats["vb"].item() > 0
    assert loss.item() == pytest.approx(stats["mse"].item() + stats["vb"].item(), rel=1e-5)
    x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    output.grad = None
    diffusion.vb_term(output, x0, x_t, t).sum().backward()
    assert torch.count_nonzero(output.grad[:, :3]) == 0
    assert torch.count_nonzero(output.grad[:, 3:]) > 0
    with pytest.raises(ValueError, match="learn_sigma"):
        GaussianDiffusion().vb_term(output, x0, x_t, t)


def test_guidance_acts_on_prediction_channels_only_and_zero_is_unconditional():
    diffusion = GaussianDiffusion(100, learn_sigma=True)

    def model_fn(x, t, cond):
        """cond (B, 2, 1): a gain for the prediction and a constant for the variance values."""
        return torch.cat([x * cond[:, :1], cond[:, 1:] * torch.ones_like(x)], dim=1)

    x, t = torch.randn(2, 1, 3), torch.tensor([5, 50])
    cond = torch.tensor([2.0, 0.3]).reshape(1, 2, 1).repeat(2, 1, 1)
    uncond = torch.tensor([-1.0, -0.4]).reshape(1, 2, 1).repeat(2, 1, 1)
    guided = diffusion.guided_output(model_fn, x, t, cond, uncond, guidance=3.0)
    torch.testing.assert_close(guided[:, :1], x * (-1.0 + 3.0 * (2.0 + 1.0)))
    torch.testing.assert_close(guided[:, 1:], torch.full_like(x, 0.3))  # the conditional variance
    # Without a learned variance, guidance 0 is exactly the unconditional model.
    plain = GaussianDiffusion(100)

    def gained(x, t, c):
        return 0.5 * x * c[:, :1]

    def sample(**kwargs):
        generator = torch.Generator().manual_seed(3)
        return plain.ddpm_sample(gained, (2, 1, 3), steps=10, generator=generator, **kwargs)

    assert torch.equal(sample(cond=cond, uncond=uncond, guidance=0.0), sample(cond=uncond))
    assert not torch.equal(sample(cond=cond, uncond=uncond, guidance=2.0), sample(cond=uncond))
    with pytest.raises(ValueError, match="uncond"):
        sample(cond=cond, guidance=2.0)


def test_dit_latent_trains_with_hybrid_loss_and_samples():
    torch.manual_seed(0)
    model = DiT(
        width=32, depth=2, heads=4, input="latent", in_channels=4, patch_size=2, seq_shape=(8, 8),
        learn_sigma=True, num_classes=3,
    )
    diffusion = GaussianDiffusion(1000, learn_sigma=True, prediction="v")
    x0, labels = torch.randn(4, 4, 8, 8), Condition(labels=torch.tensor([0, 1, 2, 3]))
    loss, stats = diffusion.loss(model, x0, labels)
    loss.backward()
    assert torch.isfinite(loss) and model.final.linear.weight.grad.abs().sum() > 0
    null = Condition(labels=torch.full((4,), 3))
    out = diffusion.ddim_sample(model, (4, 4, 8, 8), labels, null, guidance=2.0, steps=5)
    assert out.shape == (4, 4, 8, 8) and torch.isfinite(out).all()


class PointNet(nn.Module):
    """A small MLP denoiser for 2D points."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 + 32, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2)
        )

    def forward(self, x, t, cond):
        return self.net(torch.cat([x, timestep_features(t, 32)], dim=1))


@pytest.mark.slow
def test_tiny_model_fits_two_points(one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    points = torch.tensor([[-1.0, 0.5], [1.0, -0.5]])
    diffusion = GaussianDiffusion(1000, "linear")
    model = PointNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(1500):
        loss, _ = diffusion.loss(model, points[torch.randint(0, 2, (256,), generator=g)], generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    samples = diffusion.ddim_sample(model, (512, 2), steps=50, generator=torch.Generator().manual_seed(1))
    distances = torch.cdist(samples, points)
    assert (distances.min(dim=1).values < 0.2).float().mean() > 0.85
    share_first = (distances.argmin(dim=1) == 0).float().mean()
    assert 0.35 < share_first < 0.65
