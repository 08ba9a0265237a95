"""Preemption and resume with real training processes: SIGTERM/SIGUSR1 save and exit 0 with
one line; a run killed with SIGKILL and resumed from its last.ckpt ends with the same
weights, optimizer, codebook (restart rings included), EMA and metrics as an uninterrupted
one; a truncated last.ckpt falls back to the previous checkpoint. test_faults.py has the
rest of the ways runs are stopped."""

from __future__ import annotations

import csv
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_stage1, tiny_stage2

from lit_vqdiff.callbacks import LastCheckpoint
from lit_vqdiff.cli import main
from lit_vqdiff.config import load_config
from lit_vqdiff.training import build_trainer

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).with_name("lit-vqdiff"))
# Deterministic, checkpoints every 8 steps and never by the clock, an epoch boundary at step 32.
EXACT = ("trainer.deterministic=true", "trainer.max_steps=40", "trainer.val_every_steps=20", "trainer.log_every_steps=4",
         "trainer.checkpoint_every_steps=8", "trainer.checkpoint_every_minutes=0")


def start(stage: str, overrides: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # the child keeps its own descriptor
        return subprocess.Popen([CLI, "train", stage, *overrides], stdout=out, stderr=subprocess.STDOUT)


def per_run_root(overrides: list[str]) -> list[str]:
    """Overrides without run.root: each process of a test gets its own."""
    return [o for o in overrides if not o.startswith("run.root=")]


def only_run_dir(runs: Path) -> Path:
    found = [p for p in runs.iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(found) == 1, found
    return found[0]


def wait_for_checkpoint(runs: Path, proc: subprocess.Popen, timeout: float = 120.0) -> Path:
    """The run's last.ckpt as soon as it exists; fails if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(runs.glob("*/checkpoints/last.ckpt"))
        if found:
            return found[0]
        assert proc.poll() is None, f"training ended (status {proc.returncode}) before its first checkpoint"
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint under {runs} after {timeout} s")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=0, atol=1e-6), f"{what}: {key}"


def assert_same_optimizer(a: dict, b: dict) -> None:
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys() and sa
    for index in sa:
        assert_same_tensors(sa[index], sb[index], f"optimizer state {index}")


def metric_rows(run_dir: Path, version: str) -> dict[int, float]:
    """train/loss by logged step from one CSV logger folder."""
    with (run_dir / version / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]}


def kill_and_resume(stage: str, overrides: list[str], tmp_path: Path) -> tuple[dict, dict, dict, Path, Path]:
    """An uninterrupted run and one killed with SIGKILL after its first checkpoint, then
    resumed; both start together (two cores). Returns the final checkpoints, the one the
    killed run left, and both run folders."""
    reference_runs, victim_runs = tmp_path / "reference", tmp_path / "victim"
    reference = start(stage, [f"run.root={reference_runs}", *overrides], tmp_path / "reference.log")
    victim = start(stage, [f"run.root={victim_runs}", *overrides], tmp_path / "victim.log")
    ckpt = wait_for_checkpoint(victim_runs, victim)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL  # killed mid-run, not finished
    left = load(ckpt)
    assert 0 < left["global_step"] < 40

    run_dir = only_run_dir(victim_runs)
    resumed = subprocess.run([CLI, "train", stage, f"run.dir={run_dir}"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    reference_dir = only_run_dir(reference_runs)
    return load(reference_dir / "checkpoints" / "last.ckpt"), load(run_dir / "checkpoints" / "last.ckpt"), left, reference_dir, run_dir


def assert_metrics_continue(reference_dir: Path, run_dir: Path, killed_at: int) -> None:
    """The resumed run logs the steps after the checkpoint, with the reference's losses."""
    reference = metric_rows(reference_dir, "csv")
    resumed = metric_rows(run_dir, "csv-1")  # the first attempt's csv folder is kept
    assert sorted(resumed) == [s for s in sorted(reference) if s >= killed_at]
    assert all(abs(resumed[s] - reference[s]) <= 1e-6 for s in resumed)
    assert metric_rows(run_dir, "csv")  # and the killed attempt's rows are still there


def test_killed_stage1_resumes_exactly(shapes_root, tmp_path):
    # Dead codes restart every few steps: they draw from each rank's ring of recent vectors,
    # which the checkpoint must carry for the resumed run to draw the same ones.
    overrides = per_run_root(tiny_stage1(shapes_root, tmp_path, *EXACT, "tokenizer.quantizer.dead_after=3"))
    final_ref, final, left, reference_dir, run_dir = kill_and_resume("stage1", overrides, tmp_path)
    # what the killed run left: mid-epoch loop position, optimizer moments, codebook, stream
    # (random draws need no state: StepSeed derives them from the step)
    assert left["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == left["global_step"]
    assert left["optimizer_states"][0]["state"]
    assert any("quantizer" in k for k in left["state_dict"])
    assert left["ShardDataModule"]["train"][0]["consumed"] == [left["global_step"]]  # batches into epoch 0

    assert final["global_step"] == final_ref["global_step"] == 40
    assert_same_tensors(final["state_dict"], final_ref["state_dict"], "weights and codebook buffers")
    assert_same_optimizer(final, final_ref)
    assert final["ShardDataModule"] == final_ref["ShardDataModule"]
    (ring, count), = final["quantizer_rings"][0]
    (ring_ref, count_ref), = final_ref["quantizer_rings"][0]
    assert count == count_ref and torch.equal(ring, ring_ref)
    assert int(final["state_dict"]["tokenizer.quantizer.restarts"]) > 0
    assert_metrics_continue(reference_dir, run_dir, killed_at=left["global_step"])


@pytest.fixture(scope="module")
def tokenizer_runs(shapes_root, tmp_path_factory) -> Path:
    """A barely trained image tokenizer and its token cache, built before two processes
    start at once (each would otherwise build the same cache)."""
    runs = tmp_path_factory.mktemp("resume-tokenizer")
    assert main(["train", "stage1", *tiny_stage1(shapes_root, runs, "trainer.max_steps=2", "trainer.val_every_steps=2")]) == 0
    assert main(["tokenize", *tiny_stage2(shapes_root, runs, f"tokenizers.image={runs}/latest-stage1")]) == 0
    return runs


def test_killed_stage2_resumes_exactly_with_its_ema(shapes_root, tmp_path, tokenizer_runs):
    overrides = per_run_root(tiny_stage2(shapes_root, tmp_path, *EXACT, "generator.width=32", "sampling.n=0",
                                         f"tokenizers.image={tokenizer_runs}/latest-stage1"))
    final_ref, final, left, reference_dir, run_dir = kill_and_resume("stage2", overrides, tmp_path)
    assert "current_model_state" in left and left["averaging_state"]["n_averaged"] == left["global_step"]
    assert final["global_step"] == 40
    assert_same_tensors(final["state_dict"], final_ref["state_dict"], "EMA weights")
    assert_same_tensors(final["current_model_state"], final_ref["current_model_state"], "weights")
    assert int(final["averaging_state"]["n_averaged"]) == int(final_ref["averaging_state"]["n_averaged"]) == 40
    assert_same_optimizer(final, final_ref)
    assert_metrics_continue(reference_dir, run_dir, killed_at=left["global_step"])


def test_last_checkpoint_refreshes_every_two_minutes_by_default(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("lit_vqdiff.callbacks.time.monotonic", lambda: clock[0])
    cfg = load_config("stage1", ["logger=none"])
    saver = next(c for c in build_trainer(cfg, tmp_path).callbacks if isinstance(c, LastCheckpoint))
    step = SimpleNamespace(global_step=7)
    clock[0] += 119.0
    assert not saver._due(step)
    clock[0] += 1.0
    assert saver._due(step)
    by_steps = LastCheckpoint(tmp_path / "x.ckpt", every_minutes=0, every_steps=8)
    assert [s for s in range(1, 30) if by_steps._due(SimpleNamespace(global_step=s))] == [8, 16, 24]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(shapes_root, tmp_path, signum):
    runs = tmp_path / "runs"
    overrides = tiny_stage1(shapes_root, runs, "trainer.max_steps=100000", "trainer.val_every_steps=100000",
                            "trainer.checkpoint_every_steps=5", "trainer.checkpoint_every_minutes=0")
    log = tmp_path / "train.log"
    proc = start("stage1", overrides, log)
    wait_for_checkpoint(runs, proc)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == 0
    out = log.read_text()
    said = re.findall(rf"^lit-vqdiff: stopped by {signum.name} at step (\d+): saved (\S+); resume with `(.+)`$", out, re.M)
    assert len(said) == 1, out[-2000:]  # one line says it all
    step, path, command = said[0]
    run_dir = only_run_dir(runs)
    ckpt = load(run_dir / "checkpoints" / "last.ckpt")
    assert Path(path) == run_dir / "checkpoints" / "last.ckpt"
    assert ckpt["global_step"] == int(step) >= 5
    assert command == f"lit-vqdiff train stage1 run.dir={run_dir}"
    assert "Traceback" not in out
    # a preempted run is not finished: no tokenizer export, no latest link
    assert not (run_dir / "tokenizer.pt").exists() and not (runs / "latest-stage1").exists()


def test_truncated_checkpoint_falls_back_to_the_previous_one(shapes_root, tmp_path):
    runs = tmp_path / "runs"
    first = tiny_stage1(shapes_root, runs, "trainer.max_steps=12", "trainer.val_every_steps=12", "trainer.log_every_steps=1",
                        "trainer.checkpoint_every_steps=5", "trainer.checkpoint_every_minutes=0")
    assert main(["train", "stage1", *first]) == 0
    run_dir = (runs / "latest-stage1").resolve()
    last = run_dir / "checkpoints" / "last.ckpt"
    previous = last.with_name("last.ckpt.prev")
    assert load(last)["global_step"] == 12 and load(previous)["global_step"] == 10
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])

    with pytest.warns(RuntimeWarning) as caught:
        assert main(["train", "stage1", f"run.dir={run_dir}", "trainer.max_steps=16"]) == 0
    messages = [str(w.message) for w in caught]
    assert any(f"checkpoint {last} is damaged or truncated" in m for m in messages), messages
    assert any(f"resuming from the previous checkpoint {previous}" in m for m in messages), messages
    assert min(metric_rows(run_dir, "csv-1")) == 10  # trained on from step 10, not 12 or 0
    assert load(last)["global_step"] == 16
