"""Headless Chromium, fetched the platform's way, to take a screenshot of a page.

Debian 12's ``chromium`` and the libraries it needs beyond a base image are the
``chromium`` group of ``lit_vqdiff.debian``: fetched (``apt-get download``, pinned
sha256) and unpacked (``dpkg-deb -x``) into the cache without root, once, with

    python -m lit_vqdiff.debian fetch chromium

``screenshot`` never downloads by itself unless asked (``fetch=True``): a missing
browser is a ``DebianError`` that names that command.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

from . import debian

GROUP = "chromium"
BINARY = Path("usr") / "lib" / "chromium" / "chromium"
TIMEOUT_S = 120.0

# Headless, offline and quiet: no sandbox (root, containers), no GPU, no network chatter.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio")


def is_cached(cache: Path | None = None) -> bool:
    """Whether every package of the chromium group is in the cache (unpacked, or its .deb there)."""
    cache = cache or debian.cache_dir()
    for package in debian.GROUPS[GROUP]:
        version, _ = debian.PACKAGES[package]
        if not debian.is_unpacked(package, cache) and not (cache / debian.deb_name(package, version)).is_file():
            return False
    return True


def chromium(cache: Path | None = None, fetch: bool = False) -> debian.Tool:
    """The unpacked Chromium binary and its environment (the cache's libraries first on
    LD_LIBRARY_PATH, Chromium's own folder too). Unpacks .deb files already in the cache;
    downloads missing ones only with ``fetch``, else raises ``DebianError`` naming the fetch command."""
    cache = cache or debian.cache_dir()
    debian.ensure(GROUP, cache, fetch)
    root = cache / "root"
    path = root / BINARY
    if not path.is_file():
        raise debian.DebianError(f"{path}: missing although {GROUP} is unpacked; delete {root} and run "
                                 f"`{debian.fetch_command([GROUP])}`")
    env = debian.environment(root)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([env["LD_LIBRARY_PATH"], str(path.parent)])
    return debian.Tool(path, env)


def _telling_lines(stderr: str, n: int = 3) -> str:
    # Chromium logs D-Bus connection errors on every start without a session bus: not the reason.
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and "dbus" not in line.lower()]
    return " | ".join(lines[-n:]) or "no error output"


def screenshot(page: Path | str, png: Path | str, width: int = 1280, height: int = 2400, *,
               cache: Path | None = None, fetch: bool = False, timeout: float = TIMEOUT_S) -> Path:
    """A ``width`` x ``height`` PNG of the top of ``page`` (an HTML file) as headless Chromium renders it."""
    page, png = Path(page).resolve(), Path(png).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"no page at {page}")
    if width < 1 or height < 1:
        raise ValueError(f"window size must be positive, got {width}x{height}")
    browser = chromium(cache, fetch)
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="lit-vqdiff-chromium-") as profile:
        # A throwaway profile, config and cache: nothing of the user's is read or written.
        env = {**browser.env, "HOME": profile, "XDG_CONFIG_HOME": profile, "XDG_CACHE_HOME": profile}
        argv = [str(browser.path), *FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                f"--window-size={width},{height}", page.as_uri()]
        # Its own process group, so that a hung browser is ended with its helper processes.
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise debian.DebianError(f"chromium took over {timeout:g} s to screenshot {page}") from None
    if proc.returncode != 0:
        raise debian.DebianError(f"chromium failed (exit {proc.returncode}) on {page}: {_telling_lines(stderr)}")
    if not png.is_file() or png.stat().st_size == 0:
        raise debian.DebianError(f"chromium wrote no screenshot of {page}: {_telling_lines(stderr)}")
    return png
