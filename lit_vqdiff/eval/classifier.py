"""Class consistency of generated pictures: does a classifier of the data set agree with the class asked for?

For a labelled picture data set the platform trains a small CNN on the set's own train
split (read by ``ShardDataModule`` over ("image", "class") at the sizes its
``dataset.json`` gives), measures its accuracy on the val split, and caches it once per
data set and settings: ``<data root>/classifier/<digest>.pt`` (weights, loadable with
``weights_only=True``) and ``<digest>.json`` beside it (val accuracy, settings, shards).
The digest covers the shard names and sample counts of both splits, the decoded sizes
and the settings, so a rewritten data set gets a new classifier.

``class_consistency(items, labels, classifier)`` is the share of generated pictures the
classifier assigns to their conditioning class. Read it beside the classifier's own val
accuracy: real val pictures score exactly that, so it is the ceiling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DataConfig
from ..data.datamodule import ShardDataModule
from ..data.description import read_description, resolve_data
from ..media import encode_png
from ..modalities.image import decode_image

log = logging.getLogger(__name__)

FORMAT = "lit_vqdiff.classifier/1"
MODALITIES = ("image", "class")


@dataclass(frozen=True)
class ClassifierSettings:
    """How the classifier is built and trained (part of its cache key)."""

    widths: tuple[int, ...] = (32, 64, 128)  # channels of the stem and of the stages after it
    epochs: int = 2
    batch_size: int = 256
    lr: float = 5e-3  # peak of the one-cycle schedule (AdamW)
    weight_decay: float = 1e-4
    seed: int = 0


class SmallCNN(nn.Module):
    """A stride-2 conv stem, conv-BN-ReLU-maxpool stages, global average pool, linear: CPU-friendly."""

    def __init__(self, channels: int, num_classes: int, widths: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        cin = channels
        for i, width in enumerate(widths):
            # The stem halves the resolution by its stride: full-size activations dominate CPU time.
            layers += [nn.Conv2d(cin, width, 3, stride=1 if i else 2, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)] + ([nn.MaxPool2d(2)] if i else [])
            cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@dataclass
class Classifier:
    """A trained classifier with the picture format it reads and its val accuracy."""

    model: SmallCNN
    image_size: int
    channels: int
    num_classes: int
    val_accuracy: float
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- data


def classifier_data_config(root: Path | str, settings: ClassifierSettings, **overrides: Any) -> DataConfig:
    """A DataConfig over ``root`` with sizes and classes resolved from its dataset.json."""
    cfg = DataConfig(root=str(root), batch_size=settings.batch_size, val_batch_size=256, num_workers=0,
                     shuffle_buffer=2000, **overrides)
    resolve_data(cfg, read_description(root), MODALITIES, str(root))
    if int(cfg.num_classes) < 2:
        raise ValueError(f"{root}: a classifier needs at least 2 classes, the data set has {cfg.num_classes}")
    return cfg


def data_digest(data: ShardDataModule, settings: ClassifierSettings) -> str:
    """Digest of the shard lists with their sizes, the decoded picture format and the settings."""
    cfg = data.cfg
    payload = {
        "format": FORMAT,
        "shards": {split: [[s.name, s.size] for s in data.shards(split)] for split in ("train", "val")},
        "picture": [int(cfg.image_size), int(cfg.channels), int(cfg.num_classes)],
        "settings": asdict(settings),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- training


def train(data: ShardDataModule, settings: ClassifierSettings) -> SmallCNN:
    """A SmallCNN trained on the train stream for ``settings.epochs`` epochs (padding repeats left out)."""
    torch.manual_seed(settings.seed)
    cfg = data.cfg
    model = SmallCNN(int(cfg.channels), int(cfg.num_classes), settings.widths)
    steps = settings.epochs * len(data.train_dataloader())
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=max(1, steps))
    model.train()
    for epoch in range(settings.epochs):
        data.set_epoch(epoch)
        for batch in data.train_dataloader():
            valid = batch["valid"]
            if not valid.any():  # a batch of padding repeats only
                continue
            loss = F.cross_entropy(model(batch["image"][valid]), batch["label"][valid])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        log.info("classifier epoch %d/%d done", epoch + 1, settings.epochs)
    return model.eval()


@torch.no_grad()
def val_accuracy(model: nn.Module, data: ShardDataModule) -> float:
    """Share of the val split's pictures classified right (padding repeats left out)."""
    model.eval()
    right = total = 0
    for batch in data.val_dataloader():
        valid = batch["valid"]
        right += int((model(batch["image"][valid]).argmax(dim=1) == batch["label"][valid]).sum())
        total += int(valid.sum())
    if not total:
        raise ValueError(f"{data.cfg.root}: the val split holds no labelled pictures")
    return right / total


def save_classifier(path: Path, classifier: Classifier) -> None:
    """Weights as ``path`` (.pt) and the record as ``path`` with .json, each written whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "state_dict": classifier.model.state_dict(), "image_size": classifier.image_size,
             "channels": classifier.channels, "num_classes": classifier.num_classes,
             "widths": list(classifier.info["settings"]["widths"])}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    record = path.with_suffix(".json")
    tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(classifier.info, indent=1) + "\n")
    os.replace(tmp, record)


def load_classifier(path: Path | str) -> Classifier:
    """A cached classifier (``.pt`` with its ``.json`` record beside it)."""
    path = Path(path)
    record = path.with_suffix(".json")
    if not path.is_file() or not record.is_file():
        raise FileNotFoundError(f"{path}: no cached classifier (needs {path.name} and {record.name})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    info = json.loads(record.read_text())
    model = SmallCNN(int(state["channels"]), int(state["num_classes"]), [int(w) for w in state["widths"]])
    model.load_state_dict(state["state_dict"])
    return Classifier(model.eval(), int(state["image_size"]), int(state["channels"]), int(state["num_classes"]),
                      float(info["val_accuracy"]), path, info)


def data_classifier(root: Path | str, settings: ClassifierSettings | None = None, cache_dir: Path | str | None = None,
                    retrain: bool = False) -> Classifier:
    """The data set's classifier: from ``<root>/classifier/`` (or ``cache_dir``), else trained and cached."""
    settings = settings or ClassifierSettings()
    data = ShardDataModule(classifier_data_config(root, settings), MODALITIES, seed=settings.seed)
    digest = data_digest(data, settings)
    path = Path(cache_dir or Path(root) / "classifier") / f"{digest}.pt"
    if path.is_file() and not retrain:
        return load_classifier(path)
    start = time.perf_counter()
    model = train(data, settings)
    seconds = time.perf_counter() - start
    accuracy = val_accuracy(model, data)
    cfg = data.cfg
    info = {"format": FORMAT, "data": str(cfg.name), "root": str(root), "digest": digest, "val_accuracy": accuracy,
            "train_seconds": round(seconds, 1), "image_size": int(cfg.image_size), "channels": int(cfg.channels),
            "num_classes": int(cfg.num_classes), "settings": asdict(settings),
            "shards": {split: {s.name: s.size for s in data.shards(split)} for split in ("train", "val")}}
    classifier = Classifier(model, int(cfg.image_size), int(cfg.channels), int(cfg.num_classes), accuracy, path, info)
    save_classifier(path, classifier)
    log.info("classifier of %s: val accuracy %.4f after %.0f s, cached in %s", cfg.name, accuracy, seconds, path)
    return classifier


# ----------------------------------------------------------------------------- scoring


def picture_input(picture: np.ndarray, image_size: int, channels: int) -> Tensor:
    """A uint8 (H, W, C) picture as the classifier reads it: (channels, size, size) in [-1, 1]."""
    array = np.asarray(picture)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"pictures must be uint8 (H, W) or (H, W, C), got {array.dtype} {array.shape}")
    array = array[..., None] if array.ndim == 2 else array
    if array.shape == (image_size, image_size, channels):
        return torch.from_numpy(np.array(array)).permute(2, 0, 1).float().div(127.5).sub(1.0)  # a writable copy
    # Other sizes or colours go the way training pictures went: crop, resize, convert as decoding does.
    return decode_image(encode_png(array), image_size, channels)


@torch.no_grad()
def predict(items: Sequence[np.ndarray], classifier: Classifier, batch_size: int = 256) -> Tensor:
    """Predicted class of each uint8 picture."""
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = torch.stack([picture_input(p, classifier.image_size, classifier.channels) for p in chunk])
        out.append(classifier.model(batch).argmax(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def class_consistency(items: Sequence[np.ndarray], labels: Sequence[int], classifier: Classifier) -> float:
    """Share of generated pictures the classifier assigns to their conditioning class."""
    if len(items) != len(labels):
        raise ValueError(f"{len(items)} pictures for {len(labels)} labels")
    if not len(items):
        raise ValueError("no pictures to score")
    wanted = torch.as_tensor([int(label) for label in labels])
    if int(wanted.min()) < 0 or int(wanted.max()) >= classifier.num_classes:
        raise ValueError(f"labels must lie in 0..{classifier.num_classes - 1}, got {int(wanted.min())}..{int(wanted.max())}")
    return float((predict(items, classifier) == wanted).double().mean())
