"""`lit-vqdiff`: the command line. Each sub-command parses its arguments, loads and
validates the config (exit 2 on a bad one, before any file is written), then calls one
function that does the work."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

from . import pipeline
from .config import load_config, to_yaml
from .data.commands import add_shards_parser
from .errors import ConfigError, NonFiniteLossError
from .eval.conditions import read_prompts
from .eval.evaluate import evaluate_dir
from .eval.reconstruction import reconstruct_command

EXIT_CONFIG = 2


def _train(args: argparse.Namespace) -> int:
    pipeline.train(load_config(args.stage, args.overrides))
    return 0


def _config(args: argparse.Namespace) -> int:
    cfg = load_config(args.stage, args.overrides)
    print(to_yaml(cfg if args.raw else pipeline.plan(cfg).cfg), end="")
    return 0


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
    print(json.dumps(reconstruct_command(n=args.n, out=args.out, ckpt=args.ckpt, modality=args.modality), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-vqdiff", description="Two-stage generative models: VQ tokenizers and Diffusion Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("train", _train, "train a stage: `train stage1|stage2 [key=value ...]`")
    p.add_argument("stage", choices=["stage1", "stage2"])
    p.add_argument("overrides", nargs="*", metavar="key=value")

    p = add("config", _config, "check a stage's config against its data and tokenizers and print it resolved")
    p.add_argument("stage", choices=["stage1", "stage2"])
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

    add_shards_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"lit-vqdiff: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except NonFiniteLossError as err:
        print(f"lit-vqdiff: training stopped: {err}", file=sys.stderr)
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
