"""Modalities and tasks: every modality to tokens and back, from the same members shards hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import resolved, tiny_stage1

from lit_vqdiff.data import shapes
from lit_vqdiff.data.decode import collate, decode_sample
from lit_vqdiff.modalities import MODALITIES, TASKS, DecodeSpec, parse_task
from lit_vqdiff.modalities.text import BYTE_VOCAB
from lit_vqdiff.nn.tokenizer import Tokenizer


def test_tasks_parse_and_name_their_tokenizers():
    task = parse_task("image->text")
    assert (task.source.name, task.target.name) == ("image", "text")
    assert parse_task("image->audio").tokenized == ["image", "audio"]
    assert parse_task("class->image").tokenized == ["image"] and parse_task("text->audio").tokenized == ["audio"]
    with pytest.raises(ValueError, match="unknown task 'text->video'"):
        parse_task("text->video")
    # every source (class, text, image, audio) to every other generated modality
    assert {"class->image", "text->image", "image->audio", "audio->image", "image->text", "text->audio", "audio->text"} <= set(TASKS)
    assert "image->class" not in TASKS and "text->text" not in TASKS


@pytest.fixture(scope="module")
def tokenizers(shapes_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    out = {}
    for modality in ("image", "audio"):
        cfg = resolved("stage1", tiny_stage1(shapes_root, runs, f"modality={modality}", "tokenizer.channels=16"))
        out[modality] = Tokenizer.from_config(cfg).eval()
    return out


SPEC = DecodeSpec(("image", "audio", "text", "class"), num_classes=shapes.NUM_CLASSES)


def test_token_spaces_round_trip(tokenizers):
    samples = [shapes.make_sample(3, i) for i in range(4)]
    batch = collate([decode_sample(shapes.members(s), SPEC) for s in samples])
    text = MODALITIES["text"].space(None, SPEC)
    tokens = text.tokens(batch)
    assert text.vocab == BYTE_VOCAB and tokens.shape == (4, 48)
    assert text.decode(tokens) == [s.caption for s in samples]
    label = MODALITIES["class"].space(None, SPEC)
    assert label.tokens(batch).tolist() == [s.label for s in samples] and label.vocab == 72
    for modality, shape in (("image", (8, 8)), ("audio", tokenizers["audio"].code_shape)):
        space = MODALITIES[modality].space(tokenizers[modality], SPEC)
        codes = space.tokens(batch)
        assert codes.shape == (4, *shape) and space.vocab == tokenizers[modality].quantizer.codebook_size
        # cached codes win over encoding the raw input
        cached = {f"{modality}_codes": torch.zeros_like(codes)}
        assert torch.equal(space.tokens(cached), torch.zeros_like(codes))
    with pytest.raises(ValueError, match="audio needs a stage-1 tokenizer"):
        MODALITIES["audio"].space(None, SPEC)


def test_task_inputs_per_task():
    assert parse_task("text->image").inputs(cached=False) == ("text", "image")
    assert parse_task("text->image").inputs(cached=True) == ("text", "image_codes")
    assert parse_task("image->audio").inputs(cached=True) == ("image_codes", "audio_codes")
    assert parse_task("class->image").inputs(cached=True) == ("class", "image_codes")


@pytest.mark.parametrize("name", ["image", "audio", "text", "class"])
def test_items_written_read_back_and_decoded_like_shard_members(tmp_path, name):
    """An item a modality writes reads back as the same item, and decodes like the member it came from."""
    sample = shapes.make_sample(0, 5)
    m = MODALITIES[name]
    batch = collate([decode_sample(shapes.members(sample), SPEC)])
    value = batch[m.batch_key]
    item = m.items(value if name != "text" else [sample.caption])[0]
    path = m.write(tmp_path / "item", item, SPEC)
    assert path.suffix == m.suffix
    back = m.read(path)
    if name == "image":
        assert np.array_equal(back, sample.image)
    elif name == "audio":
        assert np.allclose(back, sample.sound, atol=1 / 2**15)  # 16-bit PCM
    else:
        assert back == item
    members = m.file_members(path)
    again = collate([decode_sample(members, DecodeSpec((name,), num_classes=72))])[m.batch_key]
    assert torch.allclose(again.float(), value.float(), atol=1e-4)


def test_grey_images_decode_to_one_channel_and_write_grey(tmp_path):
    from PIL import Image

    picture = (np.arange(28 * 28, dtype=np.uint8) % 251).reshape(28, 28)
    Image.fromarray(picture).save(tmp_path / "g.png")
    m = MODALITIES["image"]
    x = m.decode(m.file_members(tmp_path / "g.png"), DecodeSpec(("image",), image_size=32, channels=1))["image"]
    assert x.shape == (1, 32, 32)
    item = m.items(x[None])[0]
    assert item.shape == (32, 32, 1)
    with Image.open(m.write(tmp_path / "out", item, SPEC)) as written:
        assert written.mode == "L"
    rgb = m.decode(m.file_members(tmp_path / "g.png"), DecodeSpec(("image",), image_size=32, channels=3))["image"]
    assert rgb.shape == (3, 32, 32) and torch.equal(rgb[0], rgb[1])
