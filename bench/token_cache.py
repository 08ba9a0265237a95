"""Stage-2 training steps from the token cache against encoding with the tokenizer on the fly.

Both runs use the default stage-2 config of the task and the same tokenizer; only
``tokenizers.cache`` differs. Needs the task's tokenizers (runs/latest-stage1-<modality>-shapes-v1).

    .venv/bin/python bench/token_cache.py [--tasks text->image,image->audio] [--steps 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
from common import write_result

from lit_vqdiff.config import load_config
from lit_vqdiff.data.datamodule import ShardDataModule
from lit_vqdiff.data.prepare import ensure_dataset
from lit_vqdiff.modalities import parse_task
from lit_vqdiff.perf import DataWaitTimer
from lit_vqdiff.pipeline import ensure_tokenizers, plan, prepare_token_cache
from lit_vqdiff.stages.generator import GeneratorModule
from lit_vqdiff.training import build_trainer


def steps_per_second(task: str, cached: bool, steps: int, warmup: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        planned = plan(load_config("stage2", [f"task={task}", f"run.root={tmp}", "logger=none",
                                              f"trainer.max_steps={warmup + steps}", f"trainer.val_every_steps={10 * (warmup + steps)}",
                                              "sampling.val_n=0", f"tokenizers.cache={str(cached).lower()}"]))
        cfg = planned.cfg
        ensure_dataset(cfg.data)
        tokenizers, meta = ensure_tokenizers(planned)
        data = prepare_token_cache(cfg, tokenizers, meta) if cached else cfg.data
        module = GeneratorModule(cfg, meta)
        module.load_tokenizers(tokenizers)
        timer = DataWaitTimer()
        marks: list[float] = []

        class Mark(L.Callback):
            """Wall-clock time at the end of every step."""

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
                marks.append(time.perf_counter())

        trainer = build_trainer(cfg, Path(tmp), [timer, Mark()])
        trainer.fit(module, datamodule=ShardDataModule(data, parse_task(task).inputs(cached), seed=0))
    timed = marks[warmup:]
    rate = (len(timed) - 1) / (timed[-1] - timed[0])
    return {"steps_per_s": round(rate, 3), "samples_per_s": round(rate * cfg.data.batch_size, 1),
            "data_wait_fraction": round(timer.fraction, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default="text->image,image->audio,image->text", help="comma-separated")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    tasks = {}
    for task in args.tasks.split(","):
        on_the_fly = steps_per_second(task, False, args.steps, args.warmup)
        cached = steps_per_second(task, True, args.steps, args.warmup)
        tasks[task] = {"cached": cached, "on_the_fly": on_the_fly,
                       "speedup": round(cached["steps_per_s"] / on_the_fly["steps_per_s"], 2)}
    write_result("token_cache", {
        "tasks": tasks,
        "config": {"stage": "stage2", "steps_timed": args.steps, "warmup_steps": args.warmup},
    })


if __name__ == "__main__":
    main()
