"""Run folders: runs/<stage>-<timestamp>/ with config, checkpoints and media, plus
`runs/latest-*` links so that the next stage, `sample` and `eval` find them by default.

Every process of a multi-process launch must agree on its run folder without talking:
the one rank 0 made (Lightning re-launches ranks with an environment variable naming it),
the one ``run.dir`` names, or one named after the cluster's job id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .config import save_config

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
TOKENIZER_ARTIFACT = "tokenizer.pt"


SUMMARY_FILE = "summary.json"
RUN_DIR_ENV = "LIT_VQDIFF_RUN_DIR_{}"


def latest_link_name(stage: str, modality: str | None = None) -> str:
    """`latest-stage1` (images), `latest-stage1-audio`, `latest-stage2`: the latest run of any data set."""
    if stage == "stage1" and modality and modality != "image":
        return f"latest-stage1-{modality}"
    return f"latest-{stage}"


def tokenizer_link_name(modality: str, dataset: str) -> str:
    """`latest-stage1-image-fashion-mnist`: the latest tokenizer of one modality trained on one data set."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", dataset).strip("-") or "data"
    return f"latest-stage1-{modality}-{slug}"


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
    link.parent.mkdir(parents=True, exist_ok=True)  # absent when run.dir put the run elsewhere
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


def is_global_zero() -> bool:
    # SLURM_PROCID: the rank of a task that srun started (Lightning reads it, sets no RANK).
    return all(int(os.environ.get(var, "0")) == 0 for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes for this SLURM job (``<array job>_<task>`` in an array), if any."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def requeue_slurm_job() -> str:
    """Put this SLURM job back in the queue with `scontrol requeue <id>`; says what happened.

    The requeued job runs the same command with the same SLURM_JOB_ID, so it finds its run
    folder (runs/<stage>-job<id>) and resumes from last.ckpt. Without scontrol the job just
    ends: resubmitting the same command (same job id or run.dir) resumes it.
    """
    job = slurm_job_id()
    if job is None:
        return "not a SLURM job: nothing to requeue"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return f"SLURM job {job} not requeued (scontrol is not on PATH); requeue or resubmit it to resume"
    try:
        done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`scontrol requeue {job}` failed ({type(err).__name__}: {err}); requeue or resubmit it to resume"
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"status {done.returncode}"]
        return f"`scontrol requeue {job}` failed ({why[0]}); requeue or resubmit it to resume"
    return f"requeued SLURM job {job}: it resumes from there"


def _cluster_run_name(cfg: DictConfig) -> str | None:
    """A run name every rank of a multi-process launch agrees on, without talking."""
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        value = os.environ.get(var)
        if value and value != "none":
            tag = cfg.stage if cfg.stage == "stage2" or cfg.modality == "image" else f"stage1-{cfg.modality}"
            return f"{tag}-job{value}"
    return None


def resolve_run(cfg: DictConfig) -> tuple[Path, Path | None]:
    """The run folder for ``cfg`` (created if new) and the checkpoint to resume, if any."""
    env = RUN_DIR_ENV.format(cfg.stage.upper() if cfg.stage == "stage2" else f"STAGE1_{cfg.modality.upper()}")
    joined = os.environ.get(env)
    if joined:
        run_dir = Path(joined)
    elif cfg.run.dir:
        run_dir = Path(cfg.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    elif (name := _cluster_run_name(cfg)) is not None:
        run_dir = Path(cfg.run.root) / name
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = new_run_dir(cfg.run.root, cfg.stage, cfg.get("modality"))
    os.environ[env] = str(run_dir)
    ckpt = checkpoint_path(run_dir)
    previous = ckpt.with_name(ckpt.name + ".prev")
    resume = ckpt if ckpt.exists() else (ckpt if previous.exists() else None)
    if is_global_zero():
        save_config(cfg, run_dir / CONFIG_FILE)
    return run_dir, resume


def leave_run(run_dir: Path) -> None:
    """This process is done with ``run_dir``: a later run in it must not join that one."""
    for key in [k for k, v in os.environ.items() if k.startswith(RUN_DIR_ENV.format("")) and v == str(run_dir)]:
        del os.environ[key]


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Final figures of a run as JSON beside its config (rank 0), written whole or not at all."""
    if is_global_zero():
        path = Path(run_dir) / SUMMARY_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(path)
