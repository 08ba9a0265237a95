"""DiT shapes, adaLN-Zero init, cross-attention masking, preset sizes; condition encoders."""

from __future__ import annotations

import math

import pytest
import torch

from lit_vqdiff.nn.conditions import ByteTextEncoder, ClassCondition, CodeEncoder, drop_mask
from lit_vqdiff.nn.dit import Condition, cat_conditions
from lit_vqdiff.nn.dit import DIT_PRESETS, DiT, build_dit, patchify, unpatchify
from lit_vqdiff.modalities.text import BYTE_VOCAB, PAD_ID, decode_text, encode_text

# DiT paper, Table 1 / released checkpoints (class-conditional, 256 px, latent 32x32x4).
PAPER_PARAMS = {"DiT-S/2": 33.0e6, "DiT-B/2": 130.0e6, "DiT-L/2": 458.0e6, "DiT-XL/2": 675_129_632}


def randomize(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Overwrite every parameter (zero-initialized ones included) with Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def tiny(**kwargs) -> DiT:
    return DiT(width=32, depth=2, heads=4, **kwargs)


@pytest.mark.parametrize(
    ("seq_shape", "x_shape"), [((8, 8), (3, 8, 8)), ((8, 8), (3, 64)), ((16,), (3, 16))]
)
def test_token_logits_shape_and_mask_id(seq_shape, x_shape):
    model = tiny(vocab_size=10, seq_shape=seq_shape)
    assert model.mask_id == 10
    x = torch.randint(0, 11, x_shape)  # the mask id 10 is a valid input
    assert model(x, torch.rand(3)).shape == (*x_shape, 10)


@pytest.mark.parametrize(
    ("seq_shape", "patch", "learn_sigma"), [((8, 8), 2, False), ((8, 8), 4, True), ((16,), 4, True)]
)
def test_latent_output_shape(seq_shape, patch, learn_sigma):
    model = tiny(input="latent", in_channels=3, patch_size=patch, seq_shape=seq_shape, learn_sigma=learn_sigma)
    x = torch.randn(2, 3, *seq_shape)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == (2, 6 if learn_sigma else 3, *seq_shape)
    assert model.pos_embed.shape[1] == torch.Size(seq_shape).numel() // patch ** len(seq_shape)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 5, 12)])
def test_unpatchify_inverts_patchify(shape):
    x = torch.randn(shape)
    tokens = patchify(x, 4)
    d = len(shape) - 2
    assert tokens.shape == (2, torch.Size(shape[2:]).numel() // 4**d, shape[1] * 4**d)
    grid = tuple(s // 4 for s in shape[2:])
    assert torch.equal(unpatchify(tokens, grid, 4, shape[1]), x)


def full_model() -> DiT:
    return tiny(vocab_size=12, seq_shape=(4, 4), cond_dim=16, num_classes=5, pooled_cond_dim=16)


def full_condition(batch: int = 2, seed: int = 0) -> Condition:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[:, 4:] = False
    seq, pooled = torch.randn(batch, 6, 16, generator=g), torch.randn(batch, 16, generator=g)
    return Condition(seq=seq, mask=mask, pooled=pooled, labels=torch.tensor([1, 5]))


def test_adaln_zero_blocks_are_identity_and_output_is_zero_at_init():
    torch.manual_seed(0)
    model = full_model()
    x, t, cond = torch.randint(0, 13, (2, 16)), torch.rand(2), full_condition()
    h = torch.randn(2, 16, 32)
    c = torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(h, c, cond.seq, cond.mask), h)
    logits = model(x, t, cond)
    assert torch.count_nonzero(logits) == 0
    # Block internals (attention, cross-attention inputs, MLP) do not reach the output.
    for block in model.blocks:
        randomize(block.attn, seed=1)
        randomize(block.mlp, seed=2)
        randomize(block.cross_attn.kv, seed=3)
    final_norm_input = []
    hook = model.final.register_forward_hook(lambda module, args, out: final_norm_input.append(args[0]))
    after = model(x, t, cond)
    hook.remove()
    assert torch.count_nonzero(after) == 0
    embedded = model._embed(x) + model.pos_embed
    assert torch.equal(final_norm_input[0], embedded)


def test_cross_attention_ignores_padded_condition_positions():
    torch.manual_seed(0)
    model = full_model()
    randomize(model)
    x, t, cond = torch.randint(0, 13, (2, 16)), torch.rand(2), full_condition()
    reference = model(x, t, cond)
    changed_padding = Condition(**{**cond.__dict__, "seq": cond.seq.clone()})
    changed_padding.seq[:, 4:] = torch.randn(2, 2, 16) * 10
    torch.testing.assert_close(model(x, t, changed_padding), reference, rtol=0, atol=1e-6)
    changed_real = Condition(**{**cond.__dict__, "seq": cond.seq.clone()})
    changed_real.seq[:, 1] += 1.0
    assert (model(x, t, changed_real) - reference).abs().max() > 1e-3


def test_cross_attention_with_no_valid_position_is_finite_and_ignores_the_sequence():
    model = full_model()
    randomize(model)
    x, t, cond = torch.randint(0, 13, (2, 16)), torch.rand(2), full_condition()
    cond.mask[:] = False
    out = model(x, t, cond)
    assert torch.isfinite(out).all()
    cond.seq = torch.randn_like(cond.seq)
    torch.testing.assert_close(model(x, t, cond), out, rtol=0, atol=1e-6)


def test_class_label_changes_output_and_missing_condition_is_an_error():
    model = full_model()
    randomize(model)
    x, t, cond = torch.randint(0, 13, (2, 16)), torch.rand(2), full_condition()
    reference = model(x, t, cond)
    cond.labels = torch.tensor([2, 5])
    out = model(x, t, cond)
    assert (out[0] - reference[0]).abs().max() > 1e-3
    torch.testing.assert_close(out[1], reference[1])
    with pytest.raises(ValueError, match="cond.labels"):
        model(x, t, Condition(seq=cond.seq, pooled=cond.pooled))


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_preset_parameter_counts_match_the_paper(name):
    with torch.device("meta"):
        model = build_dit(
            name, input="latent", seq_shape=(32, 32), in_channels=4, num_classes=1000, learn_sigma=True
        )
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.01
    if name == "DiT-XL/2":
        # The reference stores its fixed sincos table as a frozen parameter; here it is a buffer.
        assert count + model.pos_embed.numel() == PAPER_PARAMS[name]


def test_build_dit_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="DiT-XL"):
        build_dit("DiT-Q")
    with pytest.raises(ValueError, match="patch"):
        build_dit("DiT-S/3", input="latent", seq_shape=(8, 8), in_channels=4)
    with pytest.raises(ValueError, match="input='latent'"):
        build_dit("DiT-S/2", vocab_size=10, seq_shape=(8, 8))
    assert set(DIT_PRESETS) >= {"DiT-T", "DiT-S", "DiT-B", "DiT-L", "DiT-XL"}


def test_learned_positions_are_parameters():
    model = tiny(vocab_size=5, seq_shape=(6,), pos="learned")
    assert isinstance(model.pos_embed, torch.nn.Parameter) and model.pos_embed.shape == (1, 6, 32)
    assert "pos_embed" not in dict(tiny(vocab_size=5, seq_shape=(6,)).named_parameters())


def test_encode_decode_text_round_trip_utf8():
    texts = ["a small red circle on the left", "größe ✓", ""]
    tokens, mask = encode_text(texts, 40)
    assert tokens.shape == (3, 40) and tokens.dtype == torch.long
    assert mask.sum(1).tolist() == [len(t.encode()) for t in texts]
    assert (tokens[~mask] == PAD_ID).all()
    assert decode_text(tokens) == texts
    with pytest.raises(ValueError, match="max_bytes=4"):
        encode_text(["hello"], 4)
    truncated, _ = encode_text(["aé"], 2, truncate=True)  # "é" is 2 bytes: cut before it
    assert decode_text(truncated) == ["a"]


def test_text_encoder_ignores_padding_and_drop_gives_the_null_condition():
    torch.manual_seed(0)
    encoder = ByteTextEncoder(width=32, depth=2, heads=4, max_bytes=12, vocab=BYTE_VOCAB, pad_id=PAD_ID)
    tokens, mask = encode_text(["red", "blue circle"], 12)
    out = encoder(tokens)
    assert out.seq.shape == (2, 12, 32) and torch.equal(out.mask, mask)
    torch.testing.assert_close(out.pooled, (out.seq * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    # Real positions do not depend on what the pad embedding holds.
    with torch.no_grad():
        encoder.byte_embed.table.weight[PAD_ID] += 5.0
    torch.testing.assert_close(encoder(tokens).seq[mask], out.seq[mask], rtol=0, atol=1e-5)
    dropped = encoder(tokens, drop=torch.tensor([True, False]))
    assert dropped.mask[0].tolist() == [True] + [False] * 11
    torch.testing.assert_close(dropped.pooled[0], encoder.null)
    torch.testing.assert_close(dropped.seq[1], encoder(tokens).seq[1])


def test_code_encoder_and_class_condition():
    encoder = CodeEncoder(vocab_size=16, seq_shape=(4, 4), width=32, depth=1, heads=4)
    codes = torch.randint(0, 16, (3, 4, 4))
    out = encoder(codes, drop=torch.tensor([False, False, True]))
    assert out.seq.shape == (3, 16, 32) and out.mask[:2].all() and out.mask[2].sum() == 1
    torch.testing.assert_close(out.seq[:2], encoder(codes.reshape(3, 16)).seq[:2])
    labels = torch.tensor([0, 71, 5])
    assert ClassCondition(72)(labels, drop=torch.tensor([False, True, False])).labels.tolist() == [0, 72, 5]
    embedded = ClassCondition(72, width=8)(labels)
    assert embedded.pooled.shape == (3, 8) and embedded.seq.shape == (3, 1, 8)
    with pytest.raises(ValueError, match="labels must be in"):
        ClassCondition(72)(torch.tensor([72]))


def test_drop_mask_rate_and_cat_conditions_pads_shorter_sequences():
    drops = drop_mask(20000, 0.1, generator=torch.Generator().manual_seed(0))
    assert drops.dtype == torch.bool and abs(drops.float().mean().item() - 0.1) < 0.01
    with pytest.raises(ValueError, match="p must be"):
        drop_mask(4, 1.5)
    a = Condition(seq=torch.randn(2, 3, 4), labels=torch.tensor([0, 1]))
    b = Condition(seq=torch.randn(2, 5, 4), mask=torch.ones(2, 5, dtype=torch.bool), labels=torch.tensor([2, 2]))
    both = cat_conditions(a, b)
    assert both.seq.shape == (4, 5, 4) and both.mask[:2, 3:].sum() == 0 and both.mask[:2, :3].all()
    assert both.labels.tolist() == [0, 1, 2, 2] and both.pooled is None
    with pytest.raises(ValueError, match="pooled"):
        cat_conditions(Condition(pooled=torch.zeros(1, 2)), Condition())


@pytest.mark.parametrize("seq_shape, patch", [((8, 8), 2), ((8, 8), 4), ((48,), 4)])
def test_token_patches_group_codes_into_one_trunk_token(seq_shape, patch):
    torch.manual_seed(0)
    model = DiT(width=32, depth=0, heads=2, input="tokens", vocab_size=10, seq_shape=seq_shape, patch_size=patch)
    assert math.prod(model.grid) == math.prod(seq_shape) // patch ** len(seq_shape)
    torch.nn.init.normal_(model.final.linear.weight)  # zero-initialized: make outputs depend on inputs
    x = torch.randint(0, 11, (2, *seq_shape))
    logits = model(x, 0.5)
    assert logits.shape == (2, *seq_shape, 10)
    # with no blocks, a code can only change the logits of its own group
    y = x.clone()
    y[(0,) + (0,) * len(seq_shape)] = (x[(0,) + (0,) * len(seq_shape)] + 1) % 11
    changed = (model(y, 0.5) - logits).abs().amax(-1)[0] > 0
    expected = torch.zeros(seq_shape, dtype=torch.bool)
    expected[tuple(slice(0, patch) for _ in seq_shape)] = True
    assert torch.equal(changed, expected)


def test_grouped_text_and_code_encoders():
    torch.manual_seed(0)
    text = ByteTextEncoder(width=32, depth=1, heads=4, max_bytes=12, vocab=BYTE_VOCAB, pad_id=PAD_ID, patch=4)
    tokens, _ = encode_text(["red", "a blue ring"], 12)
    out = text(tokens)
    # "red" lies in the first group of 4 bytes; "a blue ring" (11 bytes) reaches the third
    assert out.seq.shape == (2, 3, 32)
    assert out.mask.tolist() == [[True, False, False], [True, True, True]]
    codes = CodeEncoder(vocab_size=16, seq_shape=(4, 4), width=32, depth=1, heads=4, patch=2)
    grid = codes(torch.randint(0, 16, (3, 4, 4)))
    assert grid.seq.shape == (3, 4, 32) and grid.mask.all()
    with pytest.raises(ValueError, match="divisible"):
        ByteTextEncoder(width=32, depth=1, heads=4, max_bytes=10, vocab=BYTE_VOCAB, pad_id=PAD_ID, patch=4)
