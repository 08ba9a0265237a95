"""Fault injection: the ways clusters and users break runs, each with the outcome a user
expects, no corrupt checkpoint, and (where the fault allows it) a resumed run that ends
with the same weights as an uninterrupted one.

- One stage-1 run under a simulated SLURM job (so every restart is the same command, as a
  requeue is) is stopped five times: SIGTERM to its process group during training (the
  default W&B logger's service process included), Ctrl-C
  (SIGINT to the group) during validation, a DataLoader worker killed with SIGKILL,
  SIGUSR1 to the trainer alone (SLURM's warning: the job requeues itself through a fake
  `scontrol`), and a `timeout` expiring; the sixth start finishes it, equal to a run
  that was never stopped.
- Stage 2 is stopped while it builds its token cache and while it samples; a rerun
  finishes what was left, and a stop during the final evaluation is clean too.
- The disk fills up while a checkpoint is written (a small tmpfs, or a patched writer).
- A shard disappears or is truncated mid-epoch; NaN batches arrive at random steps.
- A rank waiting for what rank 0 builds learns of rank 0's failure at once.
"""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_stage1, tiny_stage2
from test_ops_resume import load

from lit_vqdiff import callbacks as callbacks_module
from lit_vqdiff import pipeline
from lit_vqdiff.cli import main
from lit_vqdiff.data.prepare import failure_marker, reported_to_waiters, wait_for_rank_zero
from lit_vqdiff.errors import RankZeroFailed
from lit_vqdiff.eval.evaluate import MANIFEST
from lit_vqdiff.stages.tokenizer import TokenizerModule

pytestmark = [
    pytest.mark.slow,
    # Lightning's note on a skipped step (training_step returned None), which NaN batches cause on purpose
    pytest.mark.filterwarnings("ignore:`training_step` returned `None`:UserWarning"),
]

CLI = str(Path(sys.executable).with_name("lit-vqdiff"))
STEPS = 24
# Two loader workers (so there are worker processes to signal and kill), validation at
# steps 12 and 24 (step 12 is not a checkpoint step: the save before validation covers it),
# restarts of dead codes every few steps (their rings must survive every resume).
FAULTY = ("data.num_workers=2", "data.val_batch_size=4", "trainer.deterministic=true", f"trainer.max_steps={STEPS}",
          "trainer.val_every_steps=12", "trainer.checkpoint_every_steps=5", "trainer.checkpoint_every_minutes=0",
          "trainer.log_every_steps=1", "tokenizer.quantizer.dead_after=3")
SLURM_JOB = "4242"


def stage1_overrides(root: Path) -> list[str]:
    return [o for o in tiny_stage1(root, root, *FAULTY) if not o.startswith("run.root=")]


def launch(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A command in a session of its own, so that os.killpg reaches it and its workers only."""
    with log.open("w") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_until(proc: subprocess.Popen, log: Path, ready, what: str, timeout: float = 180.0) -> None:
    """Poll ``ready()`` every few milliseconds; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)
    raise AssertionError(f"no {what} after {timeout} s:\n{log.read_text()[-3000:]}")


def reached_step(log: Path, step: int):
    """True once the run's progress lines (one per step) report ``step``."""
    pattern = re.compile(rf"^step {step}/", re.M)
    return lambda: bool(pattern.search(log.read_text()))


def finished(proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> tuple[int, str]:
    code = proc.wait(timeout=timeout)
    return code, log.read_text()


def the_line(out: str, pattern: str) -> re.Match:
    """The one `lit-vqdiff: ...` line of a run's output, matched against ``pattern``."""
    lines = [line for line in out.splitlines() if line.startswith("lit-vqdiff: ")]
    assert len(lines) == 1, out[-3000:]
    found = re.fullmatch(pattern, lines[0])
    assert found, lines[0]
    return found


def assert_clean(out: str) -> None:
    assert "Traceback" not in out and "exited unexpectedly" not in out and "killed by signal" not in out, out[-3000:]


def worker_pids(pid: int) -> list[int]:
    """The child processes of ``pid`` (its DataLoader workers)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # a thread (a queue feeder) that ended meanwhile
            pass
    return children


def checkpoint_step(path: Path) -> int:
    return int(load(path)["global_step"])


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys() and a, what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key}"


def assert_same_run(final: dict, reference: dict) -> None:
    """Bit-exact continuation: weights, codebook buffers, optimizer, data stream and restart rings."""
    assert final["global_step"] == reference["global_step"]
    assert_identical(final["state_dict"], reference["state_dict"], "weights and codebook buffers")
    moments, reference_moments = final["optimizer_states"][0]["state"], reference["optimizer_states"][0]["state"]
    assert moments.keys() == reference_moments.keys()
    for index in moments:
        assert_identical(moments[index], reference_moments[index], f"optimizer state {index}")
    assert final["ShardDataModule"] == reference["ShardDataModule"]
    for (ring, count), (ref_ring, ref_count) in zip(final["quantizer_rings"][0], reference["quantizer_rings"][0]):
        assert count == ref_count and torch.equal(ring, ref_ring)


@pytest.fixture(scope="module")
def reference_run(shapes_root, tmp_path_factory):
    """The uninterrupted stage-1 run, started at once in the background; call to get its last.ckpt."""
    root = tmp_path_factory.mktemp("reference")
    log = root / "reference.log"
    proc = launch([CLI, "train", "stage1", f"run.root={root}/runs", *stage1_overrides(shapes_root)], log)

    def result() -> dict:
        code, out = finished(proc, log, timeout=300)
        assert code == 0, out[-3000:]
        return load((root / "runs" / "latest-stage1").resolve() / "checkpoints" / "last.ckpt")

    yield result
    if proc.poll() is None:
        proc.kill()


def slurm_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment of a one-task SLURM job, and where a fake `scontrol` records its calls."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID=SLURM_JOB, SLURM_JOB_NAME="faults",
               SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="1", SLURM_PROCID="0", SLURM_LOCALID="0",
               SLURM_NODEID="0", SLURM_NODELIST="localhost")
    return env, calls


def test_a_slurm_job_stopped_five_ways_resumes_exactly(shapes_root, tmp_path, reference_run):
    env, calls = slurm_env(tmp_path)
    runs = tmp_path / "runs"
    command = [CLI, "train", "stage1", f"run.root={runs}", *stage1_overrides(shapes_root)]
    run_dir = runs / f"stage1-job{SLURM_JOB}"  # every start of the job finds it (runs.resolve_run)
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = rf"resume with `lit-vqdiff train stage1 run\.dir={re.escape(str(run_dir))}`"
    logs = iter(tmp_path / f"attempt{n}.log" for n in range(1, 10))

    # 1. SIGTERM to the whole process group mid-training (`scancel`, a pod stop): workers
    #    included, and W&B's service process (the default logger, offline here).
    log = next(logs)
    proc = launch([("logger=wandb" if a == "logger=csv" else a) for a in command], log, env)
    wait_until(proc, log, reached_step(log, 3), "step 3")
    os.killpg(proc.pid, signal.SIGTERM)
    code, out = finished(proc, log)
    assert code == 0, out[-3000:]
    said = the_line(out, rf"lit-vqdiff: stopped by SIGTERM at step (\d+): saved {re.escape(str(last))}; {resume}")
    assert_clean(out)
    assert checkpoint_step(last) == int(said.group(1)) >= 3
    assert not calls.exists()  # SIGTERM does not requeue: the scheduler decides

    # 2. Ctrl-C in a terminal (SIGINT to the foreground group) while validation runs: the
    #    save that starts validation at step 12 (not a checkpoint step) is the cue.
    log = next(logs)
    proc = launch(command, log, env)
    wait_until(proc, log, reached_step(log, 11), "step 11")
    saved_at_10 = last.stat().st_ino
    wait_until(proc, log, lambda: last.stat().st_ino != saved_at_10, "the save before validation")
    os.killpg(proc.pid, signal.SIGINT)
    code, out = finished(proc, log)
    assert code == 130, out[-3000:]
    the_line(out, rf"lit-vqdiff: stopped by SIGINT during validation at step 12: {re.escape(str(last))} holds step 12; {resume}")
    assert_clean(out)
    assert not re.search(r"^validation at step 12:", out, re.M)  # the interrupted validation is not reported
    assert checkpoint_step(last) == 12

    # 3. A DataLoader worker killed (the OOM killer's favourite): the run fails with one line;
    #    the checkpoint from before is intact.
    log = next(logs)
    proc = launch(command, log, env)
    wait_until(proc, log, reached_step(log, 14), "step 14")
    os.kill(worker_pids(proc.pid)[0], signal.SIGKILL)
    code, out = finished(proc, log)
    assert code == 1, out[-3000:]
    the_line(out, rf"lit-vqdiff: error: training stopped at step \d+: a data loader worker died \(.*\); "
                  rf"{re.escape(str(last))} holds step 12; {resume}")
    assert "Traceback" not in out and checkpoint_step(last) == 12

    # 4. SIGUSR1 to the trainer alone (sbatch --signal=USR1@90): save, then `scontrol requeue`.
    log = next(logs)
    proc = launch(command, log, env)
    wait_until(proc, log, reached_step(log, 14), "step 14")
    proc.send_signal(signal.SIGUSR1)
    code, out = finished(proc, log)
    assert code == 0, out[-3000:]
    said = the_line(out, rf"lit-vqdiff: stopped by SIGUSR1 at step (\d+): saved {re.escape(str(last))}; {resume}; "
                         rf"requeued SLURM job {SLURM_JOB}: it resumes from there")
    assert_clean(out)
    assert calls.read_text() == f"requeue {SLURM_JOB}\n"
    assert checkpoint_step(last) == int(said.group(1)) >= 14
    assert not list(run_dir.glob("hpc_ckpt*"))  # Lightning's own SLURM requeue stays out of it

    # 5. `timeout` expiring: it sends SIGTERM to the run and then to its own process group.
    log = next(logs)
    resumed_at = checkpoint_step(last)
    proc = launch(["timeout", "600", *command], log, env)
    wait_until(proc, log, reached_step(log, resumed_at + 2), f"step {resumed_at + 2}")
    proc.send_signal(signal.SIGALRM)  # what timeout's own timer delivers when it runs out
    code, out = finished(proc, log)
    assert code == 124, out[-3000:]  # timeout's status; the run's own was 0
    said = the_line(out, rf"lit-vqdiff: stopped by SIGTERM at step (\d+): saved {re.escape(str(last))}; {resume}")
    assert_clean(out)
    assert checkpoint_step(last) == int(said.group(1)) < STEPS

    # 6. The job's next start finishes it: the same weights as a run never stopped.
    log = next(logs)
    proc = launch(command, log, env)
    code, out = finished(proc, log)
    assert code == 0, out[-3000:]
    assert_clean(out)
    assert (run_dir / "tokenizer.pt").exists()
    final = load(last)
    assert final["global_step"] == STEPS
    assert_same_run(final, reference_run())
    assert calls.read_text() == f"requeue {SLURM_JOB}\n"  # requeued once, by the SIGUSR1


# ----------------------------------------------------------------------------- disk full


# In-process runs: no loader workers, a small shuffle buffer (so that shards are opened
# as the epoch goes, not all at its start), a checkpoint every 4 steps.
IN_PROCESS = ("trainer.deterministic=true", "trainer.max_steps=16", "trainer.val_every_steps=16", "data.shuffle_buffer=16",
              "trainer.checkpoint_every_steps=4", "trainer.checkpoint_every_minutes=0", "trainer.log_every_steps=1")


def fit_once(shapes_root: Path, runs: Path, *extra: str) -> int:
    """A tiny in-process stage-1 run (``IN_PROCESS``) with the CLI's exit status."""
    return main(["train", "stage1", *tiny_stage1(shapes_root, runs, *IN_PROCESS, *extra)])


def resume(run_dir: Path) -> int:
    """The run in ``run_dir`` resumed in-process, as `lit-vqdiff train stage1 run.dir=...`."""
    return main(["train", "stage1", f"run.dir={run_dir}"])


@pytest.fixture(scope="module")
def in_process_reference(shapes_root, tmp_path_factory) -> dict:
    runs = tmp_path_factory.mktemp("in-process-reference")
    assert fit_once(shapes_root, runs) == 0
    return load((runs / "latest-stage1").resolve() / "checkpoints" / "last.ckpt")


def mounted_tmpfs(where: Path, size: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize("disk", ["tmpfs", "patched"])
def test_a_full_disk_while_checkpointing_stops_cleanly_and_resumes(shapes_root, tmp_path, monkeypatch, capsys,
                                                                   in_process_reference, disk):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    if disk == "tmpfs":
        # Room for two checkpoints (last.ckpt and last.ckpt.prev) and a bit: the third save fills it.
        if not mounted_tmpfs(checkpoints, int(2.5 * 1_100_000)):
            pytest.skip("cannot mount a tmpfs here (needs root); the patched writer covers the same path")
    else:
        real_save, saves = torch.save, []

        def save_until_full(obj, f, *args, **kwargs):
            saves.append(1)
            if len(saves) == 3:
                f.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(callbacks_module.torch, "save", save_until_full)
    try:
        assert fit_once(shapes_root, tmp_path / "runs", f"run.dir={run_dir}") == 1
        err = capsys.readouterr().err
        last = checkpoints / "last.ckpt"
        said = re.search(rf"lit-vqdiff: error: could not write {re.escape(str(last))} at step 12 \(OSError: \[Errno 28\] "
                         rf"No space left on device\); {re.escape(str(last))} holds step 8; make room, then resume with "
                         rf"`lit-vqdiff train stage1 run\.dir={re.escape(str(run_dir))}`", err)
        assert said, err[-3000:]
        assert "Traceback" not in err
        assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "last.ckpt.prev"]  # no temporary left
        assert checkpoint_step(last) == 8 and checkpoint_step(last.with_name("last.ckpt.prev")) == 4
        if disk == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=64m", str(checkpoints)], check=True)  # room made
        else:
            monkeypatch.setattr(callbacks_module.torch, "save", real_save)
        assert resume(run_dir) == 0
        assert_same_run(load(last), in_process_reference)
    finally:
        if disk == "tmpfs":
            subprocess.run(["umount", str(checkpoints)], capture_output=True)


def test_ctrl_c_twice_stops_at_once_and_leaves_the_last_checkpoint_whole(shapes_root, tmp_path, monkeypatch, capsys):
    original = TokenizerModule.training_step

    def impatient(self, batch, batch_idx):
        if self.global_step == 6:
            os.kill(os.getpid(), signal.SIGINT)  # stop after this step, please...
            os.kill(os.getpid(), signal.SIGINT)  # ...no, now
        return original(self, batch, batch_idx)

    monkeypatch.setattr(TokenizerModule, "training_step", impatient)
    run_dir = tmp_path / "run"
    assert fit_once(shapes_root, tmp_path / "runs", f"run.dir={run_dir}") == 130
    last = run_dir / "checkpoints" / "last.ckpt"
    err = capsys.readouterr().err
    assert re.search(rf"^lit-vqdiff: stopped by a second SIGINT at step 6: {re.escape(str(last))} holds step 4; resume with "
                     rf"`lit-vqdiff train stage1 run\.dir={re.escape(str(run_dir))}`$", err, re.M), err[-3000:]
    assert checkpoint_step(last) == 4 and [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # nothing half-written


# ----------------------------------------------------------------------------- bad data


def break_at_step(monkeypatch: pytest.MonkeyPatch, step: int, action) -> None:
    """Run ``action`` once, just before training step ``step``."""
    original, done = TokenizerModule.training_step, []

    def patched(self, batch, batch_idx):
        if self.global_step == step and not done:
            done.append(action())
        return original(self, batch, batch_idx)

    monkeypatch.setattr(TokenizerModule, "training_step", patched)


def own_shapes(shapes_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the shared shards, and its second train shard in epoch 0's order: read mid-epoch."""
    from lit_vqdiff.data.stream import epoch_order

    root = tmp_path / "shapes-v1"
    shutil.copytree(shapes_root, root, ignore=shutil.ignore_patterns("tokens", ".*"))
    shards = sorted(root.glob("train-*.tar"))
    return root, shards[epoch_order(len(shards), 0, 0)[1]]


def skip_counts(run_dir: Path, reason: str) -> list[float]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [float(r[f"data/skipped_{reason}"]) for r in csv.DictReader(f) if r.get(f"data/skipped_{reason}")]


def test_a_shard_truncated_mid_epoch_is_counted_and_the_run_goes_on(shapes_root, tmp_path, monkeypatch, caplog):
    root, shard = own_shapes(shapes_root, tmp_path)
    break_at_step(monkeypatch, 2, lambda: shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2]))
    run_dir = tmp_path / "run"
    assert fit_once(root, tmp_path / "runs", f"run.dir={run_dir}", "data.max_skip_fraction=0.5") == 0
    counts = skip_counts(run_dir, "truncated")
    assert counts[0] == 0 and counts[-1] > 0 and counts == sorted(counts)  # counted from when the cut is read
    assert any(f"skipped a sample (truncated) in {shard.name}" in r.getMessage() for r in caplog.records)
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 16


def test_a_shard_that_disappears_mid_epoch_stops_the_run_then_it_resumes_exactly(shapes_root, tmp_path, monkeypatch, capsys,
                                                                                 in_process_reference):
    root, shard = own_shapes(shapes_root, tmp_path)
    kept = tmp_path / shard.name
    break_at_step(monkeypatch, 2, lambda: shard.rename(kept))
    run_dir = tmp_path / "run"
    # No skip allowed: the run stops at the first batch that lacks a sample, before any
    # replacement is trained on, so that its resumption can match the reference exactly.
    assert fit_once(root, tmp_path / "runs", f"run.dir={run_dir}", "data.max_skip_fraction=0") == 1
    err = capsys.readouterr().err
    last = run_dir / "checkpoints" / "last.ckpt"
    said = re.search(rf"^lit-vqdiff: error: train: \d+ of the 512 samples of epoch 0 on rank 0 were skipped, more than "
                     rf"data\.max_skip_fraction=0\.0 allows \(0\); worst shards: {shard.name} \(unreadable \d+\); "
                     rf"{re.escape(str(last))} holds step (\d+); repair or leave out those shards .*, then resume with "
                     rf"`lit-vqdiff train stage1 run\.dir={re.escape(str(run_dir))}`$", err, re.M)
    assert said, err[-3000:]
    assert checkpoint_step(last) == int(said.group(1)) > 0
    kept.rename(shard)  # the shard is back (a storage hiccup)
    monkeypatch.undo()
    assert resume(run_dir) == 0
    assert_same_run(load(last), in_process_reference)


def test_nan_batches_at_random_steps_are_skipped_and_leave_the_codebook_alone(shapes_root, tmp_path, monkeypatch):
    bad = set(random.Random(15).sample(range(16), 3)) | {0}  # step 0 too: the k-means initialization
    original = TokenizerModule.training_step
    changed: dict[int, bool] = {}

    def poisoned(self, batch, batch_idx):
        step = self.global_step
        if step in bad:
            batch = dict(batch, image=torch.full_like(batch["image"], math.nan))
        quantizer = self.tokenizer.quantizer
        before = quantizer.training_state()
        loss = original(self, batch, batch_idx)
        after = quantizer.training_state()
        changed[step] = any(not torch.equal(before[k], after[k]) for k in before if k != "ring") or \
            not torch.equal(before["ring"][0], after["ring"][0]) or before["ring"][1] != after["ring"][1]
        assert (loss is None) == (step in bad)
        return loss

    monkeypatch.setattr(TokenizerModule, "training_step", poisoned)
    run_dir = tmp_path / "run"
    assert fit_once(shapes_root, tmp_path / "runs", f"run.dir={run_dir}") == 0
    assert {s for s, c in changed.items() if not c} == bad  # untouched on exactly the NaN steps
    final = load(run_dir / "checkpoints" / "last.ckpt")
    codebook = {k: v for k, v in final["state_dict"].items() if "quantizer" in k}
    assert codebook and all(bool(torch.isfinite(v.float()).all()) for v in codebook.values())
    with (run_dir / "csv" / "metrics.csv").open() as f:
        logged = {int(r["step"]): float(r["train/skipped_nonfinite"]) for r in csv.DictReader(f) if r["train/skipped_nonfinite"]}
    assert logged[15] == len(bad) and all(logged[s] - logged.get(s - 1, 0.0) == (s in bad) for s in logged)


# ----------------------------------------------------------------------------- stage 2: cache, sampling, evaluation


@pytest.fixture(scope="module")
def tokenizer_runs(shapes_root, tmp_path_factory) -> Path:
    """A barely trained image tokenizer."""
    runs = tmp_path_factory.mktemp("faults-tokenizer")
    assert main(["train", "stage1", *tiny_stage1(shapes_root, runs, "trainer.max_steps=2", "trainer.val_every_steps=2")]) == 0
    return runs


def test_stage2_stopped_while_caching_sampling_and_evaluating(shapes_root, tmp_path, tokenizer_runs, monkeypatch, capsys):
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    command = [CLI, "train", "stage2", *tiny_stage2(shapes_root, runs, f"tokenizers.image={tokenizer_runs}/latest-stage1",
                                                    f"tokenizers.cache_dir={cache}", "generator.width=32", "trainer.max_steps=4",
                                                    "trainer.val_every_steps=4", "sampling.val_n=0", "sampling.n=200")]
    staged = cache.with_name(f".{cache.name}.partial")

    # 1. SIGTERM to the group while the token cache is being built: nothing half-written stays.
    log = tmp_path / "cache.log"
    proc = launch(command, log)
    wait_until(proc, log, staged.exists, "the token cache build")
    os.killpg(proc.pid, signal.SIGTERM)
    code, out = finished(proc, log)
    assert code == 0, out[-3000:]
    the_line(out, rf"lit-vqdiff: stopped by SIGTERM while building the token cache {re.escape(str(cache))}: "
                  r"nothing of it was kept; the next run builds it again")
    assert_clean(out)
    assert not cache.exists() and not staged.exists()
    assert "Stopped: stopped by SIGTERM" in failure_marker(cache).read_text()  # what ranks waiting for it read
    assert not list(runs.glob("stage2-*"))  # the cache comes before the run folder

    # 2. The rerun builds the cache and trains; SIGTERM to the group while it samples.
    log = tmp_path / "sampling.log"
    proc = launch(command, log)
    wait_until(proc, log, lambda: bool(list(runs.glob("stage2-*/samples"))), "sampling")
    os.killpg(proc.pid, signal.SIGTERM)
    code, out = finished(proc, log)
    assert code == 0, out[-3000:]
    run_dir = next(runs.glob("stage2-*"))
    samples = run_dir / "samples"
    the_line(out, rf"lit-vqdiff: stopped by SIGTERM while sampling into {re.escape(str(samples))}: \d+ of 200 samples "
                  rf"written and no {MANIFEST}; sample again; the training itself is complete and saved: "
                  rf"`lit-vqdiff train stage2 run\.dir={re.escape(str(run_dir))}` finishes the rest")
    assert_clean(out)
    assert not (samples / MANIFEST).exists() and not (run_dir / "summary.json").exists()
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 4
    assert not failure_marker(cache).exists()  # cleared by the build that succeeded

    # 3. Finishing it, stopped once more during the final evaluation.
    evaluate = pipeline.evaluate_dir

    def interrupted(directory):
        monkeypatch.setattr(pipeline, "evaluate_dir", evaluate)
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(directory)

    monkeypatch.setattr(pipeline, "evaluate_dir", interrupted)
    assert main(["train", "stage2", f"run.dir={run_dir}"]) == 0
    err = capsys.readouterr().err
    assert re.search(rf"^lit-vqdiff: stopped by SIGTERM after the training: it is complete and saved: "
                     rf"`lit-vqdiff train stage2 run\.dir={re.escape(str(run_dir))}` finishes the rest$", err, re.M), err[-3000:]
    assert len((samples / MANIFEST).read_text().splitlines()) == 200 and not (run_dir / "summary.json").exists()

    # 4. And once more, to the end (no logger: the last resume logged nothing, and Lightning
    #    warns about reusing its CSV folder).
    assert main(["train", "stage2", f"run.dir={run_dir}", "logger.kind=none"]) == 0
    assert (run_dir / "summary.json").exists() and checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 4


# ----------------------------------------------------------------------------- waiting for rank 0


def test_waiting_ranks_learn_of_rank_zero_failing_at_once(shapes_root, tmp_path, tokenizer_runs, monkeypatch, capsys):
    monkeypatch.setattr("lit_vqdiff.data.prepare.WAIT_POLL_S", 0.01)
    target = tmp_path / "artifact"
    with pytest.raises(OSError), reported_to_waiters(target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    started = time.monotonic()
    with pytest.raises(RankZeroFailed, match=r"^rank 0 failed to build the thing: OSError: \[Errno 28\] No space left on device"):
        wait_for_rank_zero(lambda: False, target, "the thing", wait_s=60)
    assert time.monotonic() - started < 5  # not the 60 s deadline

    # A marker older than this process is an earlier attempt's, which rank 0 clears when it starts again.
    marker = failure_marker(target)
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps(record | {"time": time.time() - 3600}))
    with pytest.raises(TimeoutError, match=r"waited 0s for rank 0 to build the thing, and it reported no failure"):
        wait_for_rank_zero(lambda: False, target, "the thing", wait_s=0.05)

    # Through the CLI: a rank that waits for the token cache stops with rank 0's error, in one line.
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError), reported_to_waiters(cache):
        raise RuntimeError("the encoder ran out of memory")
    monkeypatch.setenv("RANK", "1")
    overrides = tiny_stage2(shapes_root, tmp_path / "runs", f"tokenizers.image={tokenizer_runs}/latest-stage1",
                            f"tokenizers.cache_dir={cache}")
    assert main(["tokenize", *overrides]) == 1
    err = capsys.readouterr().err
    assert re.search(r"^lit-vqdiff: error: rank 0 failed to build the token cache .*: RuntimeError: the encoder ran out of "
                     r"memory \(host .*, pid \d+\); this rank stops too$", err, re.M), err

    # And one that waits for the shapes-v1 shards rank 0 renders.
    from lit_vqdiff.config import load_config
    from lit_vqdiff.data.prepare import ensure_dataset

    data = load_config("stage1", [f"data.root={tmp_path / 'shapes-v1'}"]).data
    with pytest.raises(KeyboardInterrupt), reported_to_waiters(tmp_path / "shapes-v1"):
        raise KeyboardInterrupt
    with pytest.raises(RankZeroFailed, match="shapes-v1 shards"):
        ensure_dataset(data)



LINGERING_LOADER = """
import sys
sys.path.insert(0, {tests!r})
from conftest import SHAPES_SIZES
from lit_vqdiff.config.schema import DataConfig
from lit_vqdiff.data.datamodule import OPEN_LOADERS, ShardDataModule
cfg = DataConfig(root={root!r}, batch_size=4, val_batch_size=4, num_workers=2, **SHAPES_SIZES)
loader = ShardDataModule(cfg, ("image",), seed=0).val_dataloader()
print(sum(1 for _ in loader), "batches", flush=True)
LINGERING = loader.loader  # the DataLoader and its persistent workers outlive the StreamLoader...
OPEN_LOADERS.discard(loader)  # ...which nothing remembers any more
"""


def test_a_process_exits_even_when_loader_workers_linger(shapes_root, tmp_path):
    """Workers ignore SIGTERM, which is how multiprocessing ends them at exit: a process that
    still had some (after a pipeline had trained its own tokenizer first) did all its work and
    then never exited. The exit handler closes known loaders and kills workers left over."""
    script = LINGERING_LOADER.format(tests=str(Path(__file__).parent), root=str(shapes_root))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the process hung at exit, waiting for its loader workers")
    assert proc.returncode == 0 and "batches" in out, err[-2000:]
    assert "Traceback" not in err and "killed by signal" not in err, err[-2000:]
