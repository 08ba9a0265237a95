"""The walking skeleton end to end: tokenizer -> generator -> sample -> eval, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_stage1, tiny_stage2
from PIL import Image

from lit_vqdiff.artifact import load_tokenizer, read_artifact
from lit_vqdiff.cli import main
from lit_vqdiff.config import load_saved
from lit_vqdiff.data import shapes

MANIFEST_KEYS = {"id", "task", "condition", "attributes", "reference", "source_key", "label", "output"}


@pytest.mark.slow
def test_tokenizer_generator_sample_eval(shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    runs = tmp_path / "runs"
    assert main(["train", "stage1", *tiny_stage1(shapes_root, runs)]) == 0
    stage1 = runs / "latest-stage1"
    assert stage1.is_symlink() and (stage1 / "checkpoints" / "last.ckpt").is_file()
    artifact = read_artifact(stage1 / "tokenizer.pt")
    assert artifact["spec"]["modality"] == "image" and len(artifact["checksum"]) == 64
    assert artifact["code_counts"].sum() == 128 * 8 * 8  # every val sample's 8x8 codes counted
    tokenizer, _ = load_tokenizer(stage1)
    assert tokenizer.code_shape == (8, 8) and not any(p.requires_grad for p in tokenizer.parameters())
    summary1 = json.loads((stage1 / "summary.json").read_text())
    assert summary1["global_step"] == 30 and "val/psnr" in summary1
    assert 0.0 <= summary1["data_wait_fraction"] < 1.0
    assert 30 / summary1["steps_per_s"] == pytest.approx(summary1["train_seconds"], abs=0.06)  # rounded to 0.1 s
    assert "peak_gpu_memory_gib" not in summary1  # trained on the CPU

    assert main(["train", "stage2", *tiny_stage2(shapes_root, runs)]) == 0
    stage2 = runs / "latest-stage2"
    summary2 = json.loads((stage2 / "summary.json").read_text())
    assert summary2["task"] == "text->image" and summary2["global_step"] == 30
    assert 0.0 <= summary2["data_wait_fraction"] < 1.0
    assert 30 / summary2["steps_per_s"] == pytest.approx(summary2["train_seconds"], abs=0.06)  # rounded to 0.1 s
    assert summary2["eval"]["tasks"]["text->image"]["n"] == 8
    assert (stage2 / "samples" / "manifest.jsonl").is_file()
    capsys.readouterr()

    out = tmp_path / "samples"
    assert main(["sample", "--task", "text->image", "--n", "6", "--out", str(out), "--ckpt", str(stage2), "sampling.steps=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n"] == 6 and printed["steps"] == 3
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    for i, entry in enumerate(lines):
        assert set(entry) == MANIFEST_KEYS
        expected = shapes.make_sample(1, i)  # captions come from the validation seed
        assert entry["id"] == f"{i:06d}" and entry["task"] == "text->image"
        assert entry["condition"] == {"text": expected.caption}
        assert entry["attributes"] == expected.attributes.as_dict()
        assert entry["output"] == f"{i:06d}.png"
        assert entry["reference"] == f"refs/{i:06d}.png" and entry["source_key"] == f"val-0001-{i:07d}"
        image = np.asarray(Image.open(out / entry["output"]))
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert np.array_equal(np.asarray(Image.open(out / entry["reference"])), expected.image)  # the held-out sample

    assert main(["eval", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    scores = report["tasks"]["text->image"]
    assert scores["n"] == 6
    assert set(scores) == {"n", "n_verified", "exact_match", "acc_shape", "acc_color", "acc_size", "acc_position"}
    assert all(0.0 <= scores[k] <= 1.0 for k in ("exact_match", "acc_shape", "acc_color", "acc_size", "acc_position"))


def test_eval_scores_known_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """eval on a folder whose outputs are the true renders scores 1.0; a wrong one lowers it."""
    lines = []
    for i in range(4):
        s = shapes.make_sample(5, i)
        Image.fromarray(s.image).save(tmp_path / f"{i:06d}.png")
        lines.append({"id": f"{i:06d}", "task": "text->image", "condition": {"text": s.caption},
                      "attributes": s.attributes.as_dict(), "output": f"{i:06d}.png"})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["eval", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"]["text->image"]["exact_match"] == 1.0
    wrong = shapes.make_sample(5, 0)
    other = next(shapes.make_sample(5, j) for j in range(1, 50) if shapes.make_sample(5, j).attributes.color != wrong.attributes.color)
    Image.fromarray(other.image).save(tmp_path / "000000.png")
    assert main(["eval", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"]["text->image"]["exact_match"] == 0.75


def test_sample_without_checkpoint_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code = main(["sample", "--n", "2", "--out", str(tmp_path / "o"), "--ckpt", str(tmp_path / "nothing")])
    assert code == 1
    assert "no stage-2 checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_stage2_trains_its_missing_tokenizer_first_with_the_same_data(shapes_root: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    stage1_args = "[tokenizer.channels=32,tokenizer.num_res_blocks=1,tokenizer.quantizer.codebook_size=64," \
                  "trainer.max_steps=20,trainer.val_every_steps=20,data.batch_size=16,data.val_batch_size=64]"
    assert main(["train", "stage2", *tiny_stage2(shapes_root, runs, "tokenizers.train_if_missing=true",
                                                 f"tokenizers.stage1_args={stage1_args}")]) == 0
    stage1 = runs / "latest-stage1"
    assert (stage1 / "tokenizer.pt").is_file()
    cfg = load_saved(stage1 / "config.yaml")
    assert (cfg.data.root, cfg.data.train, cfg.data.num_workers) == (str(shapes_root), "", 0)
    assert (cfg.logger.kind, cfg.trainer.threads, cfg.tokenizer.channels, cfg.trainer.max_steps) == ("csv", 1, 32, 20)
    summary = json.loads((runs / "latest-stage2" / "summary.json").read_text())
    assert summary["global_step"] == 30
    assert summary["eval"]["tasks"]["text->image"]["n"] == 8
