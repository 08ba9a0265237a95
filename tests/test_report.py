"""The run report: one self-contained HTML page with curves, pictures, sounds and scores of
tiny real runs, parsed back (every embedded picture and sound decodes, nothing external),
and rendered by headless Chromium when the Debian cache has it."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml
from conftest import tiny_stage1, tiny_stage2
from PIL import Image

from lit_vqdiff import browser, debian, report
from lit_vqdiff.cli import main


class Page(HTMLParser):
    """The tags of a page that matter here, with their attributes."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str, **where: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in where.items())]


def decoded(uri: str, mime: str) -> bytes:
    prefix = f"data:{mime};base64,"
    assert uri.startswith(prefix), uri[:60]
    return base64.b64decode(uri[len(prefix):], validate=True)


def picture(uri: str) -> Image.Image:
    image = Image.open(io.BytesIO(decoded(uri, "image/png")))
    image.load()
    return image


@pytest.fixture(scope="module")
def runs(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny real runs: stage 1 on images (W&B, offline) and a second, shorter one (CSV) to
    compare it with, a stage-1 sound tokenizer (sounds in the page) and a text->image stage 2."""
    base = tmp_path_factory.mktemp("report-runs")
    folder = base / "runs"
    out: dict[str, Path] = {}
    with pytest.MonkeyPatch.context() as mp:  # the conftest's W&B isolation, for the whole module
        for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": base / "wandb", "WANDB_CACHE_DIR": base / "wandb-cache",
                           "WANDB_SILENT": "true"}.items():
            mp.setenv(key, str(value))
        assert main(["train", "stage1", *tiny_stage1(shapes_root, folder, "logger=wandb", "trainer.max_steps=20",
                                                     "trainer.val_every_steps=10", "trainer.log_every_steps=5")]) == 0
        out["stage1"] = (folder / "latest-stage1").resolve()
        assert main(["train", "stage1", *tiny_stage1(shapes_root, folder, "trainer.max_steps=10", "trainer.val_every_steps=10",
                                                     "trainer.log_every_steps=5", "tokenizer.quantizer.codebook_size=32")]) == 0
        out["stage1-short"] = (folder / "latest-stage1").resolve()
        assert main(["train", "stage1", *tiny_stage1(shapes_root, folder, "modality=audio", "tokenizer.channels=16",
                                                     "trainer.max_steps=4", "trainer.val_every_steps=4",
                                                     "trainer.limit_val_batches=1")]) == 0
        out["audio"] = (folder / "latest-stage1-audio").resolve()
        # The short image tokenizer is the latest: stage 2 codes images with it.
        assert main(["train", "stage2", *tiny_stage2(shapes_root, folder, "trainer.max_steps=10", "trainer.val_every_steps=10",
                                                     "trainer.log_every_steps=5")]) == 0
        out["stage2"] = (folder / "latest-stage2").resolve()
    assert len(set(out.values())) == 4
    return out


@pytest.fixture(scope="module")
def page(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    order = [runs["stage1"], runs["stage1-short"], runs["audio"], runs["stage2"]]
    assert report.write_report(order + [runs["stage1"]], out) == out  # a run named twice is shown once
    return out


@pytest.mark.slow
def test_report_has_curves_per_metric_family_for_every_run(runs, page):
    parsed = Page(page.read_text())
    for anchor, key in zip(("run-0", "run-1", "run-2", "run-3"), ("stage1", "stage1-short", "audio", "stage2")):
        assert parsed.all("section", id=anchor), anchor
        run = report.load_run(runs[key])
        assert run.history_source == ("wandb" if key == "stage1" else "csv")
        series, _ = report.plotted_history(run)
        families = report.metric_families(list(series))
        drawn = {a["data-family"] for a in parsed.all("figure", **{"data-run": anchor})}
        assert drawn == set(families), (key, drawn, families)
        assert "train/loss" in drawn or key == "audio"  # 4 steps: validation only, no train log yet
    stage1 = report.load_run(runs["stage1"])
    # Lightning logs at global_step - 1: after 5, 10, 15 and 20 steps; validations after 10 and 20.
    assert [s for s, _ in stage1.history["train/loss"]] == [4, 9, 14, 19]
    assert [s for s, _ in stage1.history["val/psnr"]] == [9, 19]
    assert {"train/loss", "val/psnr", "val/codebook_usage"} <= set(report.metric_families(list(stage1.history)))
    # The two image tokenizers are compared: their curves overlaid, their figures side by side.
    overlaid = {a["data-family"] for a in parsed.all("figure", **{"data-run": "comparison"})}
    assert {"train/loss", "val/psnr"} <= overlaid
    assert parsed.all("section", id="comparison")
    assert len(parsed.all("section", **{"class": "run"})) == 4


@pytest.mark.slow
def test_every_embedded_picture_and_sound_decodes(runs, page):
    parsed = Page(page.read_text())
    images = [a for t, a in parsed.tags if t == "img"]
    assert len(images) >= 30
    for attrs in images:
        image = picture(attrs["src"])
        assert 4 <= min(image.size) and max(image.size) <= report.MAX_SIDE, image.size
        if "width" in attrs:  # drawn at its size, or a small sample scaled up by a whole factor
            assert int(attrs["width"]) % image.width == 0 and int(attrs["height"]) % image.height == 0
    sounds = parsed.all("audio")
    for attrs in (a for t, a in parsed.tags if t == "figure" and "data-family" in a):
        assert attrs["data-run"] in ("comparison", "run-0", "run-1", "run-2", "run-3")
    curves = [a for a in images if a["alt"] and "class" not in a]  # chart images carry no class, pictures do
    assert len(curves) >= 20
    for attrs in curves:
        chart = picture(attrs["src"]).convert("RGB")
        assert chart.size == (368, 216) and len(chart.getcolors(1 << 16)) > 8, attrs["alt"]  # a drawn chart, not blank
    assert len(sounds) == 8  # the sound tokenizer's 4 input / reconstruction pairs
    for attrs in sounds:
        assert "controls" in attrs
        wave, rate = soundfile.read(io.BytesIO(decoded(attrs["src"], "audio/wav")))
        assert rate == 8000 and wave.shape == (8000,) and np.isfinite(wave).all()

    # Stage 1's media: the reconstruction pairs and the codebook usage of both validations.
    text = page.read_text()
    for key in ("val_reconstructions", "val_code_usage"):
        assert len(parsed.all("div", **{"class": "media", "data-media": key})) == 3  # both image runs and the sound one
    # Stage 2's samples, with their captions, outputs and references; and its final evaluation.
    manifest = [json.loads(line) for line in (runs["stage2"] / "samples" / "manifest.jsonl").read_text().splitlines()]
    samples = parsed.all("table", **{"class": "samples"})
    assert len(samples) == 1 and len(manifest) == 8
    body = "".join(parsed.text)
    assert all(entry["condition"]["text"] in body for entry in manifest)
    assert len([a for a in images if a.get("alt", "").startswith(("0000", "refs/"))]) == 16  # 8 outputs, 8 references
    evaluation = json.loads((runs["stage2"] / "summary.json").read_text())["eval"]["tasks"]["text->image"]
    assert "Final evaluation" in body and "exact_match" in body and evaluation["n"] == 8
    assert 50_000 < len(text) < 3_000_000  # self-contained, yet reasonable


@pytest.mark.slow
def test_report_has_no_external_references(page):
    text = page.read_text()
    parsed = Page(text)
    outside_data = re.sub(r"data:[a-z]+/[a-z0-9.+-]+;base64,[A-Za-z0-9+/=]*", "", text)
    for scheme in ("http:", "https:", "file:", "ftp:"):
        assert scheme not in outside_data, scheme
    assert not parsed.all("script") and not parsed.all("link") and not parsed.all("iframe")
    for tag, attrs in parsed.tags:
        for name in ("src", "href", "poster", "data"):
            if name in attrs:
                value = attrs[name]
                assert value.startswith("data:") or (name == "href" and value.startswith("#")), (tag, name, value[:80])
    assert "url(" not in outside_data.split("</style>")[0]  # no stylesheet fetches either


@pytest.mark.slow
def test_report_renders_in_headless_chromium(request, tmp_path):
    if not browser.is_cached():
        pytest.skip(f"Chromium is not in the Debian cache ({debian.cache_dir()}); run `{debian.fetch_command(['chromium'])}`")
    page = request.getfixturevalue("page")  # the runs are trained only when there is a browser to show them
    png = browser.screenshot(page, tmp_path / "report.png", width=1280, height=2400)
    shot = Image.open(png).convert("RGB")
    assert shot.size == (1280, 2400)
    colours = shot.getcolors(1 << 20)
    assert colours is not None and len(colours) > 500, len(colours or [])  # text, tables, curves, pictures: not blank
    top = max(colours)[0] / (1280 * 2400)
    assert top < 0.9  # no single colour covers the page


def test_screenshot_without_chromium_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv(debian.CACHE_ENV, str(tmp_path / "empty-cache"))
    page = tmp_path / "p.html"
    page.write_text("<html><body>hi</body></html>")
    assert not browser.is_cached()
    with pytest.raises(debian.DebianError, match=re.escape("python -m lit_vqdiff.debian fetch chromium")) as err:
        browser.screenshot(page, tmp_path / "p.png")
    assert err.value.exit_code == 2 and not (tmp_path / "empty-cache").exists()  # nothing fetched or created


def test_chromium_pins_cover_its_group():
    members = debian.GROUPS["chromium"]
    assert members[-1] == "chromium" and len(set(members)) == len(members)
    for package in members:
        version, sha256 = debian.PACKAGES[package]
        assert re.fullmatch(r"[0-9a-f]{64}", sha256), package
    assert debian.deb_name("libgtk-3-common", debian.PACKAGES["libgtk-3-common"][0]).endswith("_all.deb")
    assert debian.deb_name("chromium", "156.0.8078.114-1~deb12u1") == "chromium_156.0.8078.114-1~deb12u1_amd64.deb"


# ----------------------------------------------------------------------------- runs with parts missing (no training)


def fake_run(folder: Path, config: dict, summary: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_report_of_runs_without_history_media_or_samples(tmp_path):
    fast = fake_run(tmp_path / "stage1-fast", {"stage": "stage1", "modality": "image", "data": {"name": "shapes-v1"},
                                              "logger": {"kind": "none"}})
    unfinished = fake_run(tmp_path / "stage2-x", {"stage": "stage2", "task": "class->image", "data": {"name": "mnist"},
                                                 "logger": {"kind": "csv"}}, summary={"stage": "stage2", "global_step": 3})
    out = report.write_report([fast, unfinished], tmp_path / "r.html")
    text = out.read_text()
    parsed = Page(text)
    assert len(parsed.all("section", **{"class": "run"})) == 2 and not parsed.all("img")
    body = "".join(parsed.text)
    for said in ("no metric history", "no media", "no summary.json", "no samples (samples/manifest.jsonl is absent)",
                 "no evaluation in summary.json", "class->image", "mnist", "no two runs of the same stage and task"):
        assert said in body, said


def test_class_conditions_and_scores_in_the_samples_table(tmp_path):
    run = fake_run(tmp_path / "stage2-c", {"stage": "stage2", "task": "class->image", "data": {"name": "fashion-mnist"}},
                   summary={"stage": "stage2", "eval": {"tasks": {"class->image": {"n": 2, "class_consistency": 0.5}}}})
    samples = run / "samples"
    samples.mkdir()
    Image.fromarray(np.full((28, 28), 200, dtype=np.uint8)).save(samples / "000000.png")
    lines = [{"id": "000000", "task": "class->image", "condition": {"label": 7, "name": "sneaker"}, "output": "000000.png",
              "score": 0.25},
             {"id": "000001", "task": "class->image", "condition": {"label": 1, "name": "trouser"}, "output": "000001.png"}]
    (samples / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    parsed = Page(report.write_report([run], tmp_path / "r.html").read_text())
    body = "".join(parsed.text)
    assert "sneaker (7)" in body and "trouser (1)" in body and "0.25" in body and "class_consistency" in body
    assert "000001.png: missing" in body and "not JSON, left out" in body
    (image,) = parsed.all("img")
    assert picture(image["src"]).size == (28, 28) and image["width"] == "84"  # scaled up crisply by the page


def test_csv_resumptions_merge_and_the_later_wins(tmp_path):
    run = fake_run(tmp_path / "stage1-r", {"stage": "stage1", "modality": "image"})
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text("epoch,step,train/loss,val/psnr\n0,4,1.0,\n0,9,0.9,\n0,9,,7.5\n")
    (run / "csv-1").mkdir()
    (run / "csv-1" / "metrics.csv").write_text("epoch,step,train/loss\n0,9,0.8\n0,14,0.7\n")
    history, source = report.read_history(run)
    assert source == "csv"
    assert history == {"train/loss": [(4, 1.0), (9, 0.8), (14, 0.7)], "val/psnr": [(9, 7.5)]}


def chunk_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each chunk of a .wandb log: 7-byte headers in 32 KiB blocks after the file header."""
    spans, pos = [], 7
    while pos + 7 <= len(data):
        if report.BLOCK_BYTES - pos % report.BLOCK_BYTES < 7:
            pos += report.BLOCK_BYTES - pos % report.BLOCK_BYTES
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        spans.append((pos, pos + 7 + length))
        pos += 7 + length
    return spans


@pytest.mark.slow
def test_wandb_log_damaged_or_cut_short_is_read_up_to_there(runs, tmp_path):
    (log,) = (runs["stage1"] / "wandb").glob("offline-run-*/run-*.wandb")
    whole = report.read_wandb_history(log)
    assert [s for s, _ in sorted(whole["train/loss"].items())] == [4, 9, 14, 19]
    data = log.read_bytes()
    # Cut the file inside the last history row of metrics (a run killed while writing it).
    from wandb.proto import wandb_internal_pb2

    def is_history(a: int, b: int) -> bool:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data[a + 7 : b])
        return record.WhichOneof("record_type") == "history" and any(
            (i.key or "".join(i.nested_key[:1] if len(i.nested_key) == 1 else [])).startswith(("train/", "val/"))
            for i in record.history.item)  # a row of scalars, not of media (whose keys are nested)

    rows = [(a, b) for a, b in chunk_spans(data) if data[a + 6] == report.FULL and is_history(a, b)]
    start, end = rows[-1]
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(data[: (start + end) // 2])
    notes: list[str] = []
    part = report.read_wandb_history(cut, notes)
    assert notes and "truncated" in notes[0]
    points = {(k, s, v) for k, values in whole.items() for s, v in values.items()}
    kept = {(k, s, v) for k, values in part.items() for s, v in values.items()}
    assert kept < points  # what was read is right, and the cut row is not made up
    flipped = bytearray(data)
    flipped[(rows[1][0] + rows[1][1]) // 2] ^= 0xFF  # a bit rot inside the second row: its CRC no longer matches
    (tmp_path / "bad.wandb").write_bytes(bytes(flipped))
    notes = []
    damaged = report.read_wandb_history(tmp_path / "bad.wandb", notes)
    assert notes and "damaged" in notes[0]
    assert [s for s, _ in sorted(damaged["train/loss"].items())] == [4]  # the rows before it
    (tmp_path / "other.wandb").write_bytes(b"not a log at all")
    notes = []
    assert report.read_wandb_history(tmp_path / "other.wandb", notes) == {} and "not a W&B log" in notes[0]


def test_a_folder_that_is_no_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        report.write_report([tmp_path], tmp_path / "r.html")
    with pytest.raises(FileNotFoundError, match="no run at"):
        report.write_report([tmp_path / "missing"], tmp_path / "r.html")
    with pytest.raises(ValueError, match="no runs"):
        report.write_report([], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_run_folders_are_named_relative_to_where_the_report_was_made(tmp_path, monkeypatch):
    from lit_vqdiff.report import shown_path

    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "runs" / "stage1-x") == "runs/stage1-x"  # a page kept in a repository names no machine
    outside = tmp_path.parent / "elsewhere"
    assert shown_path(outside) == str(outside)
