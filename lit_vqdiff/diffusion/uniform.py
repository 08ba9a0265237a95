"""D3PM with a uniform transition matrix (Austin et al. 2021) over discrete codes.

One step keeps a code with probability 1 - beta_t and otherwise redraws it uniformly from
the K codes (possibly the same one): Q_t = (1 - beta_t) I + beta_t / K 11^T. The steps
compose in closed form, q(x_t | x_0) = abar_t onehot(x_0) + (1 - abar_t) / K with
abar_t = prod_s (1 - beta_s), so x_T is uniform noise when abar_T = 0. There is no mask:
the network sees codes only, with the time t / T in [0, 1], and predicts x_0 logits.
Training: x_0 cross-entropy plus ``hybrid`` times the variational bound term (D3PM's
L_vb + lambda CE with lambda = 0.001 at T = 1000 is hybrid = 1, up to scale); sampling: x_T
uniform, then respaced ancestral steps through the posterior mixture (see discrete.py).
Schedule: D3PM's choice for uniform noise, the cosine abar of improved DDPM ("linear",
abar = 1 - t / T, is the alternative).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .discrete import DiscreteDiffusion, unit_times


def cosine_alpha_bar(u: Tensor, offset: float = 0.008) -> Tensor:
    """Improved DDPM's abar(u) = f(u) / f(0), f(u) = cos^2((u + s) / (1 + s) pi/2): D3PM's uniform schedule."""
    f = torch.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2
    return (f / math.cos(offset / (1 + offset) * math.pi / 2) ** 2).clamp(0.0, 1.0)


def linear_alpha_bar(u: Tensor) -> Tensor:
    """abar(u) = 1 - u."""
    return 1.0 - u


ALPHA_BAR_SCHEDULES = {"cosine": cosine_alpha_bar, "linear": linear_alpha_bar}


class UniformDiffusion(DiscreteDiffusion):
    """Uniform D3PM, x_0-parameterized: ``loss`` for training, ``sample`` for respaced ancestral sampling."""

    def __init__(self, vocab_size: int, num_steps: int = 1000, *, schedule: str = "cosine", hybrid: float = 0.0):
        if schedule not in ALPHA_BAR_SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(ALPHA_BAR_SCHEDULES)}, got {schedule!r}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps!r}")
        u = unit_times(num_steps)
        alpha_bar = ALPHA_BAR_SCHEDULES[schedule](u)
        alpha_bar[0] = 1.0  # exactly clean at t = 0, whatever cos rounds to
        super().__init__(vocab_size, rho=alpha_bar, gamma=torch.zeros_like(u), hybrid=hybrid)
        self.schedule = schedule

    @property
    def alphas_cumprod(self) -> Tensor:
        """abar_t for t = 0..T (float64)."""
        return self.rho
