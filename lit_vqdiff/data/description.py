"""The description of a data set, derived from its samples: ``dataset.json`` beside the shards.

One scan of the samples (``Describer``) records what training needs to know and must
not guess from shapes-v1: which members the samples carry, image sizes and colour,
sound sample rates and lengths, caption lengths, the classes (ids and names), and
whether the samples carry shapes-v1 attributes (then the analytic verifier can score
them). ``shards write`` feeds the describer as it writes; ``shards check --describe``
feeds it from shards a user already has (GNU tar, webdataset's writer, img2dataset).

``resolve_data`` fills a data config's auto values (0 or "") from a description; the run
then records the values it used in its config.yaml.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import soundfile as sf
from PIL import Image

from ..errors import ConfigError, SampleError
from ..modalities import MODALITIES
from ..modalities.label import label_of
from ..modalities.text import text_of
from . import shapes

DESCRIPTION_FILE = "dataset.json"
FORMAT = "lit_vqdiff.dataset/1"
IMAGE_SIZES = (32, 64, 128, 256)  # auto image_size: the smallest that holds the median short side
MAX_AUTO_RATE = 16000  # auto sample_rate: the most common rate, at most this
MAX_AUTO_SECONDS = 10.0  # auto clip length: the 90th percentile, at most this
CLIP_STEP_S = 0.25  # auto clip lengths are rounded up to this
TEXT_STEP, MAX_AUTO_TEXT = 16, 256  # auto text_bytes: the longest caption, rounded up to 16, at most 256


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = np.asarray(values, dtype=np.float64)
    return {"min": float(v.min()), "median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "max": float(v.max())}


class Describer:
    """Accumulates a description from samples (``add``), then writes it (``finish``)."""

    def __init__(self, name: str, class_names: Sequence[str] | None = None):
        self.name = name
        self.class_names = list(class_names) if class_names is not None else None
        self.samples = 0
        self.members: Counter[str] = Counter()
        self.splits: Counter[str] = Counter()
        self.widths: list[int] = []
        self.heights: list[int] = []
        self.grey = 0
        self.rates: Counter[int] = Counter()
        self.seconds: list[float] = []
        self.text_bytes: list[int] = []
        self.labels: Counter[int] = Counter()
        self.label_names: dict[int, str] = {}
        self.with_attributes = 0
        self.unreadable: Counter[str] = Counter()

    def add(self, members: Mapping[str, bytes], split: str = "train") -> None:
        """Count one sample; a member that does not decode is counted in ``unreadable``, not raised."""
        self.samples += 1
        self.splits[split] += 1
        self.members.update(members.keys())
        image = next((members[e] for e in MODALITIES["image"].members if e in members), None)
        if image is not None:
            try:
                with Image.open(io.BytesIO(image)) as img:  # the header only: no pixels decoded
                    self.widths.append(img.width)
                    self.heights.append(img.height)
                    self.grey += img.mode in ("1", "L", "I", "I;16", "F", "LA")
            except Exception:  # noqa: BLE001 - any undecodable picture is only counted here
                self.unreadable["image"] += 1
        sound = next((members[e] for e in MODALITIES["audio"].members if e in members), None)
        if sound is not None:
            try:
                info = sf.info(io.BytesIO(sound))
                self.rates[int(info.samplerate)] += 1
                self.seconds.append(info.frames / info.samplerate)
            except Exception:  # noqa: BLE001
                self.unreadable["audio"] += 1
        if MODALITIES["text"].present(members):
            try:
                self.text_bytes.append(len(text_of(members).encode("utf-8")))
            except SampleError:
                self.unreadable["text"] += 1
        label = None
        if "cls" in members:
            try:
                label = label_of(members["cls"])
                self.labels[label] += 1
            except SampleError:
                self.unreadable["class"] += 1
        meta = _json_of(members)
        if meta is not None:
            if all(meta.get(k) in shapes.VALUES[k] for k in shapes.ATTRIBUTES):
                self.with_attributes += 1
            if label is not None and isinstance(meta.get("class_name"), str):
                self.label_names.setdefault(label, meta["class_name"])

    def description(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "name": self.name, "samples": self.samples, "splits": dict(self.splits),
                               "members": dict(sorted(self.members.items()))}
        if self.widths:
            short = [min(w, h) for w, h in zip(self.widths, self.heights)]
            out["image"] = {"count": len(self.widths), "width": _stats(self.widths), "height": _stats(self.heights),
                            "short_side": _stats(short), "grey": self.grey}
        if self.rates:
            out["audio"] = {"count": len(self.seconds), "sample_rates": {str(r): n for r, n in sorted(self.rates.items())},
                            "seconds": _stats(self.seconds)}
        if self.text_bytes:
            out["text"] = {"count": len(self.text_bytes), "bytes": _stats(self.text_bytes)}
        if self.labels:
            count = max(self.labels) + 1
            names = self.class_names or [self.label_names.get(i, str(i)) for i in range(count)]
            if len(names) < count:
                raise ValueError(f"{self.name}: labels go up to {count - 1} but only {len(names)} class names were given")
            out["classes"] = {"count": max(count, len(names)), "names": list(names),
                              "samples": {str(k): v for k, v in sorted(self.labels.items())}}
        out["attributes"] = "shapes-v1" if self.samples and self.with_attributes == self.samples else None
        if self.unreadable:
            out["unreadable"] = dict(self.unreadable)
        return out

    def write(self, directory: Path | str) -> dict[str, Any]:
        """Write ``dataset.json`` into ``directory`` (atomically); returns the description."""
        description = self.description()
        write_description(directory, description)
        return description


def _json_of(members: Mapping[str, bytes]) -> dict[str, Any] | None:
    if "json" not in members:
        return None
    try:
        meta = json.loads(members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def write_description(directory: Path | str, description: Mapping[str, Any]) -> None:
    path = Path(directory) / DESCRIPTION_FILE
    tmp = path.with_name(f".{DESCRIPTION_FILE}.tmp")
    tmp.write_text(json.dumps(description, indent=1) + "\n")
    os.replace(tmp, path)


def read_description(location: Path | str) -> dict[str, Any] | None:
    """The description in a folder (or at a dataset.json path); None when there is none."""
    path = Path(location)
    if path.is_dir():
        path = path / DESCRIPTION_FILE
    if not path.is_file():
        return None
    try:
        description = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} description; `lit-vqdiff shards check --describe` writes one")
    return description


def shapes_description(train_samples: int, val_samples: int, holdout: str = "none") -> dict[str, Any]:
    """What a shapes-v1 set of these sizes describes itself as, known before it is rendered."""
    name = shapes.NAME if holdout == "none" else f"{shapes.NAME}-{holdout}"
    describer = Describer(name, class_names=shapes.class_names())
    # Every class once: the same sizes, rates, lengths, caption bytes and classes as the full set.
    for label in range(shapes.NUM_CLASSES):
        describer.add(shapes.members(shapes.make_sample(0, label, label=label)))
    out = describer.description()
    out["samples"], out["splits"] = train_samples + val_samples, {"train": train_samples, "val": val_samples}
    return out


# ---------------------------------------------------------------------- auto values


def _auto_image_size(image: Mapping[str, Any]) -> int:
    side = image["short_side"]["median"]
    return next((s for s in IMAGE_SIZES if s >= side), IMAGE_SIZES[-1])


def resolve_data(data: Any, description: Mapping[str, Any] | None, needs: Sequence[str], where: str) -> None:
    """Fill ``data``'s auto values (in place) from ``description``, for the modalities in ``needs``.

    An auto value the description cannot give (no description, or no such samples in it)
    is a ConfigError naming the key; values that were set stay as they are.
    """
    def missing(key: str, what: str) -> ConfigError:
        return ConfigError(f"data.{key}=0 (auto) needs {what} in the description of {where}; set data.{key}, or "
                           "describe the shards with `lit-vqdiff shards check --describe ...`")

    d = description or {}
    if not data.name:
        data.name = str(d.get("name") or Path(str(data.root)).name)
    if "image" in needs:
        image = d.get("image")
        if not data.image_size:
            if image is None:
                raise missing("image_size", "images")
            data.image_size = _auto_image_size(image)
        if not data.channels:
            if image is None:
                raise missing("channels", "images")
            data.channels = 1 if image["grey"] == image["count"] else 3
    if "audio" in needs:
        audio = d.get("audio")
        if not data.sample_rate:
            if audio is None:
                raise missing("sample_rate", "sounds")
            common = max(audio["sample_rates"].items(), key=lambda kv: (kv[1], int(kv[0])))[0]
            data.sample_rate = min(int(common), MAX_AUTO_RATE)
        if not data.audio_samples:
            if audio is None:
                raise missing("audio_samples", "sounds")
            seconds = min(audio["seconds"]["p90"], MAX_AUTO_SECONDS)
            seconds = max(CLIP_STEP_S, math.ceil(round(seconds / CLIP_STEP_S, 6)) * CLIP_STEP_S)
            data.audio_samples = int(round(seconds * data.sample_rate))
    if "text" in needs and not data.text_bytes:
        text = d.get("text")
        if text is None:
            raise missing("text_bytes", "captions")
        longest = int(text["bytes"]["max"])
        data.text_bytes = min(MAX_AUTO_TEXT, max(TEXT_STEP, -(-longest // TEXT_STEP) * TEXT_STEP))
    if "class" in needs and not data.num_classes:
        classes = d.get("classes")
        if classes is None:
            raise missing("num_classes", "class labels (cls members)")
        data.num_classes = int(classes["count"])


def class_names(description: Mapping[str, Any] | None, count: int) -> list[str]:
    """Names of classes 0..count-1 (their ids as text where the description has none)."""
    names = list(((description or {}).get("classes") or {}).get("names") or [])
    return [names[i] if i < len(names) else str(i) for i in range(count)]


def is_shapes(description: Mapping[str, Any] | None) -> bool:
    """True when every sample carries shapes-v1 attributes: the analytic verifier can score them."""
    return bool(description) and description.get("attributes") == "shapes-v1"
