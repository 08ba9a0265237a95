"""VQ-Diffusion's mask-and-replace process (Gu et al. 2022) over discrete codes.

One step keeps a code with probability alpha_t, redraws it uniformly with probability
K beta_t (each code value beta_t, itself included, so it stays with alpha_t + beta_t) and
masks it with probability gamma_t; a masked code stays masked. The cumulative products are closed form:
q(x_t | x_0) = (abar_t + bbar_t) at x_0, bbar_t at every other code, gbar_t at the mask,
with abar_t = prod alpha, 1 - gbar_t = prod (1 - gamma), K bbar_t = 1 - abar_t - gbar_t.

The schedule here: gbar(u) at u = t / T follows a MaskSchedule ("linear" as in VQ-Diffusion,
or masked.py's "cosine"/"arccos"), reaching 1 at T, so that x_T is all masks; among the
unmasked codes the share still equal to x_0 (not redrawn) is rho(u) = 1 - replace * u,
i.e. abar = (1 - gbar) rho and K bbar = (1 - gbar)(1 - rho). Any nonincreasing rho gives
beta_t >= 0 at every step. With the linear mask schedule and replace = 0.2, 5% of the codes
are replaced at mid-chain, as in the paper's schedule (which ends at 90% masked instead).
The network predicts x_0 logits from x_t (mask id included) and t / T; training (x_0
cross-entropy plus ``hybrid`` times the bound) and respaced sampling as in discrete.py.
"""

from __future__ import annotations

from torch import Tensor

from .discrete import DiscreteDiffusion, unit_times
from .masked import MaskSchedule


class MaskReplaceDiffusion(DiscreteDiffusion):
    """Mask-and-replace diffusion, x_0-parameterized: ``loss`` for training, ``sample`` from all masks."""

    def __init__(
        self,
        vocab_size: int,
        num_steps: int = 1000,
        *,
        mask_id: int | None = None,
        schedule: str = "linear",
        replace: float = 0.2,
        hybrid: float = 0.0,
    ):
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps!r}")
        if not 0.0 <= replace <= 1.0:
            raise ValueError(f"replace must be in [0, 1], got {replace!r}")
        u = unit_times(num_steps)
        gamma = MaskSchedule(schedule)(u)
        gamma[-1] = 1.0  # important! sampling starts from all masks, so x_T must be all masks.
        rho = 1.0 - replace * u
        mask_id = vocab_size if mask_id is None else mask_id
        super().__init__(vocab_size, rho=rho, gamma=gamma, mask_id=mask_id, hybrid=hybrid)
        self.schedule, self.replace = schedule, replace

    @property
    def alphas_cumprod(self) -> Tensor:
        """abar_t for t = 0..T (float64): the probability that a code is untouched (neither masked nor redrawn)."""
        return (1 - self.gamma) * self.rho

    @property
    def betas_cumprod(self) -> Tensor:
        """bbar_t for t = 0..T (float64): the probability of each code value by a redraw."""
        return (1 - self.gamma) * (1 - self.rho) / self.vocab_size

    @property
    def gammas_cumprod(self) -> Tensor:
        """gbar_t for t = 0..T (float64): the share masked."""
        return self.gamma
