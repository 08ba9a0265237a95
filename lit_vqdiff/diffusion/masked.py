"""Absorbing-state (mask) diffusion over discrete codes, sampled MaskGIT-style.

Forward process: at time t ~ U(0, 1) every code is independently replaced by the mask id
with probability gamma(t), where gamma(0) = 0 (clean) and gamma(1) = 1 (all masked).
The network sees the partly masked codes and the mask ratio, and is trained with
cross-entropy on the masked positions only. Sampling runs t from 1 to 0 in ``steps``
steps: predict every masked code, keep the most confident predictions and re-mask the
rest so that the masked share follows gamma.

``model_fn(x, t, cond)`` takes codes shaped like the data (mask id included) and the mask
ratio (B,) in [0, 1], and returns logits (*x.shape, V) with V >= vocab_size; only the
first vocab_size logits are read, so the mask id (>= vocab_size) is never an output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn.dit import cat_conditions

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]
SCHEDULES = ("cosine", "linear", "arccos")
DECODING_ORDERS = ("confidence", "left_to_right")


class MaskSchedule:
    """Mask ratio gamma(t), increasing from gamma(0) = 0 to gamma(1) = 1."""

    def __init__(self, kind: str = "cosine"):
        if kind not in SCHEDULES:
            raise ValueError(f"mask schedule must be one of {SCHEDULES}, got {kind!r}")
        self.kind = kind

    def __call__(self, t: Tensor) -> Tensor:
        """Mask ratio for times t in [0, 1], same shape and dtype."""
        s = t.double().clamp(0.0, 1.0)
        if self.kind == "cosine":
            # MaskGIT's cos(pi/2 * r) with r = 1 - t the share of decoding done.
            ratio = torch.sin(0.5 * math.pi * s)
        elif self.kind == "linear":
            ratio = s
        else:
            ratio = torch.arccos(1.0 - s) / (0.5 * math.pi)
        return ratio.clamp(0.0, 1.0).to(t.dtype if t.is_floating_point() else torch.float32)


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard Gumbel samples."""
    uniform = torch.rand(shape, generator=generator, device=device).clamp(min=1e-20)
    return -torch.log((-torch.log(uniform)).clamp(min=1e-20))


class MaskedDiffusion:
    """Absorbing mask diffusion: ``loss`` for training, ``sample`` for confidence-ordered decoding."""

    def __init__(
        self,
        vocab_size: int,
        mask_id: int | None = None,
        schedule: str | MaskSchedule = "cosine",
        label_smoothing: float = 0.0,
    ):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size!r}")
        mask_id = vocab_size if mask_id is None else mask_id
        if mask_id < vocab_size:
            raise ValueError(f"mask_id must not be a code value (>= vocab_size={vocab_size}), got {mask_id}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.vocab_size, self.mask_id, self.label_smoothing = vocab_size, mask_id, label_smoothing
        self.schedule = schedule if isinstance(schedule, MaskSchedule) else MaskSchedule(schedule)

    def loss(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        cond: Any = None,
        *,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Token-mean cross-entropy on masked positions of x0 (B, ...) long; stats are detached."""
        if x0.dtype != torch.long or x0.ndim < 2:
            raise ValueError(f"x0 must be long codes of shape (B, ...), got {x0.dtype} {tuple(x0.shape)}")
        if int(x0.min()) < 0 or int(x0.max()) >= self.vocab_size:
            low, high = int(x0.min()), int(x0.max())
            raise ValueError(f"x0 codes must be in [0, {self.vocab_size}), got range [{low}, {high}]")
        batch, device = x0.shape[0], x0.device
        flat = x0.reshape(batch, -1)
        length = flat.shape[1]
        if t is None:
            t = torch.rand(batch, generator=generator, device=device)
        ratio = self.schedule(t)
        masked = torch.rand(batch, length, generator=generator, device=device) < ratio[:, None]
        # A row with nothing masked would add no loss: mask one random position there.
        forced = torch.randint(length, (batch,), generator=generator, device=device)
        masked |= F.one_hot(forced, length).bool() & ~masked.any(dim=1, keepdim=True)
        x_t = flat.masked_fill(masked, self.mask_id)
        logits = self._code_logits(model_fn(x_t.reshape(x0.shape), ratio, cond), batch, length)
        picked_logits, targets = logits[masked].float(), flat[masked]
        loss = F.cross_entropy(picked_logits, targets, label_smoothing=self.label_smoothing)
        accuracy = (picked_logits.argmax(dim=-1) == targets).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy.detach(), "mask_ratio": masked.float().mean()}

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        cond: Any = None,
        uncond: Any = None,
        *,
        steps: int = 12,
        temperature: float = 1.0,
        guidance: float = 1.0,
        choice_temperature: float = 4.5,
        order: str = "confidence",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Codes of ``shape`` (B, ...), decoded from all-masked in ``steps`` model calls.

        temperature scales the logits before sampling each code (0 = argmax);
        choice_temperature scales Gumbel noise on the confidences, annealed linearly to 0
        so that early choices explore and late ones are greedy. guidance != 1 runs cond
        and uncond as one batch and uses logits = uncond + guidance * (cond - uncond).
        ``order`` picks which codes each step keeps: the most confident ("confidence"),
        or the first still-masked positions ("left_to_right"): for text, where a word of
        uncertain length shifts every later byte, committing bytes in reading order keeps
        the spelling consistent.
        """
        batch, length = shape[0], math.prod(shape[1:])
        if not 1 <= steps <= length:
            raise ValueError(f"steps must be in [1, {length}] (one code at least per step), got {steps!r}")
        if temperature < 0 or choice_temperature < 0:
            raise ValueError(f"temperatures must be >= 0, got {temperature!r} and {choice_temperature!r}")
        if order not in DECODING_ORDERS:
            raise ValueError(f"order must be one of {DECODING_ORDERS}, got {order!r}")
        if guidance != 1.0 and uncond is None:
            raise ValueError(f"guidance={guidance} needs an unconditional condition (uncond)")
        if device is None:
            device = generator.device if generator is not None else "cpu"
        x = torch.full((batch, length), self.mask_id, dtype=torch.long, device=device)
        for step in range(steps):
            masked = x == self.mask_id
            ratio = masked.float().mean(dim=1)
            logits = self._guided_logits(model_fn, x.reshape(shape), ratio, cond, uncond, guidance, batch, length)
            if temperature == 0:
                drawn = logits.argmax(dim=-1)
            else:
                noise = gumbel_noise(tuple(logits.shape), generator, logits.device)
                drawn = (logits / temperature + noise).argmax(dim=-1)
            log_probs = logits.log_softmax(dim=-1).gather(-1, drawn[..., None]).squeeze(-1)
            drawn = torch.where(masked, drawn, x)
            still_masked = self._masked_after(step, steps, length, int(masked[0].sum()))
            if still_masked == 0:
                x = drawn
                continue
            if order == "left_to_right":
                confidence = -torch.arange(length, device=x.device, dtype=log_probs.dtype).expand(batch, length)
            else:
                noise_scale = choice_temperature * (1.0 - (step + 1) / steps)
                confidence = log_probs + noise_scale * gumbel_noise((batch, length), generator, x.device)
            # Codes decided at earlier steps stay decided.
            confidence = confidence.masked_fill(~masked, math.inf)
            remask = confidence.topk(still_masked, dim=1, largest=False).indices
            x = drawn.scatter(1, remask, self.mask_id)
        return x.reshape(shape)

    def _masked_after(self, step: int, steps: int, length: int, masked_now: int) -> int:
        """Codes left masked after ``step``: floor(length * gamma(1 - (step+1)/steps)), and fewer than now."""
        ratio = float(self.schedule(torch.tensor(1.0 - (step + 1) / steps, dtype=torch.float64)))
        return max(0, min(masked_now - 1, math.floor(length * ratio)))

    def _guided_logits(
        self,
        model_fn: ModelFn,
        x: Tensor,
        ratio: Tensor,
        cond: Any,
        uncond: Any,
        guidance: float,
        batch: int,
        length: int,
    ) -> Tensor:
        """Code logits (B, L, vocab_size) in float32, with classifier-free guidance when guidance != 1."""
        if guidance == 1.0:
            return self._code_logits(model_fn(x, ratio, cond), batch, length).float()
        both = model_fn(torch.cat([x, x]), torch.cat([ratio, ratio]), cat_conditions(cond, uncond))
        conditional, unconditional = self._code_logits(both, 2 * batch, length).float().chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    def _code_logits(self, logits: Tensor, batch: int, length: int) -> Tensor:
        """Logits reshaped to (B, L, V), keeping only the vocab_size code values."""
        classes = logits.shape[-1]
        if logits.shape[0] != batch or logits.numel() != batch * length * classes or classes < self.vocab_size:
            raise ValueError(
                f"model_fn must return logits (B={batch}, {length} positions, >= {self.vocab_size} classes), "
                f"got shape {tuple(logits.shape)}"
            )
        return logits.reshape(batch, length, -1)[..., : self.vocab_size]
