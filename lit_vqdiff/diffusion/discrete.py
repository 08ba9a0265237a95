"""Discrete diffusion over codes: uniform replacement with an optional absorbing mask.

The D3PM family (Austin et al. 2021) behind ``uniform.py`` and ``mask_replace.py``. With K
codes, discrete time t = 0..T and two levels per step, rho_t (the share of unmasked codes
still equal to x_0 rather than redrawn uniformly) and gamma_t (the share masked), the
forward marginal is

    q(x_t | x_0) = gamma_t [x_t = mask] + (1 - gamma_t) (rho_t [x_t = x_0] + (1 - rho_t) / K).

In VQ-Diffusion's notation abar_t = (1 - gamma_t) rho_t, K bbar_t = (1 - gamma_t)(1 - rho_t),
gbar_t = gamma_t; uniform D3PM is gamma = 0 with rho_t = abar_t. From level s to a later
level t the chain moves by a matrix of the same form, with rho_t / rho_s and
(1 - gamma_t) / (1 - gamma_s): respaced sampling uses it to skip steps exactly.

The network predicts x_0 (logits over the K codes) from x_t and the time t / T in [0, 1].
p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p(x0 | x_t), the mixture of the true posteriors
under the predicted x_0 (VQ-Diffusion's eq. 11); with a one-hot x_0 it is Bayes' rule.
All of it runs in log space, so a confident prediction never underflows to log 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..nn.dit import cat_conditions
from .masked import gumbel_noise

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]


def log_one_hot(x: Tensor, classes: int) -> Tensor:
    """log of one_hot(x): 0 at x, -inf elsewhere, as float32 (*x.shape, classes)."""
    hit = torch.arange(classes, device=x.device) == x[..., None]
    return torch.zeros(hit.shape, device=x.device).masked_fill(~hit, -math.inf)


def categorical_kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """KL(q || p) over the last dim from log-probabilities, with 0 log 0 = 0."""
    # important! where q is 0, log p may be -inf too: fill both before subtracting (no nan, no nan grads).
    zero = torch.isneginf(log_q)
    return (log_q.exp() * (log_q.masked_fill(zero, 0.0) - log_p.masked_fill(zero, 0.0))).sum(-1)


def log_coef(values: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """log of per-row float64 coefficients (B,), shaped (B, 1, 1) in dtype to broadcast over (B, L, states)."""
    return values.log().to(dtype)[:, None, None]


def unit_times(num_steps: int) -> Tensor:
    """t / T for t = 0..T (float64): the grid the level tables are made on.

    A host-side table, on the CPU also when built under the plan's meta-device dry run."""
    return torch.arange(num_steps + 1, dtype=torch.float64, device="cpu") / num_steps


def respaced_times(num_steps: int, steps: int) -> list[int]:
    """``steps`` + 1 distinct integer times from T down to 0, evenly spaced."""
    return [num_steps * k // steps for k in range(steps, -1, -1)]


class DiscreteDiffusion:
    """Loss and sampler for a process given by its level tables rho, gamma (T + 1 values each)."""

    def __init__(
        self, vocab_size: int, rho: Tensor, gamma: Tensor, mask_id: int | None = None, hybrid: float = 0.0
    ):
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size!r}")
        if rho.shape != gamma.shape or rho.ndim != 1 or len(rho) < 2:
            raise ValueError(f"rho and gamma must be (T + 1,) tables with T >= 1, got {rho.shape}, {gamma.shape}")
        if mask_id is None and bool(gamma.any()):
            raise ValueError("a process that masks needs a mask_id")
        if mask_id is not None and mask_id < vocab_size:
            raise ValueError(f"mask_id must not be a code value (>= vocab_size={vocab_size}), got {mask_id}")
        if hybrid < 0:
            raise ValueError(f"hybrid must be >= 0, got {hybrid!r}")
        rho, gamma = rho.double(), gamma.double()
        monotone = (rho.diff() <= 0).all() and (gamma.diff() >= 0).all()
        if rho[0] != 1 or gamma[0] != 0 or not monotone or rho.min() < 0 or gamma.max() > 1:
            raise ValueError("levels must start at rho = 1, gamma = 0 and move monotonically to rho >= 0, gamma <= 1")
        self.vocab_size, self.mask_id, self.hybrid = vocab_size, mask_id, hybrid
        self.num_steps = len(rho) - 1
        self.rho, self.gamma = rho, gamma
        # Internally the mask is state K, right after the codes; the model sees mask_id instead.
        self.states = vocab_size + (mask_id is not None)

    # ------------------------------------------------------------------ closed forms

    def _levels(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(rho_t, gamma_t) as float64 (B,) on t's device."""
        if self.rho.device != t.device:  # the tables follow the data, once
            self.rho, self.gamma = self.rho.to(t.device), self.gamma.to(t.device)
        return self.rho[t], self.gamma[t]

    def log_qbar(self, log_w: Tensor, s: Tensor) -> Tensor:
        """log sum_x0 w(x0) q(x_s | x0) over the states x_s, for weights w (B, L, K) given as logs."""
        rho, gamma = self._levels(s)
        total = log_w.logsumexp(-1, keepdim=True)
        kept = log_coef((1 - gamma) * rho, log_w.dtype) + log_w
        redrawn = log_coef((1 - gamma) * (1 - rho) / self.vocab_size, log_w.dtype) + total
        codes = torch.logaddexp(kept, redrawn)
        if self.mask_id is None:
            return codes
        return torch.cat([codes, log_coef(gamma, log_w.dtype) + total], dim=-1)

    def log_q_step(self, x_t: Tensor, s: Tensor, t: Tensor) -> Tensor:
        """log q(x_t | x_s) for s < t, over the states x_s (B, L, states): the column x_t of Q_{s->t}."""
        (rho_s, gamma_s), (rho_t, gamma_t) = self._levels(s), self._levels(t)
        # Differences, not 1 - ratio: a short skip keeps its precision.
        keep, redraw = log_coef((1 - gamma_t) / (1 - gamma_s)), (rho_s - rho_t) / (rho_s * self.vocab_size)
        other, same = keep + log_coef(redraw), keep + log_coef(rho_t / rho_s + redraw)  # x_s != x_t, x_s = x_t
        batch, length = x_t.shape
        if self.mask_id is None:
            out = other.expand(batch, length, self.vocab_size).contiguous()
        else:
            # important! the mask is absorbing: a masked x_s stays masked; a code x_s is
            # masked with probability (gamma_t - gamma_s) / (1 - gamma_s).
            masked = (x_t == self.vocab_size)[..., None]
            drop = log_coef((gamma_t - gamma_s) / (1 - gamma_s))
            other, same = torch.where(masked, drop, other), torch.where(masked, drop, same)
            out = torch.cat([other.expand(batch, length, self.vocab_size), masked.float().log()], dim=-1)
        # A masked x_t's codes all hold drop, so writing same at the clamped index changes nothing.
        return out.scatter_(-1, x_t.clamp(max=self.vocab_size - 1)[..., None], same.expand(batch, length, 1))

    def log_posterior(self, log_p0: Tensor, x_t: Tensor, s: Tensor, t: Tensor) -> Tensor:
        """log sum_x0 q(x_s | x_t, x0) p(x0) over the states x_s, for log p(x0) (B, L, K); s < t."""
        # q(x_s | x_t, x0) = q(x_t | x_s) q(x_s | x0) / q(x_t | x0): divide p by q(x_t | x0) first,
        # then one pass over x0 mixes all K posteriors in O(K) rather than O(K^2).
        log_z = self.log_q_step(x_t, torch.zeros_like(t), t)[..., : self.vocab_size]
        return self.log_q_step(x_t, s, t) + self.log_qbar(log_p0 - log_z, s)

    def q_probs(self, x0: Tensor, t: Tensor) -> Tensor:
        """q(x_t | x_0) over the states, (B, L, states)."""
        return self.log_qbar(log_one_hot(x0, self.vocab_size), t).exp()

    def q_sample(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x_t ~ q(x_t | x_0) for codes (B, L) and times (B,); the mask is state vocab_size."""
        rho, gamma = (v.float()[:, None] for v in self._levels(t))
        redraw = torch.rand(x0.shape, generator=generator, device=x0.device) >= rho
        codes = torch.randint(self.vocab_size, x0.shape, generator=generator, device=x0.device)
        x_t = torch.where(redraw, codes, x0)
        if self.mask_id is None:
            return x_t
        return x_t.masked_fill(torch.rand(x0.shape, generator=generator, device=x0.device) < gamma, self.vocab_size)

    # ------------------------------------------------------------------ training

    def loss(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        cond: Any = None,
        *,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """x_0 cross-entropy + hybrid * vb at t ~ U{1..T} per row (or given (B,) t), token means; stats detached.

        vb = T * KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) is an unbiased estimate of the
        whole bound without its constant prior term (at t = 1 the KL is -log p(x_0 | x_1)), so
        it is in nats per code like the cross-entropy. The papers' L_vb + lambda CE, with L_vb
        the KL at one step, is this loss up to scale for hybrid = 1 / (lambda T): D3PM's
        lambda = 0.001 at T = 1000 is hybrid = 1. Stats: loss, ce, accuracy (argmax x_0 over
        all codes), noised (share of x_t != x_0), and vb when hybrid > 0.
        """
        if x0.dtype != torch.long or x0.ndim < 2:
            raise ValueError(f"x0 must be long codes of shape (B, ...), got {x0.dtype} {tuple(x0.shape)}")
        if int(x0.min()) < 0 or int(x0.max()) >= self.vocab_size:
            low, high = int(x0.min()), int(x0.max())
            raise ValueError(f"x0 codes must be in [0, {self.vocab_size}), got range [{low}, {high}]")
        batch, device = x0.shape[0], x0.device
        flat = x0.reshape(batch, -1)
        if t is None:
            t = torch.randint(1, self.num_steps + 1, (batch,), generator=generator, device=device)
        x_t = self.q_sample(flat, t, generator)
        logits = self._code_logits(model_fn(self._model_input(x_t, x0.shape), t / self.num_steps, cond), flat)
        log_p0 = logits.float().log_softmax(dim=-1)
        ce = -log_p0.gather(-1, flat[..., None]).mean()
        accuracy = (log_p0.argmax(dim=-1) == flat).float().mean()
        stats = {"ce": ce, "accuracy": accuracy, "noised": (x_t != flat).float().mean()}
        loss = ce
        if self.hybrid > 0:
            # Skipped at hybrid = 0: over K codes it costs some ten times the cross-entropy.
            log_q = self.log_posterior(log_one_hot(flat, self.vocab_size), x_t, t - 1, t)
            stats["vb"] = self.num_steps * categorical_kl(log_q, self.log_posterior(log_p0, x_t, t - 1, t)).mean()
            loss = ce + self.hybrid * stats["vb"]
        stats["loss"] = loss
        return loss, {k: v.detach() for k, v in stats.items()}

    # ------------------------------------------------------------------ sampling

    def prior_sample(self, shape: tuple[int, int], generator: torch.Generator | None, device: Any) -> Tensor:
        """x_T: uniform codes, masked with probability gamma_T (all masked when gamma_T = 1)."""
        x = torch.randint(self.vocab_size, shape, generator=generator, device=device)
        if self.mask_id is None:
            return x
        masked = torch.rand(shape, generator=generator, device=device) < float(self.gamma[-1])
        return x.masked_fill(masked, self.vocab_size)

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        cond: Any = None,
        uncond: Any = None,
        *,
        steps: int = 50,
        temperature: float = 1.0,
        guidance: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Codes of ``shape`` (B, ...) from x_T down to x_0 in ``steps`` model calls (respaced when < T).

        Each call predicts x_0 logits at time t, guided as uncond + guidance * (cond - uncond)
        when guidance != 1 (cond and uncond run as one batch), divided by temperature
        (0 = argmax x_0), and draws x_s ~ sum_x0 q(x_s | x_t, x0) p(x0 | x_t) for the next
        time s; the last call draws x_0 from the prediction itself.
        """
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must be in [1, {self.num_steps}], got {steps!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if guidance != 1.0 and uncond is None:
            raise ValueError(f"guidance={guidance} needs an unconditional condition (uncond)")
        if device is None:
            device = generator.device if generator is not None else "cpu"
        batch, length = shape[0], math.prod(shape[1:])
        x = self.prior_sample((batch, length), generator, device)
        times = respaced_times(self.num_steps, steps)
        for t_now, t_next in zip(times, times[1:]):
            t = torch.full((batch,), t_now, dtype=torch.long, device=device)
            logits = self._guided_logits(model_fn, x, t, cond, uncond, guidance, shape)
            if temperature == 0:
                log_p0 = log_one_hot(logits.argmax(dim=-1), self.vocab_size)
            else:
                log_p0 = (logits / temperature).log_softmax(dim=-1)
            # At s = 0 the posterior mixture is the x_0 prediction itself.
            log_probs = log_p0 if t_next == 0 else self.log_posterior(log_p0, x, torch.full_like(t, t_next), t)
            x = (log_probs + gumbel_noise(tuple(log_probs.shape), generator, log_probs.device)).argmax(dim=-1)
        return x.reshape(shape)

    # ------------------------------------------------------------------ model calls

    def _model_input(self, x: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
        """States (B, L) as the model's codes of ``shape``: state vocab_size becomes mask_id."""
        if self.mask_id is not None and self.mask_id != self.vocab_size:
            x = x.masked_fill(x == self.vocab_size, self.mask_id)
        return x.reshape(shape)

    def _guided_logits(
        self, model_fn: ModelFn, x: Tensor, t: Tensor, cond: Any, uncond: Any, guidance: float, shape: tuple[int, ...]
    ) -> Tensor:
        """x_0 logits (B, L, vocab_size) in float32, with classifier-free guidance when guidance != 1."""
        time = t / self.num_steps
        if guidance == 1.0:
            return self._code_logits(model_fn(self._model_input(x, shape), time, cond), x).float()
        both_x = self._model_input(torch.cat([x, x]), (2 * shape[0], *shape[1:]))
        both = model_fn(both_x, torch.cat([time, time]), cat_conditions(cond, uncond))
        conditional, unconditional = self._code_logits(both, torch.cat([x, x])).float().chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    def _code_logits(self, logits: Tensor, x: Tensor) -> Tensor:
        """Logits reshaped to (B, L, V) like the states x (B, L), keeping only the vocab_size code values."""
        batch, length = x.shape
        classes = logits.shape[-1]
        if logits.shape[0] != batch or logits.numel() != batch * length * classes or classes < self.vocab_size:
            raise ValueError(
                f"model_fn must return logits (B={batch}, {length} positions, >= {self.vocab_size} classes), "
                f"got shape {tuple(logits.shape)}"
            )
        return logits.reshape(batch, length, -1)[..., : self.vocab_size]
