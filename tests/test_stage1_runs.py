"""One tokenizer per modality side by side, and `lit-vqdiff reconstruct` on each (through the CLI)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import tiny_stage1
from PIL import Image

from lit_vqdiff.artifact import read_artifact
from lit_vqdiff.cli import main
from lit_vqdiff.data import shapes
from lit_vqdiff.eval import shapes as verify

SHORT = ("trainer.max_steps=4", "trainer.val_every_steps=4", "trainer.limit_val_batches=1")
VAL_SAMPLES = 128  # the shapes_root fixture's val split


def train(shapes_root: Path, runs: Path, *extra: str) -> None:
    assert main(["train", "stage1", *tiny_stage1(shapes_root, runs, *SHORT, *extra)]) == 0


def reconstruct(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    assert main(["reconstruct", *args]) == 0
    return json.loads(capsys.readouterr().out)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.slow
def test_image_and_audio_tokenizers_side_by_side(shapes_root, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    train(shapes_root, runs)
    image_run = os.readlink(runs / "latest-stage1")
    train(shapes_root, runs, "modality=audio", "tokenizer.channels=16", "tokenizer.prune_unused=true")
    assert os.readlink(runs / "latest-stage1") == image_run  # training audio leaves the image link alone
    audio_run = os.readlink(runs / "latest-stage1-audio")
    assert audio_run != image_run and audio_run.startswith("stage1-audio-")

    artifact = read_artifact(runs / "latest-stage1-audio")
    assert artifact["spec"]["modality"] == "audio" and artifact["config"]["modality"] == "audio"
    remap, counts = artifact["remap"], artifact["code_counts"]
    kept = int((remap >= 0).sum())
    assert tuple(remap.shape) == (1, 64) and artifact["spec"]["quantizer"]["codebook_size"] == kept
    assert tuple(counts.shape) == (1, kept) and (counts > 0).all()  # only used codes were kept
    assert int(counts.sum()) == VAL_SAMPLES * 32  # 32 codes for every val clip

    # Images: the inputs are the val shards' first samples, scored as the files say.
    out = tmp_path / "image-recon"
    report = reconstruct(capsys, "--n", "5", "--out", str(out), "--ckpt", str(runs / "latest-stage1"))
    keys = [f"val-0001-{i:07d}" for i in range(5)]  # the fixture renders val from seed 1
    assert names(out / "orig") == names(out / "recon") == [f"{k}.png" for k in keys]
    orig = np.stack([np.asarray(Image.open(out / "orig" / f"{k}.png")) for k in keys])
    recon = np.stack([np.asarray(Image.open(out / "recon" / f"{k}.png")) for k in keys])
    assert np.array_equal(orig, np.stack([shapes.make_sample(1, i).image for i in range(5)]))
    agree = [a == b and None not in a.values() for a, b in zip(verify.verify_images(orig), verify.verify_images(recon))]
    assert report["verifier_agreement"] == pytest.approx(float(np.mean(agree)))
    assert report["n"] == 5 and report["inputs"] == f"{shapes_root} (val)"
    assert {"psnr", "ssim", "codebook_usage", "perplexity", "dead_codes"} <= set(report)
    assert report["codebook_usage"] == pytest.approx(1 - report["dead_codes"] / 64, abs=1e-4)

    # Audio: the default artifact of --modality audio is runs/latest-stage1-audio.
    monkeypatch.chdir(tmp_path)
    report = reconstruct(capsys, "--n", "3", "--out", "audio-recon", "--modality", "audio")
    assert report["artifact"] == str((runs / audio_run / "tokenizer.pt").resolve())
    assert {"si_snr", "lsd", "verifier_agreement", "codebook_usage"} <= set(report) and report["n"] == 3
    wavs = [f"val-0001-{i:07d}.wav" for i in range(3)]
    assert names(tmp_path / "audio-recon" / "orig") == names(tmp_path / "audio-recon" / "recon") == wavs
    wave, rate = sf.read(tmp_path / "audio-recon" / "orig" / wavs[0], dtype="float32")
    assert rate == 8000 and np.abs(wave - shapes.make_sample(1, 0).sound).max() < 1e-4  # 16-bit PCM of the input


def test_reconstruct_without_a_tokenizer_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["reconstruct", "--n", "2", "--out", "o", "--modality", "audio"]) == 1
    assert "no tokenizer at runs/latest-stage1-audio" in capsys.readouterr().err
    assert main(["reconstruct", "--n", "0", "--out", "o", "--ckpt", str(tmp_path)]) == 1
    assert "--n must be a positive integer, got 0" in capsys.readouterr().err
