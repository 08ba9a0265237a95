"""`lit-vqdiff report RUN [RUN ...] --out report.html`: one self-contained HTML page about runs.

For each run folder it shows what a reader would otherwise open file by file: the run's
stage, task or modality and data set, its summary figures, its loss and metric curves
over steps (read back from the CSV logger's ``metrics.csv`` or from W&B's own offline
``.wandb`` log), the media its validations left (reconstruction pairs, codebook usage,
sample grids, spectrograms, sounds, captions), the samples of a stage-2 run with their
conditions and references (``samples/manifest.jsonl``) and its final evaluation. With
several runs a comparison section puts their figures side by side and overlays the
curves of runs of the same stage and task.

Everything is inside the one file: pictures as base64 PNG data URIs, sounds as base64
WAV data URIs, the stylesheet inline. Curves are drawn with matplotlib (Agg); large
pictures are scaled down and each run shows at most ``MAX_SAMPLES`` samples, so that the
page stays a few megabytes at most.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import soundfile as sf
import yaml
from PIL import Image

from . import media
from .jsonl import json_lines

MAX_SAMPLES = 64  # samples of a stage-2 run shown (with their conditions and references)
MAX_SOUND_SAMPLES = 16  # fewer when sounds are involved: a second of WAV is ~20 kB of base64
MAX_SIDE = 1024  # longest side of an embedded picture, in pixels; larger ones are scaled down
MAX_SECONDS = 10.0  # longest sound embedded; longer ones are cut
MAX_SERIES_POINTS = 2000  # points per curve; longer histories are thinned evenly
SAMPLE_PIXELS = 64  # small sample pictures (32x32 shapes) are shown at least this wide
SAMPLE_SIDE = 192  # and large ones (photographs) are scaled down to this in the samples table

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
SOUND_SUFFIXES = (".wav", ".flac", ".ogg")
TEXT_SUFFIXES = (".txt",)

# History keys that are bookkeeping, not metrics; metrics are namespaced (train/loss, val/psnr, perf/..., data/...).
NOT_METRICS = {"epoch", "step", "trainer/global_step"}
BOOKKEEPING_NAMESPACES = ("trainer",)

MEDIA_TITLES = {
    "val_reconstructions": "Reconstructions (input | reconstruction)",
    "val_reconstructions_spectrograms": "Reconstructions: spectrograms (input | reconstruction)",
    "val_code_usage": "Codebook usage (codes sorted by use; red: dead codes)",
    "val_samples": "Validation samples",
    "val_samples_spectrograms": "Validation samples: spectrograms",
}


# ----------------------------------------------------------------------------- reading a run folder

Series = list[tuple[int, float]]  # (step, value), sorted by step


@dataclass
class Run:
    """What the report knows of one run folder."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    history: dict[str, Series]  # metric key -> its values over steps
    history_source: str  # "csv", "wandb" or "" (none found)
    notes: list[str] = field(default_factory=list)  # what could not be read, for the page

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def stage(self) -> str:
        return str(self.config.get("stage") or self.summary.get("stage") or "?")

    @property
    def kind(self) -> str:
        """The task of a stage-2 run (``text->image``), the modality of a stage-1 run (``image``)."""
        if self.stage == "stage2":
            return str(self.config.get("task") or self.summary.get("task") or "?")
        return str(self.config.get("modality") or self.summary.get("modality") or "?")

    @property
    def dataset(self) -> str:
        return str(mapping(self.config, "data").get("name") or self.summary.get("data") or "?")


def mapping(parent: dict[str, Any], key: str) -> dict[str, Any]:
    """``parent[key]`` when it is a mapping, else empty: a hand-edited file never breaks the page."""
    value = parent.get(key)
    return value if isinstance(value, dict) else {}


def shown_path(path: Path) -> str:
    """A run folder as the page's reader knows it: relative to where the report was made, when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_run(path: Path | str) -> Run:
    """A run folder (a ``latest-*`` link to one, or a file inside it): config, summary and metric history."""
    given = Path(path)
    if not given.exists():
        raise FileNotFoundError(f"no run at {given}")
    folder = given.resolve()
    folder = folder.parent if folder.is_file() else folder
    config_file, summary_file = folder / "config.yaml", folder / "summary.json"
    if not config_file.is_file() and not summary_file.is_file():
        raise FileNotFoundError(f"{given} is not a run folder: it has neither config.yaml nor summary.json")
    notes: list[str] = []
    config = _read_yaml(config_file, notes)
    summary = _read_json(summary_file, notes)
    if not summary_file.is_file():
        notes.append("no summary.json: the run has not finished (or failed)")
    history, source = read_history(folder, notes)
    return Run(folder, config, summary, history, source, notes)


def _read_yaml(path: Path, notes: list[str]) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        notes.append(f"{path.name} unreadable: {err}")
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _read_json(path: Path, notes: list[str]) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        notes.append(f"{path.name} unreadable: {err}")
        return {}
    return loaded if isinstance(loaded, dict) else {}


def read_history(run_dir: Path, notes: list[str] | None = None) -> tuple[dict[str, Series], str]:
    """Metric key -> (step, value) series from the run's CSV logs (``csv``, ``csv-1``, ... for
    resumptions, the later one winning a step both logged) or, failing that, its offline W&B logs."""
    notes = [] if notes is None else notes
    csv_files = sorted(run_dir.glob("csv*/metrics.csv"), key=lambda p: _version_number(p.parent.name))
    if csv_files:
        return _merge(read_csv_metrics(f) for f in csv_files), "csv"
    # One folder per W&B run started in this run folder (a resumption may start another);
    # wandb/latest-run is a link to one of them.
    wandb_files = sorted((p for p in run_dir.glob("wandb/*/run-*.wandb") if not p.parent.is_symlink()),
                         key=lambda p: (p.stat().st_mtime, p.name))
    if wandb_files:
        return _merge(read_wandb_history(f, notes) for f in wandb_files), "wandb"
    return {}, ""


def _version_number(name: str) -> int:
    found = re.fullmatch(r"csv(?:-(\d+))?", name)
    return int(found.group(1) or 0) if found else 1 << 30


def _merge(parts: Iterator[dict[str, dict[int, float]]]) -> dict[str, Series]:
    merged: dict[str, dict[int, float]] = {}
    for part in parts:
        for key, values in part.items():
            merged.setdefault(key, {}).update(values)
    return {key: sorted(values.items()) for key, values in sorted(merged.items())}


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_csv_metrics(path: Path) -> dict[str, dict[int, float]]:
    """Lightning's CSVLogger file: one row per logged step, a column per key, ``step`` the step
    (``trainer/global_step`` where a file has no ``step`` column)."""
    out: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = _number(row.get("step") or row.get("trainer/global_step") or "")
            if step is None:
                continue
            for key, text in row.items():
                if key is None or key in NOT_METRICS or not text:
                    continue
                value = _number(text)
                if value is not None:
                    out.setdefault(key, {})[int(step)] = value
    return out


# W&B's offline log (``run-<id>.wandb``) is a LevelDB-style log of protobuf ``Record``s:
# a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte header (CRC-32 of
# its type byte and data, length, type: full, or first / middle / last of a record that
# spans blocks).
WANDB_IDENT, WANDB_MAGIC, WANDB_VERSION = b":W&B", 0xBEE1, 0
BLOCK_BYTES, CHUNK_HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_log_records(path: Path, notes: list[str] | None = None) -> Iterator[bytes]:
    """The serialized records of a ``.wandb`` file, in order. A damaged or truncated tail (a run
    killed while writing) ends the reading with a note rather than an error."""
    notes = [] if notes is None else notes
    data = Path(path).read_bytes()
    if len(data) < 7 or struct.unpack("<4sHB", data[:7]) != (WANDB_IDENT, WANDB_MAGIC, WANDB_VERSION):
        notes.append(f"{path.name}: not a W&B log (unknown header)")
        return
    pos, pending = 7, b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK_BYTES - pos % BLOCK_BYTES
        if left_in_block < CHUNK_HEADER:  # a block's tail too short for a header is padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if crc == 0 and length == 0 and kind == 0:  # zero padding up to the next block
            pos += left_in_block
            continue
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            notes.append(f"{path.name}: damaged or truncated at byte {pos}; history read up to there")
            return
        pos += CHUNK_HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:
            notes.append(f"{path.name}: unknown chunk type {kind} at byte {pos}; history read up to there")
            return


def read_wandb_history(path: Path, notes: list[str] | None = None) -> dict[str, dict[int, float]]:
    """Scalar history of an offline W&B run, read with W&B's own protobuf schema. The step is
    Lightning's ``trainer/global_step`` where logged (W&B's ``_step`` otherwise); media and
    other nested values are left out (the report reads media from the run folder)."""
    from wandb.proto import wandb_internal_pb2

    out: dict[str, dict[int, float]] = {}
    for raw in wandb_log_records(path, notes):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, float] = {}
        for item in record.history.item:
            key = item.key or (item.nested_key[0] if len(item.nested_key) == 1 else "")
            if not key:
                continue  # a nested value: media (images, audio, tables) as W&B stores them
            try:
                value = json.loads(item.value_json)
            except json.JSONDecodeError:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                row[key] = float(value)
        step = row.get("trainer/global_step", row.get("_step"))
        if step is None:
            continue
        for key, value in row.items():
            if key not in NOT_METRICS and not key.startswith("_"):
                out.setdefault(key, {})[int(step)] = value
    return out


# ----------------------------------------------------------------------------- curves


def is_metric(key: str) -> bool:
    """A namespaced metric (``train/loss``), not bookkeeping (``epoch``, ``trainer/global_step``)."""
    split, _, name = key.partition("/")
    return bool(name) and key not in NOT_METRICS and split not in BOOKKEEPING_NAMESPACES and not key.startswith("_")


def is_counter(key: str) -> bool:
    """Skip counters (``data/skipped_*``, ``train/skipped_nonfinite``): plotted only when not all zero."""
    return key.startswith("data/") or "/skipped" in key


def metric_families(keys: Sequence[str]) -> dict[str, list[str]]:
    """Metric keys grouped into the families drawn one figure each: the losses of a split
    (``train/loss``, ``train/recon_loss`` ... -> ``train/loss``), the data counters
    (``data/*`` -> ``data/skipped``), and otherwise a split's metrics sharing a stem
    (``val/acc_color``, ``val/acc_shape`` -> ``val/acc``); a metric alone is its own family
    (``val/psnr``, ``val/exact_match``)."""
    families: dict[str, list[str]] = {}
    for key in keys:
        split, _, name = key.partition("/")
        if not is_metric(key):
            continue
        if name == "loss" or name.endswith("_loss"):
            family = f"{split}/loss"
        elif split == "data":
            family = "data/skipped"
        else:
            family = f"{split}/{name.split('_')[0]}"
        families.setdefault(family, []).append(key)
    # A stem that only one key has is no family: the figure is named after the key.
    named = {(keys[0] if len(keys) == 1 and not f.endswith(("/loss", "/skipped")) else f): sorted(keys)
             for f, keys in families.items()}
    order = {"train/loss": 0, "val/loss": 1}
    return {f: named[f] for f in sorted(named, key=lambda f: (order.get(f, 2), f))}


def plotted_history(run: Run) -> tuple[dict[str, Series], list[str]]:
    """The series worth a curve, and the keys left out (all-zero counters)."""
    kept, dropped = {}, []
    for key, series in run.history.items():
        if not is_metric(key):
            continue
        if is_counter(key) and all(v == 0 for _, v in series):
            dropped.append(key)
            continue
        kept[key] = series
    return kept, dropped


def family_title(family: str, keys: Sequence[str]) -> str:
    if len(keys) == 1:
        return keys[0]
    if family.endswith("/loss"):
        return f"{family.split('/')[0]} losses"
    return f"{family}_*"


def _thin(series: Series) -> Series:
    if len(series) <= MAX_SERIES_POINTS:
        return series
    idx = np.linspace(0, len(series) - 1, MAX_SERIES_POINTS).round().astype(int)
    return [series[i] for i in sorted(set(idx.tolist()))]


def curve_png(lines: Sequence[tuple[str, Series, int, int]], title: str) -> bytes:
    """A line chart as PNG bytes: ``lines`` are (label, series, colour index, dash index)."""
    # A Figure drawn by the Agg canvas directly: no pyplot, no global backend or state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 2.7), dpi=80)
    fig.subplots_adjust(left=0.14, right=0.97, top=0.88, bottom=0.17)  # fixed margins: a layout engine doubles the cost
    ax = fig.subplots()
    ax.tick_params(labelsize=8)
    colours = [f"C{i}" for i in range(10)]
    dashes = ["-", "--", ":", "-."]
    for label, series, colour, dash in lines:
        series = _thin(series)
        steps = [s for s, _ in series]
        values = [v for _, v in series]
        ax.plot(steps, values, dashes[dash % len(dashes)], color=colours[colour % len(colours)], label=label,
                marker="o" if len(series) <= 12 else None, markersize=3.5, linewidth=1.4)
    steps = sorted({s for _, series, _, _ in lines for s, _ in series})
    if len(steps) == 1:  # one validation so far: one tick at its step, not a made-up range around it
        ax.set_xticks(steps)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(True, alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=7, loc="best", framealpha=0.7)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    # A 64-colour palette keeps a chart's PNG at a third of its size, with no visible change.
    picture = Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB").quantize(colors=64)
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------- embedding


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def png_uri(image: Image.Image | np.ndarray, max_side: int = MAX_SIDE) -> tuple[str, int, int]:
    """A picture as a PNG data URI (scaled down to ``max_side``) and its width and height."""
    picture = Image.fromarray(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if picture.mode not in ("RGB", "RGBA", "L"):
        picture = picture.convert("RGBA" if "A" in picture.getbands() else "RGB")
    if max(picture.size) > max_side:
        picture = picture.copy()
        picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    return data_uri("image/png", buf.getvalue()), picture.width, picture.height


def img_tag(image: Image.Image | np.ndarray, alt: str, small: bool = False) -> str:
    """``<img>`` of a picture; ``small`` ones (samples) are scaled up crisply to ``SAMPLE_PIXELS``
    wide, or down to ``SAMPLE_SIDE``."""
    uri, w, h = png_uri(image, SAMPLE_SIDE if small else MAX_SIDE)
    if small and w < SAMPLE_PIXELS:
        factor = -(-SAMPLE_PIXELS // w)
        w, h = w * factor, h * factor
    return f'<img src="{uri}" width="{w}" height="{h}" alt="{html.escape(alt)}" class="pic">'


def file_img(path: Path, alt: str, small: bool = False) -> str:
    try:
        with Image.open(path) as picture:
            picture.load()
            return img_tag(picture, alt, small)
    except (OSError, ValueError) as err:
        return f'<span class="missing">{html.escape(path.name)}: unreadable ({html.escape(type(err).__name__)})</span>'


def audio_tag(wave: np.ndarray, rate: int, title: str = "") -> str:
    """``<audio controls>`` with the sound as a 16-bit WAV data URI (mono, cut to ``MAX_SECONDS``)."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim > 1:
        wave = wave.mean(axis=1)
    wave = wave[: int(MAX_SECONDS * rate)]
    uri = data_uri("audio/wav", media.encode_wav(wave, rate))
    return f'<audio controls preload="metadata" src="{uri}" title="{html.escape(title)}"></audio>'


def file_audio(path: Path, title: str = "") -> str:
    try:
        wave, rate = sf.read(path, dtype="float32", always_2d=False)
    except (OSError, RuntimeError) as err:
        return f'<span class="missing">{html.escape(path.name)}: unreadable ({html.escape(type(err).__name__)})</span>'
    return audio_tag(wave, int(rate), title or path.name)


def file_text(path: Path, limit: int = 2000) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        return f'<span class="missing">{html.escape(path.name)}: unreadable ({html.escape(type(err).__name__)})</span>'
    return f'<span class="caption">{html.escape(text[:limit])}</span>'


def file_cell(folder: Path, name: Any, small: bool = True) -> str:
    """A sample's file (picture, sound or caption) as HTML, by its suffix."""
    if not isinstance(name, str):
        return html.escape(json.dumps(name))
    path = folder / name
    if not path.is_file():
        return f'<span class="missing">{html.escape(name)}: missing</span>'
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return file_img(path, name, small)
    if suffix in SOUND_SUFFIXES:
        return file_audio(path, name)
    if suffix in TEXT_SUFFIXES:
        return file_text(path)
    return html.escape(name)


# ----------------------------------------------------------------------------- sections of the page


def fmt(value: Any) -> str:
    """A figure for a table: floats to 4 significant digits, the rest as text."""
    if isinstance(value, bool) or value is None:
        return html.escape(str(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return html.escape(json.dumps(value))
    return html.escape(str(value))


def table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None, cls: str = "") -> str:
    """An HTML table of already-escaped cells."""
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{head}{body}</table>'


def scalar_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary's own figures (sampling settings and the evaluation have sections of their own)."""
    return {k: v for k, v in summary.items() if k not in ("sampling", "eval") and not isinstance(v, dict)}


def eval_rows(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-task scores of the final evaluation: task -> metric -> value."""
    tasks = mapping(mapping(summary, "eval"), "tasks")
    return {task: scores for task, scores in tasks.items() if isinstance(scores, dict)}


def flat_eval(summary: dict[str, Any]) -> dict[str, Any]:
    """The final scores as one row: ``metric`` for a run that evaluated one task (the usual
    case: the comparison names the task above), ``task: metric`` for several."""
    tasks = eval_rows(summary)
    if len(tasks) == 1:
        return dict(next(iter(tasks.values())))
    return {f"{t}: {m}": v for t, scores in tasks.items() for m, v in scores.items()}


def section_overview(run: Run) -> str:
    ckpts = sorted((run.path / "checkpoints").glob("*.ckpt")) if (run.path / "checkpoints").is_dir() else []
    logger = mapping(run.config, "logger").get("kind", "?")
    rows = [["stage", html.escape(run.stage)],
            ["task" if run.stage == "stage2" else "modality", html.escape(run.kind)],
            ["data set", html.escape(run.dataset)],
            ["folder", f"<code>{html.escape(shown_path(run.path))}</code>"],
            ["logger", html.escape(f"{logger}" + (f" (history from {run.history_source})" if run.history_source else " (no history found)"))],
            ["checkpoints", html.escape(", ".join(f"{p.name} ({p.stat().st_size / 1e6:.1f} MB)" for p in ckpts) or "none")]]
    name = mapping(run.config, "run").get("name")
    if name:
        rows.insert(0, ["name", html.escape(str(name))])
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in run.notes)
    return f'<h3>Overview</h3>{table(rows, cls="kv")}{notes}'


OVERVIEW_KEYS = ("stage", "task", "modality", "data")  # shown in a run's overview already


def section_summary(run: Run) -> str:
    figures = {k: v for k, v in scalar_summary(run.summary).items() if k not in OVERVIEW_KEYS}
    if not figures:
        return "<h3>Summary</h3><p class=\"none\">no summary figures</p>"
    return "<h3>Summary</h3>" + table([[html.escape(k), fmt(v)] for k, v in figures.items()], cls="kv")


def section_curves(run: Run, anchor: str) -> str:
    series, dropped = plotted_history(run)
    if not series:
        why = "no metrics were logged" if run.history_source else "no metric history (logger none, or nothing logged yet)"
        return f'<h3>Curves</h3><p class="none">{why}</p>'
    figures = []
    for family, keys in metric_families(list(series)).items():
        title = family_title(family, keys)
        png = curve_png([(key, series[key], 0 if len(keys) == 1 else i, i) for i, key in enumerate(keys)], title)
        uri = data_uri("image/png", png)
        figures.append(f'<figure class="curve" data-run="{anchor}" data-family="{html.escape(family)}">'
                       f'<img src="{uri}" alt="{html.escape(title)}"></figure>')
    note = f'<p class="note">all-zero counters not drawn: {html.escape(", ".join(dropped))}</p>' if dropped else ""
    return f'<h3>Curves</h3><div class="grid">{"".join(figures)}</div>{note}'


STEP_FILE = re.compile(r"step-(\d+)(?:-(\d+))?\.(\w+)$")


def media_steps(folder: Path) -> dict[int, list[Path]]:
    """step -> the files one validation wrote into a media folder (sounds in their order)."""
    steps: dict[int, list[tuple[int, Path]]] = {}
    for path in folder.iterdir():
        found = STEP_FILE.fullmatch(path.name)
        if found:
            steps.setdefault(int(found.group(1)), []).append((int(found.group(2) or 0), path))
    return {step: [p for _, p in sorted(files)] for step, files in sorted(steps.items())}


def media_block(key: str, files: list[Path], step: int) -> str:
    """One validation's media of one key: a picture, sounds (input/reconstruction pairs for a
    tokenizer) or caption rows."""
    pictures = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    sounds = [p for p in files if p.suffix.lower() in SOUND_SUFFIXES]
    texts = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES]
    parts = [file_img(p, f"{key} step {step}") for p in pictures]
    if sounds:
        if key == "val_reconstructions" and len(sounds) % 2 == 0:
            rows = [[file_audio(a, f"input {i}"), file_audio(b, f"reconstruction {i}")]
                    for i, (a, b) in enumerate(zip(sounds[::2], sounds[1::2]))]
            parts.append(table(rows, ["input", "reconstruction"], cls="sounds"))
        else:
            parts.append(table([[file_audio(p, p.name)] for p in sounds[:MAX_SOUND_SAMPLES]], ["sound"], cls="sounds"))
    for path in texts:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[:MAX_SAMPLES]
        parts.append("<ol class=\"captions\">" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ol>")
    return "".join(parts)


def section_media(run: Run) -> str:
    """The latest validation's media per key (and, for pictures, the first one beside it)."""
    root = run.path / "media"
    blocks = []
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for folder in folders:
        steps = media_steps(folder)
        if not steps:
            continue
        key = folder.name
        title = MEDIA_TITLES.get(key, key)
        last = max(steps)
        shown = [last]
        first = min(steps)
        if first != last and all(p.suffix.lower() in IMAGE_SUFFIXES for p in steps[first]):
            shown.insert(0, first)  # how the pictures changed over training
        cells = "".join(f'<div class="media-step"><div class="step">step {s}</div>{media_block(key, steps[s], s)}</div>'
                        for s in shown)
        blocks.append(f'<div class="media" data-media="{html.escape(key)}"><h4>{html.escape(title)}</h4>'
                      f'<div class="row">{cells}</div></div>')
    if run.stage == "stage1" and not (root / "val_code_usage").is_dir():
        usage = artifact_code_usage(run.path)
        if usage:
            blocks.append(f'<div class="media" data-media="code_usage"><h4>Codebook usage (from tokenizer.pt)</h4>{usage}</div>')
    if not blocks:
        return '<h3>Validation media</h3><p class="none">no media (no validation ran, or a fast run)</p>'
    return "<h3>Validation media</h3>" + "".join(blocks)


def artifact_code_usage(run_dir: Path) -> str:
    """The code-count histogram a tokenizer artifact keeps, for runs whose validations left no picture of it."""
    path = run_dir / "tokenizer.pt"
    if not path.is_file():
        return ""
    try:
        from .artifact import read_artifact

        counts = np.asarray(read_artifact(path)["code_counts"], dtype=np.float64)
    except Exception as err:  # noqa: BLE001 - a damaged artifact costs this picture only
        return f'<p class="note">tokenizer.pt unreadable ({html.escape(type(err).__name__)})</p>'
    counts = counts.reshape(-1, counts.shape[-1]) if counts.ndim > 1 else counts[None]
    return "".join(img_tag(media.histogram_image(row), f"code usage, codebook {i}") for i, row in enumerate(counts))


def condition_cell(folder: Path, condition: Any) -> str:
    """A sample's condition: a caption, a class (name and id), or a conditioning file."""
    if not isinstance(condition, dict):
        return fmt(condition)
    parts = []
    for key, value in condition.items():
        if key == "text":
            parts.append(f'<span class="caption">{html.escape(str(value))}</span>')
        elif key == "label":
            name = condition.get("name")
            parts.append(f'<span class="caption">{html.escape(str(name))} ({fmt(value)})</span>' if name else f"class {fmt(value)}")
        elif key == "name" and "label" in condition:
            continue
        elif isinstance(value, str) and Path(value).suffix.lower() in IMAGE_SUFFIXES + SOUND_SUFFIXES + TEXT_SUFFIXES:
            parts.append(file_cell(folder, value))
        else:
            parts.append(f"{html.escape(key)}: {fmt(value)}")
    return "<br>".join(parts)


def score_cell(entry: dict[str, Any]) -> str:
    score = entry.get("score", entry.get("scores"))
    if isinstance(score, dict):
        return "<br>".join(f"{html.escape(str(k))}: {fmt(v)}" for k, v in score.items())
    return fmt(score) if score is not None else ""


def read_manifest_lines(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    entries = []
    for lineno, entry in json_lines(path.read_text().splitlines()):
        if isinstance(entry, json.JSONDecodeError):
            notes.append(f"{path.name}:{lineno}: not JSON, left out")
        elif isinstance(entry, dict):
            entries.append(entry)
    return entries


def section_samples(run: Run) -> str:
    """A stage-2 run's samples (``samples/manifest.jsonl``): condition, output, reference, score."""
    folder = run.path / "samples"
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        return '<h3>Samples</h3><p class="none">no samples (samples/manifest.jsonl is absent)</p>' if run.stage == "stage2" else ""
    notes: list[str] = []
    entries = read_manifest_lines(manifest, notes)
    sounds = any(str(v).lower().endswith(SOUND_SUFFIXES) for e in entries[:1]
                 for v in [e.get("output"), e.get("reference"), *mapping(e, "condition").values()])
    limit = MAX_SOUND_SAMPLES if sounds else MAX_SAMPLES
    shown = entries[:limit]
    scored = any("score" in e or "scores" in e for e in shown)
    header = ["#", "condition", "output", "reference", "attributes / label"] + (["score"] if scored else [])
    rows = []
    for entry in shown:
        truth = entry.get("attributes") or {}
        label = " ".join(str(v) for v in truth.values()) if isinstance(truth, dict) else str(truth)
        if "label" in entry:
            label = f"{label} (class {entry['label']})".strip()
        row = [html.escape(str(entry.get("id", ""))), condition_cell(folder, entry.get("condition")),
               file_cell(folder, entry.get("output")),
               file_cell(folder, entry["reference"]) if "reference" in entry else '<span class="none">none</span>',
               html.escape(label)]
        rows.append(row + ([score_cell(entry)] if scored else []))
    info = _read_json(folder / "samples.json", notes)
    settings = {k: v for k, v in (mapping(run.summary, "sampling") or info).items()
                if k not in ("out", "data") and not isinstance(v, dict)}
    source = f" (conditions: {html.escape(str(info['conditions']))})" if info.get("conditions") else ""
    head = f"<p>{len(shown)} of {len(entries)} samples{source}</p>"
    extra = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    settings_table = table([[html.escape(k), fmt(v)] for k, v in settings.items()], cls="kv") if settings else ""
    return f'<h3>Samples</h3>{head}{settings_table}{table(rows, header, cls="samples")}{extra}'


def section_eval(run: Run) -> str:
    tasks = eval_rows(run.summary)
    if not tasks:
        return '<h3>Final evaluation</h3><p class="none">no evaluation in summary.json</p>' if run.stage == "stage2" else ""
    parts = ["<h3>Final evaluation</h3>"]
    for task, scores in tasks.items():
        parts.append(f"<h4>{html.escape(task)}</h4>" + table([[html.escape(k), fmt(v)] for k, v in scores.items()], cls="kv"))
    return "".join(parts)


def section_config(run: Run) -> str:
    path = run.path / "config.yaml"
    if not path.is_file():
        return ""
    return f"<details><summary>config.yaml</summary><pre>{html.escape(path.read_text())}</pre></details>"


def run_section(run: Run, anchor: str) -> str:
    title = f"{run.name} <small>{html.escape(run.stage)} · {html.escape(run.kind)} · {html.escape(run.dataset)}</small>"
    body = [section_overview(run), section_summary(run), section_curves(run, anchor), section_media(run),
            section_samples(run), section_eval(run), section_config(run)]
    return f'<section class="run" id="{anchor}"><h2>{title}</h2>{"".join(body)}</section>'


def comparison_section(runs: Sequence[Run], anchors: Sequence[str]) -> str:
    """The runs side by side: summary figures and final scores in one table, and the curves of
    runs of the same stage and task overlaid."""
    heads = ["", *(f'<a href="#{a}">{html.escape(r.name)}</a>' for r, a in zip(runs, anchors))]
    rows = [["stage", *(html.escape(r.stage) for r in runs)], ["task / modality", *(html.escape(r.kind) for r in runs)],
            ["data set", *(html.escape(r.dataset) for r in runs)]]
    keys: list[str] = []
    for run in runs:
        keys += [k for k in scalar_summary(run.summary) if k not in keys and k not in OVERVIEW_KEYS]
    rows += [[html.escape(k), *(fmt(scalar_summary(r.summary).get(k, "")) for r in runs)] for k in keys]
    scores = [flat_eval(r.summary) for r in runs]
    names: list[str] = []
    for one in scores:
        names += [k for k in one if k not in names]
    rows += [[html.escape(f"eval: {k}"), *(fmt(one.get(k, "")) for one in scores)] for k in names]
    parts = ['<section id="comparison"><h2>Comparison</h2>', table(rows, heads, cls="compare")]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault((run.stage, run.kind), []).append(i)
    overlaid = False
    for (stage, kind), members in groups.items():
        if len(members) < 2:
            continue
        plotted = [plotted_history(runs[i])[0] for i in members]
        families = metric_families(sorted({k for p in plotted for k in p}))
        figures = []
        for family, fkeys in families.items():
            lines = [(f"{runs[i].name}: {k}" if len(fkeys) > 1 else runs[i].name, p[k], j, d)
                     for j, (i, p) in enumerate(zip(members, plotted)) for d, k in enumerate(fkeys) if k in p]
            if len({line[2] for line in lines}) < 2:
                continue  # only one of the runs has this family: its own section shows it
            uri = data_uri("image/png", curve_png(lines, family_title(family, fkeys)))
            figures.append(f'<figure class="curve" data-run="comparison" data-family="{html.escape(family)}">'
                           f'<img src="{uri}" alt="{html.escape(family)}"></figure>')
        if figures:
            overlaid = True
            parts.append(f"<h3>Curves overlaid: {html.escape(stage)} · {html.escape(kind)} "
                         f"({len(members)} runs)</h3><div class=\"grid\">{''.join(figures)}</div>")
    if not overlaid:
        parts.append('<p class="none">no two runs of the same stage and task with curves to overlay</p>')
    parts.append("</section>")
    return "".join(parts)


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1f3a5f;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;opacity:.85;font-size:12px}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #d8dde6;padding:8px 24px;z-index:2}
nav a{margin-right:14px;color:#1f5fbf;text-decoration:none;font-weight:600}
main{max-width:1220px;margin:0 auto;padding:8px 24px 40px}
section{background:#fff;border:1px solid #d8dde6;border-radius:6px;padding:4px 18px 14px;margin:16px 0}
h2{font-size:18px;border-bottom:2px solid #e4e8ef;padding-bottom:4px}h2 small{color:#5a6475;font-weight:normal;font-size:13px}
h3{font-size:15px;margin:18px 0 6px;color:#1f3a5f}h4{font-size:13px;margin:10px 0 4px;color:#3a4456}
table{border-collapse:collapse;margin:4px 0 8px;font-size:13px}
td,th{border:1px solid #dfe3ea;padding:3px 8px;text-align:left;vertical-align:middle}
th{background:#eef1f6}table.kv td:first-child{color:#4a5568;white-space:nowrap}
table.compare td:not(:first-child){font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;border:1px solid #e4e8ef;border-radius:4px;background:#fff}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.step{font-size:12px;color:#5a6475}
img.pic{image-rendering:pixelated;display:block;max-width:100%;height:auto}
.caption{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
audio{height:30px;width:220px}.note{color:#8a5a00;font-size:12px;margin:2px 0}.none{color:#7a8494;font-style:italic}
.missing{color:#b42318}pre{background:#f3f5f8;padding:8px;font-size:11px;max-height:360px;overflow:auto}
details{margin-top:10px}summary{cursor:pointer;color:#1f5fbf}
"""


def write_report(runs: Sequence[Path | str], out: Path | str) -> Path:
    """Write one self-contained HTML page about ``runs`` (run folders or ``latest-*`` links) to ``out``."""
    if not runs:
        raise ValueError("no runs to report on: name at least one run folder")
    loaded: list[Run] = []
    for path in runs:
        run = load_run(path)
        if all(run.path != other.path for other in loaded):  # a run named twice (a folder and its latest link)
            loaded.append(run)
    anchors = [f"run-{i}" for i in range(len(loaded))]
    nav = "".join(f'<a href="#{a}">{html.escape(r.name)}</a>' for r, a in zip(loaded, anchors))
    if len(loaded) > 1:
        nav = '<a href="#comparison">comparison</a>' + nav
    overview = table([[f'<a href="#{a}">{html.escape(r.name)}</a>', html.escape(r.stage), html.escape(r.kind),
                       html.escape(r.dataset), fmt(r.summary.get("global_step", "")), fmt(r.summary.get("train_seconds", ""))]
                      for r, a in zip(loaded, anchors)], ["run", "stage", "task / modality", "data set", "steps", "train time (s)"])
    sections = [comparison_section(loaded, anchors)] if len(loaded) > 1 else []
    sections += [run_section(r, a) for r, a in zip(loaded, anchors)]
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>lit_vqdiff report: {html.escape(', '.join(r.name for r in loaded))}</title><style>{STYLE}</style></head>"
            f"<body><header><h1>lit_vqdiff report</h1><p>{len(loaded)} run{'s' if len(loaded) > 1 else ''} · generated {generated}</p>"
            f"</header><nav>{nav}</nav><main><section><h2>Runs</h2>{overview}</section>{''.join(sections)}</main></body></html>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
