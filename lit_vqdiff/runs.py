"""Run folders: runs/<stage>-<timestamp>/ with config, checkpoints and media, plus
`runs/latest-*` links so that the next stage, `sample` and `eval` find them by default."""

from __future__ import annotations

import os
import time
from pathlib import Path

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
TOKENIZER_ARTIFACT = "tokenizer.pt"


def latest_link_name(stage: str, modality: str | None = None) -> str:
    """`latest-stage1` (images), `latest-stage1-audio`, `latest-stage2`."""
    if stage == "stage1" and modality and modality != "image":
        return f"latest-stage1-{modality}"
    return f"latest-{stage}"


def new_run_dir(root: Path | str, stage: str, modality: str | None = None) -> Path:
    """A fresh, unique run folder such as runs/stage1-20261129-113005."""
    tag = stage if not modality or modality == "image" else f"{stage}-{modality}"
    base = Path(root) / f"{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    path.mkdir(parents=True)
    return path


def update_latest(root: Path | str, name: str, run_dir: Path) -> Path:
    """Point runs/<name> at ``run_dir`` (relative link, swapped atomically)."""
    link = Path(root) / name
    tmp = link.with_name(f".{name}.tmp{os.getpid()}")
    target = os.path.relpath(Path(run_dir).resolve(), Path(root).resolve())
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target, target_is_directory=True)
    tmp.replace(link)
    return link


def resolve_run_dir(path: Path | str) -> Path:
    """A run folder given itself, a latest-* link, or a file inside it."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no run at {path}")
    p = p.resolve()
    return p if p.is_dir() else p.parent


def checkpoint_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CKPT


def is_run_dir(path: Path | str) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()
