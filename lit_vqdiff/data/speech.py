"""Synthesized English speech as a shard set, for measuring speech tokenizers and codecs.

espeak-ng (the Debian package, through ``lit_vqdiff.debian``) speaks sentences of the
platform's own making (``make_sentences``: seeded, from small word lists) in several
voices, at seeded speaking rates and pitches. Each sample is one sentence in one voice:

- ``wav``: 16-bit mono PCM at 8 kHz (espeak-ng's 22.05 kHz resampled by ``dsp.resample``)
- ``txt``: the sentence
- ``cls``: the voice's index in ``voices`` (the class names are the voices)
- ``json``: voice, speaking rate (words per minute), pitch (0-99), synthesizer version

Train and val hold different sentences (held out by sentence); voices take turns within
each split, so val holds every voice as long as it has at least as many sentences.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import soundfile as sf
import torch

from .. import debian
from ..dsp import resample
from ..media import encode_wav
from .description import Describer
from .shards import write_set, write_split
from .sources import SourceError

RATE = 8000
VOICES = ("en-us", "en-gb", "en+f3", "en+m3", "en-gb-scotland")
SPEED_WPM = (140, 190)  # espeak-ng -s range; its default is 175
PITCH = (30, 70)  # espeak-ng -p range (0-99); its default is 50
SYNTHESIZER = f"espeak-ng {debian.PACKAGES['espeak-ng'][0]}"

# ----------------------------------------------------------------------------- sentences

NAMES = ("Anna", "Peter", "Maria", "Tom", "Lucy", "Oscar", "Nina", "Daniel", "Grace", "Hugo", "Ruth", "Simon")
RELATIVES = ("sister", "brother", "uncle", "aunt", "neighbour", "teacher", "grandmother", "cousin", "friend")
GROUPS = ("the children", "my parents", "the farmers", "our neighbours", "the students", "the sailors")
ADJECTIVES = ("small", "heavy", "old", "green", "broken", "quiet", "bright", "wooden", "empty", "yellow", "narrow",
              "clean", "orange", "round", "tiny", "famous")
# (singular, plural)
NOUNS = (("box", "boxes"), ("lamp", "lamps"), ("chair", "chairs"), ("letter", "letters"), ("basket", "baskets"),
         ("bottle", "bottles"), ("coat", "coats"), ("ladder", "ladders"), ("map", "maps"), ("drum", "drums"),
         ("kettle", "kettles"), ("blanket", "blankets"), ("apple", "apples"), ("umbrella", "umbrellas"),
         ("envelope", "envelopes"), ("key", "keys"), ("clock", "clocks"), ("knife", "knives"), ("bicycle", "bicycles"),
         ("painting", "paintings"))
# (base, past)
VERBS = (("find", "found"), ("paint", "painted"), ("carry", "carried"), ("open", "opened"), ("clean", "cleaned"),
         ("sell", "sold"), ("buy", "bought"), ("watch", "watched"), ("fix", "fixed"), ("drop", "dropped"),
         ("borrow", "borrowed"), ("count", "counted"), ("hide", "hid"), ("move", "moved"), ("wrap", "wrapped"),
         ("lift", "lifted"), ("wash", "washed"), ("check", "checked"))
PLACES = ("near the river", "in the kitchen", "behind the station", "under the old bridge", "at the market",
          "on the top shelf", "in the garden", "outside the library", "by the window", "in the cellar")
TIMES = ("this morning", "last winter", "on Tuesday", "before lunch", "after the storm", "yesterday evening",
         "at midnight", "last week")
HABITS = ("every morning", "on Sundays", "twice a week", "in the summer", "after school", "every evening")
FUTURES = ("tomorrow", "next week", "on Friday", "after dinner", "in the spring", "tonight")
NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
TEMPLATES = (
    "{Subject} {past} {object} {place}.",
    "{Subject} {past} {object} {time}.",
    "Did {subject} {base} {object} {place}?",
    "{Name} says that {subject} will {base} {object} {future}.",
    "Please {base} {object} {place}.",
    "Why would {subject} {base} {object} {time2}?",
    "{Group} {base} {objects} {habit}.",
    "There are {number} {adjective} {plural} {place}.",
    "When {subject} {past} {object}, {subject2} {past2} {objects}.",
    "{Subject} did not {base} {object}, but {subject2} did.",
)


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    """``a`` or ``an`` before ``phrase`` (every word list above starts its words as they sound)."""
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def _thing(rng: np.random.Generator) -> str:
    """A singular noun phrase: the/a/my/your + optional adjective + noun."""
    noun = _pick(rng, NOUNS)[0]
    phrase = f"{_pick(rng, ADJECTIVES)} {noun}" if rng.random() < 0.6 else noun
    determiner = _pick(rng, ("the", "a", "my", "your", "that"))
    return _article(phrase) if determiner == "a" else f"{determiner} {phrase}"


def _things(rng: np.random.Generator) -> str:
    """A plural noun phrase with a number or a determiner."""
    plural = _pick(rng, NOUNS)[1]
    lead = _pick(rng, NUMBERS + ("the", "some", "these"))
    return f"{lead} {_pick(rng, ADJECTIVES)} {plural}" if rng.random() < 0.5 else f"{lead} {plural}"


def _person(rng: np.random.Generator) -> str:
    """A singular subject: a name, or someone's relative."""
    if rng.random() < 0.5:
        return _pick(rng, NAMES)
    return f"{_pick(rng, ('my', 'your', 'our', 'the'))} {_pick(rng, RELATIVES)}"


def make_sentence(rng: np.random.Generator) -> str:
    """One grammatical English sentence from the word lists, drawn with ``rng``."""
    (base, past), (_, past2) = _pick(rng, VERBS), _pick(rng, VERBS)
    subject, subject2 = _person(rng), _person(rng)
    words = {
        "subject": subject, "Subject": subject[0].upper() + subject[1:], "subject2": subject2,
        "Name": _pick(rng, NAMES), "Group": _pick(rng, GROUPS).capitalize(),
        "base": base, "past": past, "past2": past2,
        "object": _thing(rng), "objects": _things(rng), "plural": _pick(rng, NOUNS)[1],
        "adjective": _pick(rng, ADJECTIVES), "number": _pick(rng, NUMBERS),
        "place": _pick(rng, PLACES), "time": _pick(rng, TIMES), "time2": _pick(rng, TIMES + ("",)),
        "habit": _pick(rng, HABITS), "future": _pick(rng, FUTURES),
    }
    sentence = _pick(rng, TEMPLATES).format(**words)
    return " ".join(sentence.split()).replace(" ?", "?")  # an empty slot leaves a double or trailing space


def make_sentences(count: int, seed: int) -> list[str]:
    """``count`` distinct sentences, the same for the same ``seed``."""
    rng = np.random.default_rng(seed)
    seen: dict[str, None] = {}
    for _ in range(100 * count + 100):
        if len(seen) == count:
            break
        seen.setdefault(make_sentence(rng), None)
    if len(seen) < count:
        raise ValueError(f"could only make {len(seen)} distinct sentences, {count} asked for")
    return list(seen)


# ----------------------------------------------------------------------------- synthesis


def synthesize(espeak: debian.Tool, text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """espeak-ng speaking ``text``: a float32 waveform and its sample rate (22.05 kHz)."""
    out = debian.run(espeak, ["--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), text]).stdout
    wave, rate = sf.read(io.BytesIO(out), dtype="float32")
    return wave, int(rate)


def to_rate(waves: Sequence[np.ndarray], rate: int) -> list[np.ndarray]:
    """Waveforms at ``rate`` resampled to 8 kHz in one batch, each ``ceil(len * 8000 / rate)`` long.

    One call builds the filter once for the lot; zero padding to a common length leaves
    each clip's own samples as a call of its own would give them.
    """
    batch = torch.zeros(len(waves), max(w.size for w in waves))
    for row, wave in zip(batch, waves):
        row[: wave.size] = torch.from_numpy(wave)
    out = resample(batch, rate, RATE).numpy()
    return [row[: -(-w.size * RATE // rate)] for row, w in zip(out, waves)]


def check_voices(espeak: debian.Tool, voices: Sequence[str]) -> None:
    """Raise a SourceError naming the first voice espeak-ng does not know."""
    if not voices or len(set(voices)) != len(voices) or not all(voices):
        raise SourceError(f"voices must be distinct, non-empty espeak-ng voice names; got {list(voices)}")
    for voice in voices:
        try:
            debian.run(espeak, ["-q", "-v", voice, "a"])
        except debian.DebianError:
            raise SourceError(f"espeak-ng does not know the voice {voice!r} (`espeak-ng --voices=en` lists voices, "
                              "and a variant is added as en+f3)", exit_code=2) from None


def speech_samples(
    espeak: debian.Tool, sentences: Sequence[str], voices: Sequence[str], offset: int, rng: np.random.Generator,
    batch: int = 32,
) -> Iterator[dict[str, bytes]]:
    """Members of each sentence spoken by voice ``(offset + i) % len(voices)``, rate and pitch from ``rng``."""
    for start in range(0, len(sentences), batch):
        metas, waves, rates = [], [], set()
        for i, text in enumerate(sentences[start : start + batch], start):
            label = (offset + i) % len(voices)
            speed, pitch = int(rng.integers(SPEED_WPM[0], SPEED_WPM[1] + 1)), int(rng.integers(PITCH[0], PITCH[1] + 1))
            wave, rate = synthesize(espeak, text, voices[label], speed, pitch)
            waves.append(wave)
            rates.add(rate)
            meta = {"voice": voices[label], "speed_wpm": speed, "pitch": pitch, "synthesizer": SYNTHESIZER}
            metas.append((text, label, meta))
        if len(rates) != 1:
            raise SourceError(f"espeak-ng wrote at several sample rates ({sorted(rates)}); expected one", exit_code=1)
        for (text, label, meta), wave in zip(metas, to_rate(waves, rates.pop())):
            yield {"wav": encode_wav(wave, RATE), "txt": text.encode("utf-8"), "cls": str(label).encode("ascii"),
                   "json": json.dumps(meta, sort_keys=True).encode("utf-8")}


def write_speech(
    out_dir: Path | str, train_sentences: int = 400, val_sentences: int = 50, voices: Sequence[str] = VOICES,
    seed: int = 0, shard_size: int | None = None, overwrite: bool = False, progress: bool = False,
) -> dict[str, int] | None:
    """Synthesized speech as train/val shards (see the module's docstring), through ``write_set``.

    ``train_sentences`` + ``val_sentences`` distinct sentences are made with ``seed`` and
    val's are a seeded random subset of them. espeak-ng is fetched into the Debian cache
    when absent.
    """
    voices = list(voices)
    if train_sentences < 1 or val_sentences < len(voices):
        raise SourceError(f"need train_sentences >= 1 and val_sentences >= the {len(voices)} voices (so that val "
                          f"holds every voice), got {train_sentences} and {val_sentences}")
    params = {"source": "espeak-ng", "synthesizer": SYNTHESIZER, "train_sentences": train_sentences,
              "val_sentences": val_sentences, "voices": voices, "seed": seed, "shard_size": shard_size,
              "sample_rate": RATE}

    def fill(stage: Path, describer: Describer) -> dict[str, Any]:
        try:
            espeak = debian.tool("espeak-ng")
            check_voices(espeak, voices)
            pool = make_sentences(train_sentences + val_sentences, seed)
            rng = np.random.default_rng([seed, 1])  # a stream apart from the sentences' own
            held = set(rng.permutation(len(pool))[:val_sentences].tolist())
            for split, keep in (("train", False), ("val", True)):
                sentences = [s for i, s in enumerate(pool) if (i in held) == keep]
                samples = speech_samples(espeak, sentences, voices, int(rng.integers(len(voices))), rng)
                write_split(stage, split, samples, len(sentences), shard_size, describer, progress)
        except debian.DebianError as err:
            raise SourceError(str(err), err.exit_code) from None
        pinned = {p: debian.PACKAGES[p] for p in debian.GROUPS["espeak-ng"]}
        return {debian.deb_name(p, version): {"sha256": sha256} for p, (version, sha256) in pinned.items()}

    return write_set(out_dir, params, fill, "espeak-speech", voices, overwrite)
