"""Experiment loggers: W&B (offline unless asked otherwise), CSV, or none.

A W&B problem (no network, a bad key, a full disk) must never stop a training run:
the logger warns once and carries on as a no-op. Lightning's WandbLogger already acts
on rank 0 only; the other ranks get a dummy experiment.
"""

from __future__ import annotations

import os
import secrets
import warnings
from pathlib import Path
from typing import Any, Mapping

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.logger import DummyExperiment
from omegaconf import DictConfig, OmegaConf

WANDB_ID_FILE = "wandb-id.txt"
CSV_VERSION = "csv"


def wandb_mode(configured: str) -> str:
    """WANDB_MODE in the environment wins over ``logger.mode`` (offline by default)."""
    return os.environ.get("WANDB_MODE") or configured


def in_sweep() -> bool:
    """True inside a process started by `wandb agent`: the agent owns the run id."""
    return bool(os.environ.get("WANDB_SWEEP_ID"))


def wandb_run_id(run_dir: Path) -> str:
    """The W&B id of a run folder: made once and kept in the folder, so that a resumed
    run continues its W&B run, and two folders of the same name never share one."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = f"{Path(run_dir).name.replace('.', '-')}-{secrets.token_hex(3)}"
    path.write_text(run_id + "\n")
    return run_id


def csv_version(run_dir: Path) -> str:
    """`csv` for a new run, `csv-1`, `csv-2`, ... for each resumption: Lightning's CSV
    writer deletes the metrics file of a folder it reopens."""
    version, n = CSV_VERSION, 0
    while (Path(run_dir) / version / "metrics.csv").exists():
        n += 1
        version = f"{CSV_VERSION}-{n}"
    return version


class SafeWandbLogger(WandbLogger):
    """WandbLogger whose failures become one warning, never an exception."""

    _failed = False
    _closed = False

    def _warn(self, what: str, err: BaseException) -> None:
        if not self._failed:
            warnings.warn(f"W&B {what} failed ({type(err).__name__}: {err}); training continues without W&B", RuntimeWarning, stacklevel=3)
        self._failed = True

    @property
    def experiment(self) -> Any:  # type: ignore[override]
        if self._failed or self._closed:
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
        # The resolved config went to wandb.init already; the module's copy of it would
        # only repeat it under a `config` key.
        params = {k: v for k, v in dict(params).items() if k != "config"}
        if params:
            self._guard("config logging", super().log_hyperparams, params)

    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self._guard("image logging", super().log_image, key, images, step, **kwargs)

    def log_audio(self, key: str, audios: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self._guard("audio logging", super().log_audio, key, audios, step, **kwargs)

    def log_text(self, key: str, columns: list[str] | None = None, data: list[list[Any]] | None = None, **kwargs: Any) -> None:
        self._guard("text logging", super().log_text, key, columns, data, **kwargs)

    def finalize(self, status: str) -> None:
        self._guard("finish", super().finalize, status)
        self.close(0 if status == "success" else 1)

    def close(self, exit_code: int = 0) -> None:
        """Finish this process's W&B run (writes its summary); a later run in the same
        process would otherwise be attached to this one."""
        run, self._experiment, self._closed = self._experiment, None, True
        if run is None or isinstance(run, DummyExperiment) or not hasattr(run, "finish"):
            return
        if getattr(self, "_attach_id", None) is not None:
            return  # a ddp_spawn rank attached to the run of the launching process, which finishes it
        try:
            run.finish(exit_code=exit_code)
        except Exception as err:  # noqa: BLE001
            self._warn("finish", err)


def build_logger(cfg: DictConfig, run_dir: Path) -> Logger | bool:
    """The logger named by ``cfg.logger.kind`` writing under ``run_dir``; False for none."""
    kind = cfg.logger.kind
    if kind == "none":
        return False
    if kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="", version=csv_version(run_dir))
    return SafeWandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        name=cfg.run.name or run_dir.name,
        # Under `wandb agent` the agent's run id (WANDB_RUN_ID) must stand, or the sweep
        # never sees its run's metrics.
        id=None if in_sweep() or rank_zero_only.rank != 0 else wandb_run_id(run_dir),
        save_dir=str(run_dir),
        mode=wandb_mode(cfg.logger.mode),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
