"""How generated items of one task are scored: the same ``Scorer`` in validation and `eval`.

- shapes-v1 conditions (their attributes known): exact match and per-attribute accuracy
  read back by the analytic verifier; with the compositional hold-out, exact match on
  the held-out combinations and on the seen ones separately;
- captions with a reference: exact match and character error rate;
- pictures and sounds of real data, with references: Frechet distance, precision and
  recall in a pretrained feature space (``frechet.py``), beside the real-vs-real floor;
- pictures whose condition names a class of a labelled data set: class consistency by the
  data set's own classifier, beside that classifier's val accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from ..data import shapes
from . import frechet, metrics
from . import shapes as shapes_verifier
from .classifier import Classifier, class_consistency, predict


HOLDOUT_LABELS = shapes.HOLDOUTS  # data.shapes.holdout -> the labels it keeps out of training


def heldout_flags(attributes: Sequence[dict[str, str]]) -> list[bool]:
    """Whether each attribute set is one of the compositional hold-out's combinations."""
    return [shapes.label_of(shapes.Attributes(**attrs)) in shapes.HELDOUT_LABELS for attrs in attributes]


@dataclass
class Scorer:
    """Scores of generated items of one target modality (see the module docstring)."""

    target: str
    sample_rate: int
    real: bool = False  # real data: Frechet distance and precision/recall against the references
    second_real: Sequence[Any] | None = None  # real items beside the references (train), for the floor
    classifier: Classifier | None = None  # a labelled data set's classifier, for class consistency
    holdout: bool = False  # the run held the compositional combinations out of training
    _reference: tuple[int, Tensor] | None = field(default=None, repr=False)  # (count, features) of fixed references
    _floor: dict[str, float] | None = field(default=None, repr=False)

    def fix_references(self, references: Sequence[Any]) -> None:
        """Embed references every later call shares (validation's fixed conditions) once."""
        references = [r for r in references if r is not None]
        if self.real and self.target in frechet.SPACES and references:
            self._reference = (len(references), frechet.features_of(references, self.target, self.sample_rate))

    def score(self, items: Sequence[Any], attributes: Sequence[dict | None], references: Sequence[Any | None],
              labels: Sequence[int | None]) -> dict[str, float]:
        # Judges run in full precision, also from inside a bf16-autocast validation.
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return self._score(items, attributes, references, labels)

    def _score(self, items: Sequence[Any], attributes: Sequence[dict | None], references: Sequence[Any | None],
               labels: Sequence[int | None]) -> dict[str, float]:
        out: dict[str, float] = {}
        out |= self.verified(items, attributes)
        paired = [(item, ref) for item, ref in zip(items, references) if ref is not None]
        if self.target == "text" and paired:
            out |= metrics.text_scores([h for h, _ in paired], [r for _, r in paired])
            out["n_referenced"] = len(paired)
        if self.real and self.target in frechet.SPACES and (paired or self._reference):
            out |= self.distribution([item for item, _ in paired] or list(items), [ref for _, ref in paired])
        labelled = [(item, label) for item, label in zip(items, labels) if label is not None]
        if self.classifier is not None and self.target == "image" and labelled:
            out["class_consistency"] = class_consistency([i for i, _ in labelled], [lab for _, lab in labelled], self.classifier)
            out["classifier_val_accuracy"] = self.classifier.val_accuracy
        return out

    def per_item(self, items: Sequence[Any], attributes: Sequence[dict | None], references: Sequence[Any | None],
                 labels: Sequence[int | None]) -> tuple[str, list[float | None]] | None:
        """(name, one score per item) for a table of samples: shapes-v1 exact match, a
        caption's character error rate, or whether the classifier finds the asked class."""
        if any(attributes):
            flags = [i for i, attrs in enumerate(attributes) if attrs]
            readings = shapes_verifier.read_items(self.target, [items[i] for i in flags], self.sample_rate)
            out: list[float | None] = [None] * len(items)
            for i, reading in zip(flags, readings):
                out[i] = float(all(reading.get(k) == attributes[i][k] for k in shapes.ATTRIBUTES))
            return "exact_match", out
        if self.target == "text" and any(r is not None for r in references):
            return "cer", [None if r is None else metrics.character_error_rate([h], [r]) for h, r in zip(items, references)]
        if self.classifier is not None and self.target == "image" and any(label is not None for label in labels):
            predicted = predict(list(items), self.classifier).tolist()
            return "class_match", [None if label is None else float(p == label) for p, label in zip(predicted, labels)]
        return None

    def verified(self, items: Sequence[Any], attributes: Sequence[dict | None]) -> dict[str, float]:
        """shapes-v1 scores of the items whose conditions carry attributes."""
        pairs = [(item, attrs) for item, attrs in zip(items, attributes) if attrs]
        if not pairs:
            return {}
        readings = shapes_verifier.read_items(self.target, [item for item, _ in pairs], self.sample_rate)
        expected = [attrs for _, attrs in pairs]
        result = shapes_verifier.score(readings, expected)
        out = {"exact_match": result["exact_match"], "n_verified": result["n"]}
        out |= {f"acc_{k}": result[k] for k in shapes.ATTRIBUTES}
        if self.holdout:
            flags = heldout_flags(expected)
            for name, wanted in (("heldout", True), ("seen", False)):
                chosen = [i for i, flag in enumerate(flags) if flag == wanted]
                if chosen:
                    part = shapes_verifier.score([readings[i] for i in chosen], [expected[i] for i in chosen])
                    out[f"exact_match_{name}"], out[f"n_{name}"] = part["exact_match"], part["n"]
        return out

    def distribution(self, items: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
        """Frechet distance and precision/recall against the references, and the floor beside them."""
        if self._reference is not None and (not references or len(references) == self._reference[0]):
            reference = self._reference[1]
        else:
            reference = frechet.features_of(references, self.target, self.sample_rate)
        out = frechet.named(frechet.feature_scores(reference, frechet.features_of(items, self.target, self.sample_rate)),
                            self.target)
        if self.second_real is not None:
            if self._floor is None:
                second = frechet.features_of(frechet.first_n(self.second_real, len(reference)), self.target, self.sample_rate)
                floor = frechet.feature_scores(reference, second)
                self._floor = frechet.named({k: floor[k] for k in frechet.SCORES}, self.target, "_floor")
            out |= self._floor
        return out
