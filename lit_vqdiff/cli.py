"""`lit-vqdiff`: the command line. Each sub-command parses its arguments, loads and
validates the config (exit 2 on a bad one, before any file is written), then calls one
function that does the work."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from . import pipeline, runs
from .callbacks import stop_on_signals
from . import __version__
from .config import load_config, to_yaml
from .config.load import USER_CONF_ENV, conf_dirs, presets
from .config.schema import GROUPS, SCHEMAS, documented_keys
from .data.commands import add_shards_parser
from .data.datamodule import DataQualityError
from .errors import ConfigError, NonFiniteLossError, RankZeroFailed, Stopped, TrainingFailed
from .eval.conditions import read_prompts
from .eval.evaluate import evaluate_dir
from .eval.reconstruction import reconstruct_command
from .browser import screenshot
from .export import export_run
from .report import write_report

EXIT_CONFIG = 2


def _train(args: argparse.Namespace) -> int:
    pipeline.train(load_config(args.stage, args.overrides))
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.list:
        print(config_listing([args.stage] if args.stage else list(SCHEMAS)), end="")
        return 0
    if args.stage is None:
        raise ConfigError("config needs a stage (stage1 or stage2), or --list")
    cfg = load_config(args.stage, args.overrides)
    print(to_yaml(cfg if args.raw else pipeline.plan(cfg).cfg), end="")
    return 0


def config_listing(stages: list[str]) -> str:
    """The presets of every group (shipped and the user's) and every key with its default and documentation."""
    dirs = conf_dirs()
    lines = ["presets (group=name on the command line; first folder wins: " + ", ".join(map(str, dirs)) + ")"]
    lines += [f"  {group:10s} {', '.join(presets(dirs, group)) or '-'}" for group in GROUPS]
    for stage in stages:
        lines.append(f"\n{stage} keys (key=value on the command line)")
        for key, default, doc in documented_keys(SCHEMAS[stage]):
            lines.append(f"  {key} = {default!r}" + (f"  # {doc}" if doc else ""))
    return "\n".join(lines) + "\n"


def _tokenize(args: argparse.Namespace) -> int:
    print(json.dumps(pipeline.tokenize(load_config("stage2", args.overrides)), indent=2))
    return 0


def _sample(args: argparse.Namespace) -> int:
    prompts = list(args.prompt or []) + (read_prompts(args.prompts) if args.prompts else [])
    summary = pipeline.sample_command(n=args.n, out=args.out, ckpt=args.ckpt, overrides=args.overrides, task=args.task,
                                      prompts=prompts or None, inputs=args.inputs, classes=args.classes, seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    print(json.dumps(evaluate_dir(args.dir), indent=2))
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    report = reconstruct_command(n=args.n, out=args.out, ckpt=args.ckpt, modality=args.modality, baselines=not args.no_baselines)
    print(json.dumps(report, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    print(json.dumps(export_run(args.run, args.out), indent=2))
    return 0


def _report(args: argparse.Namespace) -> int:
    page = write_report([Path(r) for r in args.runs], Path(args.out))
    print(f"wrote {page}")
    if args.screenshot:
        print(f"wrote {screenshot(page, Path(args.screenshot))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-vqdiff", description="Two-stage generative models: VQ tokenizers and Diffusion Transformers.")
    parser.add_argument("--version", action="version", version=f"lit-vqdiff {__version__}")
    parser.add_argument("--config-dir", metavar="DIR", help=f"a folder of your own presets (data/, trainer/, task/ ...) that "
                        f"extend and override the shipped ones; also {USER_CONF_ENV}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("train", _train, "train a stage: `train stage1|stage2 [key=value ...]`")
    p.add_argument("stage", choices=["stage1", "stage2"])
    p.add_argument("overrides", nargs="*", metavar="key=value")

    p = add("config", _config, "check a stage's config against its data and tokenizers and print it resolved")
    p.add_argument("stage", nargs="?", choices=["stage1", "stage2"])
    p.add_argument("--list", action="store_true", help="list the presets and every key with its documentation")
    p.add_argument("--raw", action="store_true", help="print it as loaded, with auto values (0, '') unresolved")
    p.add_argument("overrides", nargs="*", metavar="key=value")

    p = add("tokenize", _tokenize, "encode the shards once into a token cache for stage 2")
    p.add_argument("overrides", nargs="*", metavar="key=value")

    p = add("sample", _sample, "generate samples with manifest.jsonl from a stage-2 checkpoint")
    p.add_argument("--task", default=None, help="source->target, e.g. text->image (default: the run's task)")
    p.add_argument("--n", type=int, default=200, help="samples: held-out conditions drawn, or samples per given condition")
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", default=None, help="checkpoint or run folder (default: runs/latest-stage2)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a caption to generate from (repeatable)")
    p.add_argument("--prompts", metavar="FILE", help="captions, one per line (or JSONL with a text field)")
    p.add_argument("--inputs", metavar="DIR", help="a folder of pictures or sounds to generate from")
    p.add_argument("--classes", metavar="IDS", help="classes to generate, by id or name: 0,3,7 or dress,sneaker")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="sampling.* overrides, e.g. sampling.guidance=3")

    p = add("eval", _eval, "score a sample folder against its manifest (exact match, per attribute)")
    p.add_argument("dir")

    p = add("reconstruct", _reconstruct, "reconstruct validation samples with a tokenizer and report its metrics")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", default=None, help="tokenizer artifact or run folder (default: the latest of --modality)")
    p.add_argument("--modality", default="image", choices=["image", "audio"])
    p.add_argument("--no-baselines", action="store_true", help="skip the classic baselines (bicubic; Codec2 and Opus)")

    p = add("export", _export, "write a run's weights as safetensors beside its resolved config (for load_generator/load_tokenizer)")
    p.add_argument("run", help="a run folder or runs/latest-* link")
    p.add_argument("--out", required=True)

    p = add("report", _report, "one self-contained HTML page of runs: curves, samples, reconstructions, sounds, figures")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders or runs/latest-* links, shown side by side")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--screenshot", metavar="PNG", help="also render the page with headless Chromium (fetched from Debian)")

    add_shards_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config_dir:
        os.environ[USER_CONF_ENV] = args.config_dir  # also seen by the runs a command starts (stage 2 -> stage 1)
    try:
        # SIGTERM, SIGINT and SIGUSR1 end any command cleanly, with what it kept (Stopped).
        with stop_on_signals():
            return int(args.func(args) or 0)
    except Stopped as stop:
        message = stop.message
        if stop.signame == "SIGUSR1" and runs.slurm_job_id() and runs.is_global_zero():
            # SLURM's warning before the time limit (sbatch --signal=USR1@<seconds>): saved, so requeue.
            message += "; " + runs.requeue_slurm_job()
        if runs.is_global_zero():
            print(f"lit-vqdiff: {message}", file=sys.stderr, flush=True)
        return int(stop.code)
    except ConfigError as err:
        print(f"lit-vqdiff: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except NonFiniteLossError as err:
        print(f"lit-vqdiff: training stopped: {err}", file=sys.stderr)
        return 1
    except (TrainingFailed, DataQualityError, RankZeroFailed, TimeoutError) as err:
        # Faults of the machine or the data, not of the code: one line that names the
        # checkpoint to resume from (LIT_VQDIFF_DEBUG=1 shows the traceback).
        if os.environ.get("LIT_VQDIFF_DEBUG"):
            raise
        print(f"lit-vqdiff: error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        # Problems with the user's files or arguments: one line, not a traceback
        # (LIT_VQDIFF_DEBUG=1 shows the traceback).
        if os.environ.get("LIT_VQDIFF_DEBUG"):
            raise
        print(f"lit-vqdiff: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lit-vqdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
