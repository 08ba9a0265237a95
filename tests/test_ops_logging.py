"""Loggers: an offline W&B run holds the resolved config, the scalars against the step,
and the media; a W&B failure costs one warning, never the run; csv and none work too."""

from __future__ import annotations

import csv

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import soundfile
import torch
import wandb
from conftest import tiny_stage1

from lit_vqdiff.cli import main

pytestmark = pytest.mark.slow


def train_stage1(shapes_root: Path, runs: Path, *extra: str) -> Path:
    """A tiny stage-1 run through the CLI; returns its run folder."""
    assert main(["train", "stage1", *tiny_stage1(shapes_root, runs, *extra)]) == 0
    latest = runs / ("latest-stage1-audio" if "modality=audio" in extra else "latest-stage1")
    return latest.resolve()


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of the run's one offline .wandb log, read by wandb's own reader."""
    logs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs  # one W&B run per training run, made by rank 0
    reader = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(reader), "leet", "inspect", "--json", str(logs[0])], capture_output=True, text=True, check=True, timeout=60)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def steps_of(rows: list[dict], key: str) -> list[int]:
    return [row["trainer/global_step"] for row in rows if key in row]


def test_offline_wandb_run_holds_config_scalars_and_images(shapes_root, tmp_path):
    run_dir = train_stage1(shapes_root, tmp_path / "runs", "logger=wandb", "trainer.val_every_steps=15", "trainer.log_every_steps=10")
    records = wandb_records(run_dir)
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    assert config["optim"]["lr"] == 1.0e-3 and config["tokenizer"]["quantizer"]["codebook_size"] == 64
    assert config["logger"]["kind"] == "wandb" and config["stage"] == "stage1"
    assert next(r["run"]["run_id"] for r in records if r["type"] == "run") == (run_dir / "wandb-id.txt").read_text().strip()

    rows = history(records)
    # Lightning logs at global_step - 1: after 10, 20 and 30 optimizer steps.
    assert steps_of(rows, "train/loss") == [9, 19, 29]
    assert steps_of(rows, "val/psnr") == [14, 29]
    for image in ("val/reconstructions", "val/code_usage"):
        assert steps_of(rows, f"{image}._type") == [14, 29]  # filed with the validation they show
        assert all(row[f"{image}._type"] == "images/separated" for row in rows if f"{image}._type" in row)
    for step in (15, 30):
        assert (run_dir / "media" / "val_reconstructions" / f"step-{step:07d}.png").is_file()
        assert (run_dir / "media" / "val_code_usage" / f"step-{step:07d}.png").is_file()
    exits = [r for r in records if r["type"] == "exit"]
    assert len(exits) == 1 and exits[0]["exit"].get("exit_code", 0) == 0  # finished, not left open


def test_offline_wandb_run_holds_sounds_and_spectrograms(shapes_root, tmp_path):
    run_dir = train_stage1(shapes_root, tmp_path / "runs", "logger=wandb", "modality=audio", "tokenizer.channels=16",
                           "trainer.max_steps=4", "trainer.val_every_steps=4", "trainer.limit_val_batches=1")
    rows = history(wandb_records(run_dir))
    sounds = [row for row in rows if "val/reconstructions._type" in row]
    assert len(sounds) == 1 and sounds[0]["val/reconstructions._type"] == "audio" and sounds[0]["val/reconstructions.count"] == 8
    assert sounds[0]["val/reconstructions.sampleRates"] == [8000] * 8
    assert steps_of(rows, "val/reconstructions_spectrograms._type") == steps_of(rows, "val/si_snr") == [3]
    waves = sorted((run_dir / "media" / "val_reconstructions").glob("step-0000004-*.wav"))
    assert len(waves) == 8  # input, reconstruction x 4
    data, rate = soundfile.read(waves[0])
    assert rate == 8000 and data.shape == (8000,)


def boom(*args, **kwargs):
    raise ConnectionError("W&B server unreachable")


@pytest.mark.parametrize("failing", ["init", "log"])
def test_wandb_failure_warns_once_and_training_finishes(shapes_root, tmp_path, monkeypatch, failing):
    if failing == "init":
        monkeypatch.setattr(wandb, "init", boom)
    else:
        monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", boom)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_dir = train_stage1(shapes_root, tmp_path / "runs", "logger=wandb", "trainer.max_steps=6",
                               "trainer.val_every_steps=3", "trainer.log_every_steps=1")
    ours = [w for w in caught if "W&B" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    what = "start" if failing == "init" else "log"
    assert issubclass(ours[0].category, RuntimeWarning) and f"W&B {what} failed (ConnectionError" in str(ours[0].message)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 6
    assert wandb.run is None  # nothing left open for the next run in this process


@pytest.mark.parametrize("kind", ["csv", "none"])
def test_csv_and_none_loggers(shapes_root, tmp_path, kind):
    run_dir = train_stage1(shapes_root, tmp_path / "runs", f"logger={kind}", "trainer.max_steps=6",
                           "trainer.val_every_steps=3", "trainer.log_every_steps=2")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "wandb").exists()
    metrics = run_dir / "csv" / "metrics.csv"
    if kind == "none":
        assert not metrics.exists()
        return
    lines = metrics.read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [1, 3, 5]
    assert [int(r["step"]) for r in rows if r["val/psnr"]] == [2, 5]
    # Minutes since training began ride along with every validation: the time-to-quality curve.
    minutes = [float(r["time/minutes"]) for r in rows if r["time/minutes"]]
    assert len(minutes) == 2 and 0 < minutes[0] < minutes[1]
    first = json.loads((run_dir / "summary.json").read_text())["train_seconds"]

    # A resumed run's clock goes on from where the checkpoint left it, in the curve and the summary.
    assert main(["train", "stage1", f"run.dir={run_dir}", "trainer.max_steps=9"]) == 0
    resumed = run_dir / "csv-1" / "metrics.csv"  # each resumption logs into a folder of its own
    later = [float(r["time/minutes"]) for r in csv.DictReader(resumed.read_text().splitlines()) if r["time/minutes"]]
    assert len(later) == 1 and later[0] > minutes[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 9 and summary["train_seconds"] > first


def test_a_pipeline_shares_its_w_and_b_group_logs_tables_artifacts_lineage_and_the_evaluation(shapes_root, tmp_path):
    """Stage 2 starting its stage-1 run: both in one group with their job types, a table per
    validation, the tokenizer and checkpoints as artifacts, the tokenizer declared as input,
    the final evaluation in the summary."""
    from conftest import tiny_stage2

    runs = tmp_path / "runs"
    stage1_args = "[tokenizer.channels=16,tokenizer.num_res_blocks=1,trainer.max_steps=8,trainer.val_every_steps=8]"
    assert main(["train", "stage2", *tiny_stage2(shapes_root, runs, "logger=wandb", "tokenizers.train_if_missing=true",
                                                 f"tokenizers.stage1_args={stage1_args}", "logger.tags=[mine]")]) == 0
    first, second = (wandb_records((runs / name).resolve()) for name in ("latest-stage1", "latest-stage2"))
    runs_info = [next(r["run"] for r in records if r["type"] == "run") for records in (first, second)]
    assert runs_info[0]["run_group"] == runs_info[1]["run_group"] and runs_info[0]["run_group"].startswith("pipeline-shapes-v1")
    assert [info["job_type"] for info in runs_info] == ["tokenizer", "generator"]
    assert "mine" in runs_info[1]["tags"] and "text->image" in runs_info[1]["tags"]
    tables = [row for row in history(second) if row.get("val/table._type") == "table-file"]
    assert tables and tables[0]["val/table.ncols"] == 4  # condition, output, reference, exact_match
    artifacts = {r["artifact"]["name"]: r["artifact"]["type"] for records in (first, second) for r in records if r["type"] == "artifact"}
    assert artifacts[f"tokenizer-image-shapes-v1"] == "tokenizer"
    assert any(t == "model" and n.endswith("-best") for n, t in artifacts.items())
    config = {k: v for r in second if r["type"] == "config" for k, v in r["config"]["update"].items()}
    assert config["inputs"]["tokenizer"].startswith("tokenizer-image-shapes-v1:sha-")  # offline lineage
    summary = {k: v for r in second if r["type"] == "summary" for k, v in r["summary"]["update"].items()}
    assert "eval/tasks/text->image/exact_match" in summary and summary["best/metric"] == "val/exact_match"
