"""Classic speech codecs as baselines for the learned audio tokenizer: Codec2 and Opus round trips.

Each round trip takes a mono float waveform in [-1, 1] at 8 kHz, runs the Debian binaries
that ``lit_vqdiff.debian`` keeps in its cache (c2enc/c2dec, opusenc/opusdec) on temporary
files, and returns the decoded waveform, aligned with the input and of its length, with the
bit rate the codec spent on it. Samples are quantized to 16 bits on the way in, as the
binaries read and write 16-bit PCM.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import soundfile as sf

from .. import debian

RATE = 8000
# mode -> (samples per frame, bits per frame): 3200 codes 20 ms in 64 bits, 1300 40 ms in 52 bits.
CODEC2_MODES: dict[int, tuple[int, int]] = {3200: (160, 64), 1300: (320, 52)}
# c2dec's output trails c2enc's input by 160 samples (20 ms) in both modes: the encoder
# describes each 10 ms sub-frame by a window centred 160 samples behind its newest input
# sample, and the decoder's overlap-add completes that sub-frame's centre with the last of
# the 80 samples it emits for it. Codec2 synthesizes phases rather than coding them, so
# only envelopes line up: eval.speech.envelope_lag recovers this delay on steady probes, but
# per utterance it scatters by tens of samples, so the structural constant is applied
# rather than a per-call estimate.
CODEC2_DELAY = 160
OPUS_HEADER_PACKETS = 2  # OpusHead and OpusTags lead every Ogg Opus stream (RFC 7845)


class RoundTrip(NamedTuple):
    """A decoded waveform (float32, the input's length), the bit rate spent, and the coded bytes counted."""

    wave: np.ndarray
    bit_rate: float
    coded_bytes: int


def pcm16(wave: np.ndarray) -> np.ndarray:
    """Little-endian int16 samples of a float waveform in [-1, 1] (clipped, rounded)."""
    return np.round(np.clip(wave, -1.0, 1.0) * 32767.0).astype("<i2")


def check_wave(wave: np.ndarray) -> np.ndarray:
    """A 1-D finite float64 copy of ``wave``, or a ValueError naming what is wrong."""
    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"expected a non-empty mono waveform (1-D), got shape {wave.shape}")
    if not np.isfinite(wave).all():
        raise ValueError("waveform holds NaN or infinite samples")
    return wave


def codec2_round_trip(wave: np.ndarray, mode: int = 3200) -> RoundTrip:
    """Codec2 at ``mode`` (3200 or 1300 bit/s) on 8 kHz s16le raw audio.

    The input is padded with silence so that the decoder, ``CODEC2_DELAY`` samples late,
    still covers its last sample; the output is cut back to the input's span. The rate is
    the coded bits (frames x bits per frame, the frames counted from the encoded bytes) per
    second of coded audio, so exactly the mode's rate: c2enc stores 1300's 52-bit frames in
    7 bytes each, a padding to whole bytes that a packed stream would not spend, so
    ``coded_bytes`` * 8 exceeds the bits counted for 1300.
    """
    if mode not in CODEC2_MODES:
        raise ValueError(f"Codec2 mode {mode} not supported; expected one of {sorted(CODEC2_MODES)}")
    wave = check_wave(wave)
    frame, bits = CODEC2_MODES[mode]
    frames = -(-(wave.size + CODEC2_DELAY) // frame)
    padded = np.zeros(frames * frame)
    padded[: wave.size] = wave
    encoder, decoder = debian.tool("c2enc"), debian.tool("c2dec")
    with tempfile.TemporaryDirectory(prefix="lit_vqdiff-codec2-") as tmp:
        raw, coded, decoded = Path(tmp) / "in.raw", Path(tmp) / "coded.bit", Path(tmp) / "out.raw"
        raw.write_bytes(pcm16(padded).tobytes())
        debian.run(encoder, [str(mode), raw, coded])
        debian.run(decoder, [str(mode), coded, decoded])
        coded_bytes = coded.stat().st_size
        out = np.frombuffer(decoded.read_bytes(), dtype="<i2").astype(np.float32) / 32768.0
    frame_bytes = -(-bits // 8)
    if coded_bytes != frames * frame_bytes or out.size < wave.size + CODEC2_DELAY:
        raise RuntimeError(f"c2enc/c2dec {mode}: {frames} frames should give {frames * frame_bytes} bytes and "
                           f"{frames * frame} samples, got {coded_bytes} bytes and {out.size} samples")
    bit_rate = (coded_bytes // frame_bytes) * bits / (frames * frame / RATE)
    return RoundTrip(out[CODEC2_DELAY : CODEC2_DELAY + wave.size].copy(), bit_rate, coded_bytes)


def ogg_packet_sizes(data: bytes) -> list[int]:
    """Byte sizes of the packets of an Ogg stream, in order (RFC 3533 pages and lacing)."""
    sizes, pos, current = [], 0, 0
    while pos < len(data):
        if data[pos : pos + 4] != b"OggS" or pos + 27 > len(data):
            raise ValueError(f"not an Ogg page at byte {pos}")
        segments = data[pos + 26]
        lacing = data[pos + 27 : pos + 27 + segments]
        pos += 27 + segments + sum(lacing)
        for value in lacing:
            current += value
            if value < 255:  # a lacing value under 255 ends a packet; 255 continues it
                sizes.append(current)
                current = 0
    return sizes


def opus_round_trip(wave: np.ndarray, kbps: float = 6.0) -> RoundTrip:
    """Opus: ``opusenc --bitrate kbps`` on an 8 kHz 16-bit WAV, ``opusdec --rate 8000`` back.

    The rate reported is the audio payload: the bytes of the Opus packets (each with its TOC
    byte) over the input's duration, without the Ogg container (page headers, the OpusHead
    and OpusTags packets). Codec2's rate has no container either, and neither has a learned
    tokenizer's code rate; the container's fixed cost (near 1 kB of headers and tags) would
    add about 3 kbit/s to a 3-second sentence at a 6 kbit/s target. ``coded_bytes`` is the
    payload. opusdec removes the encoder's pre-skip and trims the end to the input's length,
    so the output needs no shift.
    """
    wave = check_wave(wave)
    encoder, decoder = debian.tool("opusenc"), debian.tool("opusdec")
    with tempfile.TemporaryDirectory(prefix="lit_vqdiff-opus-") as tmp:
        source, coded, decoded = Path(tmp) / "in.wav", Path(tmp) / "coded.opus", Path(tmp) / "out.wav"
        sf.write(source, pcm16(wave), RATE, subtype="PCM_16")
        debian.run(encoder, ["--quiet", "--bitrate", f"{kbps:g}", source, coded])
        debian.run(decoder, ["--quiet", "--rate", str(RATE), coded, decoded])
        data = coded.read_bytes()
        out, rate = sf.read(decoded, dtype="float32", always_2d=True)
    if rate != RATE:
        raise RuntimeError(f"opusdec wrote {rate} Hz, asked for {RATE}")
    payload = sum(ogg_packet_sizes(data)[OPUS_HEADER_PACKETS:])
    out = out[:, 0]
    aligned = np.zeros(wave.size, dtype=np.float32)
    aligned[: min(out.size, wave.size)] = out[: wave.size]
    return RoundTrip(aligned, payload * 8 / (wave.size / RATE), payload)


# Baselines by name, as evaluation reports them.
CODECS: dict[str, Callable[[np.ndarray], RoundTrip]] = {
    "codec2-3200": lambda wave: codec2_round_trip(wave, 3200),
    "codec2-1300": lambda wave: codec2_round_trip(wave, 1300),
    "opus-6k": lambda wave: opus_round_trip(wave, 6.0),
}
