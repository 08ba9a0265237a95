"""Diffusion Transformer (DiT) with adaLN-Zero blocks, over code tokens or continuous latents.

Two inputs share one trunk:
- ``input="tokens"``: x is (B, L) or (B, *seq_shape) long codes in [0, vocab_size], where
  the extra id ``vocab_size`` (``DiT.mask_id``) is the mask token, added internally.
  Logits cover only the ``vocab_size`` real codes, so the mask can never be predicted.
  With ``patch_size`` p > 1, each p x p group of codes (p for 1D) is one transformer
  token: its embedding is the sum of a per-slot embedding of each code, and the output
  head predicts all p^d codes of the group. The trunk then runs on p^d times fewer
  tokens, which is most of the cost.
- ``input="latent"``: x is (B, C, *seq_shape) float, cut into patch_size patches as in DiT;
  the output has C channels, or 2C (mean, then variance values) with ``learn_sigma``.

Conditioning: the timestep, an optional class label (with a null class for classifier-free
guidance) and an optional pooled condition vector are summed into the adaLN vector; an
optional condition sequence is read by cross-attention in every block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import (FREQ_DIM, Attention, GroupEmbedding, Mlp, group_codes, modulate, patchify, sincos_positions,
                     timestep_features, unpatchify)

# Mask diffusion passes t in [0, 1]; scaling it to [0, 1000] puts it on the same
# frequencies as the integer timesteps of Gaussian diffusion, which DiT embeds as-is.
TOKEN_TIME_SCALE = 1000.0
PATCH_SIZES = (1, 2, 4, 8)

DIT_PRESETS: dict[str, dict[str, int]] = {
    "DiT-T": dict(depth=6, width=256, heads=4),
    "DiT-S": dict(depth=12, width=384, heads=6),
    "DiT-B": dict(depth=12, width=768, heads=12),
    "DiT-L": dict(depth=24, width=1024, heads=16),
    "DiT-XL": dict(depth=28, width=1152, heads=16),
}


def trunk_size(preset: str, width: int | None = None, depth: int | None = None, heads: int | None = None) -> tuple[int, int, int]:
    """(width, depth, heads) of a preset, each replaced where given (generator.width etc.)."""
    p = DIT_PRESETS[preset]
    return width or p["width"], depth or p["depth"], heads or p["heads"]


@dataclass
class Condition:
    """What DiT reads; any field may be None when the model is not configured for it."""

    seq: Tensor | None = None  # (B, S, cond_dim), read by cross-attention
    mask: Tensor | None = None  # (B, S) bool, True = a real position (None = all real)
    pooled: Tensor | None = None  # (B, pooled_cond_dim), added to the adaLN vector
    labels: Tensor | None = None  # (B,) long; the value num_classes is the null class


def _cat_optional(first: Tensor | None, second: Tensor | None, name: str) -> Tensor | None:
    """torch.cat of two batch parts, which must both be present or both be None."""
    if (first is None) != (second is None):
        raise ValueError(f"cannot concatenate conditions: only one of them has {name}")
    return None if first is None else torch.cat([first, second])


def cat_conditions(
    first: Condition | Tensor | None, second: Condition | Tensor | None
) -> Condition | Tensor | None:
    """Stack two conditions along the batch (conditional then unconditional for guidance)."""
    if isinstance(first, Tensor) or isinstance(second, Tensor):
        return _cat_optional(first, second, "a tensor")
    if first is None or second is None:
        if first is not second:
            raise ValueError("cannot concatenate a condition with None")
        return None
    seqs, masks = [first.seq, second.seq], [first.mask, second.mask]
    if seqs[0] is not None and seqs[1] is not None:
        length = max(s.shape[1] for s in seqs)
        for i, s in enumerate(seqs):
            mask = masks[i] if masks[i] is not None else torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
            # Sequences of different lengths are right-padded; the padding is masked out.
            masks[i] = nn.functional.pad(mask, (0, length - s.shape[1]), value=False)
            seqs[i] = nn.functional.pad(s, (0, 0, 0, length - s.shape[1]))
    return Condition(
        seq=_cat_optional(*seqs, "seq"),
        mask=None if seqs[0] is None else torch.cat(masks),
        pooled=_cat_optional(first.pooled, second.pooled, "pooled"),
        labels=_cat_optional(first.labels, second.labels, "labels"),
    )


class DiTBlock(nn.Module):
    """adaLN-Zero block: gated self-attention, optional cross-attention, gated MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, cond_dim: int | None, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, dropout=dropout)
        self.cross_norm = nn.LayerNorm(width, eps=1e-6) if cond_dim else None
        self.cross_attn = Attention(width, heads, kv_dim=cond_dim, dropout=dropout) if cond_dim else None
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio), dropout)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(
        self, x: Tensor, c: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c).chunk(6, dim=1)
        x = x + gate_sa[:, None] * self.attn(modulate(self.norm1(x), shift_sa, scale_sa))
        if self.cross_attn is not None:
            # Not modulated (as in PixArt-alpha); its output projection starts at zero,
            # so the block is still the identity at init.
            x = x + self.cross_attn(self.cross_norm(x), context, context_mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map to the per-token outputs."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer; see the module docstring for the two input modes.

    ``forward(x, t, cond)``: t is a scalar or (B,) tensor: the mask ratio in [0, 1] for
    tokens (embedded as t * 1000), an integer timestep for latents (embedded as-is).
    """

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        input: str = "tokens",
        vocab_size: int | None = None,
        seq_shape: tuple[int, ...],
        in_channels: int | None = None,
        patch_size: int | None = None,
        learn_sigma: bool = False,
        pos: str = "sincos",
        cond_dim: int | None = None,
        num_classes: int | None = None,
        pooled_cond_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        seq_shape = tuple(int(s) for s in seq_shape)
        if len(seq_shape) not in (1, 2) or min(seq_shape) < 1:
            raise ValueError(f"seq_shape must be (L,) or (H, W) of positive sizes, got {seq_shape!r}")
        if width < 1 or depth < 0 or heads < 1:
            raise ValueError(f"need width >= 1, depth >= 0, heads >= 1; got {width}, {depth}, {heads}")
        if pos not in ("sincos", "learned"):
            raise ValueError(f"pos must be 'sincos' or 'learned', got {pos!r}")
        self.input, self.seq_shape, self.learn_sigma = input, seq_shape, learn_sigma
        if input == "tokens":
            if vocab_size is None or vocab_size < 1:
                raise ValueError(f"input='tokens' needs vocab_size >= 1, got {vocab_size!r}")
            if learn_sigma or in_channels is not None:
                raise ValueError("learn_sigma and in_channels apply only to input='latent'")
            patch_size = patch_size or 1
            if any(s % patch_size for s in seq_shape):
                raise ValueError(f"seq_shape {seq_shape} must be divisible by patch_size {patch_size}")
            self.vocab_size, self.mask_id, self.patch_size = vocab_size, vocab_size, patch_size
            slots = patch_size ** len(seq_shape)
            self.token_embed = GroupEmbedding(vocab_size + 1, slots, width)
            self.grid = tuple(s // patch_size for s in seq_shape)
            out_dim = vocab_size * slots
        elif input == "latent":
            if in_channels is None or patch_size is None or in_channels < 1 or patch_size < 1:
                raise ValueError(
                    f"input='latent' needs in_channels and patch_size >= 1, got {in_channels!r}, {patch_size!r}"
                )
            if any(s % patch_size for s in seq_shape):
                raise ValueError(f"seq_shape {seq_shape} must be divisible by patch_size {patch_size}")
            self.in_channels, self.patch_size = in_channels, patch_size
            self.out_channels = in_channels * (2 if learn_sigma else 1)
            self.patch_embed = nn.Linear(in_channels * patch_size ** len(seq_shape), width)
            self.grid = tuple(s // patch_size for s in seq_shape)
            out_dim = self.out_channels * patch_size ** len(seq_shape)
        else:
            raise ValueError(f"input must be 'tokens' or 'latent', got {input!r}")
        if pos == "sincos":
            # A buffer, not a parameter: fixed, rebuilt at construction, left out of checkpoints.
            self.register_buffer("pos_embed", sincos_positions(self.grid, width)[None], persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid), width))
        self.time_embed = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))
        # Row num_classes is the null class: the unconditional branch of classifier-free guidance.
        self.num_classes = num_classes
        self.label_embed = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.pooled_embed = nn.Linear(pooled_cond_dim, width) if pooled_cond_dim else None
        self.cond_dim = cond_dim
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio, cond_dim, dropout) for _ in range(depth))
        self.final = FinalLayer(width, out_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, small embeddings, zero adaLN modulation and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        token_table = self.token_embed.table if hasattr(self, "token_embed") else None
        for embedding in (token_table, self.label_embed):
            if embedding is not None:
                nn.init.normal_(embedding.weight, std=0.02)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        zeroed = [self.final.linear, self.final.modulation[-1]]
        for block in self.blocks:
            zeroed.append(block.modulation[-1])
            if block.cross_attn is not None:
                zeroed.append(block.cross_attn.proj)
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, t: Tensor | float, cond: Condition | None = None) -> Tensor:
        """Tokens: (B, L) long -> (B, L, vocab_size) logits; latent: (B, C, *S) -> (B, C or 2C, *S)."""
        tokens = self._embed(x) + self.pos_embed
        c = self.time_embed(timestep_features(self._times(t, x.shape[0], x.device)))
        context, context_mask, extra = self._read_condition(cond, x.shape[0])
        if extra is not None:
            c = c + extra
        for block in self.blocks:
            tokens = block(tokens, c, context, context_mask)
        out = self.final(tokens, c)
        if self.input == "tokens":
            logits = unpatchify(out, self.grid, self.patch_size, self.vocab_size)  # (B, V, *seq_shape)
            return logits.movedim(1, -1).reshape(*x.shape, self.vocab_size)
        return unpatchify(out, self.grid, self.patch_size, self.out_channels)

    def _embed(self, x: Tensor) -> Tensor:
        """Input tokens (B, N, width) from codes or latent patches."""
        if self.input == "tokens":
            length = math.prod(self.seq_shape)
            if x.dtype != torch.long or tuple(x.shape[1:]) not in (self.seq_shape, (length,)):
                raise ValueError(
                    f"token input must be long of shape (B, {length}) or (B, *{self.seq_shape}), "
                    f"got {x.dtype} {tuple(x.shape)}"
                )
            return self.token_embed(group_codes(x, self.seq_shape, self.patch_size))
        expected = (self.in_channels, *self.seq_shape)
        if not x.is_floating_point() or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"latent input must be float of shape (B, *{expected}), got {x.dtype} {tuple(x.shape)}"
            )
        return self.patch_embed(patchify(x, self.patch_size))

    def _times(self, t: Tensor | float, batch: int, device: torch.device) -> Tensor:
        """Timesteps as a float (B,) tensor on the embedding's scale."""
        t = torch.as_tensor(t, device=device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or shape ({batch},), got {tuple(t.shape)}")
        return t * TOKEN_TIME_SCALE if self.input == "tokens" else t

    def _read_condition(
        self, cond: Condition | None, batch: int
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(context, context_mask, adaLN addition) from a Condition, checked against the config."""
        seq = getattr(cond, "seq", None)
        labels = getattr(cond, "labels", None)
        pooled = getattr(cond, "pooled", None)
        extra = None
        if self.label_embed is not None:
            if labels is None or labels.shape != (batch,):
                raise ValueError(f"DiT(num_classes={self.num_classes}) needs cond.labels of shape ({batch},)")
            extra = self.label_embed(labels)
        if self.pooled_embed is not None:
            dim = self.pooled_embed.in_features
            if pooled is None or pooled.shape != (batch, dim):
                raise ValueError(f"DiT(pooled_cond_dim={dim}) needs cond.pooled of shape ({batch}, {dim})")
            pooled_c = self.pooled_embed(pooled)
            extra = pooled_c if extra is None else extra + pooled_c
        if self.cond_dim is None:
            return None, None, extra
        if seq is None or seq.ndim != 3 or seq.shape[0] != batch or seq.shape[2] != self.cond_dim:
            raise ValueError(
                f"DiT(cond_dim={self.cond_dim}) needs cond.seq of shape ({batch}, S, {self.cond_dim})"
            )
        mask = cond.mask
        if mask is not None and (mask.dtype != torch.bool or mask.shape != seq.shape[:2]):
            raise ValueError(f"cond.mask must be bool of shape {tuple(seq.shape[:2])}")
        return seq, mask, extra


def build_dit(name: str, **overrides) -> DiT:
    """A DiT from a preset name such as "DiT-S" or "DiT-B/4" (patch 4, latent input) plus overrides."""
    base, _, patch = name.partition("/")
    if base not in DIT_PRESETS:
        raise ValueError(
            f"unknown DiT preset {name!r}; valid: {sorted(DIT_PRESETS)}, optionally with /patch in {PATCH_SIZES}"
        )
    kwargs: dict = dict(DIT_PRESETS[base])
    if patch:
        if not patch.isdigit() or int(patch) not in PATCH_SIZES:
            raise ValueError(f"patch size in {name!r} must be one of {PATCH_SIZES}")
        if overrides.get("input") != "latent" or "patch_size" in overrides:
            raise ValueError(f"{name!r} names a patch size: pass input='latent' and no patch_size override")
        kwargs["patch_size"] = int(patch)
    kwargs.update(overrides)
    return DiT(**kwargs)
