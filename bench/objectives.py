"""The four stage-2 objectives side by side, at one training budget.

``generator.objective`` = mask (absorbing), uniform (D3PM uniform transitions), mask_replace
(VQ-Diffusion) and gaussian (latent diffusion on code vectors, DDIM sampling), each trained
with the same steps, batch and learning rate on:

- shapes-v1 text->image: exact match of ``eval`` over 200 val conditions;
- Fashion-MNIST class->image: class consistency and Frechet distance (Inception) beside its floor.

Each run is a plain ``lit-vqdiff train stage2`` in its own process (under ``runs/bench-objectives``,
over the data set's tokenizer ``runs/latest-stage1-image-<data set>``, trained first at defaults
when missing, so every row reads the same codes). Time per step comes from the run's summary;
time per sample is ``generate`` over a batch of 64 val conditions in fp32, as ``lit-vqdiff
sample`` runs.

    .venv/bin/python bench/objectives.py                       # 400 steps per run, both data sets
    .venv/bin/python bench/objectives.py --steps 1000 --data shapes

Results: bench/results/objectives.json (rows are written as they finish).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import timed, write_result

from lit_vqdiff.data.prepare import load_description
from lit_vqdiff.eval.conditions import from_val_shards
from lit_vqdiff.pipeline import load_generator_module

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVES = ("mask", "uniform", "mask_replace", "gaussian")
# data set -> (its config overrides, task, its tokenizer link, the eval figures the table keeps)
SETUPS: dict[str, tuple[list[str], str, str, tuple[str, ...]]] = {
    "shapes": ([], "text->image", "runs/latest-stage1-image-shapes-v1", ("exact_match",)),
    "fashion": (["data=fashion"], "class->image", "runs/latest-stage1-image-fashion-mnist",
                ("class_consistency", "classifier_val_accuracy", "fd_inception", "fd_inception_floor",
                 "precision_inception", "recall_inception")),
}
SAMPLE_BATCH = 64


def train(data: str, objective: str, steps: int, root: Path) -> Path:
    overrides, task, tokenizer, _ = SETUPS[data]
    run_dir = root / f"{data}-{objective}"
    if (run_dir / "summary.json").exists():
        return run_dir  # finished by an earlier call: rows are kept, not retrained
    if not (ROOT / tokenizer).exists():  # every row reads the codes of one tokenizer: trained once, at defaults
        run_logged([str(ROOT / ".venv/bin/lit-vqdiff"), "train", "stage1", *overrides, "logger=csv"], root / f"{data}-tokenizer.log")
    command = [str(ROOT / ".venv/bin/lit-vqdiff"), "train", "stage2", *overrides, f"task={task}",
               f"generator.objective={objective}", f"trainer.max_steps={steps}", f"trainer.val_every_steps={steps}",
               f"tokenizers.image={tokenizer}", f"run.dir={run_dir}", f"run.root={root}", "logger=csv"]
    run_logged(command, root / f"{data}-{objective}.log")
    return run_dir


def run_logged(command: list[str], log: Path) -> None:
    print("$", " ".join(command), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        rc = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"{' '.join(command)} exited {rc}; its output is in {log}")


def seconds_per_sample(run_dir: Path) -> float:
    """Median seconds per sample of ``generate`` over SAMPLE_BATCH val conditions, fp32."""
    module = load_generator_module(run_dir)
    description, _ = load_description(module.cfg.data)
    conditions = from_val_shards(module.cfg.data, module.task, SAMPLE_BATCH, description).cycled(SAMPLE_BATCH)
    batch = conditions.batch(module.task.source, module.spec)
    generator = torch.Generator().manual_seed(0)

    def call() -> None:
        with torch.no_grad():
            module.generate(batch, generator=generator)

    return timed(call, repeats=2, warmup=1) / SAMPLE_BATCH


def row(data: str, objective: str, run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    _, task, _, keys = SETUPS[data]
    scores = summary["eval"]["tasks"][task]
    s = summary["sampling"]
    return {
        "data": summary["data"], "task": task, "objective": objective,
        **{k: scores.get(k) for k in keys},
        "steps": summary["global_step"], "train_min": round(summary["train_seconds"] / 60, 2),
        "ms_per_step": round(1000 / summary["steps_per_s"], 1),
        "ms_per_sample": round(1000 * seconds_per_sample(run_dir), 2),
        "sampler": "ddim" if objective == "gaussian" else f"{s['steps']}-step {objective}",
        "run": str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps of every run (default 400)")
    parser.add_argument("--data", default="shapes,fashion", help="data sets, comma-separated: shapes, fashion")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="objectives, comma-separated")
    parser.add_argument("--root", default="runs/bench-objectives", help="where the runs go")
    args = parser.parse_args()
    datas = [d for d in args.data.split(",") if d]
    objectives = [o for o in args.objectives.split(",") if o]
    for name, given, allowed in (("--data", datas, SETUPS), ("--objectives", objectives, OBJECTIVES)):
        bad = [v for v in given if v not in allowed]
        if bad:
            parser.error(f"{name}: unknown {bad}; one of {list(allowed)}")
    root = (ROOT / args.root).resolve()
    rows = []
    started = time.time()
    for data in datas:
        for objective in objectives:
            rows.append(row(data, objective, train(data, objective, args.steps, root / f"steps{args.steps}")))
            print(json.dumps(rows[-1]), flush=True)
            write_result("objectives", {"steps": args.steps, "rows": rows,
                                        "minutes": round((time.time() - started) / 60, 1)}, echo=False)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
