"""Codebook math shared by the vector quantizers: nearest codes, k-means, and the
collectives that keep every rank's codebook identical under torch.distributed.

The collectives do nothing without a process group, so the same code runs in one
process and under DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


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
