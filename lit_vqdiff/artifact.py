"""The tokenizer artifact: what stage 1 hands to stage 2.

One file (``<run>/tokenizer.pt``) with the weights, the spec to rebuild the module, the
run's config, the code-usage histogram, latent statistics (for Gaussian stage 2), the
remap table of a pruned codebook and a checksum of the weights. Stage 2 and the token
cache key on that checksum; loading needs only ``lit_vqdiff.nn.tokenizer``, not the
training code (no Lightning).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from .nn.tokenizer import Tokenizer

FORMAT = "lit_vqdiff.tokenizer/1"


def weights_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes, dtypes and bytes of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_artifact(
    path: Path | str, tokenizer: Tokenizer, code_counts: torch.Tensor, latent_mean: torch.Tensor, latent_std: torch.Tensor,
    metrics: dict[str, float] | None = None, remap: torch.Tensor | None = None, config: dict[str, Any] | None = None,
) -> str:
    """Write the artifact atomically; returns the weights' checksum.

    ``code_counts`` (num_codebooks, codebook_size) count the codes as this tokenizer
    numbers them; ``remap`` (num_codebooks, size before pruning) maps the codes of the
    unpruned tokenizer to these (-1: dropped). ``config`` is the run's config as plain data.
    """
    state = {k: v.detach().cpu().clone() for k, v in tokenizer.state_dict().items()}
    checksum = weights_checksum(state)
    payload = {
        "format": FORMAT,
        "spec": tokenizer.spec(),
        "state_dict": state,
        "code_counts": code_counts.detach().cpu(),
        "latent_mean": latent_mean.detach().cpu().float(),
        "latent_std": latent_std.detach().cpu().float(),
        "metrics": dict(metrics or {}),
        "remap": None if remap is None else remap.detach().cpu(),
        "config": config,
        "checksum": checksum,
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return checksum


def read_artifact(path: Path | str) -> dict[str, Any]:
    """The raw artifact, checked for format and integrity."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer artifact at {path}")
    try:
        # weights_only: an artifact is tensors and plain data, and loading one runs no pickled code.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated files raise several error types
        raise ValueError(f"{path}: unreadable tokenizer artifact ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} artifact (format={payload.get('format') if isinstance(payload, dict) else None!r})")
    actual = weights_checksum(payload["state_dict"])
    if actual != payload["checksum"]:
        raise ValueError(f"{path}: weights checksum {actual[:12]} does not match the recorded {payload['checksum'][:12]}; the file is damaged")
    payload["path"] = str(path)
    return payload


def load_tokenizer(path: Path | str) -> tuple[Tokenizer, dict[str, Any]]:
    """A frozen, eval-mode tokenizer and its artifact metadata (without the weights)."""
    payload = read_artifact(path)
    tokenizer = Tokenizer.from_spec(payload["spec"])
    tokenizer.load_state_dict(payload["state_dict"])
    tokenizer.eval().requires_grad_(False)
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return tokenizer, meta
