"""`lit-vqdiff eval DIR`: score a folder of generated samples against its manifest.

Reads ``DIR/manifest.jsonl`` (one object per sample: id, task, condition, output, and
``attributes`` when the condition came from shapes-v1, ``reference`` when it came from a
held-out sample, ``label`` when its class is known) and ``DIR/samples.json`` (the data set
it was drawn from), and reports per task what ``scoring.Scorer`` measures: shapes-v1 exact
match, caption error rates, Frechet distance with precision and recall beside the
real-vs-real floor, class consistency beside the classifier's own accuracy.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..config import DataConfig
from ..data import shapes
from ..data.description import is_shapes
from ..data.prepare import load_description
from ..jsonl import json_lines
from ..modalities import MODALITIES, DecodeSpec, parse_task
from .classifier import data_classifier
from .conditions import real_items
from .scoring import Scorer

MANIFEST = "manifest.jsonl"
SAMPLES_INFO = "samples.json"  # what a sample folder was drawn with: data set, checkpoint, settings


def read_manifest(directory: Path | str) -> list[dict[str, Any]]:
    """Entries of ``manifest.jsonl``; a malformed line is an error naming file and line."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; `lit-vqdiff sample --out {directory}` writes one")
    entries = []
    for lineno, entry in json_lines(path.read_text().splitlines()):
        if isinstance(entry, json.JSONDecodeError):
            raise ValueError(f"{path}:{lineno}: not valid JSON ({entry.msg})")
        missing = [k for k in ("id", "task", "condition", "output") if k not in entry]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing keys {missing}")
        try:
            parse_task(entry["task"])
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: {err}") from None
        entries.append(entry)
    return entries


def read_item(directory: Path, name: str, modality: str) -> Any:
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: listed in the manifest but missing")
    return MODALITIES[modality].read(path)


def samples_info(directory: Path) -> dict[str, Any]:
    """What the folder was sampled with (``samples.json``: data set, sizes); empty for hand-made folders."""
    path = directory / SAMPLES_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def scorer_for(task: str, info: dict[str, Any], n: int, labelled: bool) -> Scorer:
    """The scorer of one task's samples: real-data metrics when the folder names a data set other
    than shapes-v1, its floor from that data set's train split, its classifier for labelled pictures."""
    target = parse_task(task).target
    data = info.get("data")
    if not data:
        return Scorer(target.name, shapes.SAMPLE_RATE)
    data = OmegaConf.merge(OmegaConf.structured(DataConfig), data)
    spec = DecodeSpec.from_config(data, (target.name,))
    description, _ = load_description(data)
    real = not is_shapes(description)
    second = real_items(data, "train", target, spec, n) if real and target.name in ("image", "audio") else None
    classifier = None
    if real and labelled and target.name == "image" and (description or {}).get("classes"):
        classifier = data_classifier(data.root)
    return Scorer(target.name, spec.sample_rate, real=real, second_real=second, classifier=classifier,
                  holdout=data.shapes.holdout != "none")


def evaluate_dir(directory: Path | str) -> dict[str, Any]:
    """Per-task scores of a sample folder (see the module docstring), plus how many entries nothing could score."""
    directory = Path(directory)
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for entry in read_manifest(directory):
        target = parse_task(entry["task"]).target.name
        attrs = entry.get("attributes")
        if attrs:
            bad = [k for k in shapes.ATTRIBUTES if attrs.get(k) not in shapes.VALUES[k]]
            if bad:
                raise ValueError(f"{directory / MANIFEST}: entry {entry['id']}: invalid attributes {bad}: {attrs}")
        group = groups[entry["task"]]
        group["items"].append(read_item(directory, entry["output"], target))
        group["attributes"].append(attrs)
        reference = entry.get("reference")
        group["references"].append(read_item(directory, reference, target) if reference else None)
        group["labels"].append(entry.get("label"))
    info = samples_info(directory)
    report: dict[str, Any] = {"dir": str(directory), "tasks": {}}
    for task, group in sorted(groups.items()):
        n = len(group["items"])
        scorer = scorer_for(task, info, n, labelled=any(label is not None for label in group["labels"]))
        scores: dict[str, Any] = {"n": n}
        scores.update(scorer.score(group["items"], group["attributes"], group["references"], group["labels"]))
        scored = max(scores.get("n_verified", 0), scores.get("n_referenced", 0),
                     n if any(k.startswith(("fd_", "class_consistency")) for k in scores) else 0)
        if scored < n:
            scores["unscored"] = n - scored
        report["tasks"][task] = scores
    return report
