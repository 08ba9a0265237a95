"""Gaussian diffusion on continuous latents: DDPM training, DDPM and DDIM sampling.

Timesteps are integers 0..num_steps-1; x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
where t = 0 is the first (least) noise level. ``model_fn(x_t, t, cond)`` predicts eps or
v = sqrt(abar) eps - sqrt(1 - abar) x0 over the channels of x; with ``learn_sigma`` it
returns twice the channels (dim 1): the prediction, then values v in about [-1, 1] that
interpolate the log-variance between the posterior's and beta_t (improved DDPM).
Without learned sigma, DDPM sampling uses the posterior variance ("fixed small").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..nn.dit import cat_conditions

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]
PREDICTIONS = ("eps", "v")


def linear_betas(num_steps: int) -> Tensor:
    """DDPM's linear betas (1e-4 to 0.02 at 1000 steps), rescaled so other step counts match."""
    scale = 1000.0 / num_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved DDPM's cosine schedule: abar(t) = cos^2((t/T + s) / (1 + s) * pi/2)."""
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    abar = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


BETA_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) in nats."""
    variance_ratio = torch.exp(log_var1 - log_var2)
    return 0.5 * (-1.0 + log_var2 - log_var1 + variance_ratio + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def gather(table: Tensor, index: Tensor, like: Tensor) -> Tensor:
    """table[index] (B,) reshaped to broadcast against ``like`` (B, ...), in its dtype and device."""
    values = table.to(index.device)[index].to(like.dtype)
    return values.reshape(-1, *[1] * (like.ndim - 1))


@dataclass(frozen=True)
class Tables:
    """Per-step float64 constants of one (possibly respaced) chain of noise levels."""

    alphas_cumprod: Tensor
    betas: Tensor
    posterior_log_variance: Tensor  # clipped: step 0 has zero variance, so it borrows step 1's
    posterior_coef_x0: Tensor
    posterior_coef_xt: Tensor

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor) -> Tables:
        """Tables for a chain given its cumulative alphas; betas follow from consecutive ratios."""
        prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        betas = 1 - alphas_cumprod / prev
        variance = betas * (1 - prev) / (1 - alphas_cumprod)
        floor = variance[1:2] if len(variance) > 1 else betas[:1]
        return cls(
            alphas_cumprod=alphas_cumprod,
            betas=betas,
            posterior_log_variance=torch.log(torch.cat([floor, variance[1:]])),
            posterior_coef_x0=betas * prev.sqrt() / (1 - alphas_cumprod),
            posterior_coef_xt=(1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        )


class GaussianDiffusion:
    """DDPM process with eps- or v-prediction, optional learned variance, DDPM/DDIM samplers."""

    def __init__(
        self, num_steps: int = 1000, schedule: str = "linear", prediction: str = "eps", learn_sigma: bool = False
    ):
        if num_steps < 2:
            raise ValueError(f"num_steps must be >= 2, got {num_steps!r}")
        if schedule not in BETA_SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(BETA_SCHEDULES)}, got {schedule!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.num_steps, self.prediction, self.learn_sigma = num_steps, prediction, learn_sigma
        self.tables = Tables.from_alphas_cumprod(torch.cumprod(1 - BETA_SCHEDULES[schedule](num_steps), dim=0))

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.tables.alphas_cumprod

    def _coefs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) broadcast against ``like``."""
        abar = gather(self.tables.alphas_cumprod, t, like)
        return abar.sqrt(), (1 - abar).sqrt()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        signal, sigma = self._coefs(t, x0)
        return signal * x0 + sigma * noise

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        signal, sigma = self._coefs(t, x_t)
        return (x_t - sigma * eps) / signal

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        signal, sigma = self._coefs(t, x_t)
        return (x_t - signal * x0) / sigma

    def v_from_x0_eps(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        signal, sigma = self._coefs(t, x0)
        return signal * eps - sigma * x0

    def x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        signal, sigma = self._coefs(t, x_t)
        return signal * x_t - sigma * v

    def eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        signal, sigma = self._coefs(t, x_t)
        return sigma * x_t + signal * v

    def split_output(self, output: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(prediction, variance values or None) from a model output, checked against x's shape."""
        expected = (x.shape[0], x.shape[1] * (2 if self.learn_sigma else 1), *x.shape[2:])
        if output.shape != expected:
            raise ValueError(
                f"model output must have shape {expected} with learn_sigma={self.learn_sigma}, "
                f"got {tuple(output.shape)}"
            )
        return output.chunk(2, dim=1) if self.learn_sigma else (output, None)

    def x0_eps_from_prediction(self, x_t: Tensor, t: Tensor, prediction: Tensor) -> tuple[Tensor, Tensor]:
        """(x0, eps) implied by an eps or v prediction."""
        if self.prediction == "eps":
            return self.x0_from_eps(x_t, t, prediction), prediction
        return self.x0_from_v(x_t, t, prediction), self.eps_from_v(x_t, t, prediction)

    @staticmethod
    def posterior_mean(tables: Tables, index: Tensor, x0: Tensor, x_t: Tensor) -> Tensor:
        """Mean of q(x_prev | x_t, x0) at step ``index`` of ``tables``."""
        coef_x0, coef_xt = gather(tables.posterior_coef_x0, index, x_t), gather(tables.posterior_coef_xt, index, x_t)
        return coef_x0 * x0 + coef_xt * x_t

    def p_mean_log_variance(
        self, tables: Tables, index: Tensor, t: Tensor, x_t: Tensor, output: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of p(x_prev | x_t) at step ``index`` of ``tables`` (model timestep ``t``)."""
        prediction, var_values = self.split_output(output, x_t)
        x0, _ = self.x0_eps_from_prediction(x_t, t, prediction)
        mean = self.posterior_mean(tables, index, x0, x_t)
        min_log = gather(tables.posterior_log_variance, index, x_t)
        if var_values is None:
            return mean, min_log.expand_as(x_t)
        max_log = gather(tables.betas.log(), index, x_t)
        fraction = (var_values + 1) / 2
        return mean, fraction * max_log + (1 - fraction) * min_log

    def vb_term(self, output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Per-sample KL(q(x_prev | x_t, x0) || p(x_prev | x_t)) in bits per dimension, training only the variance.

        The mean is detached, so this term shapes the learned variance while the MSE alone
        trains the mean (improved DDPM's hybrid loss). Latents are continuous, so step 0 uses
        the same KL with the clipped posterior variance instead of a discretized likelihood.
        """
        if not self.learn_sigma:
            raise ValueError("vb_term needs learn_sigma=True")
        prediction, var_values = self.split_output(output, x_t)
        frozen = torch.cat([prediction.detach(), var_values], dim=1)
        mean, log_var = self.p_mean_log_variance(self.tables, t, t, x_t, frozen)
        true_mean = self.posterior_mean(self.tables, t, x0, x_t)
        true_log_var = gather(self.tables.posterior_log_variance, t, x_t)
        return mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)

    def loss(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        cond: Any = None,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """MSE on eps or v (plus the VB term with learn_sigma), averaged over the batch; stats detached."""
        batch = x0.shape[0]
        if t is None:
            t = torch.randint(self.num_steps, (batch,), generator=generator, device=x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        output = model_fn(x_t, t, cond)
        prediction, _ = self.split_output(output, x0)
        target = noise if self.prediction == "eps" else self.v_from_x0_eps(x0, noise, t)
        mse = mean_flat((target - prediction.float()) ** 2)
        stats = {"mse": mse.mean().detach()}
        total = mse
        if self.learn_sigma:
            vb = self.vb_term(output.float(), x0, x_t, t)
            stats["vb"] = vb.mean().detach()
            total = total + vb
        loss = total.mean()
        stats["loss"] = loss.detach()
        return loss, stats

    def guided_output(
        self, model_fn: ModelFn, x: Tensor, t: Tensor, cond: Any, uncond: Any, guidance: float
    ) -> Tensor:
        """Model output with classifier-free guidance on the prediction channels (not the variance)."""
        if guidance == 1.0:
            return model_fn(x, t, cond)
        if uncond is None:
            raise ValueError(f"guidance={guidance} needs an unconditional condition (uncond)")
        both = model_fn(torch.cat([x, x]), torch.cat([t, t]), cat_conditions(cond, uncond))
        conditional, unconditional = both.chunk(2)
        cond_pred, cond_var = self.split_output(conditional, x)
        uncond_pred, _ = self.split_output(unconditional, x)
        guided = uncond_pred + guidance * (cond_pred - uncond_pred)
        return guided if cond_var is None else torch.cat([guided, cond_var], dim=1)

    def timesteps(self, steps: int) -> Tensor:
        """``steps`` evenly spaced timesteps, ascending, always including the noisiest one."""
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must be in [1, {self.num_steps}], got {steps!r}")
        return torch.linspace(self.num_steps - 1, 0, steps, dtype=torch.float64).round().long().flip(0)

    def _start(
        self,
        shape: tuple[int, ...],
        x_T: Tensor | None,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> Tensor:
        """Initial pure noise: x_T when given, else drawn from the generator."""
        if x_T is not None:
            if tuple(x_T.shape) != tuple(shape):
                raise ValueError(f"x_T must have shape {tuple(shape)}, got {tuple(x_T.shape)}")
            return x_T
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        return torch.randn(shape, generator=generator, device=device)

    @torch.no_grad()
    def ddpm_sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        cond: Any = None,
        uncond: Any = None,
        guidance: float = 1.0,
        steps: int | None = None,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        x_T: Tensor | None = None,
    ) -> Tensor:
        """Ancestral sampling over all steps, or ``steps`` respaced ones (betas recomputed)."""
        x = self._start(shape, x_T, generator, device)
        timesteps = self.timesteps(steps or self.num_steps).to(x.device)
        respaced = len(timesteps) < self.num_steps
        tables = Tables.from_alphas_cumprod(self.alphas_cumprod[timesteps.cpu()]) if respaced else self.tables
        for i in reversed(range(len(timesteps))):
            index = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
            t = timesteps[index]
            output = self.guided_output(model_fn, x, t, cond, uncond, guidance)
            mean, log_var = self.p_mean_log_variance(tables, index, t, x, output)
            # The last step returns the mean: no noise is added to the sample itself.
            if i == 0:
                x = mean
            else:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = mean + torch.exp(0.5 * log_var) * noise
        return x

    @torch.no_grad()
    def ddim_sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        cond: Any = None,
        uncond: Any = None,
        guidance: float = 1.0,
        steps: int = 50,
        eta: float = 0.0,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        x_T: Tensor | None = None,
    ) -> Tensor:
        """DDIM over ``steps`` respaced timesteps; eta = 0 is deterministic given x_T, eta = 1 is DDPM-like."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta!r}")
        x = self._start(shape, x_T, generator, device)
        timesteps = self.timesteps(steps).to(x.device)
        for i in reversed(range(len(timesteps))):
            t = timesteps[i].expand(shape[0])
            prediction, _ = self.split_output(self.guided_output(model_fn, x, t, cond, uncond, guidance), x)
            x0, eps = self.x0_eps_from_prediction(x, t, prediction)
            abar = gather(self.alphas_cumprod, t, x)
            if i > 0:
                abar_prev = gather(self.alphas_cumprod, timesteps[i - 1].expand(shape[0]), x)
            else:
                abar_prev = torch.ones_like(abar)
            sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
            x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
            if eta > 0 and i > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x
