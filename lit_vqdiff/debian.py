"""Debian packages without root: ``apt-get download`` into a cache, pinned sha256, ``dpkg-deb -x``.

The classic speech codecs the platform compares against (Codec2, Opus) and its speech
synthesizer (espeak-ng) are Debian 12 (bookworm, amd64) binaries. They are fetched on
first use, or ahead of time with

    python -m lit_vqdiff.debian fetch codec2 opus-tools espeak-ng

into ``$LIT_VQDIFF_CACHE/debian`` (default ``~/.cache/lit_vqdiff/debian``): the .deb files
beside ``root/``, where they are unpacked. Nothing is installed system-wide; ``tool`` gives
a binary's absolute path and the environment it runs in (its libraries and data in the
cache). Every .deb is checked against the sha256 pinned in ``PACKAGES`` before it is
unpacked. The unpacked binaries still load a few libraries every Debian 12 system with
audio support has (libc, libasound2, libdbus-1-3, libx11-xcb1, libsystemd0).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

from . import packaged
from .packaged import cache_root, sha256_of

CACHE_ENV = packaged.CACHE_ENV
ARCH = "amd64"  # the pins below are for this architecture
MULTIARCH = "x86_64-linux-gnu"
TIMEOUT_S = 900

# package -> (version, sha256 of its amd64 .deb), as in Debian 12 (bookworm).
PACKAGES: dict[str, tuple[str, str]] = {
    "codec2": ("1.0.5-1", "4b6136774cc5ec1e3de744fa52c66f3af13619336b25a13ae58b455d55803086"),
    "libcodec2-1.0": ("1.0.5-1", "5f91673bc70e10496389d061a7f01f27f7f0d9090de56cce7ba21b9c461163d9"),
    "opus-tools": ("0.2-1+b1", "998412aac2566abce6bc734f709478797dc67a476e66e3071e455b492566c6b9"),
    "libopus0": ("1.3.1-3", "c172e212f9039e741916aa8e12f3670d1e049dc0c16685325641288c2d83faa7"),
    "libopusenc0": ("0.2.1-2", "53e45aa47c090b0ad80336b4a338643372743bf3de21ba9cf89da2e9fe12106f"),
    "libopusfile0": ("0.12-4", "bede4581fe9c2b97fa6419c3d7d32fb3b40cc63d03282b5b05f4bcea5f7390db"),
    "libogg0": ("1.3.5-3", "f67acb0477aed0354f411172e37af338f3ac6bd4f3766134a2cf5539884b5a28"),
    "libflac12": ("1.4.2+ds-2", "4d8431c274eef13ec9ee2c0bf988c34b4342367dec053b7f69a432525be5b1fe"),
    "espeak-ng": ("1.51+dfsg-10+deb12u2", "a11396a690f85f55e6e6b2965505237ddf3dc95c51936aa61de936f1ccf8f4d0"),
    "libespeak-ng1": ("1.51+dfsg-10+deb12u2", "2b127a95b50d92cbd7a615968d2ac1566e1cbc87e27bcda0c2894afb2407c6d2"),
    "espeak-ng-data": ("1.51+dfsg-10+deb12u2", "573f5661c6a5adcf949018baad158c4c773bf5579390ee5235a890f1cd694106"),
    "libpcaudio0": ("1.2-2", "5309759e4d129c7d9a601240cc6e62820ecfa86a1a98e207992ffa6a572dbcd2"),
    "libsonic0": ("0.2.0-12", "9d60de6918ace0b10e3e4e95421befd08aaf03b5b2a3d71ceb799e0cf259916f"),
    "libpulse0": ("16.1+dfsg1-2+b1", "7b2c5403cb726312219aad678becc6d6adcee1d8694fdffce0b6ec15ae010831"),
    "libasyncns0": ("0.8-6+b3", "cadaff99f4178b1f580331045621b363abaaefc994e78eecba1857774a3cead2"),
    "libsndfile1": ("1.2.0-1+deb12u1", "02dc3f08fe8476e82e005f412e3b7289ff641180f33a9be8073f4bde61c85e8e"),
    "libvorbis0a": ("1.3.7-1", "01c14f9d1109650077a4c5c337c285476a6932d4d448f5a190c2b845724dbf21"),
    "libvorbisenc2": ("1.3.7-1", "75dd4d6f904c7db82f5112e60d8efea9e81dfedf94e970c5da7af2b3d81643c0"),
    "libmpg123-0": ("1.31.2-1+deb12u1", "a10ad0d59995b859797a5f20d2833672051d0b2c7dab4c71f2e79258b2e3f631"),
    "libmp3lame0": ("3.100-6", "b1292c749172e7623547ecf684da57d3ec6ca22109f08b11bbb9e6be6e6beb95"),
    # Desktop wallpapers: camera photographs for the photos shard set (Architecture: all).
    "mate-backgrounds": ("1.26.0-1", "7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04"),
    "lxqt-themes": ("1.2.0-1", "d518df36b515b09d36cb00b12645dd8ce170bb82bb0966297741905ce3edc8e1"),
    "lomiri-wallpapers-16.04": ("20.04.0-2", "a99ff6a3bfe451e4cc0682ecb3cc82e71740626d59e4845ae34a0a0e45421eab"),
    "lomiri-wallpapers-20.04": ("20.04.0-2", "d44e89b8473aafe64a5b678f014862dc31335aaaf18665c544d985d854f1a709"),
    "plasma-workspace-wallpapers": ("4:5.27.5-2", "32cd18b71c8c938a18b3b351f217c02ac590e323caa3cf322fbb875ce8892f8b"),
    # Headless Chromium for screenshots of reports (lit_vqdiff.browser), from bookworm-security.
    "chromium": ("156.0.8078.114-1~deb12u1", "0a8cda4db34125e8cd0cb710c3379538bb94f06eb5cc440d921860bcdc2273e7"),
    "chromium-common": ("156.0.8078.114-1~deb12u1", "fe9713b01e8336384848ca9ff4c073d9a36113c71ebf6e1f1e54e8d294b675ae"),
    "libdouble-conversion3": ("3.2.1-1", "802b880ed900e4a8d54bab77b7551a7f3408b04891c3e5650fdc2368cc1fbc0a"),
    "libharfbuzz-subset0": ("6.0.0+dfsg-3", "020de1eeba5fb56052a6ca71b259f8cbe3f6fce5038f4caca751c7e4867ca33f"),
    "libminizip1": ("1.1-8+deb12u1", "b2999b980cbb9e6dcaa2d5154c9d1f1b9d55f5a0ca8166699de7ab47afaf4a36"),
    "libopenh264-7": ("2.3.1+dfsg-3+deb12u2", "d453c4d81b7b3ff14663da75471250a4894543ae5ab5e902e225aca56aec56e8"),
    "libopenjp2-7": ("2.5.0-2+deb12u3", "a127e2f1741d66bdddb6393a718e3cbec327d53f88c89b859b1f8d73f64cf635"),
    "libxnvctrl0": ("525.85.05-3~deb12u1", "6fc26e4b6069f4648692e0c225f580161e3b0c04e4bac1c616c8a418a9a9817d"),
    "libcolord2": ("1.4.6-2.2", "6e5a48b72ae316301103d642c8881cc06205cb4b5f54c25c467b2847048d268f"),
    "libepoxy0": ("1.5.10-1", "050cbedc9c2a5cce976151c720a3817f2103a01e6ac255bdd6f2c6a7509b04c3"),
    "libwayland-cursor0": ("1.21.0-1", "0b684467ec795024fcaae99ea4384959cc4052b2da5adec38c9b76dfed9bcf41"),
    "libwayland-egl1": ("1.21.0-1", "cb4225f0e15e00a3570d4cbc288c87ff477d73e741c3f1c5a6d47cf350d45378"),
    "libgtk-3-common": ("3.24.38-2~deb12u3", "f2642d127d85440acbfc2ed404d3932d8b2fbe8a576ead7f93f35ac1fa999c92"),
    "libgtk-3-0": ("3.24.38-2~deb12u3", "0ff7375c98b5a8d6aafc6096b21d9f7bae4ecb581d31fce5d37be18f55b489a2"),
    "xdg-utils": ("1.1.3-4.1", "0e31caa8c34643f7eedb4d373ee61943c09061275b5fa727524fc568d0a9e332"),
}

# What each tool package needs unpacked beside it to run (its library closure outside
# a base Debian 12 system); the sets overlap, and a shared .deb is unpacked once.
GROUPS: dict[str, tuple[str, ...]] = {
    "codec2": ("codec2", "libcodec2-1.0"),
    "opus-tools": ("opus-tools", "libopus0", "libopusenc0", "libopusfile0", "libogg0", "libflac12"),
    # libsndfile1 (through libpulse0) loads FLAC, Ogg, Opus and Vorbis libraries too.
    "espeak-ng": ("espeak-ng", "libespeak-ng1", "espeak-ng-data", "libpcaudio0", "libsonic0", "libpulse0", "libasyncns0",
                  "libsndfile1", "libvorbis0a", "libvorbisenc2", "libmpg123-0", "libmp3lame0", "libflac12", "libogg0",
                  "libopus0"),
    # Data, not tools: the photographs that lit_vqdiff.data.photos crops.
    "photos": ("mate-backgrounds", "lxqt-themes", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04",
               "plasma-workspace-wallpapers"),
    # Headless Chromium (lit_vqdiff.browser): the libraries it needs beyond a base Debian 12 image
    # (NSS, ATK, X11 and Mesa are assumed there, as libc is).
    "chromium": ("libdouble-conversion3", "libogg0", "libflac12", "libharfbuzz-subset0", "libminizip1", "libopenh264-7",
                 "libopenjp2-7", "libopus0", "libasyncns0", "libmp3lame0", "libmpg123-0", "libvorbis0a", "libvorbisenc2",
                 "libsndfile1", "libpulse0", "libxnvctrl0", "libcolord2", "libepoxy0", "libwayland-cursor0",
                 "libwayland-egl1", "libgtk-3-common", "libgtk-3-0", "xdg-utils", "chromium-common", "chromium"),
}

# Packages built once for every architecture ("Architecture: all"): apt-get download names them <p>_<v>_all.deb.
ARCH_ALL: frozenset[str] = frozenset(GROUPS["photos"]) | {"libgtk-3-common", "xdg-utils"}

BINARIES: dict[str, str] = {"c2enc": "codec2", "c2dec": "codec2", "opusenc": "opus-tools", "opusdec": "opus-tools",
                            "espeak-ng": "espeak-ng"}


class DebianError(RuntimeError):
    """A package or tool that cannot be had; ``exit_code`` is 2 for a missing prerequisite, 1 for a failed fetch."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Tool(NamedTuple):
    """An unpacked binary and the environment to run it in (``os.environ`` plus the cache's paths)."""

    path: Path
    env: dict[str, str]


# ----------------------------------------------------------------------------- files and folders


def cache_dir() -> Path:
    """``$LIT_VQDIFF_CACHE/debian``, ``~/.cache/lit_vqdiff/debian`` by default."""
    return cache_root() / "debian"


def deb_name(package: str, version: str, arch: str | None = None) -> str:
    """The file name ``apt-get download`` gives a package (an epoch's ``:`` written ``%3a``); ``arch``
    defaults to ``all`` for the packages in ``ARCH_ALL``, ``ARCH`` for the others."""
    arch = arch or ("all" if package in ARCH_ALL else ARCH)
    return f"{package}_{version.replace(':', '%3a')}_{arch}.deb"


def fetch_command(names: Sequence[str]) -> str:
    """The command that pre-fetches ``names`` into the cache."""
    return f"python -m lit_vqdiff.debian fetch {' '.join(names)}"


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` so that concurrent runs do not fetch or unpack into it at once."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- download, verify, unpack


def _program(name: str, hint: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise DebianError(f"{name} not found on PATH; {hint}", exit_code=2)
    return found


def _telling_line(output: str) -> str:
    # apt-get prints its reason on an "E:" line, often after "W:" warnings that are not it.
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or [line for line in lines if not line.startswith("W:")] or ["no error output"])[0]


def _run(argv: Sequence[str], cwd: Path, advice: str) -> None:
    shown = " ".join([Path(argv[0]).name, *map(str, argv[1:])])
    try:
        done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DebianError(f"{shown} timed out after {TIMEOUT_S} s; {advice}") from None
    if done.returncode != 0:
        why = _telling_line(done.stderr + done.stdout)
        raise DebianError(f"{shown} failed (exit {done.returncode}): {why}; {advice}")


def download(folder: Path | str, *specs: str) -> list[Path]:
    """``apt-get download`` of ``specs`` (``package`` or ``package=version``) into ``folder``, in one
    call; returns the .deb files written, in the order of ``specs``."""
    folder = Path(folder)
    shown = " ".join(specs)
    apt = _program("apt-get", f"on Debian or Ubuntu run apt-get download {shown}, or put the .deb files into {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    advice = f"run apt-get update, check that a Debian mirror is reachable, or put the .deb files into {folder}"
    written = []
    # A private folder: a download interrupted half-way never sits under the final name.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        try:
            _run([apt, "download", *specs], Path(tmp), advice)
        except DebianError:
            # A fresh machine's package lists may predate the pinned versions: refresh them
            # once where that is allowed (as root), then try again.
            if os.geteuid() != 0:
                raise
            _run([apt, "update", "-qq"], Path(tmp), advice)
            _run([apt, "download", *specs], Path(tmp), advice)
        for spec in specs:
            package = spec.split("=")[0]
            found = sorted(Path(tmp).glob(f"{package}_*.deb"))
            if not found:
                raise DebianError(f"apt-get download {spec} wrote no {package}_*.deb; {advice}")
            written.append(found[-1].replace(folder / found[-1].name))
    return written


def verify(deb: Path, package: str, sha256: str) -> None:
    """Raise unless ``deb`` has the pinned ``sha256``."""
    actual = sha256_of(deb)
    if actual != sha256:
        raise DebianError(f"{deb}: sha256 {actual}, but {package} is pinned to {sha256}; "
                          "delete the file to fetch it again")


def unpack(deb: Path | str, dest: Path | str) -> None:
    """``dpkg-deb -x deb dest``: the package's files under ``dest``, nothing run, nothing installed."""
    dpkg = _program("dpkg-deb", "install dpkg (Debian-based systems have it)")
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    _run([dpkg, "-x", Path(deb).resolve(), dest], dest, f"delete {deb} to fetch it again")


# ----------------------------------------------------------------------------- pinned packages in the cache


def _marker(root: Path, package: str) -> Path:
    version, _ = PACKAGES[package]
    return root / ".unpacked" / deb_name(package, version)


def is_unpacked(package: str, cache: Path | None = None) -> bool:
    """Whether the pinned version of ``package`` is unpacked in the cache."""
    root = (cache or cache_dir()) / "root"
    marker = _marker(root, package)
    return marker.is_file() and marker.read_text().strip() == PACKAGES[package][1]


def _check_platform(package: str) -> None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise DebianError(f"{package}: the pinned .deb files are Debian 12 {ARCH} binaries; "
                          f"this machine is {platform.system()} {platform.machine()}", exit_code=2)


def ensure_package(package: str, cache: Path | None = None, fetch: bool = True) -> bool:
    """Unpack the pinned ``package`` into ``<cache>/root`` (downloading its .deb when absent and
    ``fetch``); returns whether anything had to be done. Call it under ``locked(cache)``."""
    if package not in PACKAGES:
        raise DebianError(f"{package}: no pinned version; pinned packages: {', '.join(sorted(PACKAGES))}", exit_code=2)
    cache = cache or cache_dir()
    if is_unpacked(package, cache):
        return False
    _check_platform(package)
    version, sha256 = PACKAGES[package]
    deb = cache / deb_name(package, version)
    if not deb.is_file():
        if not fetch:
            raise _not_cached(package, package, cache)
        download(cache, f"{package}={version}")
        if not deb.is_file():
            raise DebianError(f"apt-get download {package}={version} did not write {deb.name} into {cache}")
    verify(deb, package, sha256)
    root = cache / "root"
    unpack(deb, root)
    marker = _marker(root, package)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(sha256 + "\n")  # written last: a half-unpacked package is unpacked again
    return True


def _not_cached(package: str, name: str, cache: Path) -> DebianError:
    version, _ = PACKAGES[package]
    return DebianError(f"{package} {version} is not in {cache}; run `{fetch_command([name])}`", exit_code=2)


def ensure(name: str, cache: Path | None = None, fetch: bool = True) -> list[str]:
    """Unpack a group (``codec2``, ``opus-tools``, ``espeak-ng``) or one pinned package into the cache
    (one ``apt-get download`` for what is absent, when ``fetch``); returns the packages unpacked now."""
    members = GROUPS.get(name, (name,))
    cache = cache or cache_dir()
    missing = [p for p in members if p not in PACKAGES or not is_unpacked(p, cache)]
    if not missing:
        return []
    if not fetch:  # checked before taking the lock, which would create the cache folder
        for package in missing:
            if package in PACKAGES and not (cache / deb_name(package, PACKAGES[package][0])).is_file():
                raise _not_cached(package, name, cache)
    with locked(cache):
        absent = [p for p in missing if p in PACKAGES and not (cache / deb_name(p, PACKAGES[p][0])).is_file()]
        if absent and fetch:
            _check_platform(absent[0])
            download(cache, *(f"{p}={PACKAGES[p][0]}" for p in absent))  # one apt-get call for the lot
        return [p for p in members if ensure_package(p, cache, fetch)]


def environment(root: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with the unpacked tree's binaries first on PATH, its
    libraries (and libpulse's private ones) on LD_LIBRARY_PATH, and espeak-ng's data."""
    env = dict(os.environ if base is None else base)
    lib = root / "usr" / "lib" / MULTIARCH

    def first(key: str, *paths: Path) -> str:
        return os.pathsep.join([*map(str, paths), *filter(None, [env.get(key, "")])])

    env["PATH"] = first("PATH", root / "usr" / "bin")
    env["LD_LIBRARY_PATH"] = first("LD_LIBRARY_PATH", lib, lib / "pulseaudio")
    env["ESPEAK_DATA_PATH"] = str(lib)  # the folder that holds espeak-ng-data/, not that folder itself
    return env


def tool(binary: str, cache: Path | None = None, fetch: bool = True) -> Tool:
    """Path and environment of ``binary`` (c2enc, c2dec, opusenc, opusdec, espeak-ng), its packages
    unpacked into the cache first (fetched when absent and ``fetch``)."""
    if binary not in BINARIES:
        raise DebianError(f"unknown tool {binary!r}; known: {', '.join(sorted(BINARIES))}", exit_code=2)
    cache = cache or cache_dir()
    ensure(BINARIES[binary], cache, fetch)
    root = cache / "root"
    path = root / "usr" / "bin" / binary
    if not path.is_file():
        raise DebianError(f"{path}: missing although {BINARIES[binary]} is unpacked; delete {root} and run "
                          f"`{fetch_command([BINARIES[binary]])}`")
    return Tool(path, environment(root))


def run(program: Tool, args: Sequence[str | Path], timeout: float = 120.0) -> subprocess.CompletedProcess[bytes]:
    """Run an unpacked tool; a failure is a DebianError with its telling stderr line."""
    argv = [str(program.path), *map(str, args)]
    shown = " ".join([program.path.name, *map(str, args)])
    try:
        done = subprocess.run(argv, env=program.env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DebianError(f"{shown} timed out after {timeout:g} s") from None
    if done.returncode != 0:
        text = done.stderr.decode("utf-8", "replace") + done.stdout.decode("utf-8", "replace")
        if "error while loading shared libraries" in text:
            # The closure in GROUPS assumes a base Debian 12 system for libc, ALSA, D-Bus and X11.
            why = _telling_line(text)
            raise DebianError(f"{program.path.name} cannot load a library: {why}; install that library system-wide")
        raise DebianError(f"{shown} failed (exit {done.returncode}): {_telling_line(text)}")
    return done


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``fetch NAME...``: download, verify and unpack pinned packages or groups into the cache."""
    parser = argparse.ArgumentParser(prog="python -m lit_vqdiff.debian", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="fetch, verify and unpack packages into the cache")
    fetch.add_argument("names", nargs="+", metavar="NAME", help=f"a group ({', '.join(GROUPS)}) or a pinned package")
    args = parser.parse_args(argv)
    cache = cache_dir()
    for name in args.names:
        try:
            done = ensure(name, cache)
        except DebianError as err:
            print(f"lit_vqdiff.debian: error: {err}", file=sys.stderr)
            return err.exit_code
        members = GROUPS.get(name, (name,))
        pinned = ", ".join(f"{p} {PACKAGES[p][0]}" for p in members)
        print(f"{name}: {pinned}; {len(done)} unpacked now, {len(members) - len(done)} already there ({cache / 'root'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
