"""Conditions to generate from, taken from the data in use or given by a user.

Every condition is a member dict, as a shard sample holds it, so it is decoded by the
same code as training data. Four sources:

- ``from_val_shards``: the first held-out samples that carry both the task's source and
  target; each keeps its shard key, its target as the reference to compare against, and
  its shapes-v1 attributes when it has them (then the analytic verifier scores it);
- ``from_prompts``: captions (``--prompt``, ``--prompts FILE`` of lines or JSONL);
- ``from_inputs``: a folder of pictures or sounds (``--inputs DIR``);
- ``from_classes``: class ids or names (``--classes 0,3,dress``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..data import shapes
from ..data.datamodule import resolve_shards
from ..data.decode import collate, decode_sample
from ..data.description import class_names
from ..data.stream import RawSample, read_shard
from ..errors import SampleError
from ..jsonl import json_lines
from ..modalities import DecodeSpec, Modality, Task
from ..modalities.text import text_of


@dataclass
class Condition:
    """One condition: its members, how the manifest names it, and what it came from."""

    members: dict[str, bytes]
    entry: dict[str, Any]  # the manifest's "condition": {"text": ...}, {"label": 3, "name": ...} or a file
    key: str  # the shard key or the input's file name
    reference: dict[str, bytes] | None = None  # the held-out sample's members, when it came from one
    attributes: dict[str, str] | None = None  # shapes-v1 attributes, when the sample had them
    file: tuple[str, bytes] | None = None  # (extension, bytes) of a conditioning file to keep beside the outputs
    label: int | None = None  # the class the condition names or its sample belongs to (labelled data)


@dataclass
class Conditions:
    source: str  # how they were chosen: "val shards", "prompts", "inputs DIR", "classes"
    items: list[Condition] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def cycled(self, n: int) -> "Conditions":
        """Exactly ``n`` conditions, repeating from the start when there are fewer."""
        if not self.items:
            raise ValueError(f"no conditions from {self.source}")
        return Conditions(self.source, [self.items[i % len(self.items)] for i in range(n)])

    def repeated(self, times: int) -> "Conditions":
        """Each condition ``times`` times in a row (several samples per prompt)."""
        return Conditions(self.source, [c for c in self.items for _ in range(times)])

    def batch(self, modality: Modality, spec: DecodeSpec, start: int = 0, stop: int | None = None) -> dict[str, Any]:
        """The decoded batch of conditions [start, stop) of ``modality``."""
        source_spec = DecodeSpec(**{**spec.__dict__, "modalities": (modality.name,)})
        chunk = self.items[start:stop]
        try:
            return collate([decode_sample(c.members, source_spec) for c in chunk])
        except SampleError as err:
            bad = next(c.key for c in chunk if _fails(c.members, source_spec))
            raise ValueError(f"condition {bad}: cannot be read as {modality.name} ({err})") from None


def _fails(members: Mapping[str, bytes], spec: DecodeSpec) -> bool:
    try:
        decode_sample(members, spec)
    except SampleError:
        return True
    return False


def condition_entry(modality: Modality, members: Mapping[str, bytes], names: Sequence[str]) -> tuple[dict, tuple | None]:
    """The manifest's condition of a sample and the conditioning file to keep, if any."""
    if modality.name == "text":
        return {"text": text_of(members)}, None
    if modality.name == "class":
        label = int(members["cls"].decode("ascii").strip())
        return {"label": label, "name": names[label] if label < len(names) else str(label)}, None
    ext = next(e for e in modality.members if e in members)
    return {}, (ext, members[ext])


def _label(members: Mapping[str, bytes]) -> int | None:
    try:
        return int(members["cls"].decode("ascii").strip()) if "cls" in members else None
    except (UnicodeDecodeError, ValueError):
        return None


def _attributes(members: Mapping[str, bytes]) -> dict[str, str] | None:
    try:
        meta = json.loads(members["json"]) if "json" in members else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or not all(meta.get(k) in shapes.VALUES[k] for k in shapes.ATTRIBUTES):
        return None
    return {k: meta[k] for k in shapes.ATTRIBUTES}


def from_val_shards(data: Any, task: Task, n: int, description: Mapping[str, Any] | None = None,
                    labels: Sequence[int] | None = None) -> Conditions:
    """The first ``n`` held-out samples (in shard order) that carry the task's source and target
    (and, with ``labels``, belong to one of those classes)."""
    names = class_names(description, int(data.num_classes or 0))
    out = Conditions("val shards" if labels is None else f"val shards of classes {list(labels)}")
    for members, key in samples_of(data, "val"):
        if not (task.source.present(members) and task.target.present(members)):
            continue
        if labels is not None and _label(members) not in labels:
            continue
        entry, file = condition_entry(task.source, members, names)
        out.items.append(Condition(members, entry, key, reference=members, attributes=_attributes(members),
                                   file=file, label=_label(members)))
        if len(out) >= n:
            return out
    if not out.items:
        raise ValueError(f"no val sample of {data.root} carries both {task.source.name} and {task.target.name}; "
                         f"pass conditions with --prompt/--prompts/--inputs/--classes")
    return out


def samples_of(data: Any, split: str) -> Iterator[tuple[dict[str, bytes], str]]:
    """(members, key) of every readable sample of a split, in shard order."""
    for shard in resolve_shards(str(getattr(data, split)), str(data.root), split, str(data.sizes)):
        for item in read_shard(shard, 0, None, True):
            if isinstance(item, RawSample):
                yield item.members, item.key


def real_items(data: Any, split: str, modality: Modality, spec: DecodeSpec, n: int) -> list[Any]:
    """The first ``n`` items of ``modality`` in a split, decoded at the run's sizes (e.g. train
    pictures for the real-vs-real floor of a Frechet distance)."""
    one = DecodeSpec(**{**spec.__dict__, "modalities": (modality.name,)})
    items: list[Any] = []
    for members, _ in samples_of(data, split):
        if len(items) >= n:
            break
        if not modality.present(members):
            continue
        try:
            value = decode_sample(members, one)[modality.batch_key]
        except SampleError:
            continue
        items.append(text_of(members) if modality.name == "text" else modality.items(value[None])[0])
    return items


def from_prompts(prompts: Sequence[str]) -> Conditions:
    """Captions as conditions; the shapes-v1 attributes of a shapes-v1 caption are kept (it can be scored)."""
    out = Conditions("prompts")
    for i, prompt in enumerate(prompts):
        attrs = shapes.parse_caption(prompt)
        out.items.append(Condition({"txt": prompt.encode("utf-8")}, {"text": prompt}, f"prompt-{i:06d}",
                                   attributes=attrs.as_dict() if attrs else None))
    return out


def read_prompts(path: Path | str) -> list[str]:
    """Prompts from a file: one per line, or JSONL objects with a ``text``, ``caption`` or ``prompt`` field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        prompts = [line.strip() for line in lines if line.strip()]
    else:
        prompts = []
        for lineno, row in json_lines(lines):
            if isinstance(row, json.JSONDecodeError):
                raise ValueError(f"{path}:{lineno}: not valid JSON ({row.msg})")
            text = next((row[k] for k in ("text", "caption", "prompt") if isinstance(row, dict) and isinstance(row.get(k), str)), None)
            if text is None:
                raise ValueError(f"{path}:{lineno}: expected an object with a text, caption or prompt string")
            prompts.append(text)
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in it")
    return prompts


def from_inputs(folder: Path | str, modality: Modality) -> Conditions:
    """Every file of ``modality`` in a folder (sorted by name) as a condition."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--inputs {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in modality.members)
    if not files:
        raise ValueError(f"--inputs {folder}: no {modality.name} files ({', '.join('.' + m for m in modality.members)})")
    return from_files(files, modality, f"inputs {folder}")


def from_files(paths: Sequence[Path], modality: Modality, source: str = "input files") -> Conditions:
    """Pictures or sounds given as files, one condition each."""
    out = Conditions(source)
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such input file")
        members = modality.file_members(path)
        ext = next(iter(members))
        out.items.append(Condition(members, {}, path.name, file=(ext, members[ext])))
    return out


def from_classes(spec: str, num_classes: int, description: Mapping[str, Any] | None) -> Conditions:
    """Classes given as ids or names, comma-separated: '0,3,7' or 'dress,sneaker'."""
    names = class_names(description, num_classes)
    lookup = {name.lower(): i for i, name in enumerate(names)}
    out = Conditions("classes")
    for i, token in enumerate(t.strip() for t in spec.split(",") if t.strip()):
        label = int(token) if token.isdigit() else lookup.get(token.lower())
        if label is None or not 0 <= label < num_classes:
            raise ValueError(f"--classes: {token!r} is not a class of this data set (ids 0..{num_classes - 1} or names {names[:10]})")
        out.items.append(Condition({"cls": str(label).encode()}, {"label": label, "name": names[label]}, f"class-{i:06d}",
                                   label=label))
    if not out.items:
        raise ValueError("--classes: no class given")
    return out


def decoded_reference(modality: Modality, condition: Condition, spec: DecodeSpec) -> Any | None:
    """The reference of a condition as an item of ``modality`` (decoded at the run's settings), or None."""
    if condition.reference is None:
        return None
    target_spec = DecodeSpec(**{**spec.__dict__, "modalities": (modality.name,)})
    try:
        decoded = decode_sample(condition.reference, target_spec)
    except SampleError:
        return None
    value = decoded[modality.batch_key]
    if modality.name == "text":
        return text_of(condition.reference)
    return modality.items(value[None] if isinstance(value, torch.Tensor) else torch.tensor([value]))[0]
