"""The Makefile hands ARGS to the program word for word: tasks contain `>`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make_argv(tmp_path: Path, target: str, args: str) -> list[str]:
    """What the program behind `make <target> ARGS=...` receives (CLI swapped for a recorder)."""
    recorder = tmp_path / "record"
    out = tmp_path / "argv.json"
    recorder.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(out)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    recorder.chmod(0o755)
    done = subprocess.run(["make", "-s", "-o", "install", target, f"CLI={recorder}", f"ARGS={args}"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def test_task_overrides_reach_the_program_and_are_not_redirections(tmp_path):
    argv = make_argv(tmp_path, "train-stage2", "task=image->audio trainer.max_steps=3")
    assert argv == ["train", "stage2", "task=image->audio", "trainer.max_steps=3"]
    assert not (REPO / "audio").exists()  # what `task=image->audio` would have written, as a redirection


def test_quotes_in_args_group_words_as_in_a_shell(tmp_path):
    argv = make_argv(tmp_path, "sample", "--task 'text->image' --out \"my samples\"")
    assert argv == ["sample", "--task", "text->image", "--out", "my samples"]
    assert make_argv(tmp_path, "eval", "") == ["eval"]
