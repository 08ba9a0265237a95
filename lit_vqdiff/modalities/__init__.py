"""The modalities (image, audio, text, class) and the tasks between them.

Every modality-specific decision lives in one ``Modality`` object (see ``base.py``);
the rest of the platform looks a modality up here by name. Adding a modality is adding
one module beside these and one entry in ``MODALITIES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .audio import AudioModality
from .base import CODES_SUFFIX, DecodeSpec, Modality, TokenSpace, codes_key
from .image import ImageModality
from .label import LabelModality
from .text import TextModality

MODALITIES: dict[str, Modality] = {m.name: m for m in (ImageModality(), AudioModality(), TextModality(), LabelModality())}
# What stage 2 can generate: everything it can turn tokens back into.
TARGETS = ("image", "audio", "text")
TASKS = tuple(f"{s}->{t}" for t in TARGETS for s in MODALITIES if s != t)


def modality(name: str) -> Modality:
    if name not in MODALITIES:
        raise ValueError(f"unknown modality {name!r}; expected one of {list(MODALITIES)}")
    return MODALITIES[name]


@dataclass(frozen=True)
class Task:
    """``source->target``: what stage 2 conditions on and what it generates."""

    source: Modality
    target: Modality

    @property
    def name(self) -> str:
        return f"{self.source.name}->{self.target.name}"

    @property
    def tokenized(self) -> list[str]:
        """Modalities of this task that need a stage-1 tokenizer, source first."""
        return [m.name for m in (self.source, self.target) if m.coded]

    def cached(self, generator: Any) -> dict[str, str]:
        """What a token cache keeps for this task: modality -> form (codes, sentence states)."""
        out = {}
        for role, m in (("source", self.source), ("target", self.target)):
            form = m.cached_form(generator if role == "source" else None)
            if form is not None:
                out[m.name] = form
        return out

    def inputs(self, cached: bool, generator: Any = None) -> tuple[str, ...]:
        """Batch entries a training step reads: raw inputs, or what a token cache keeps of them."""
        forms = self.cached(generator) if cached else {}
        return tuple(f"{m.name}_{forms[m.name]}" if m.name in forms else m.name for m in (self.source, self.target))


def parse_task(task: str) -> Task:
    """'text->image' -> Task(text, image), with a clear error for anything else."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    source, target = task.split("->")
    return Task(MODALITIES[source], MODALITIES[target])


__all__ = ["CODES_SUFFIX", "MODALITIES", "TASKS", "TARGETS", "DecodeSpec", "Modality", "Task", "TokenSpace", "codes_key",
           "modality", "parse_task"]
