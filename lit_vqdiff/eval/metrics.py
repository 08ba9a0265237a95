"""Metrics of generated samples against real data: what `eval` reports on any data set."""

from __future__ import annotations

from typing import Sequence


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings (insertions, deletions, substitutions)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def character_error_rate(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Character edits needed to turn each hypothesis into its reference, over the references' length."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    edits = sum(edit_distance(h, r) for h, r in zip(hypotheses, references))
    return edits / max(1, sum(len(r) for r in references))


def text_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match and character error rate of generated captions against reference captions."""
    exact = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / max(1, len(references))
    return {"reference_exact_match": float(exact), "cer": float(character_error_rate(hypotheses, references))}
