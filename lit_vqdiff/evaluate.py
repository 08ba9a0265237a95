"""`lit-vqdiff eval DIR`: score generated samples against their conditioning attributes.

Reads ``DIR/manifest.jsonl`` (see docs: one object per sample with id, task, condition,
attributes, output), reads every output back with the shapes-v1 verifier of its
modality, and reports per task the exact-match rate and per-attribute accuracy.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image

from .data import shapes, verify

MANIFEST = "manifest.jsonl"
OUTPUT_KINDS = {".png": "image", ".wav": "audio", ".txt": "text"}


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
        entries.append(entry)
    return entries


def load_output(path: Path) -> Any:
    """A generated file as the verifier wants it: uint8 image, float waveform, or text."""
    kind = OUTPUT_KINDS.get(path.suffix)
    if kind is None:
        raise ValueError(f"{path}: unknown output type {path.suffix!r}; expected one of {sorted(OUTPUT_KINDS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: listed in the manifest but missing")
    if kind == "image":
        return np.asarray(Image.open(path).convert("RGB"))
    if kind == "audio":
        wave, rate = sf.read(path, dtype="float32", always_2d=True)
        return wave.mean(axis=1), rate
    return path.read_text(encoding="utf-8", errors="replace")


def read_outputs(kind: str, items: list[Any]) -> list[verify.Reading]:
    """Verifier readings of a list of loaded outputs of one kind."""
    if kind == "image":
        return verify.verify_images(np.stack(items))
    if kind == "audio":
        return [verify.verify_sound(wave, rate) for wave, rate in items]
    return verify.verify_captions(items)


def evaluate_dir(directory: Path | str) -> dict[str, Any]:
    """Per-task scores of a sample folder, plus how many entries carried no attributes."""
    directory = Path(directory)
    by_task: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    unscored = 0
    for entry in read_manifest(directory):
        if not entry.get("attributes"):
            unscored += 1
            continue
        expected = entry["attributes"]
        bad = [k for k in shapes.ATTRIBUTES if expected.get(k) not in shapes.VALUES[k]]
        if bad:
            raise ValueError(f"{directory / MANIFEST}: entry {entry['id']}: invalid attributes {bad}: {expected}")
        path = directory / entry["output"]
        kind = OUTPUT_KINDS.get(path.suffix, "?")
        group = by_task[entry["task"]]
        group[kind].append(load_output(path))
        group[f"{kind}:expected"].append(expected)
    report: dict[str, Any] = {"dir": str(directory), "tasks": {}}
    for task, group in sorted(by_task.items()):
        predicted, expected = [], []
        for kind in OUTPUT_KINDS.values():
            if group.get(kind):
                predicted += read_outputs(kind, group[kind])
                expected += group[f"{kind}:expected"]
        report["tasks"][task] = verify.score(predicted, expected)
    if unscored:
        report["unscored"] = unscored
    return report
