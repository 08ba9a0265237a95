"""Quantizers for the stage-1 tokenizers: VQ (EMA or gradient codebook), residual VQ, FSQ.

Inputs are channels-first encoder outputs, (B, C, H, W) or (B, C, T). Everything inside
runs in float32 whatever the surrounding autocast says; ``quantized`` comes back in the
input's dtype.

Under torch.distributed a training-mode forward of VectorQuantizer / ResidualVQ is a
collective: k-means init, EMA statistics and dead-code restarts are shared so that
every rank holds the same codebook. Every rank must therefore run the same number of
training-mode forwards (eval-mode forwards, ``encode`` and the decoders never
communicate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lit_vqdiff.metrics import histogram_perplexity, histogram_usage


@dataclass
class QuantizerOutput:
    """What a quantizer's forward returns."""

    quantized: Tensor  # like the input z (shape, dtype); straight-through gradient to z
    codes: Tensor  # long: (B, *spatial), or (B, num_quantizers, *spatial) for residual VQ
    loss: Tensor  # float32 scalar: codebook + commitment terms (0 for FSQ)
    counts: Tensor  # long (num_codebooks, codebook_size): this rank's histogram of the batch

    @property
    def usage(self) -> Tensor:
        """Share of each codebook's codes used in this batch, (num_codebooks,)."""
        return histogram_usage(self.counts)

    @property
    def perplexity(self) -> Tensor:
        """exp(entropy) of each codebook's code distribution in this batch, (num_codebooks,)."""
        return histogram_perplexity(self.counts)


def distributed() -> bool:
    """True when a torch.distributed process group is up."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum t over ranks in place (no-op without a process group)."""
    if distributed():
        dist.all_reduce(t)
    return t


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate every rank's rows of x, in rank order; ranks may hold different counts."""
    if not distributed():
        return x
    world = dist.get_world_size()
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = x.new_zeros(max(sizes), *x.shape[1:])
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def nearest_code(x: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook row (squared L2) for each row of x."""
    distances = x.pow(2).sum(1, keepdim=True) - 2 * x @ codebook.T + codebook.pow(2).sum(1)
    return distances.argmin(1)


def draw_indices(n: int, k: int, generator: torch.Generator) -> Tensor:
    """k random indices below n (CPU): distinct when n >= k, with replacement otherwise."""
    if n >= k:
        return torch.randperm(n, generator=generator)[:k]
    return torch.randint(n, (k,), generator=generator)


def sum_rows_by_code(x: Tensor, codes: Tensor, num_codes: int) -> Tensor:
    """(num_codes, D) sums of the rows of x assigned to each code."""
    # scatter_add_ over an expanded index is far faster on CPU than index_add_ here.
    return x.new_zeros(num_codes, x.shape[1]).scatter_add_(0, codes[:, None].expand_as(x), x)


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator, spherical: bool) -> Tensor:
    """k centroids of the rows of x: random rows, then Lloyd steps (empty clusters stay put)."""
    centroids = x[draw_indices(x.shape[0], k, generator).to(x.device)]
    for _ in range(iters):
        assign = nearest_code(x, centroids)
        counts = torch.bincount(assign, minlength=k)
        means = sum_rows_by_code(x, assign, k) / counts.clamp_min(1)[:, None]
        if spherical:
            means = F.normalize(means, dim=-1)
        centroids = torch.where(counts[:, None] > 0, means, centroids)
    return centroids


def no_autocast(t: Tensor) -> torch.autocast:
    """Turn autocast off on t's device: distances, EMA and losses must stay float32."""
    return torch.autocast(t.device.type, enabled=False)


def project(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply a projection in float32 even when its weights are stored in lower precision."""
    if isinstance(layer, nn.Linear):
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x, layer.weight.float(), bias)
    return x


def to_rows(z: Tensor, dim: int, name: str = "z") -> tuple[Tensor, tuple[int, ...]]:
    """(B, dim, *spatial) -> float32 rows (B * prod(spatial), dim), and the shape (B, *spatial)."""
    if z.dim() < 3 or z.shape[1] != dim:
        raise ValueError(f"{name} must be channels-first (B, {dim}, *spatial), got shape {tuple(z.shape)}")
    return z.float().movedim(1, -1).reshape(-1, dim), (z.shape[0], *z.shape[2:])


def from_rows(rows: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of to_rows: (N, C) -> (B, C, *spatial)."""
    return rows.reshape(*shape, rows.shape[-1]).movedim(-1, 1)


def used_codes(counts: Tensor, codebook_size: int) -> Tensor:
    """Indices of codes with a nonzero count; counts (codebook_size,) or (1, codebook_size)."""
    if tuple(counts.shape) not in ((codebook_size,), (1, codebook_size)):
        expected = f"({codebook_size},) or (1, {codebook_size})"
        raise ValueError(f"counts must have shape {expected}, got {tuple(counts.shape)}")
    keep = (counts.reshape(-1) > 0).nonzero().squeeze(1)
    if keep.numel() == 0:
        raise ValueError("counts: no code was ever used, nothing to keep")
    return keep


def remap_table(keep: Tensor, codebook_size: int) -> Tensor:
    """Old -> new code index after keeping only `keep` (in order); -1 for dropped codes."""
    table = torch.full((codebook_size,), -1, dtype=torch.long, device=keep.device)
    table[keep] = torch.arange(keep.numel(), device=keep.device)
    return table


def check_positive(name: str, value: int) -> None:
    """Raise unless value is a positive int."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class Quantizer(nn.Module):
    """Shared plumbing: in/out projections, channels-first <-> rows, float32, code layouts.

    Subclasses work on float32 rows in the lookup space and implement ``_quantize``,
    ``_encode_rows``, ``_vectors_of`` (codes (N, q) -> vectors) and ``prune``.
    """

    stacked_codes = False  # codes (B, num_codebooks, *spatial) instead of (B, *spatial)

    def __init__(self, dim: int, lookup_dim: int) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("lookup_dim", lookup_dim)
        self.dim, self.lookup_dim = dim, lookup_dim
        projected = lookup_dim != dim
        self.project_in = nn.Linear(dim, lookup_dim) if projected else nn.Identity()
        self.project_out = nn.Linear(lookup_dim, dim) if projected else nn.Identity()

    def forward(self, z: Tensor) -> QuantizerOutput:
        with no_autocast(z):
            rows, shape = to_rows(z, self.dim)
            source, target, codes, loss = self._quantize(project(self.project_in, rows))
            # Straight-through: the value of the code, the gradient of the encoder output.
            quantized = project(self.project_out, source + (target - source).detach())
        return QuantizerOutput(
            quantized=from_rows(quantized, shape).to(z.dtype),
            codes=self._codes_out(codes, shape),
            loss=loss,
            counts=self._histogram(codes),
        )

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """Codes of z, without any codebook update (safe on a frozen tokenizer)."""
        with no_autocast(z):
            rows, shape = to_rows(z, self.dim)
            return self._codes_out(self._encode_rows(project(self.project_in, rows)), shape)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Quantized z (B, dim, *spatial) of codes; equals ``forward(z).quantized`` for codes = encode(z)."""
        rows, shape = self._codes_in(codes)
        with no_autocast(rows):
            return from_rows(project(self.project_out, self._vectors_of(rows)), shape)

    def code_vectors(self, codes: Tensor) -> Tensor:
        """Low-dimensional code vectors (B, lookup_dim, *spatial): what Gaussian latent diffusion models."""
        rows, shape = self._codes_in(codes)
        with no_autocast(rows):
            return from_rows(self._vectors_of(rows), shape)

    @torch.no_grad()
    def encode_vectors(self, vectors: Tensor) -> Tensor:
        """Codes of the codes nearest to lookup-space vectors (B, lookup_dim, *spatial)."""
        with no_autocast(vectors):
            rows, shape = to_rows(vectors, self.lookup_dim, name="vectors")
            return self._codes_out(self._snap_rows(rows), shape)

    def decode_vectors(self, vectors: Tensor) -> Tensor:
        """Snap lookup-space vectors to their nearest codes, then project out to (B, dim, *spatial)."""
        return self.decode_codes(self.encode_vectors(vectors))

    def _snap_rows(self, vectors: Tensor) -> Tensor:
        return self._encode_rows(vectors)

    def _codes_out(self, codes: Tensor, shape: Sequence[int]) -> Tensor:
        return from_rows(codes, shape) if self.stacked_codes else codes.reshape(shape)

    def _codes_in(self, codes: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """Validate user codes; return rows (N, q) and the shape (B, *spatial)."""
        if codes.is_floating_point() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if self.stacked_codes:
            if codes.dim() < 3 or not 1 <= codes.shape[1] <= self.num_codebooks:
                raise ValueError(
                    f"codes must have shape (B, q, *spatial) with 1 <= q <= {self.num_codebooks}, "
                    f"got {tuple(codes.shape)}"
                )
            rows, shape = codes.movedim(1, -1).reshape(-1, codes.shape[1]), (codes.shape[0], *codes.shape[2:])
        else:
            if codes.dim() < 2:
                raise ValueError(f"codes must have shape (B, *spatial), got {tuple(codes.shape)}")
            rows, shape = codes.reshape(-1, 1), tuple(codes.shape)
        if rows.numel():
            low, high = torch.aminmax(rows)
            if bool((low < 0) | (high >= self.codebook_size)):  # one device sync, not two
                raise ValueError(f"codes must lie in [0, {self.codebook_size}), got range [{low}, {high}]")
        return rows.long(), shape

    def _histogram(self, codes: Tensor) -> Tensor:
        """(N, num_codebooks) codes -> (num_codebooks, codebook_size) counts."""
        num, size = codes.shape[1], self.codebook_size
        offsets = torch.arange(num, device=codes.device) * size
        return torch.bincount((codes + offsets).flatten(), minlength=num * size).view(num, size)


class VectorQuantizer(Quantizer):
    """Nearest-code VQ with k-means init, EMA (or gradient) codebook and dead-code restarts.

    ``restarts`` counts codes restarted so far; ``steps_unused`` how many training steps
    each code has gone unused (all ranks together).
    """

    num_codebooks = 1

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        lookup_dim: int | None = None,
        l2_normalize: bool = True,
        update: str = "ema",
        ema_decay: float = 0.99,
        commitment: float = 0.25,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        kmeans_samples: int = 8192,
        restart_dead: bool = True,
        dead_after: int = 100,
        restart_buffer: int = 1024,
        eps: float = 1e-5,
        seed: int = 0,
    ) -> None:
        super().__init__(dim, dim if lookup_dim is None else lookup_dim)
        check_positive("codebook_size", codebook_size)
        for name, value in (("kmeans_samples", kmeans_samples), ("dead_after", dead_after),
                            ("restart_buffer", restart_buffer)):
            check_positive(name, value)
        if update not in ("ema", "grad"):
            raise ValueError(f"update must be 'ema' or 'grad', got {update!r}")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay!r}")
        if kmeans_iters < 0 or commitment < 0 or eps <= 0:
            raise ValueError(f"need kmeans_iters >= 0, commitment >= 0, eps > 0; got "
                             f"{kmeans_iters!r}, {commitment!r}, {eps!r}")
        self.codebook_size, self.l2_normalize, self.update = codebook_size, l2_normalize, update
        self.ema_decay, self.commitment, self.eps, self.seed = ema_decay, commitment, eps, seed
        self.kmeans_iters, self.kmeans_samples = kmeans_iters, kmeans_samples
        self.restart_dead, self.dead_after = restart_dead, dead_after
        # Seeded, so every rank builds the same codebook even without k-means.
        initial = torch.randn(codebook_size, self.lookup_dim, generator=torch.Generator().manual_seed(seed))
        initial = F.normalize(initial, dim=-1) if l2_normalize else initial
        if update == "grad":
            self.embedding = nn.Parameter(initial)
        else:
            self.register_buffer("embedding", initial)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_sum", initial.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))
        if restart_dead:
            # This rank's recent lookup inputs: the candidates for restarting dead codes.
            self.register_buffer("recent", torch.zeros(restart_buffer, self.lookup_dim), persistent=False)
            self.recent_count = 0

    def codebook(self) -> Tensor:
        """Code vectors in the lookup space, float32 (unit length when lookups are l2-normalized)."""
        codes = self.embedding.float()
        return F.normalize(codes, dim=-1) if self.l2_normalize else codes

    def prune(self, counts: Tensor) -> Tensor:
        """Drop codes whose count is 0; returns the old -> new table shaped like counts (-1: dropped)."""
        keep = used_codes(counts, self.codebook_size)
        self._keep(keep)
        return remap_table(keep, counts.numel()).view(counts.shape)

    def _keep(self, index: Tensor) -> None:
        """Shrink the codebook and its statistics to the codes in index (in that order)."""
        with torch.no_grad():
            if isinstance(self.embedding, nn.Parameter):
                self.embedding = nn.Parameter(self.embedding[index].clone())
            else:
                self.embedding = self.embedding[index].clone()
            for name in ("cluster_size", "embed_sum", "steps_unused"):
                if hasattr(self, name):
                    setattr(self, name, getattr(self, name)[index].clone())
        self.codebook_size = index.numel()

    def _prepare(self, rows: Tensor) -> Tensor:
        return F.normalize(rows, dim=-1) if self.l2_normalize else rows

    def _encode_rows(self, rows: Tensor) -> Tensor:
        return nearest_code(self._prepare(rows), self.codebook())[:, None]

    def _vectors_of(self, codes: Tensor) -> Tensor:
        return self.codebook()[codes[:, 0]]

    def _quantize(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = self._prepare(rows)
        # Codebook edits happen before the graph is built, so backward never sees them.
        if self.training and not bool(self.initialized):
            self._kmeans_init(x.detach())
        if self.training and self.restart_dead:
            self._restart_dead_codes()
        codebook = self.codebook()
        codes = nearest_code(x.detach(), codebook.detach())
        target = codebook[codes]
        loss = self.commitment * F.mse_loss(x, target.detach())
        if self.update == "grad":
            loss = loss + F.mse_loss(x.detach(), target)
        if self.training:
            self._record(x.detach(), codes)
        return x, target, codes[:, None], loss

    def _generator(self, salt: int) -> torch.Generator:
        """CPU generator that is identical on every rank for a given step."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + int(self.steps)) * 4 + salt)

    @torch.no_grad()
    def _set_codes(self, index: Tensor | slice, vectors: Tensor) -> None:
        self.embedding[index] = vectors.to(self.embedding.dtype)
        if self.update == "ema":
            # A fresh code counts as one vector, so its first assignments move it quickly.
            self.embed_sum[index] = vectors
            self.cluster_size[index] = 1.0
        self.steps_unused[index] = 0

    @torch.no_grad()
    def _kmeans_init(self, x: Tensor) -> None:
        pick = torch.randperm(x.shape[0], generator=self._generator(0))[: self.kmeans_samples]
        sample = gather_rows(x[pick.to(x.device)])
        generator = self._generator(1)
        centroids = kmeans(sample, self.codebook_size, self.kmeans_iters, generator, self.l2_normalize)
        if distributed():  # same data and seed give the same centroids; this guards against float drift
            dist.broadcast(centroids, src=0)
        self._set_codes(slice(None), centroids)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _record(self, x: Tensor, codes: Tensor) -> None:
        """After a training lookup: EMA update, unused-step counters, recent-vector buffer."""
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        if self.update == "ema":
            sums = sum_rows_by_code(x, codes, self.codebook_size)
            stats = all_reduce_sum(torch.cat([counts[:, None], sums], 1))  # one collective, not two
            counts = stats[:, 0]
            self.cluster_size.lerp_(counts, 1.0 - self.ema_decay)
            self.embed_sum.lerp_(stats[:, 1:], 1.0 - self.ema_decay)
            total = self.cluster_size.sum()
            # Laplace smoothing keeps never-used codes from dividing by ~0.
            smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
            self.embedding.copy_(self.embed_sum / smoothed[:, None])
        elif self.restart_dead:
            all_reduce_sum(counts)
        if self.restart_dead:
            self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
            self._remember(x)
        self.steps += 1

    def _remember(self, x: Tensor) -> None:
        """Write a random subset of this batch's vectors into the ring buffer of recent ones."""
        size = self.recent.shape[0]
        take = min(x.shape[0], size)
        pick = torch.randperm(x.shape[0], generator=self._generator(2))[:take]
        slots = (torch.arange(take) + self.recent_count) % size
        self.recent[slots.to(x.device)] = x[pick.to(x.device)]
        self.recent_count += take

    @torch.no_grad()
    def _restart_dead_codes(self) -> None:
        """Replace codes unused for dead_after steps by recent vectors drawn from all ranks."""
        dead = self.steps_unused >= self.dead_after
        # steps_unused comes from all-reduced counts, so every rank takes the same branch here.
        if not bool(dead.any()):
            return
        candidates = gather_rows(self.recent[: min(self.recent_count, self.recent.shape[0])])
        if candidates.shape[0] == 0:  # the same on every rank: candidates were gathered
            return
        index = dead.nonzero().squeeze(1)
        pick = draw_indices(candidates.shape[0], index.numel(), self._generator(3))
        self._set_codes(index, candidates[pick.to(candidates.device)])
        self.restarts += index.numel()


class ResidualVQ(Quantizer):
    """num_quantizers VQ layers, each quantizing what the previous ones left over.

    One shared projection in/out; the layers work in the lookup space, take the
    VectorQuantizer options in ``layer_kwargs`` and are seeded seed, seed + 1, ...
    With ``l2_normalize`` the lookup input is unit-normalized and the first layer
    matches by cosine; later layers quantize plain residuals, which are not unit vectors.
    """

    stacked_codes = True

    def __init__(
        self,
        num_quantizers: int,
        dim: int,
        codebook_size: int,
        lookup_dim: int | None = None,
        l2_normalize: bool = False,
        seed: int = 0,
        **layer_kwargs,
    ) -> None:
        super().__init__(dim, dim if lookup_dim is None else lookup_dim)
        check_positive("num_quantizers", num_quantizers)
        self.l2_normalize = l2_normalize
        self.layers = nn.ModuleList(
            VectorQuantizer(self.lookup_dim, codebook_size, l2_normalize=l2_normalize and i == 0,
                            seed=seed + i, **layer_kwargs)
            for i in range(num_quantizers)
        )

    @property
    def num_codebooks(self) -> int:
        return len(self.layers)

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def restarts(self) -> Tensor:
        return sum(layer.restarts for layer in self.layers)

    def prune(self, counts: Tensor) -> Tensor:
        """Drop unused codes per layer; returns (num_quantizers, old size) old -> new tables.

        Every layer keeps the same number of codes (the most any layer used), so stage 2
        keeps one vocabulary size: a layer that used fewer also keeps its lowest-index
        unused codes.
        """
        expected = (self.num_codebooks, self.codebook_size)
        if tuple(counts.shape) != expected:
            raise ValueError(f"counts must have shape {expected}, got {tuple(counts.shape)}")
        used = counts > 0
        size = int(used.sum(1).max())
        if size == 0:
            raise ValueError("counts: no code was ever used, nothing to keep")
        tables = []
        for layer, row in zip(self.layers, used):
            keep = torch.cat([row.nonzero().squeeze(1), (~row).nonzero().squeeze(1)])[:size].sort().values
            layer._keep(keep)
            tables.append(remap_table(keep, row.numel()))
        return torch.stack(tables)

    def _prepare(self, rows: Tensor) -> Tensor:
        return F.normalize(rows, dim=-1) if self.l2_normalize else rows

    def _quantize(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rows = self._prepare(rows)
        residual, target, codes, loss = rows, torch.zeros_like(rows), [], rows.new_zeros(())
        for layer in self.layers:
            _, vectors, layer_codes, layer_loss = layer._quantize(residual)
            # Detach the code, not the residual: every layer's commitment reaches the encoder.
            residual = residual - vectors.detach()
            target = target + vectors.detach()
            codes.append(layer_codes)
            loss = loss + layer_loss
        return rows, target, torch.cat(codes, 1), loss

    def _encode_rows(self, rows: Tensor) -> Tensor:
        residual, codes = self._prepare(rows), []
        for layer in self.layers:
            layer_codes = layer._encode_rows(residual)
            residual = residual - layer._vectors_of(layer_codes)
            codes.append(layer_codes)
        return torch.cat(codes, 1)

    def _vectors_of(self, codes: Tensor) -> Tensor:
        """Sum of the first q layers' code vectors for codes (N, q): q < num_quantizers is a coarse decode."""
        layers = self.layers[: codes.shape[1]]
        return sum(layer._vectors_of(codes[:, i : i + 1]) for i, layer in enumerate(layers))


class FSQ(Quantizer):
    """Finite scalar quantization: each lookup channel rounded to one of its levels.

    Code index is mixed radix, first channel fastest: d0 + L0 * (d1 + L1 * (d2 + ...)).
    Code vectors put the digits of each channel evenly on [-1, 1]. ``prune`` keeps a
    subset of the grid; lookups then go to the nearest kept grid point.
    """

    num_codebooks = 1

    def __init__(self, dim: int, levels: Sequence[int] = (8, 5, 5, 5)) -> None:
        levels = tuple(levels)
        if not levels or not all(isinstance(level, int) and level >= 2 for level in levels):
            raise ValueError(f"levels must be a non-empty list of ints >= 2, got {levels!r}")
        super().__init__(dim, len(levels))
        self.levels = levels
        radix = torch.tensor((1, *levels[:-1])).cumprod(0)
        self.register_buffer("level_counts", torch.tensor(levels), persistent=False)
        self.register_buffer("radix", radix, persistent=False)
        # Grid indices still in use, in new-code order; persistent so a pruned FSQ reloads.
        self.register_buffer("kept", torch.arange(math.prod(levels)))

    @property
    def codebook_size(self) -> int:
        return self.kept.numel()

    def prune(self, counts: Tensor) -> Tensor:
        """Drop codes whose count is 0; returns the old -> new table shaped like counts (-1: dropped)."""
        keep = used_codes(counts, self.codebook_size)
        self.kept = self.kept[keep]
        return remap_table(keep, counts.numel()).view(counts.shape)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # A pruned checkpoint holds a shorter `kept`: take its size before loading.
        kept = state_dict.get(prefix + "kept")
        if kept is not None:
            self.kept = torch.empty_like(kept, device=self.kept.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _digit_vectors(self, digits: Tensor) -> Tensor:
        return digits * 2.0 / (self.level_counts - 1) - 1.0

    def _bounded_vectors(self, rows: Tensor) -> Tensor:
        """Continuous code vectors: each channel squashed onto (-0.5, L - 0.5), then scaled like digits."""
        # The half-level margins give every level an equal-width rounding bin.
        return self._digit_vectors(torch.sigmoid(rows) * self.level_counts - 0.5)

    def _quantize(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        source = self._bounded_vectors(rows)
        codes = self._snap_rows(source.detach())
        return source, self._vectors_of(codes), codes, rows.new_zeros(())

    def _encode_rows(self, rows: Tensor) -> Tensor:
        return self._snap_rows(self._bounded_vectors(rows))

    def _snap_rows(self, vectors: Tensor) -> Tensor:
        if self.codebook_size < math.prod(self.levels):
            every_code = torch.arange(self.codebook_size, device=vectors.device)[:, None]
            return nearest_code(vectors, self._vectors_of(every_code))[:, None]
        digits = ((vectors + 1.0) * (self.level_counts - 1) / 2.0).round()
        digits = torch.minimum(digits.clamp_min(0), self.level_counts - 1).long()
        return (digits * self.radix).sum(1, keepdim=True)

    def _vectors_of(self, codes: Tensor) -> Tensor:
        digits = (self.kept[codes[:, 0]][:, None] // self.radix) % self.level_counts
        return self._digit_vectors(digits.float())


QUANTIZERS: dict[str, type[Quantizer]] = {"vq": VectorQuantizer, "rvq": ResidualVQ, "fsq": FSQ}


def build_quantizer(kind: str, **kwargs) -> Quantizer:
    """Build a quantizer by registry name ('vq', 'rvq', 'fsq') with its constructor kwargs."""
    if kind not in QUANTIZERS:
        raise ValueError(f"unknown quantizer kind {kind!r}; valid kinds: {sorted(QUANTIZERS)}")
    return QUANTIZERS[kind](**kwargs)
