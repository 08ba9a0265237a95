"""Shard sources: http(s):// URLs (a local http.server), brace patterns, pipe: commands,
folders and data.root; sizes.json found beside the shards or given."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from lit_vqdiff.data.datamodule import ShardDataModule, resolve_shards

SIZES = [5, 3, 6, 4]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """No access log on stderr."""


@pytest.fixture
def serve() -> Iterator:
    """Serve a folder over HTTP on 127.0.0.1 (random port); yields a function folder -> base URL."""
    servers: list[ThreadingHTTPServer] = []

    def start(folder: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def epoch_keys(dm: ShardDataModule, split: str = "train") -> list[str]:
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return [k for batch in loader for k, v in zip(batch["key"], batch["valid"]) if v]


@pytest.mark.parametrize("workers", [0, 2])
def test_http_shards_stream_like_local_ones(tiny_shards, tiny_config, serve, workers):
    data = tiny_shards(SIZES)
    url = serve(data.directory) + "/train-{000000..000003}.tar"
    remote = ShardDataModule(tiny_config("unused", train=url, num_workers=workers), ("image", "class"))
    assert [s.size for s in remote.shards("train")] == SIZES  # sizes.json fetched beside the shards
    local = ShardDataModule(tiny_config(data.directory, num_workers=workers), ("image", "class"))
    keys = epoch_keys(remote)
    assert keys == epoch_keys(local) and sorted(keys) == sorted(data.all_keys)


def test_http_sizes_can_be_given_elsewhere(tiny_shards, tiny_config, serve, tmp_path):
    data = tiny_shards(SIZES)
    sizes = tmp_path / "elsewhere.json"
    (data.directory / "sizes.json").rename(sizes)
    url = serve(data.directory) + "/train-{000000..000003}.tar"
    with pytest.raises(ValueError, match="exact mode needs the sample count"):
        ShardDataModule(tiny_config("unused", train=url), ("class",)).train_dataloader()
    dm = ShardDataModule(tiny_config("unused", train=url, sizes=str(sizes)), ("class",))
    assert sorted(epoch_keys(dm)) == sorted(data.all_keys)


def test_missing_http_shard_is_counted_unreadable(tiny_shards, tiny_config, serve):
    data = tiny_shards(SIZES)
    (data.directory / data.names[1]).unlink()  # the server answers 404
    url = serve(data.directory) + "/train-{000000..000003}.tar"
    dm = ShardDataModule(tiny_config("unused", train=url, max_skip_fraction=0.5), ("class",))
    keys = epoch_keys(dm)
    assert sorted(keys) == sorted(set(data.all_keys) - set(data.keys[1]))
    assert dm.skipped()["unreadable"] == SIZES[1]


def test_brace_pattern_selects_shards(tiny_shards, tiny_config):
    data = tiny_shards(SIZES)
    pattern = str(data.directory / "train-{000001..000002}.tar")
    dm = ShardDataModule(tiny_config("unused", train=pattern), ("class",))
    assert [s.name for s in dm.shards("train")] == data.names[1:3]
    assert sorted(epoch_keys(dm)) == sorted(data.keys[1] + data.keys[2])


def test_pipe_cat_reads_shards_with_sizes_beside_them(tiny_shards, tiny_config):
    data = tiny_shards(SIZES)
    pattern = f"pipe:cat {data.directory}/train-{{000000..000003}}.tar"
    dm = ShardDataModule(tiny_config("unused", train=pattern, num_workers=2), ("text",))
    assert [s.size for s in dm.shards("train")] == SIZES
    assert sorted(epoch_keys(dm)) == sorted(data.all_keys)


def test_folder_and_root_sources(tiny_shards, tiny_config):
    train = tiny_shards(SIZES)
    val = tiny_shards([4, 3], split="val", seed=1, directory=train.directory)
    by_folder = ShardDataModule(tiny_config("unused", train=str(train.directory)), ("class",))
    assert len(by_folder.shards("train")) == len(SIZES) + 2  # a folder means every *.tar in it
    by_root = ShardDataModule(tiny_config(train.directory), ("class",))
    assert [s.name for s in by_root.shards("train")] == train.names
    assert epoch_keys(by_root, "val") == val.all_keys  # validation keeps shard order


def test_missing_sources_are_named(tmp_path, tiny_config):
    with pytest.raises(FileNotFoundError, match="holds no train-\\*.tar"):
        resolve_shards("", str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="2 of 2 shards do not exist"):
        resolve_shards(str(tmp_path / "x-{0..1}.tar"), "", "train")
