"""The speech tokenizer preset (conf/tokenizer/speech.yaml) and the stft frontend: shapes,
the inverse STFT's perfect reconstruction, the artifact round trip, the code rate, and
short CLI runs on espeak-ng sentences whose loss falls."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.signal import lfilter

from lit_vqdiff import debian
from lit_vqdiff.artifact import load_tokenizer
from lit_vqdiff.cli import main
from lit_vqdiff.config import load_config
from lit_vqdiff.data import speech as speech_set
from lit_vqdiff.errors import ConfigError
from lit_vqdiff.eval.reconstruction import code_rate
from lit_vqdiff.nn.tokenizer import Tokenizer

RATE = 8000
ARCH = dict(channels=32, channel_mult=[1], num_res_blocks=1, z_channels=16, downsample=None, attention=False, patch=4,
            mid=False, patch_width=24, n_fft=256, hop=64, griffin_lim_iters=4)
RVQ = dict(kind="rvq", num_quantizers=3, codebook_size=16, lookup_dim=4)


def babble(seed: int, samples: int) -> torch.Tensor:
    """Speech-like test signal: a jittered 100-200 Hz pulse train through two formant resonators."""
    rng = np.random.default_rng(seed)
    x = np.zeros(samples)
    x[np.cumsum(rng.integers(40, 80, size=samples // 40))[: samples // 80]] = 1.0
    for hz, bandwidth in ((600, 90), (1700, 140)):
        radius, angle = math.exp(-math.pi * bandwidth / RATE), 2 * math.pi * hz / RATE
        x = lfilter([1 - radius], [1, -2 * radius * math.cos(angle), radius * radius], x)
    return torch.from_numpy(0.5 * x / np.abs(x).max()).float()


def stft_tokenizer(samples: int = 4000) -> Tokenizer:
    return Tokenizer("audio", "stft", ARCH, RVQ, {"audio_samples": samples, "sample_rate": RATE})


def test_stft_frontend_inverse_is_the_identity_and_shapes_follow_the_geometry():
    tok = stft_tokenizer().eval()
    x = torch.stack([babble(0, 4000), babble(1, 4000), torch.zeros(4000)])
    feats = tok.features(x)
    # 1 + 4000 // 64 = 63 frames, padded to a multiple of patch x CODE_MULTIPLE = 32; 3 channels per bin.
    assert feats.shape == (3, 3 * 129, 64) and tok.frames == 64
    # The analysis and the inverse STFT agree: features -> waveform gives the input back
    # (to the bound the phase normalization's epsilon leaves on the quietest bins), silence as silence.
    assert torch.allclose(tok.waveform(feats), x, atol=1e-3)
    assert tok.waveform(feats)[2].abs().max() == 0
    assert torch.allclose(tok.to_signal(feats), x, atol=1e-3)
    codes = tok.encode(x)
    assert codes.shape == (3, *tok.code_shape) and tok.code_shape == (3, 16)
    assert codes.dtype == torch.long and 0 <= int(codes.min()) and int(codes.max()) < 16
    y = tok.decode(codes)
    assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().max() <= 1


def test_stft_tokenizer_rebuilds_from_its_spec_and_decodes_alike():
    tok = stft_tokenizer().eval()
    again = Tokenizer.from_spec(tok.spec())
    again.load_state_dict(tok.state_dict())
    again.eval()
    assert again.arch["patch_width"] == 24 and again.decoder.head.refine.in_channels == 24
    codes = tok.encode(babble(2, 4000)[None])
    assert torch.equal(again.encode(babble(2, 4000)[None]), codes)
    assert torch.allclose(again.decode(codes), tok.decode(codes))


def test_waveform_and_magnitude_refuse_other_frontends():
    tok = Tokenizer("audio", "wave", dict(ARCH, patch=1, channel_mult=[1, 1], downsample=[4]), RVQ,
                    {"audio_samples": 4000, "sample_rate": RATE})
    with pytest.raises(ValueError, match="stft frontend"):
        tok.waveform(torch.zeros(1, 1, 4000))
    with pytest.raises(ValueError, match="spectrogram or stft"):
        tok.magnitude(torch.zeros(1, 1, 4000))


def test_rate_is_positions_times_bits_times_codebooks():
    tok = stft_tokenizer(samples=8000)  # 1 s: 126 frames -> 128 -> 32 code steps
    assert code_rate(tok) == {"bits": 32 * 4 * 3, "bits_per_second": 32 * 4 * 3}


def test_speech_preset_carries_codec2s_rate_at_most():
    cfg = load_config("stage1", ["modality=audio", "tokenizer=speech", "data.sample_rate=8000"])
    assert cfg.tokenizer.quantizer.kind == "rvq" and cfg.data.audio_samples == 32000
    with torch.device("meta"):
        tok = Tokenizer.from_config(cfg)
    q = cfg.tokenizer.quantizer
    assert tok.code_shape == (q.num_quantizers, 128)
    rate = code_rate(tok)
    # 128 code steps x 10 codebooks x log2(1024) bits over 4 s: Codec2's 3200 bit/s, not a bit more.
    assert rate["bits"] == 128 * q.num_quantizers * math.log2(q.codebook_size)
    assert rate["bits_per_second"] <= 3200


def test_stft_frontend_needs_its_fft_size_and_overlapping_frames():
    with pytest.raises(ConfigError, match="stft frontend needs both set"):
        load_config("stage1", ["modality=audio", "tokenizer.frontend=stft"])
    with pytest.raises(ConfigError, match="overlapping frames"):
        load_config("stage1", ["modality=audio", "tokenizer.frontend=stft", "tokenizer.n_fft=256", "tokenizer.hop=200"])
    with pytest.raises(ConfigError, match="tokenizer=nowhere"):
        load_config("stage1", ["modality=audio", "tokenizer=nowhere"])


# ----------------------------------------------------------------------------- short runs


@pytest.fixture(scope="module")
def speech_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten espeak-ng sentences (five held out), or a skip when espeak-ng is not in the cache."""
    try:
        debian.tool("espeak-ng", fetch=False)
    except debian.DebianError as err:
        pytest.skip(f"needs espeak-ng from the Debian package cache: {err}")
    root = tmp_path_factory.mktemp("speech")
    speech_set.write_speech(root, train_sentences=5, val_sentences=5, seed=0, shard_size=5)
    return root


def losses(run_dir: Path) -> list[float]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [float(r["train/recon_loss"]) for r in csv.DictReader(f) if r.get("train/recon_loss")]


@pytest.mark.parametrize("frontend", ["spectrogram", "stft"])
def test_speech_preset_learns_on_a_few_sentences(speech_root, tmp_path, frontend):
    run_dir = tmp_path / "run"
    steps = 40
    assert main(["train", "stage1", "modality=audio", "tokenizer=speech", f"tokenizer.frontend={frontend}",
                 f"data.root={speech_root}", f"run.dir={run_dir}", f"run.root={tmp_path / 'runs'}", "data.num_workers=0", "data.batch_size=5",
                 "data.audio_samples=8000", "tokenizer.channels=32", "tokenizer.patch_width=32",
                 "tokenizer.quantizer.codebook_size=32", "tokenizer.quantizer.num_quantizers=4",
                 f"trainer.max_steps={steps}", f"trainer.val_every_steps={steps}", "trainer.log_every_steps=1",
                 "trainer.threads=1", "optim.warmup_steps=5", "optim.lr=3e-3", "logger=csv"]) == 0
    curve = losses(run_dir)
    assert len(curve) == steps
    assert np.mean(curve[-5:]) < 0.8 * np.mean(curve[:5]), curve
    tok, _ = load_tokenizer(run_dir / "tokenizer.pt")
    assert tok.frontend == frontend and tok.code_shape == (4, 32) and tok.arch["patch_width"] == 32
