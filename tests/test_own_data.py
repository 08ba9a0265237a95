"""A user's own data end to end: shards write -> stage 1 -> stage 2 -> sample -> eval, on
folders made here that are not shapes-v1 (pictures with captions at 64 px, sounds with
captions at 16 kHz x 2 s, a labelled set of 10 classes), and every bad value rejected
before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from lit_vqdiff.cli import main
from lit_vqdiff.config import load_saved

pytestmark = pytest.mark.slow

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "white": (235, 235, 235), "black": (20, 20, 20)}
KINDS = ("bar", "block", "dot", "frame", "cross", "ring", "stripe", "corner", "band", "spot")
# Tiny models: every run here takes seconds.
STAGE1_ARGS = ("[tokenizer.channels=16,tokenizer.num_res_blocks=1,tokenizer.quantizer.codebook_size=32,"
               "trainer.max_steps=12,trainer.val_every_steps=12,data.batch_size=8,data.val_batch_size=16]")


def own_stage2(root: Path, runs: Path, *extra: str) -> list[str]:
    """Stage 2 on a user's folder: its tokenizer is found or trained by the data set's name."""
    return [f"data.root={root}", f"run.root={runs}", "data.batch_size=8", "data.val_batch_size=16", "data.num_workers=0",
            f"tokenizers.stage1_args={STAGE1_ARGS}", "generator.depth=1", "generator.width=32", "generator.heads=2",
            "generator.cond_depth=1", "sampling.steps=2", "sampling.val_n=4", "sampling.n=6", "trainer.max_steps=12",
            "trainer.val_every_steps=12", "trainer.limit_val_batches=1", "logger=csv", "trainer.threads=1", *extra]


def drawing(kind: int, color: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A picture of class ``kind``: a different figure per class, jittered, on a noisy background."""
    pixels = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
    c, r, o = size // 2 + int(rng.integers(-3, 4)), size // 4, size // 8
    y, x = np.mgrid[:size, :size]
    masks = [abs(y - c) < o, (abs(y - c) < r) & (abs(x - c) < r), (y - c) ** 2 + (x - c) ** 2 < o * o,
             ((abs(y - c) < r) & (abs(x - c) < r)) & ~((abs(y - c) < r - 2) & (abs(x - c) < r - 2)),
             (abs(y - c) < 2) | (abs(x - c) < 2), abs(np.hypot(y - c, x - c) - r) < 2, abs(x - c) < o,
             (y < c) & (x < c), abs(y - x) < o, (y - c) ** 2 + (x - c) ** 2 < r * r]
    pixels[masks[kind]] = COLORS[color]
    return pixels


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """48 pictures with captions, non-square ones among them (the loader centre-crops)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    rows = ["file,caption"]
    for i in range(48):
        kind, color = i % 10, list(COLORS)[i % 5]
        picture = drawing(kind, color, 80, rng)
        if i % 3 == 0:
            picture = np.concatenate([picture, picture[:, :20]], axis=1)  # 100 x 80
        Image.fromarray(picture).save(folder / f"p{i:03d}.jpg", quality=95)
        rows.append(f'p{i:03d}.jpg,"a {color} {KINDS[kind]}, picture {i}"')
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_pictures_with_captions_at_64_px(photo_folder, tmp_path, capsys):
    data, runs = tmp_path / "photos", tmp_path / "runs"
    assert main(["shards", "write", "images", "--captions", str(photo_folder / "captions.csv"), "--val-fraction", "0.25",
                 "--out", str(data), "--no-progress"]) == 0
    described = json.loads((data / "dataset.json").read_text())
    assert described["name"] == "photos" and described["image"]["short_side"]["min"] == 80
    assert main(["train", "stage2", *own_stage2(data, runs, "data.image_size=64", "task=text->image")]) == 0
    stage1 = load_saved(runs / "latest-stage1-image-photos" / "config.yaml")
    assert (stage1.data.image_size, stage1.tokenizer.grid, stage1.tokenizer.patch) == (64, 16, 4)  # 16x16 codes
    run = runs / "latest-stage2"
    summary = json.loads((run / "summary.json").read_text())
    scores = summary["eval"]["tasks"]["text->image"]
    assert summary["data"] == "photos" and scores["n"] == 6
    # real data: a Frechet distance against the held-out references, beside the real-vs-real floor
    assert scores["fd_inception"] > scores["fd_inception_floor"] >= 0 and 0 <= scores["precision_inception"] <= 1
    assert "exact_match" not in scores and "unscored" not in scores
    lines = [json.loads(x) for x in (run / "samples" / "manifest.jsonl").read_text().splitlines()]
    assert all("attributes" not in e and e["reference"].startswith("refs/") for e in lines)
    assert all(np.asarray(Image.open(run / "samples" / e["output"])).shape == (64, 64, 3) for e in lines)
    capsys.readouterr()

    out = tmp_path / "bike"
    assert main(["sample", "--prompt", "a red bicycle by a wall", "--n", "3", "--out", str(out), "--ckpt", str(run)]) == 0
    entries = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [e["condition"] for e in entries] == [{"text": "a red bicycle by a wall"}] * 3
    assert all("reference" not in e for e in entries)
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tasks"]["text->image"]["n"] == 3


def test_labelled_set_of_ten_classes(tmp_path, capsys):
    """class->image with 10 named classes, sampled by id and by name."""
    folder, rng = tmp_path / "src", np.random.default_rng(1)
    folder.mkdir()
    rows = ["file,caption,label"]
    for i in range(60):
        kind = i % 10
        Image.fromarray(drawing(kind, "white", 28, rng)[..., 0]).save(folder / f"x{i:03d}.png")  # grey pictures
        rows.append(f"x{i:03d}.png,a {KINDS[kind]},{KINDS[kind]}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    data, runs = tmp_path / "shapes10", tmp_path / "runs"
    assert main(["shards", "write", "images", "--captions", str(folder / "labels.csv"), "--val-fraction", "0.2",
                 "--out", str(data), "--no-progress"]) == 0
    assert main(["train", "stage2", *own_stage2(data, runs, "task=class->image")]) == 0
    cfg = load_saved(runs / "latest-stage2" / "config.yaml")
    assert (cfg.data.num_classes, cfg.data.image_size, cfg.data.channels) == (10, 32, 1)  # from dataset.json
    scores = json.loads((runs / "latest-stage2" / "summary.json").read_text())["eval"]["tasks"]["class->image"]
    assert 0 <= scores["class_consistency"] <= 1 and 0 <= scores["classifier_val_accuracy"] <= 1
    assert list((data / "classifier").glob("*.pt"))  # trained once, cached with the data set
    capsys.readouterr()
    out = tmp_path / "by-class"
    assert main(["sample", "--classes", "0,3,spot", "--n", "2", "--out", str(out), "--ckpt", str(runs / "latest-stage2")]) == 0
    entries = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    names = sorted(KINDS)
    assert [e["condition"] for e in entries][::2] == [{"label": 0, "name": names[0]}, {"label": 3, "name": names[3]},
                                                      {"label": names.index("spot"), "name": "spot"}]
    assert np.asarray(Image.open(out / entries[0]["output"])).shape == (32, 32)  # grey, as the data
    assert main(["sample", "--classes", "giraffe", "--out", str(tmp_path / "no"), "--ckpt", str(runs / "latest-stage2")]) == 1
    assert "'giraffe' is not a class of this data set" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


@pytest.fixture(scope="module")
def sound_folder(tmp_path_factory) -> Path:
    """32 clips with captions at 16 kHz, 1.2 to 2.6 s long: rising or falling tones, some stereo."""
    folder = tmp_path_factory.mktemp("sounds")
    rng = np.random.default_rng(2)
    rows = []
    for i in range(32):
        seconds, rising = 1.2 + (i % 8) * 0.2, i % 2 == 0
        t = np.arange(int(16000 * seconds)) / 16000
        f = np.where(rising, 300 + 400 * t / seconds, 700 - 400 * t / seconds)
        wave = 0.4 * np.sin(2 * np.pi * np.cumsum(f) / 16000) + 0.01 * rng.standard_normal(len(t))
        if i % 4 == 0:
            wave = np.stack([wave, wave * 0.5], axis=1)
        sf.write(folder / f"s{i:03d}.wav", wave.astype(np.float32), 16000, subtype="PCM_16")
        rows.append(json.dumps({"file": f"s{i:03d}.wav", "caption": f"a {'rising' if rising else 'falling'} tone"}))
    (folder / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_sounds_with_captions_at_16_khz(sound_folder, tmp_path, capsys):
    data, runs = tmp_path / "tones", tmp_path / "runs"
    assert main(["shards", "write", "sounds", "--captions", str(sound_folder / "captions.jsonl"), "--val-fraction", "0.25",
                 "--out", str(data), "--no-progress"]) == 0
    assert main(["train", "stage2", *own_stage2(data, runs, "task=text->audio", "data.audio_samples=32000",
                                                "trainer.max_steps=6", "trainer.val_every_steps=6")]) == 0
    stage1 = load_saved(runs / "latest-stage1-audio-tones" / "config.yaml")
    assert (stage1.data.sample_rate, stage1.tokenizer.n_fft, stage1.tokenizer.hop) == (16000, 512, 128)
    run = runs / "latest-stage2"
    lines = [json.loads(x) for x in (run / "samples" / "manifest.jsonl").read_text().splitlines()]
    wave, rate = sf.read(run / "samples" / lines[0]["output"])
    assert rate == 16000 and wave.shape == (32000,)
    scores = json.loads((run / "summary.json").read_text())["eval"]["tasks"]["text->audio"]
    assert scores["fd_aisfx"] >= 0 and "fd_aisfx_floor" in scores
    # audio->text on the same data finds the audio tokenizer trained above: no second stage 1
    before = sorted(p.name for p in runs.iterdir())
    assert main(["train", "stage2", *own_stage2(data, runs, "task=audio->text", "data.audio_samples=32000",
                                                "trainer.max_steps=4", "trainer.val_every_steps=4")]) == 0
    new = sorted(set(p.name for p in runs.iterdir()) - set(before))
    assert all(name.startswith("stage2-") for name in new if not name.startswith("latest"))
    capsys.readouterr()
    out = tmp_path / "heard"
    assert main(["sample", "--inputs", str(sound_folder), "--n", "1", "--out", str(out), "--ckpt", str(run)]) == 0
    entries = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(entries) == 32 and entries[0]["condition"] == {"audio": "cond/000000.wav"}
    assert (out / "cond" / "000000.wav").read_bytes() == (sound_folder / "s000.wav").read_bytes()
    assert isinstance((out / entries[0]["output"]).read_text(), str)


def readme_snippet(heading: str) -> str:
    """The first python block under ``heading`` in the README."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index(heading):]
    return section[section.index("```python\n") + len("```python\n"):section.index("\n```", section.index("```python"))]


def test_python_api_from_the_readme(tmp_path, shapes_root, monkeypatch):
    """The README's five lines, run as written (in a folder with a tiny shapes-v1 run)."""
    from conftest import tiny_stage1, tiny_stage2

    monkeypatch.chdir(tmp_path)
    assert main(["train", "stage1", *tiny_stage1(shapes_root, Path("runs"))]) == 0
    assert main(["train", "stage2", *tiny_stage2(shapes_root, Path("runs"))]) == 0
    scope: dict = {}
    exec(compile(readme_snippet("## Python API"), "README.md", "exec"), scope)
    images, codes, tokenizer, generator = scope["images"], scope["codes"], scope["tokenizer"], scope["generator"]
    assert len(images) == 4 and images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8
    assert codes.shape == (4, 8, 8) and len(tokenizer.decode(codes)) == 4
    assert len(generator.generate(n=3)) == 3  # conditions from the run's val shards
    assert len(generator.generate(prompts=["a large blue square in the center"], n=1, steps=2, guidance=1.0)) == 1

    from lit_vqdiff.stages.generator import GeneratorModule

    module = GeneratorModule.load_from_checkpoint("runs/latest-stage2/checkpoints/last.ckpt", map_location="cpu")
    assert module.task.name == "text->image" and module.dit.grid == (4, 4)
    # the frozen tokenizer inside the checkpoint is bit-equal to the artifact it was loaded from
    assert all(torch.equal(a, b) for a, b in zip(module.tokenizers["image"].state_dict().values(),
                                                  tokenizer.module.state_dict().values()))


BAD_VALUES = [
    ("data.image_size=30", "data.image_size=30: must be a multiple of the code grid"),
    ("generator.preset=DiT-Q", "generator.preset=DiT-Q: expected one of"),
    ("data.text_bytes=77", "data.text_bytes=77: must be a multiple of generator.text_patch_size=8"),
    ("generator.patch_size=3", "generator.patch_size=3: must be 1, 2, 4 or 8"),
    ("tokenizers.stage1_args=[tokenizer.grid=3]", "must be a multiple of the code grid (tokenizer.grid=3)"),
    ("data.channels=2", "data.channels=2: must be 0 (auto), 1 (grey) or 3 (RGB)"),
    ("data.sample_rate=16000 task=image->audio data.audio_samples=100", "data.audio_samples=100: is 0.01 s"),
    ("task=text->audio data.root={tmp}/no-such-data", "data.root="),
    ("data.image_size=48 generator.patch_size=8", "generator.patch_size=8: does not divide the image codes (12, 12)"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[b[0].split("=")[0] for b in BAD_VALUES])
def test_bad_values_fail_before_anything_is_written(tmp_path, capsys, override, message):
    root, runs = tmp_path / "shapes-v1", tmp_path / "runs"
    args = [f"data.root={root}", f"run.root={runs}", "logger=csv", *override.format(tmp=tmp_path).split()]
    assert main(["train", "stage2", *args]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and message in err
    assert list(tmp_path.iterdir()) == []  # no data rendered, no run folder, no tokenizer


def test_other_shards_build_another_token_cache(tmp_path, shapes_root):
    """The cache is keyed by the data: pointing data.train elsewhere must not reuse old codes."""
    from conftest import tiny_stage1, tiny_stage2

    from lit_vqdiff.data import shards

    runs = tmp_path / "runs"
    assert main(["train", "stage1", *tiny_stage1(shapes_root, runs)]) == 0
    other = tmp_path / "other"
    shards.write_shapes_set(other, 64, 16, train_seed=7, val_seed=8, shard_size=16)
    common = ["trainer.max_steps=2", "trainer.val_every_steps=2", "sampling.n=0", "sampling.val_n=0"]
    assert main(["train", "stage2", *tiny_stage2(shapes_root, runs, *common)]) == 0
    assert main(["train", "stage2", *tiny_stage2(shapes_root, runs, *common, f"data.train={other}")]) == 0
    caches = sorted(p for p in (shapes_root / "tokens").iterdir() if (p / "tokens.json").is_file())
    metas = [json.loads((c / "tokens.json").read_text()) for c in caches]
    trained_on = {tuple(row[0] for row in m["data"]["shards"]["train"]) for m in metas}
    assert {str(p) for p in sorted(other.glob("train-*.tar"))} <= {u for urls in trained_on for u in urls}
    assert len(caches) >= 2
