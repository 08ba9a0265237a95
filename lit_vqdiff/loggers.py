"""Experiment loggers: W&B (offline unless asked otherwise), CSV, or none.

A W&B problem (no network, a bad key, a full disk) must never stop a training run:
the logger warns once and carries on as a no-op. Lightning's WandbLogger already acts
on rank 0 only; the other ranks get a dummy experiment.
"""

from __future__ import annotations

import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
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
    """`csv` for a new run, `csv-1`, `csv-2`, ... for each resumption: a folder of its own,
    as Lightning's CSV writer deletes the metrics of a folder it reopens (and warns about
    one a run stopped in before its first flush)."""
    version, n = CSV_VERSION, 0
    while (Path(run_dir) / version).exists():
        n += 1
        version = f"{CSV_VERSION}-{n}"
    return version


class SafeWandbLogger(WandbLogger):
    """WandbLogger whose failures become one warning, never an exception. With ``keep_open``
    the run outlives the fit, for what the pipeline logs after it (artifacts, the final
    evaluation); ``close`` ends it."""

    _failed = False
    _closed = False
    keep_open = False

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

    def log_table(self, key: str, columns: list[str] | None = None, data: list[list[Any]] | None = None, **kwargs: Any) -> None:
        self._guard("table logging", super().log_table, key, columns, data, **kwargs)

    def log_files_artifact(self, name: str, kind: str, files: list[Path], metadata: dict[str, Any], aliases: list[str]) -> None:
        def log() -> None:
            import wandb  # imported when a W&B logger logs: importing it costs a second

            artifact = wandb.Artifact(name, type=kind, metadata=metadata)
            for path in files:
                artifact.add_file(str(path), name=Path(path).name)
            self.experiment.log_artifact(artifact, aliases=aliases)

        self._guard("artifact logging", log)

    def use_input(self, name: str, alias: str, kind: str) -> None:
        def use() -> None:
            run = self.experiment
            if getattr(run.settings, "_offline", False) or run.settings.mode == "offline":
                run.config.update({"inputs": {kind: f"{name}:{alias}"}}, allow_val_change=True)
            else:
                run.use_artifact(f"{name}:{alias}", type=kind)

        self._guard("artifact lineage", use)

    def update_summary(self, figures: dict[str, Any]) -> None:
        self._guard("summary", lambda: self.experiment.summary.update(figures))

    def finalize(self, status: str) -> None:
        self._guard("finish", super().finalize, status)
        if not (self.keep_open and status == "success"):
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
        group=cfg.logger.group or run_dir.name,
        job_type=JOB_TYPES[cfg.stage],
        tags=run_tags(cfg),
    )


JOB_TYPES = {"stage1": "tokenizer", "stage2": "generator"}


def run_tags(cfg: DictConfig) -> list[str]:
    """``logger.tags`` plus what a reader filters by: the stage, its modality or task, the data set."""
    what = cfg.modality if cfg.stage == "stage1" else cfg.task
    return list(dict.fromkeys([*cfg.logger.tags, cfg.stage, str(what), str(cfg.data.name)]))


def wandb_loggers(trainer: Any) -> list[SafeWandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, SafeWandbLogger)]


def close_loggers(trainer: Any) -> None:
    """Finish this process's W&B runs of a fit (their summary is written then)."""
    for logger in wandb_loggers(trainer):
        logger.close()


def artifact_name(kind: str, *parts: str) -> str:
    """A W&B artifact name of letters, digits, dashes, dots and underscores."""
    return "-".join([kind, *(re.sub(r"[^A-Za-z0-9._-]+", "-", p).strip("-") for p in parts)])


def log_artifact(trainer: Any, name: str, kind: str, files: list[Path], metadata: dict[str, Any] | None = None,
                 aliases: list[str] | None = None) -> None:
    """Log files as a W&B artifact of the fit's run (offline too: `wandb sync` uploads it)."""
    for logger in wandb_loggers(trainer):
        logger.log_files_artifact(name, kind, files, metadata or {}, aliases or [])


def declare_input(trainer: Any, name: str, alias: str, kind: str) -> None:
    """Lineage: the run used artifact ``name:alias``. W&B links inputs only online; offline
    the run's config records it (``inputs``), and the name finds it after `wandb sync`."""
    for logger in wandb_loggers(trainer):
        logger.use_input(name, alias, kind)


def log_summary(trainer: Any, figures: dict[str, Any], prefix: str = "") -> None:
    """Final figures into the runs' W&B summaries, flattened to ``a/b/c`` keys."""
    for logger in wandb_loggers(trainer):
        logger.update_summary(flatten(figures, prefix))


def flatten(figures: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of ``a/b`` keys; numbers, strings and bools only."""
    out: dict[str, Any] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, f"{name}/")
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
    return out


def wandb_rows(table: dict[str, Any]) -> list[list[Any]]:
    """Table rows with pictures and sounds as W&B media objects."""
    import wandb  # imported when a W&B logger logs: importing it costs a second

    def cell(kind: str, value: Any) -> Any:
        if value is None:
            return None
        if kind == "image":
            return wandb.Image(np.asarray(value))
        if kind == "audio":
            return wandb.Audio(np.asarray(value, dtype=np.float32), sample_rate=table["sample_rate"])
        return value

    return [[cell(kind, value) for kind, value in zip(table["kinds"], row)] for row in table["rows"]]
