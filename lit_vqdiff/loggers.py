"""Experiment loggers: W&B (offline unless asked otherwise), CSV, or none.

A W&B problem (no network, a bad key, a full disk) must never stop a training run:
the logger warns once and carries on as a no-op.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.logger import DummyExperiment
from omegaconf import DictConfig, OmegaConf


def wandb_mode(configured: str) -> str:
    """WANDB_MODE in the environment wins over ``logger.mode`` (offline by default)."""
    return os.environ.get("WANDB_MODE") or configured


class SafeWandbLogger(WandbLogger):
    """WandbLogger whose failures become one warning each, never an exception."""

    _failed = False

    def _warn(self, what: str, err: BaseException) -> None:
        if not self._failed:
            warnings.warn(f"W&B {what} failed ({type(err).__name__}: {err}); training continues without W&B", RuntimeWarning, stacklevel=3)
        self._failed = True

    @property
    def experiment(self) -> Any:  # type: ignore[override]
        if self._failed:
            return DummyExperiment()
        try:
            return super().experiment
        except Exception as err:  # noqa: BLE001 - any W&B failure is non-fatal by design
            self._warn("start", err)
            return DummyExperiment()

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self._failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            self._warn(what, err)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._guard("log", super().log_metrics, metrics, step)

    def log_hyperparams(self, params: Any) -> None:
        self._guard("config logging", super().log_hyperparams, params)

    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self._guard("image logging", super().log_image, key, images, step, **kwargs)

    def log_audio(self, key: str, audios: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self._guard("audio logging", super().log_audio, key, audios, step, **kwargs)

    def finalize(self, status: str) -> None:
        self._guard("finish", super().finalize, status)


def build_logger(cfg: DictConfig, run_dir: Path) -> Logger | bool:
    """The logger named by ``cfg.logger.kind`` writing under ``run_dir``; False for none."""
    kind = cfg.logger.kind
    if kind == "none":
        return False
    if kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="", version="csv")
    mode = wandb_mode(cfg.logger.mode)
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    logger = SafeWandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        name=cfg.run.name or run_dir.name,
        id=run_dir.name.replace(".", "-"),
        save_dir=str(run_dir),
        mode=mode,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    return logger
