"""`lit-vqdiff eval DIR`: score a folder of generated samples against its manifest.

Reads ``DIR/manifest.jsonl`` (one object per sample: id, task, condition, output, and
``attributes`` when the condition came from shapes-v1, ``reference`` when it came from a
held-out sample) and reports, per task:

- on entries with shapes-v1 attributes: exact match and per-attribute accuracy, read back
  by the analytic verifier;
- on text outputs with a reference caption: exact match and character error rate.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ..data import shapes
from ..modalities import MODALITIES, parse_task
from . import metrics
from . import shapes as shapes_verifier

MANIFEST = "manifest.jsonl"
SAMPLES_INFO = "samples.json"  # what a sample folder was drawn with: data set, checkpoint, settings


def read_manifest(directory: Path | str) -> list[dict[str, Any]]:
    """Entries of ``manifest.jsonl``; a malformed line is an error naming file and line."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; `lit-vqdiff sample --out {directory}` writes one")
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
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


def sample_rate_of(directory: Path) -> int:
    info_path = directory / SAMPLES_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return int(info.get("sample_rate") or shapes.SAMPLE_RATE)


def score_items(target: str, items: Sequence[Any], attributes: Sequence[dict | None], references: Sequence[Any | None],
                sample_rate: int) -> dict[str, float]:
    """Scores of generated items of one target modality: by the shapes-v1 verifier where a
    condition carries attributes, against reference captions for text."""
    scores: dict[str, float] = {}
    verified = [(item, attrs) for item, attrs in zip(items, attributes) if attrs]
    if verified:
        readings = shapes_verifier.read_items(target, [item for item, _ in verified], sample_rate)
        result = shapes_verifier.score(readings, [attrs for _, attrs in verified])
        scores.update({k: v for k, v in result.items() if k != "n"})
        scores["n_verified"] = result["n"]
    paired = [(item, ref) for item, ref in zip(items, references) if ref is not None]
    if target == "text" and paired:
        scores.update(metrics.text_scores([h for h, _ in paired], [r for _, r in paired]))
        scores["n_referenced"] = len(paired)
    return scores


def evaluate_dir(directory: Path | str) -> dict[str, Any]:
    """Per-task scores of a sample folder, plus how many entries nothing could score."""
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
    report: dict[str, Any] = {"dir": str(directory), "tasks": {}}
    rate = sample_rate_of(directory)
    for task, group in sorted(groups.items()):
        target = parse_task(task).target.name
        scores: dict[str, Any] = {"n": len(group["items"])}
        scores.update(score_items(target, group["items"], group["attributes"], group["references"], rate))
        scored = max(scores.get("n_verified", 0), scores.get("n_referenced", 0))
        if scored < scores["n"]:
            scores["unscored"] = scores["n"] - scored
        report["tasks"][task] = scores
    return report
