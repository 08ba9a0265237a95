"""Tasks and token spaces: every modality to tokens and back."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_stage1

from lit_vqdiff.config import load_config
from lit_vqdiff.data import shapes
from lit_vqdiff.nn.tokenizer import Tokenizer
from lit_vqdiff.tasks import TASKS, needed_tokenizers, parse_task, raw_batch, stage_inputs, token_space
from lit_vqdiff.text import BYTE_VOCAB


def test_tasks_parse_and_name_their_tokenizers():
    assert parse_task("image->text") == ("image", "text")
    assert needed_tokenizers("image->audio") == ["image", "audio"]
    assert needed_tokenizers("class->image") == ["image"] and needed_tokenizers("text->audio") == ["audio"]
    with pytest.raises(ValueError, match="unknown task 'text->video'"):
        parse_task("text->video")
    assert len(TASKS) == 6


@pytest.fixture(scope="module")
def tokenizers(shapes_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    out = {}
    for modality in ("image", "audio"):
        cfg = load_config("stage1", tiny_stage1(shapes_root, runs, f"modality={modality}", "tokenizer.channels=16"))
        out[modality] = Tokenizer.from_config(cfg).eval()
    return out


def test_token_spaces_round_trip(tokenizers):
    samples = [shapes.make_sample(3, i) for i in range(4)]
    text = token_space("text", tokenizers, 48)
    tokens = text.tokens(raw_batch(samples, "text", 48))
    assert text.vocab == BYTE_VOCAB and tokens.shape == (4, 48)
    assert text.decode(tokens) == [s.caption for s in samples]
    label = token_space("class", tokenizers, 48)
    assert label.tokens(raw_batch(samples, "class", 48)).tolist() == [s.label for s in samples]
    for modality, shape in (("image", (8, 8)), ("audio", tokenizers["audio"].code_shape)):
        space = token_space(modality, tokenizers, 48)
        codes = space.tokens(raw_batch(samples, modality, 48))
        assert codes.shape == (4, *shape) and space.vocab == tokenizers[modality].quantizer.codebook_size
        # cached codes win over encoding the raw input
        cached = {f"{modality}_codes": torch.zeros_like(codes), modality: None}
        assert torch.equal(space.tokens(cached), torch.zeros_like(codes))
    with pytest.raises(ValueError, match="audio needs a stage-1 tokenizer"):
        token_space("audio", {}, 48)


def test_stage_inputs_per_task():
    assert stage_inputs("text->image", cached=False) == ("text", "image")
    assert stage_inputs("text->image", cached=True) == ("text", "image_codes")
    assert stage_inputs("image->audio", cached=True) == ("image_codes", "audio_codes")
    assert stage_inputs("class->image", cached=True) == ("class", "image_codes")
