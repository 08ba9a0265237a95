"""Checking a WebDataset shard set before training on it.

``check_shards`` reads every shard of a set (a directory, or a brace pattern such as
``data/mnist/train-{000000..000004}.tar``) and reports, by shard and key: truncated tars,
samples that lack an expected member, members that do not decode, keys seen twice, and
per-shard counts that disagree with ``sizes.json``. Those are problems: the set fails.
Shards made by another tool (GNU tar, webdataset's writer, img2dataset) usually come
without ``sizes.json`` and ``dataset.json``: their absence is a note, not a problem, and
``describe=True`` writes both from the same scan (see ``description.py``).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator, Sequence

import soundfile as sf
from PIL import Image
from ..progress import progress as progress_of

from .datamodule import expand_shards
from .description import DESCRIPTION_FILE, Describer, read_description
from .shards import SIZES_FILE, read_sizes, update_sizes

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
SOUND_EXTS = ("wav", "flac", "ogg")
BLOCK = tarfile.BLOCKSIZE  # 512
BUFFER_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
INFER_FROM = 8  # samples of the first shard whose members are taken as the expected ones


@dataclass(frozen=True)
class Problem:
    shard: str
    key: str  # "-" when the problem is the shard's, not one sample's
    message: str

    def __str__(self) -> str:
        return f"{self.shard} {self.key}: {self.message}"


@dataclass
class Report:
    shards: list[Path]
    expected: tuple[str, ...]
    samples: int = 0
    members: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what is missing but not broken
    counts: dict[str, int] = field(default_factory=dict)  # samples read per shard file name

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, max_problems: int = 50) -> str:
        """Human-readable summary: shards, samples, members, then the problems (at most ``max_problems``)."""
        counts = ", ".join(f"{ext} {n}" for ext, n in sorted(self.members.items())) or "none"
        lines = [
            f"shards:   {len(self.shards)}",
            f"samples:  {self.samples}",
            f"members:  {counts} (expected in every sample: {', '.join(self.expected) or 'nothing'})",
            f"problems: {len(self.problems)}",
        ]
        lines += [f"  {p}" for p in self.problems[:max_problems]]
        if len(self.problems) > max_problems:
            lines.append(f"  ... and {len(self.problems) - max_problems} more")
        lines += [f"note:     {n}" for n in self.notes]
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


class TruncatedShard(Exception):
    """A shard ends early: inside a member, or without the tar end-of-archive blocks."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key  # the sample being read when the data ran out


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member, as WebDataset groups them: the extension starts at the basename's first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext if dot else "")


def resolve_shards(patterns: str | Sequence[str]) -> list[Path]:
    """Shard paths of one spec or several (folders, globs, brace patterns, paths; see
    ``datamodule.expand_shards``), in order; paths that do not exist are kept and reported."""
    specs = [patterns] if isinstance(patterns, str) else list(patterns)
    return [Path(p) for spec in specs for p in expand_shards(spec)]


def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes], list[str]]]:
    """(key, members, duplicated extensions) per sample, in tar order; raises TruncatedShard at a short end.

    A sample cut inside a member is not yielded; one cut between members is, and then
    lacks the members that were lost.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    repeated: list[str] = []
    end, reading, last = 0, "-", "the start"
    with open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    reading, ext = split_member(info.name)
                    data = tar.extractfile(info).read()  # type: ignore[union-attr]
                    if reading != key:
                        if key is not None:
                            yield key, members, repeated
                        key, members, repeated = reading, {}, []
                    if ext in members:
                        repeated.append(ext)
                    members[ext] = data
                    end = info.offset_data + -(-info.size // BLOCK) * BLOCK
                    last = info.name
        except tarfile.ReadError as err:
            raise TruncatedShard(reading, f"unreadable after {last}: {err}") from None
        # tarfile stops quietly when a file ends on a block boundary; a complete archive
        # has two zero blocks after the last member.
        f.seek(end)
        complete = f.read(2 * BLOCK) == bytes(2 * BLOCK)
        if key is not None:
            yield key, members, repeated
        if not complete:
            raise TruncatedShard(reading, f"no end-of-archive marker after {last}: the file was cut short")


def decode_error(ext: str, data: bytes) -> str | None:
    """Why a member does not decode, or None when it does (unknown extensions always pass)."""
    try:
        if ext in IMAGE_EXTS:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
        elif ext in SOUND_EXTS:
            sf.read(io.BytesIO(data))
        elif ext == "txt":
            data.decode("utf-8")
        elif ext == "cls":
            int(data.decode("ascii"))
        elif ext == "json":
            json.loads(data)
    except Exception as err:  # noqa: BLE001 -- any failure to decode is the finding itself
        detail = BUFFER_REPR.sub("", str(err))  # PIL and soundfile name the in-memory buffer
        return f"{ext} does not decode ({type(err).__name__}: {detail})"
    return None


def infer_members(shard: Path) -> tuple[str, ...]:
    """Members found in the first samples of a shard (their union, so one short sample cannot set the rule)."""
    found: set[str] = set()
    try:
        for _, members, _ in islice(iter_samples(shard), INFER_FROM):
            found.update(members)
    except (TruncatedShard, OSError):
        pass  # reported when the shard is checked
    return tuple(sorted(found))


def split_of(shard_name: str) -> str:
    """The split a shard belongs to by its name: 'train-000001.tar' and 'train.tar' -> 'train'."""
    return shard_name.split("-")[0].split(".")[0]


def check_shards(pattern: str | Sequence[str], expected: Sequence[str] | None = None, progress: bool = False,
                 describe: bool = False, name: str | None = None) -> Report:
    """Read every shard matched by ``pattern`` and collect the problems found (see the module
    docstring); with ``describe``, write sizes.json and dataset.json beside the shards from
    the same scan (``name``: the data set's name, default: the shards' folder's)."""
    shards = resolve_shards(pattern)
    existing = [s for s in shards if s.is_file()]
    if not existing:
        raise FileNotFoundError(f"no shards match {pattern!r}")
    folders = {s.parent for s in existing}
    if describe and len(folders) > 1:
        raise ValueError(f"--describe writes one dataset.json beside the shards, but {pattern!r} spans "
                         f"{len(folders)} folders; describe each folder on its own")
    folder = existing[0].parent
    report = Report(shards, tuple(sorted(expected)) if expected else infer_members(existing[0]))
    describer = Describer(name or folder.resolve().name) if describe else None
    first_shard: dict[str, str] = {}
    for shard in progress_of(shards, "checking", unit="shard", enabled=progress):
        if not shard.is_file():
            report.problems.append(Problem(shard.name, "-", "shard file missing"))
            continue
        count = _check_shard(shard, report, first_shard, describer)
        report.samples += count
        report.counts[shard.name] = count
    if describe:
        assert describer is not None
        update_sizes(folder, report.counts)
        describer.write(folder)
        report.notes.append(f"wrote {folder / SIZES_FILE} and {folder / DESCRIPTION_FILE}")
    for shard in existing:
        _check_count(shard, report.counts.get(shard.name, 0), report)
    _note_missing(folders, report)
    for folder_spec in [p for p in ([pattern] if isinstance(pattern, str) else pattern) if Path(p).is_dir()]:
        try:
            listed = read_sizes(folder_spec)
        except ValueError:
            listed = {}  # already reported against each shard
        for missing in sorted(set(listed) - {s.name for s in report.shards}):
            report.problems.append(Problem(missing, "-", f"listed in {SIZES_FILE} but missing"))
    return report


def _note_missing(folders: set[Path], report: Report) -> None:
    for folder in sorted(folders):
        missing = [f for f in (SIZES_FILE, DESCRIPTION_FILE) if not (folder / f).is_file()]
        if missing:
            report.notes.append(f"{folder} has no {' or '.join(missing)}: training needs them; "
                                f"`lit-vqdiff shards check {folder} --describe` writes them from one scan")
        else:
            try:
                read_description(folder)
            except ValueError as err:
                report.problems.append(Problem(DESCRIPTION_FILE, "-", str(err)))


def _check_shard(shard: Path, report: Report, first_shard: dict[str, str], describer: Describer | None) -> int:
    count = 0
    try:
        for key, members, repeated in iter_samples(shard):
            count += 1
            report.members.update(members.keys())  # count member names; update(dict) would add the bytes
            if describer is not None:
                describer.add(members, split=split_of(shard.name))
            problems = [f"member {ext} appears twice" for ext in repeated]
            if key in first_shard:
                problems.append(f"duplicate key (first seen in {first_shard[key]})")
            first_shard.setdefault(key, shard.name)
            problems += [f"missing member {ext}" for ext in report.expected if ext not in members]
            problems += [e for e in (decode_error(ext, data) for ext, data in sorted(members.items())) if e]
            report.problems += [Problem(shard.name, key, p) for p in problems]
    except TruncatedShard as err:
        report.problems.append(Problem(shard.name, err.key, f"truncated or corrupt tar: {err}"))
    except OSError as err:
        report.problems.append(Problem(shard.name, "-", f"cannot read: {err}"))
    return count


def _check_count(shard: Path, count: int, report: Report) -> None:
    """A shard's sample count against sizes.json (no sizes.json at all is only a note, see _note_missing)."""
    try:
        sizes = read_sizes(shard.parent)
    except ValueError as err:
        report.problems.append(Problem(shard.name, "-", str(err)))
        return
    if not (shard.parent / SIZES_FILE).is_file():
        return
    if shard.name not in sizes:
        report.problems.append(Problem(shard.name, "-", f"not listed in {SIZES_FILE}"))
    elif sizes[shard.name] != count:
        report.problems.append(Problem(shard.name, "-", f"{SIZES_FILE} says {sizes[shard.name]} samples, the shard holds {count}"))
