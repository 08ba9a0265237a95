"""Progress of long commands: plain lines without carriage returns when the output is a file."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from lit_vqdiff.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_file_gets_plain_lines_and_a_terminal_a_bar():
    log = io.StringIO()
    assert list(progress(range(5), "writing", unit="shard", stream=log, every_s=0.0)) == list(range(5))
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 6  # one line per item (every_s=0) and a last one
    assert lines[-1].startswith("writing: 5/5 shards in") and lines[-1].endswith("done")
    batches = io.StringIO()
    list(progress(range(2), "Inception features", unit="batch", stream=batches))
    assert "2 batches in" in batches.getvalue()  # the plural of the unit, not "batchs"
    quiet = io.StringIO()
    assert list(progress(range(3), "x", stream=quiet)) == [0, 1, 2] and quiet.getvalue().count("\n") == 1  # only the end
    tty = Terminal()
    list(progress(range(3), "bar", stream=tty))
    assert "\r" in tty.getvalue()  # tqdm's bar, on a terminal


def test_shard_writing_into_a_log_file_has_no_carriage_returns(tmp_path):
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "lit_vqdiff.cli", "shards", "write", "shapes", "--out", str(tmp_path / "s"),
                               "data.shapes.train_samples=40", "data.shapes.val_samples=8", "data.shapes.shard_size=8"],
                              stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent, timeout=120)
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text and "shapes-v1 train: 40/40 samples" in text and "wrote" in text
