"""JSON Lines: one parse loop for every reader, each deciding what a bad line means."""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator


def json_lines(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """(line number from 1, parsed value) for every non-blank line; a line that is not JSON
    gives its ``json.JSONDecodeError`` as the value, for the caller to raise or note."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            yield lineno, err
