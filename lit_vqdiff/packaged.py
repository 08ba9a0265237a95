"""Files the platform reads but does not write: pretrained weights inside installed packages
(found without importing those packages, whose imports may need what is not installed),
checksums of files, and the cache folder for what is derived from them."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

CACHE_ENV = "LIT_VQDIFF_CACHE"


def cache_root() -> Path:
    """Where lit_vqdiff caches fetched and derived files: ``$LIT_VQDIFF_CACHE`` or ~/.cache/lit_vqdiff."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lit_vqdiff").expanduser()


def package_folder(package: str) -> Path | None:
    """The folder of an installed package, or None when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(package: str, relative: str, install: str) -> Path:
    """A file inside an installed package, or an error saying how to install it (``install``: its pip spec)."""
    folder = package_folder(package)
    path = folder / relative if folder is not None else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no {package}/{relative}: install it with `pip install --no-deps '{install}'`")
    return path


def sha256_of(path: Path | str) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
