"""The photos shard set: pinned photographs from Debian wallpaper packages, cropped, split by file.

The pins, the split and the crop boxes are checked everywhere. Writing needs the
packages: one test writes from small pictures of its own (the package fetch stubbed
out), the others from the real photographs in the Debian package cache, never fetching
(no network in tests); without them they skip, naming the command that pre-fetches them.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_vqdiff import debian
from lit_vqdiff.data import photos
from lit_vqdiff.data.description import read_description
from lit_vqdiff.data.shards import read_sizes, read_source
from lit_vqdiff.data.sources import SourceError
from lit_vqdiff.packaged import sha256_of


def read_split(directory: Path, split: str) -> list[dict[str, bytes]]:
    """The samples of one split, in shard order, as member dicts."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(directory.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.rsplit(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def meta(sample: dict[str, bytes]) -> dict:
    return json.loads(sample["json"])


def pixels(sample: dict[str, bytes]) -> np.ndarray:
    with Image.open(io.BytesIO(sample["png"])) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


# ----------------------------------------------------------------------------- pins, split, boxes


def test_pins_are_distinct_and_come_from_the_photos_group():
    assert len(photos.PHOTOS) == 49
    for field in ("path", "sha256", "name", "description"):
        values = [getattr(p, field) for p in photos.PHOTOS]
        assert len(set(values)) == len(values), f"repeated {field}"
    assert all(re.fullmatch(r"[0-9a-f]{64}", p.sha256) for p in photos.PHOTOS)
    group = debian.GROUPS[photos.GROUP]
    assert {p.package for p in photos.PHOTOS} == set(group)  # every package pinned gives photos
    assert all(package in debian.PACKAGES for package in group)
    assert photos.PHOTOS[27].name == "BytheWater"  # KDE wallpapers are named by their folder
    assert photos.caption(photos.PHOTOS[0], 1.0) == "a photograph of a drop of water splashing into water"
    assert photos.caption(photos.PHOTOS[0], 0.5).startswith("a detail from a photograph of ")


def test_held_out_files_are_a_seeded_share_of_the_photos():
    paths = {p.path for p in photos.PHOTOS}
    val = photos.held_out(0.2, 0)
    assert val == list(photos.VAL_FILES) == sorted(val)
    assert len(val) == 10 and set(val) <= paths
    assert photos.held_out(0.2, 0) == val  # the same for the same seed
    assert photos.held_out(0.2, 1) != val
    assert photos.held_out(0.0, 0) == []
    assert len(photos.held_out(0.5, 3)) == round(0.5 * 49)
    with pytest.raises(SourceError, match=r"val_fraction must be in \[0, 1\)"):
        photos.held_out(1.0)


def test_crop_boxes_are_squares_inside_the_photo_at_the_pinned_scales():
    boxes = photos.crop_boxes((2560, 1600), 300, 128, np.random.default_rng(0))
    assert boxes == photos.crop_boxes((2560, 1600), 300, 128, np.random.default_rng(0))
    sides = {s: round(s * 1600) for s in photos.SCALES}
    for (left, top, right, bottom), scale in boxes:
        assert 0 <= left < right <= 2560 and 0 <= top < bottom <= 1600
        assert right - left == bottom - top == sides[scale]
    counts = Counter(scale for _, scale in boxes)
    assert set(counts) == set(photos.SCALES) and counts[0.25] > counts[1.0]  # small crops drawn more often
    # Never upsampled: a box is at least the crop's size (and at most the short side).
    for (left, top, right, bottom), _ in photos.crop_boxes((300, 200), 50, 128, np.random.default_rng(1)):
        assert 128 <= right - left <= 200 and bottom <= 200 and right <= 300


def test_bad_settings_are_refused_before_anything_is_fetched(tmp_path):
    for kwargs, message in (({"crop": 4}, "crop must be in"), ({"crops_per_photo": 0}, "crops_per_photo"),
                            ({"val_fraction": 1.5}, "val_fraction")):
        with pytest.raises(SourceError, match=message):
            photos.write_photos(tmp_path / "out", cache=tmp_path / "cache", fetch=False, **kwargs)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_without_the_packages_the_error_names_the_fetch_command(tmp_path):
    with pytest.raises(SourceError, match=re.escape(debian.fetch_command([photos.GROUP]))) as err:
        photos.write_photos(tmp_path / "out", cache=tmp_path / "cache", fetch=False)
    assert err.value.exit_code == 2
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- writing, from pictures of our own


def test_writer_on_pictures_of_its_own(tmp_path, monkeypatch):
    """The whole writer with the package fetch stubbed: a small fake root of pinned pictures."""
    root = tmp_path / "cache" / "root"
    rng = np.random.default_rng(0)
    fakes = []
    for i, (w, h) in enumerate([(120, 80), (90, 100), (64, 64), (100, 70), (80, 96)]):
        path = root / f"usr/share/fake/photo{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "L" if i == 1 else "RGB"  # a grey photo comes out as grey RGB
        picture = rng.integers(0, 256, size=(h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
        Image.fromarray(picture, mode).save(path)
        fakes.append(photos.Photo("mate-backgrounds", str(path.relative_to(root)), sha256_of(path), f"thing {i}"))
    monkeypatch.setattr(photos, "PHOTOS", tuple(fakes))
    monkeypatch.setattr(photos.debian, "ensure", lambda *args, **kwargs: [])

    out = tmp_path / "set"
    sizes = photos.write_photos(out, crop=16, crops_per_photo=3, val_fraction=0.4, seed=5, cache=tmp_path / "cache")
    assert sum(n for name, n in sizes.items() if name.startswith("val")) == 2 * 3
    assert sum(sizes.values()) == 5 * 3 and read_sizes(out) == sizes
    val = read_split(out, "val")
    assert {meta(s)["file"] for s in val} == set(photos.held_out(0.4, 5))
    assert not {meta(s)["file"] for s in val} & {meta(s)["file"] for s in read_split(out, "train")}
    for sample in val + read_split(out, "train"):
        info = meta(sample)
        source = photos.open_photo(root / info["file"])
        expected = np.asarray(source.resize((16, 16), Image.Resampling.LANCZOS, box=tuple(info["box"])))
        np.testing.assert_array_equal(pixels(sample), expected)
        assert sample["txt"].decode().endswith(f"thing {info['file'][-5]}")
    # The set's record names what it was cropped from; the same settings again are a no-op.
    assert read_source(out)["files"][fakes[0].path] == {"sha256": fakes[0].sha256}
    assert photos.write_photos(out, crop=16, crops_per_photo=3, val_fraction=0.4, seed=5, cache=tmp_path / "cache") is None

    # A picture whose bytes differ from its pin is an error, and the set already there stays.
    Image.fromarray(np.zeros((80, 120, 3), np.uint8)).save(root / fakes[0].path)
    with pytest.raises(SourceError, match="is pinned to") as err:
        photos.write_photos(out, crop=16, crops_per_photo=2, cache=tmp_path / "cache", overwrite=True)
    assert err.value.exit_code == 1
    assert read_sizes(out) == sizes


# ----------------------------------------------------------------------------- writing, from the real photographs


@pytest.fixture(scope="module")
def photo_root() -> Path:
    try:
        return photos.photo_root(fetch=False)
    except SourceError as err:
        pytest.skip(f"needs the photos packages in the Debian package cache: {err}")  # it names the fetch command


@pytest.fixture(scope="module")
def small_set(photo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("photos") / "photos"
    photos.write_photos(out, crop=32, crops_per_photo=2)
    return out


def test_real_photos_split_by_file_with_sizes_and_description(small_set):
    sizes = read_sizes(small_set)
    train, val = read_split(small_set, "train"), read_split(small_set, "val")
    per_split = Counter()
    for shard, count in sizes.items():
        per_split[shard.split("-")[0]] += count
    assert (len(train), len(val)) == (per_split["train"], per_split["val"]) == (39 * 2, 10 * 2)
    train_files, val_files = Counter(meta(s)["file"] for s in train), Counter(meta(s)["file"] for s in val)
    assert set(val_files) == set(photos.VAL_FILES) and not set(train_files) & set(val_files)
    assert set(train_files) | set(val_files) == {p.path for p in photos.PHOTOS}
    assert set((train_files + val_files).values()) == {2}  # every photo gives crops_per_photo crops

    description = read_description(small_set)
    assert description["name"] == "photos" and description["samples"] == 98
    assert description["splits"] == {"train": 78, "val": 20}
    assert description["members"] == {"json": 98, "png": 98, "txt": 98}
    assert description["image"]["short_side"]["min"] == description["image"]["width"]["max"] == 32
    assert description["image"]["grey"] == 0  # the black-and-white photo is stored as RGB too
    record = read_source(small_set)
    assert record["params"]["crop"] == 32 and record["params"]["packages"].keys() == set(debian.GROUPS[photos.GROUP])

    by_path = {p.path: p for p in photos.PHOTOS}
    for sample in train + val:
        info = meta(sample)
        assert pixels(sample).shape == (32, 32, 3)
        assert sample["txt"].decode() == photos.caption(by_path[info["file"]], info["scale"])
        left, top, right, bottom = info["box"]
        assert right - left == bottom - top >= 32 and right <= info["photo_size"][0] and bottom <= info["photo_size"][1]


def test_real_photo_crops_are_reproducible(small_set, photo_root):
    # One photo's crops depend on the seed and its place in the list alone: made again, they are the same bytes.
    index = next(i for i, p in enumerate(photos.PHOTOS) if p.name == "GreenMeadow")
    again = list(photos.photo_crops(photos.PHOTOS[index], photo_root, index, 32, 2, 0))
    written = [s for s in read_split(small_set, "train") + read_split(small_set, "val")
               if meta(s)["file"] == photos.PHOTOS[index].path]
    assert sorted(s["png"] for s in written) == sorted(s["png"] for s in again)
