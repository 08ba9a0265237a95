"""Speech metrics, the Codec2/Opus baselines, the Debian package cache and the espeak-ng speech set.

Tests that run Debian binaries take them from the package cache and never fetch (no
network in tests); without them they skip, naming the command that pre-fetches them.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import butter, correlate, lfilter, sosfilt

from lit_vqdiff import debian
from lit_vqdiff.data import speech as speech_set
from lit_vqdiff.data.description import read_description
from lit_vqdiff.data.shards import read_sizes
from lit_vqdiff.data.sources import SourceError
from lit_vqdiff.eval import codecs, speech
from lit_vqdiff.packaged import sha256_of

RATE = 8000


def cached_tools(group: str, *binaries: str) -> list[debian.Tool]:
    """The binaries from the package cache, or a skip that names the fetch command."""
    try:
        return [debian.tool(b, fetch=False) for b in binaries]
    except debian.DebianError as err:
        pytest.skip(f"needs {group} from the Debian package cache: {err}")


@pytest.fixture(scope="module")
def codec_tools() -> None:
    cached_tools("codec2", "c2enc", "c2dec")
    cached_tools("opus-tools", "opusenc", "opusdec")


@pytest.fixture(scope="module")
def espeak() -> debian.Tool:
    return cached_tools("espeak-ng", "espeak-ng")[0]


def babble(seed: int, seconds: float = 3.0) -> np.ndarray:
    """Speech-like test signal: a jittered pulse train through three formant resonators, in syllables."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    pulses = np.zeros(n)
    pulses[np.cumsum(rng.integers(40, 80, size=n // 40))[: n // 80]] = 1.0
    x = pulses
    for hz, bandwidth in ((500, 80), (1500, 120), (2500, 160)):
        radius, angle = np.exp(-np.pi * bandwidth / RATE), 2 * np.pi * hz / RATE
        x = lfilter([1 - radius], [1, -2 * radius * np.cos(angle), radius * radius], x)
    t = np.arange(n) / RATE
    syllables = np.sqrt(np.clip(np.sin(2 * np.pi * rng.uniform(2.5, 4.0) * t + rng.uniform(0, 6)), 0, None))
    x = x * syllables
    return 0.5 * x / np.abs(x).max()


def harmonic_probe(seed: int, seconds: float = 4.0) -> np.ndarray:
    """A steady harmonic tone under a slow, smooth loudness wave: Codec2 keeps its envelope's timing."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = rng.uniform(100, 220)
    tone = sum(np.sin(k * 2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, int(3800 / f0)))
    wave = sum(np.sin(2 * np.pi * rng.uniform(1, 6) * t + rng.uniform(0, 2 * np.pi)) for _ in range(3)) / 3
    return 0.1 * tone * (0.55 + 0.45 * wave)


# ----------------------------------------------------------------------------- metrics


def test_identical_signals_score_perfectly_at_8k_and_after_resampling():
    x = babble(0)
    scores, notes = speech.score_pair(x, x)
    assert notes == []
    assert scores["pesq"] == pytest.approx(4.55, abs=0.01) and scores["stoi"] == pytest.approx(1.0, abs=1e-6)
    assert scores["lsd"] == 0.0 and scores["mcd"] == 0.0
    at_16k = np.repeat(x, 2)  # any 16 kHz signal; it is resampled to 8 kHz on both sides
    scores, _ = speech.score_pair(at_16k, at_16k, rate=16000)
    assert scores["pesq"] > 4.5 and scores["stoi"] > 0.999 and scores["mcd"] == 0.0


def test_noise_and_lowpass_make_every_figure_worse():
    x = babble(1)
    rng = np.random.default_rng(0)
    perfect, _ = speech.score_pair(x, x)
    lowpass = sosfilt(butter(8, 1200, fs=RATE, output="sos"), x)
    light, heavy = x + 0.003 * rng.standard_normal(x.size), x + 0.05 * rng.standard_normal(x.size)
    worse = [speech.score_pair(x, y)[0] for y in (light, heavy, lowpass)]
    for scores in worse:
        assert scores["pesq"] < perfect["pesq"] - 0.3 and scores["stoi"] < perfect["stoi"] - 0.01
        assert scores["lsd"] > 0.5 and scores["mcd"] > 0.2
    light_scores, heavy_scores = worse[:2]
    assert heavy_scores["pesq"] < light_scores["pesq"] and heavy_scores["stoi"] < light_scores["stoi"]
    assert heavy_scores["lsd"] > light_scores["lsd"] and heavy_scores["mcd"] > light_scores["mcd"]


def test_misalignment_is_found_and_undone():
    x = babble(2)
    late = np.concatenate([np.zeros(37), x[:-37]])
    assert speech.envelope_lag(late, x, 100) == pytest.approx(37, abs=0.5)
    assert speech.envelope_lag(x, late, 100) == pytest.approx(-37, abs=0.5)
    raw, _ = speech.score_pair(x, late)
    aligned, _ = speech.score_pair(x, late, max_shift_s=0.02)
    assert raw["pesq"] > 4.4  # PESQ aligns on its own
    assert raw["stoi"] < 0.97 and aligned["stoi"] > 0.999
    assert aligned["lsd"] < 0.01 < 1.0 < raw["lsd"] and aligned["mcd"] < 0.01 < 0.1 < raw["mcd"]


def test_unscorable_pairs_give_nan_and_counted_notes():
    x = babble(3)
    pairs = [(x, x), (np.zeros(RATE), x[:RATE]), (x[:800], x[:800]), (x, np.zeros_like(x))]
    out = speech.score_pairs(pairs)
    assert out["pairs"] == 4 and out["pesq_scored"] == 1 and out["pesq"] == pytest.approx(4.55, abs=0.01)
    assert out["stoi_scored"] == 2 and out["mcd_scored"] == 3
    assert out["notes"] == {
        "mcd: silent reference signal": 1,
        "pesq: shorter than 0.25 s": 1, "pesq: silent degraded signal": 1, "pesq: silent reference signal": 1,
        "stoi: shorter than 0.4 s": 1, "stoi: silent reference signal": 1,
    }

    blip = np.zeros(RATE)  # 40 ms of tone in a second of silence: too little for either
    blip[100:420] = 0.5 * np.sin(0.3 * np.arange(320))
    scores, notes = speech.score_pair(blip, blip[:-100])
    assert np.isnan(scores["pesq"]) and np.isnan(scores["stoi"]) and scores["mcd"] >= 0
    assert notes == ["pair: lengths differ, degraded fitted to the reference", "pesq: No utterances detected",
                     "stoi: too few speech frames"]


def test_mel_cepstra_leave_out_the_level():
    x = babble(4)
    bands = speech.mel_bands(x)
    assert speech.mel_cepstra(bands, 1e-8).shape == (1 + (x.size - 256) // 80, 13)
    # c0 (the level) is not compared; only bands near the floor move when the level does
    assert speech.mcd(x, 0.5 * x) < 0.1 and speech.mcd(x, 2.0 * x) < 0.1
    assert speech.mcd(x, x + 0.01 * np.random.default_rng(0).standard_normal(x.size)) > 1.0


# ----------------------------------------------------------------------------- codecs


def test_codec_arguments_are_checked_before_anything_runs():
    with pytest.raises(ValueError, match="Codec2 mode 2400 not supported"):
        codecs.codec2_round_trip(np.zeros(RATE), 2400)
    with pytest.raises(ValueError, match="NaN or infinite"):
        codecs.opus_round_trip(np.full(RATE, np.nan))
    with pytest.raises(ValueError, match="mono waveform"):
        codecs.codec2_round_trip(np.zeros((2, RATE)))


def test_ogg_packet_sizes_follow_lacing():
    def page(lacing: list[int]) -> bytes:
        header = b"OggS" + bytes(22) + bytes([len(lacing)]) + bytes(lacing)
        return header + bytes(sum(lacing))

    assert codecs.ogg_packet_sizes(page([19]) + page([255, 255, 10, 3])) == [19, 520, 3]
    with pytest.raises(ValueError, match="not an Ogg page at byte 0"):
        codecs.ogg_packet_sizes(b"RIFF" + bytes(40))


def test_round_trips_keep_length_spend_their_rate_and_resemble_the_input(codec_tools):
    x = babble(5, seconds=2.5)
    shuffled = speech.stoi(x, np.random.default_rng(0).permutation(x))
    for name, round_trip in codecs.CODECS.items():
        out = round_trip(x)
        assert out.wave.shape == x.shape and out.wave.dtype == np.float32, name
        assert speech.stoi(x, out.wave.astype(np.float64)) > shuffled + 0.4, name
        assert speech.pesq_nb(x, out.wave.astype(np.float64)) > 1.3, name
    assert codecs.CODECS["codec2-3200"](x).bit_rate == 3200.0
    low = codecs.codec2_round_trip(x, 1300)
    assert low.bit_rate == 1300.0 and low.coded_bytes % 7 == 0  # 52-bit frames stored in 7 bytes
    opus = codecs.opus_round_trip(x)
    assert 4000 < opus.bit_rate < 8000 and opus.bit_rate == pytest.approx(opus.coded_bytes * 8 / 2.5)


def test_codec2_output_lines_up_with_its_input(codec_tools):
    # Codec2 synthesizes its own phases: envelopes line up, waveforms do not, and one probe's
    # envelope lag scatters by a few samples around the true offset; their mean does not.
    for mode in (3200, 1300):
        lags = [speech.envelope_lag(codecs.codec2_round_trip(harmonic_probe(s), mode).wave, harmonic_probe(s), 400, 400)
                for s in range(6)]
        assert abs(np.mean(lags)) < 2.0, (mode, lags)
    probe = harmonic_probe(0)
    late = codecs.codec2_round_trip(np.concatenate([np.zeros(20), probe]), 3200).wave[20:]
    assert speech.envelope_lag(late, probe, 400, 400) == pytest.approx(0, abs=2)  # the probe is found, shifted back


def test_opus_output_lines_up_with_its_input_to_the_sample(codec_tools):
    for seed in range(3):
        x = babble(seed)
        y = codecs.opus_round_trip(x).wave.astype(np.float64)
        corr = correlate(y, x, mode="full", method="fft")[x.size - 1 - 40 : x.size + 40]
        assert abs(int(np.argmax(corr)) - 40) <= 1, seed


# ----------------------------------------------------------------------------- the Debian package cache


def fake_deb(tmp_path: Path, package: str, version: str, files: dict[str, str]) -> Path:
    """A .deb built with dpkg-deb holding executable ``files`` (path -> shell script)."""
    tree = tmp_path / f"tree-{package}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: {debian.ARCH}\nMaintainer: t <t@t>\nDescription: t\n")
    for path, text in files.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(text)
        (tree / path).chmod(0o755)
    deb = tmp_path / debian.deb_name(package, version)
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True, capture_output=True)
    return deb


def test_cache_verifies_unpacks_and_gives_the_environment(tmp_path, monkeypatch):
    if not debian.shutil.which("dpkg-deb"):
        pytest.skip("needs dpkg-deb")
    cache = tmp_path / "cache"
    script = "#!/bin/sh\necho \"$ESPEAK_DATA_PATH|$LD_LIBRARY_PATH|$1\"\n"
    deb = fake_deb(tmp_path, "codec2", "9.9-1", {"usr/bin/c2enc": script})
    monkeypatch.setitem(debian.PACKAGES, "codec2", ("9.9-1", sha256_of(deb)))
    monkeypatch.setitem(debian.GROUPS, "codec2", ("codec2",))
    fetch = r"run `python -m lit_vqdiff\.debian fetch codec2`"
    with pytest.raises(debian.DebianError, match=rf"codec2 9\.9-1 is not in .*; {fetch}"):
        debian.tool("c2enc", cache, fetch=False)
    cache.mkdir()
    deb.replace(cache / deb.name)
    tool = debian.tool("c2enc", cache, fetch=False)
    lib = cache / "root" / "usr" / "lib" / debian.MULTIARCH
    assert tool.path == cache / "root" / "usr" / "bin" / "c2enc"
    assert tool.env["PATH"].split(":")[0] == str(cache / "root" / "usr" / "bin")
    printed = debian.run(tool, ["hello"]).stdout.decode().strip().split("|")
    assert printed[0] == str(lib) and printed[2] == "hello"
    assert printed[1].split(":")[:2] == [str(lib), str(lib / "pulseaudio")]
    assert debian.is_unpacked("codec2", cache) and debian.ensure("codec2", cache, fetch=False) == []


def test_checksum_mismatch_and_missing_apt_get_are_one_line_errors(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    version, pinned = debian.PACKAGES["codec2"]
    (cache / debian.deb_name("codec2", version)).write_bytes(b"not the pinned package")
    with pytest.raises(debian.DebianError, match=f"but codec2 is pinned to {pinned}; delete the file") as err:
        debian.ensure_package("codec2", cache, fetch=False)
    assert err.value.exit_code == 1 and "\n" not in str(err.value)

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setenv(debian.CACHE_ENV, str(tmp_path / "other"))
    assert debian.main(["fetch", "opus-tools"]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "apt-get not found on PATH" in message and "opus-tools=0.2-1+b1" in message


# ----------------------------------------------------------------------------- the speech shard set


def read_split(directory: Path, split: str) -> list[dict[str, bytes]]:
    """Samples of a split, in order, as {ext: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(directory.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return list(samples.values())


def test_sentences_are_seeded_distinct_and_well_formed():
    first = speech_set.make_sentences(300, seed=0)
    assert first == speech_set.make_sentences(300, seed=0) != speech_set.make_sentences(300, seed=1)
    assert len(set(first)) == 300
    for sentence in first:
        assert sentence[0].isupper() and sentence[-1] in ".?" and "  " not in sentence and " ," not in sentence
        assert " a a" not in sentence and " a o" not in sentence and " a e" not in sentence and " a u" not in sentence


def test_speech_set_holds_out_sentences_and_names_voices_as_classes(tmp_path, espeak):
    voices = speech_set.VOICES
    out = tmp_path / "speech"
    sizes = speech_set.write_speech(out, train_sentences=6, val_sentences=5, voices=voices, seed=3, shard_size=4)
    assert sizes == read_sizes(out) and sum(sizes.values()) == 11
    train, val = read_split(out, "train"), read_split(out, "val")
    assert len(train) == 6 and len(val) == 5
    assert not {s["txt"] for s in train} & {s["txt"] for s in val}
    assert {int(s["cls"]) for s in val} == set(range(len(voices)))
    for sample in train + val:
        meta = json.loads(sample["json"])
        assert voices[int(sample["cls"])] == meta["voice"] and meta["synthesizer"].startswith("espeak-ng 1.51")
        wave, rate = sf.read(io.BytesIO(sample["wav"]))
        info = sf.info(io.BytesIO(sample["wav"]))
        assert rate == RATE and info.channels == 1 and info.subtype == "PCM_16" and 0.5 < wave.size / RATE < 8
        assert np.abs(wave).max() > 0.05
    described = read_description(out)
    assert described["classes"]["names"] == list(voices) and described["audio"]["sample_rates"] == {"8000": 11}
    assert json.loads((out / "source.json").read_text())["params"]["voices"] == list(voices)
    assert speech_set.write_speech(out, 6, 5, voices, seed=3, shard_size=4) is None  # same settings: nothing to do


def test_speech_set_refuses_unknown_voices_and_too_small_val(tmp_path, espeak):
    with pytest.raises(SourceError, match="val_sentences >= the 2 voices"):
        speech_set.write_speech(tmp_path / "a", 4, 1, ("en-us", "en-gb"))
    with pytest.raises(SourceError, match="espeak-ng does not know the voice 'xx-nowhere'"):
        speech_set.write_speech(tmp_path / "b", 4, 2, ("en-us", "xx-nowhere"))
    assert not (tmp_path / "b").exists()
