"""Non-finite losses: a NaN/Inf step is skipped (weights and codebook untouched) and counted
in train/skipped_nonfinite; five in a row stop the run with a loadable checkpoint of the
last good state and a message that says what happened."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable

import lightning as L
import pytest
import torch
from conftest import tiny_stage1, resolved

from lit_vqdiff.callbacks import load_checkpoint_file
from lit_vqdiff.config import load_config
from lit_vqdiff.data.datamodule import ShardDataModule
from lit_vqdiff.stages.base import NonFiniteLossError
from lit_vqdiff.stages.tokenizer import TokenizerModule
from lit_vqdiff.runs import resolve_run
from lit_vqdiff.training import fit

pytestmark = [
    pytest.mark.slow,
    # Lightning's note on a skipped step (training_step returned None), which is the point here
    pytest.mark.filterwarnings("ignore:`training_step` returned `None`:UserWarning"),
]


class WeightsByStep(L.Callback):
    """The trainable weights after each optimizer step, by global step."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module):
        self.after[trainer.global_step] = self.snapshot(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = self.snapshot(pl_module)

    @staticmethod
    def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in module.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def poison_losses(monkeypatch: pytest.MonkeyPatch, bad: Callable[[int], float | None]) -> None:
    """Make the reconstruction loss of step ``s`` equal ``bad(s)`` when that is not None."""
    original = TokenizerModule.reconstruction_loss

    def poisoned(self, target, recon):
        loss = original(self, target, recon)
        value = bad(self.global_step)
        return loss * 0 + value if value is not None else loss

    monkeypatch.setattr(TokenizerModule, "reconstruction_loss", poisoned)


def fit_stage1(shapes_root: Path, tmp_path: Path, steps: int, recorder: WeightsByStep, resume: Path | None = None) -> tuple[TokenizerModule, Path]:
    """A tiny stage-1 fit (a resumed one with ``resume``) with ``recorder`` watching."""
    overrides = tiny_stage1(shapes_root, tmp_path / "runs", f"trainer.max_steps={steps}", "trainer.val_every_steps=100",
                            "trainer.log_every_steps=1")
    cfg = resolved("stage1", [f"run.dir={resume}", f"trainer.max_steps={steps}"] if resume else overrides)
    run_dir, ckpt = resolve_run(cfg)
    module = TokenizerModule(cfg)
    fit(cfg, module, ShardDataModule(cfg.data, (cfg.modality,), seed=cfg.run.seed), run_dir, ckpt, callbacks=[recorder])
    return module, run_dir


def skipped_counts(run_dir: Path) -> dict[int, float]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["train/skipped_nonfinite"]) for r in csv.DictReader(f) if r["train/skipped_nonfinite"]}


def test_nonfinite_steps_are_skipped_and_counted(shapes_root, tmp_path, monkeypatch):
    bad_steps = {3: math.nan, 4: math.inf, 7: -math.inf}
    poison_losses(monkeypatch, bad_steps.get)
    recorder = WeightsByStep()
    module, run_dir = fit_stage1(shapes_root, tmp_path, 10, recorder)
    after = recorder.after
    assert sorted(after) == list(range(11))  # a skipped step still counts as a step
    for step in range(10):  # the weights after step s+1 (the one run at global_step s)
        assert same(after[step + 1], after[step]) == (step in bad_steps), step
    assert int(module.skipped_nonfinite) == 3
    running = [sum(1 for bad in bad_steps if bad <= step) for step in range(10)]
    assert skipped_counts(run_dir) == dict(enumerate(map(float, running)))  # 0 0 0 1 2 2 2 3 3 3


def test_five_nonfinite_in_a_row_stop_with_the_last_good_state(shapes_root, tmp_path, monkeypatch):
    recorder = WeightsByStep()
    with monkeypatch.context() as patch, pytest.raises(NonFiniteLossError) as stopped:
        poison_losses(patch, lambda step: math.nan if step == 2 or step >= 5 else None)
        fit_stage1(shapes_root, tmp_path, 20, recorder)
    message = str(stopped.value)
    run_dir = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    last = run_dir / "checkpoints" / "last.ckpt"
    assert message.startswith(f"5 non-finite losses in a row at step 9 (6 skipped in all); saved the last good state to {last}")
    assert "optim.lr" in message  # and what to try

    ckpt = load_checkpoint_file(last)
    good = TokenizerModule(resolved("stage1", tiny_stage1(shapes_root, tmp_path / "unused")))
    good.load_state_dict(ckpt["state_dict"])
    assert same(WeightsByStep.snapshot(good), recorder.after[5])  # after the last finite step
    assert int(ckpt["state_dict"]["skipped_nonfinite"]) == 6

    resumed = WeightsByStep()
    module, _ = fit_stage1(shapes_root, tmp_path, 12, resumed, resume=run_dir)
    assert same(resumed.after[min(resumed.after)], recorder.after[5])
    assert max(resumed.after) == 12 and int(module.skipped_nonfinite) == 6


class CodebookByStep(WeightsByStep):
    """The quantizer's codebook state (codebook, EMA statistics, counters, restart ring) after each step."""

    @staticmethod
    def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        state = module.tokenizer.quantizer.training_state()
        ring, count = state.pop("ring")
        return state | {"ring": ring, "ring_count": torch.tensor(count)}


def test_a_nan_batch_leaves_the_codebook_as_it_was(shapes_root, tmp_path, monkeypatch):
    """The EMA codebook update runs inside the forward, before the loss is known: a skipped
    step must undo it, or one NaN batch poisons the codebook for good."""
    original = TokenizerModule.inputs

    def nan_at_step_3(self, batch):
        x = original(self, batch)
        return torch.full_like(x, math.nan) if self.global_step == 3 else x

    monkeypatch.setattr(TokenizerModule, "inputs", nan_at_step_3)
    recorder = CodebookByStep()
    _, run_dir = fit_stage1(shapes_root, tmp_path, 6, recorder)
    after = recorder.after
    assert same(after[4], after[3])  # the step run at global_step 3 left it exactly as it was
    assert all(not same(after[s + 1], after[s]) for s in (0, 1, 2, 4, 5))  # the others moved it
    assert all(bool(torch.isfinite(t.float()).all()) for t in after[6].values())
    assert skipped_counts(run_dir) == {0: 0.0, 1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0, 5: 1.0}  # and the log says it was skipped
