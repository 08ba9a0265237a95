"""Nearest-code vector quantization: VectorQuantizer (EMA or gradient codebook, k-means
init, dead-code restarts, all synchronized across ranks) and ResidualVQ (a stack of them).

Under torch.distributed a training-mode forward is a collective (see the package
docstring): every rank must run the same number of them.

Each rank keeps its own ring of recent lookup inputs for dead-code restarts. It is a
plain tensor attribute, not a buffer: DDP broadcasts buffers from rank 0 before every
forward (``broadcast_buffers``), which would replace every rank's ring by rank 0's, and
restarts would draw rank 0's vectors world-size times. It is not in the state dict
either (that holds what the ranks share); ``ring_state`` carries it into checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Quantizer, check_positive, remap_table, used_codes
from .collectives import all_reduce_sum, distributed, draw_indices, gather_rows, kmeans, nearest_code, sum_rows_by_code


class VectorQuantizer(Quantizer):
    """Nearest-code VQ with k-means init, EMA (or gradient) codebook and dead-code restarts.

    ``restarts`` counts codes restarted so far; ``steps_unused`` how many training steps
    each code has gone unused (all ranks together).
    """

    num_codebooks = 1
    # Buffers (or the embedding parameter) that a training forward changes outside the optimizer.
    TRAINING_STATE = ("embedding", "cluster_size", "embed_sum", "initialized", "steps", "restarts", "steps_unused")

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
            self.recent = torch.zeros(restart_buffer, self.lookup_dim)
            self.recent_count = 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "recent" in self.__dict__:
            # A private copy: tensors unpickled from torch.multiprocessing (ddp_spawn hands its
            # ranks the module that way) live in memory shared by every rank, and Lightning
            # makes private copies of parameters and buffers only.
            self.recent = self.recent.clone()

    def training_state(self) -> dict[str, Any]:
        """Clones of what a training forward changes outside the optimizer: the codebook, its
        statistics and counters, and the restart ring (``load_training_state`` puts them back)."""
        state: dict[str, Any] = {name: getattr(self, name).detach().clone() for name in self.TRAINING_STATE if hasattr(self, name)}
        if self.restart_dead:
            state["ring"] = (self.recent.clone(), self.recent_count)
        return state

    @torch.no_grad()
    def load_training_state(self, state: dict[str, Any]) -> None:
        for name in self.TRAINING_STATE:
            if name in state:
                getattr(self, name).copy_(state[name])
        if "ring" in state:
            self.recent, self.recent_count = state["ring"][0].clone(), state["ring"][1]

    def ring_state(self) -> list[tuple[Tensor, int]]:
        """This rank's restart ring(s), on the CPU, for a checkpoint."""
        return [(self.recent.cpu().clone(), self.recent_count)] if self.restart_dead else []

    def load_ring_state(self, rings: list[tuple[Tensor, int]]) -> None:
        if self.restart_dead and rings:
            ring, count = rings[0]
            if tuple(ring.shape) != tuple(self.recent.shape):
                raise ValueError(f"restart ring of shape {tuple(ring.shape)} in the checkpoint; this quantizer's is {tuple(self.recent.shape)}")
            self.recent, self.recent_count = ring.to(self.recent.device).clone(), int(count)

    def _ring_on(self, device: torch.device) -> Tensor:
        """The ring on ``device`` (module.to() moves buffers, not plain attributes)."""
        if self.recent.device != device:
            self.recent = self.recent.to(device)
        return self.recent

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
        ring = self._ring_on(x.device)
        size = ring.shape[0]
        take = min(x.shape[0], size)
        pick = torch.randperm(x.shape[0], generator=self._generator(2))[:take]
        slots = (torch.arange(take) + self.recent_count) % size
        ring[slots.to(x.device)] = x[pick.to(x.device)]
        self.recent_count += take

    @torch.no_grad()
    def _restart_dead_codes(self) -> None:
        """Replace codes unused for dead_after steps by recent vectors drawn from all ranks."""
        dead = self.steps_unused >= self.dead_after
        # steps_unused comes from all-reduced counts, so every rank takes the same branch here.
        if not bool(dead.any()):
            return
        ring = self._ring_on(self.steps_unused.device)
        candidates = gather_rows(ring[: min(self.recent_count, ring.shape[0])])
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

    def training_state(self) -> dict[str, Any]:
        return {"layers": [layer.training_state() for layer in self.layers]}

    def load_training_state(self, state: dict[str, Any]) -> None:
        for layer, layer_state in zip(self.layers, state["layers"]):
            layer.load_training_state(layer_state)

    def ring_state(self) -> list[tuple[Tensor, int]]:
        return [ring for layer in self.layers for ring in layer.ring_state()]

    def load_ring_state(self, rings: list[tuple[Tensor, int]]) -> None:
        if rings and len(rings) != len(self.layers):
            raise ValueError(f"{len(rings)} restart rings in the checkpoint for {len(self.layers)} layers")
        for layer, ring in zip(self.layers, rings):
            layer.load_ring_state([ring])

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
