"""Natural photographs as a shard set: square crops of camera photographs that Debian ships.

Five Debian 12 packages from main (so under free licences: GPL-2+, LGPL-3, CC-BY-4.0,
CC-BY-SA-3.0/4.0, CC0-1.0; each package's ``usr/share/doc/<package>/copyright`` names the
photographers) carry desktop wallpapers. ``PHOTOS`` pins the 49 of them that are camera
photographs (landscapes, plants, animals, objects, textures), by path and sha256; the
illustrations and renderings beside them are left out. The packages are fetched, verified
and unpacked through ``lit_vqdiff.debian`` (group ``photos``); a photo whose bytes differ
from its pin is an error, so the set is the same wherever it is written.

Photos are split into train and val by file (``held_out``: a seeded share of the files),
so val measures photographs a model never saw. Each photo gives ``crops_per_photo`` square
crops: a scale drawn from ``SCALES`` (the crop's side as a share of the photo's short side;
smaller crops more often, as a photo holds more distinct ones), a uniform random position,
then Pillow's Lanczos filter (antialiased) down to ``crop`` pixels. Every photo draws from
its own seeded stream, so its crops do not depend on the split or on the other photos. The
crops of a split are shuffled before they are written, so that every shard mixes photos.

Members: ``png`` (RGB, ``crop`` x ``crop``), ``txt`` ("a photograph of ..." for a crop of the
photo's whole height, "a detail from a photograph of ..." for a smaller one), ``json``
(package, file, photo size, crop box, scale).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageOps
from ..progress import progress as progress_of

from .. import debian
from ..media import encode_png
from .description import Describer
from .shards import write_set, write_split
from ..packaged import sha256_of
from .sources import SourceError

NAME = "photos"
GROUP = "photos"  # the lit_vqdiff.debian group that holds the packages
SCALES = (1.0, 0.5, 0.25)  # crop side / the photo's short side
SCALE_WEIGHTS = (0.2, 0.3, 0.5)  # how often each scale is drawn
MIN_CROP, MAX_CROP = 8, 1024  # the smallest photo's short side is 1024: no crop is ever upsampled


class Photo(NamedTuple):
    """One pinned photograph: where it is in its package, its sha256, what it shows."""

    package: str
    path: str  # inside the unpacked package
    sha256: str
    description: str

    @property
    def name(self) -> str:
        """The file's stem, or the wallpaper's folder for KDE's ``<Name>/contents/images/<size>.jpg``."""
        parts = self.path.split("/")
        return parts[-4] if parts[-3:-1] == ["contents", "images"] else Path(self.path).stem


PHOTOS: tuple[Photo, ...] = (
    # mate-backgrounds (GPL-2+)
    Photo("mate-backgrounds", "usr/share/backgrounds/mate/nature/Aqua.jpg",
          "5c30118205982da441bf7e6a1ada636a8a0be879408140b3148280c665ed6bce",
          "a drop of water splashing into water"),
    Photo("mate-backgrounds", "usr/share/backgrounds/mate/nature/Blinds.jpg",
          "f7aac0dcc2e06d0491643e84df3da1d9db7c4610f58806a880d56e074799f600",
          "the ribs of a green leaf, close up"),
    Photo("mate-backgrounds", "usr/share/backgrounds/mate/nature/Dune.jpg",
          "8a67c2cb0be8c46b70c237311a4fa4d2b4ac7d39568135384787801fa5cc9a91",
          "dune grass by the sea"),
    Photo("mate-backgrounds", "usr/share/backgrounds/mate/nature/FreshFlower.jpg",
          "972b0a0c4e5e3fa93f4f244fc84bc64b121a5eac3aaa5856f1308c1f38a02f8e",
          "an orange flower, close up"),
    Photo("mate-backgrounds", "usr/share/backgrounds/mate/nature/Garden.jpg",
          "d3095ee09d425ef23d27155412136cf14fc3c9af76ca58b452f55e23da324e78",
          "a red and orange marigold"),
    Photo("mate-backgrounds", "usr/share/backgrounds/mate/nature/GreenMeadow.jpg",
          "8fa0de0aa4089f7319c9fb7a6d006d4cab6023e8c8853731557cff53567b4832",
          "blades of green grass"),
    Photo("mate-backgrounds", "usr/share/backgrounds/mate/nature/LadyBird.jpg",
          "e35a9a4126ef969c90b29c038058c5a575a20eadd84106a37bf1fa9931e7b61d",
          "a ladybird on a stem among small blue flowers"),
    Photo("mate-backgrounds", "usr/share/backgrounds/mate/nature/RainDrops.jpg",
          "3e4ea9671c28c90a86cf67b3db9daf18c4741587c596333a7529ca589aaa0c16",
          "raindrops on green leaves"),
    Photo("mate-backgrounds", "usr/share/backgrounds/mate/nature/Storm.jpg",
          "77ca53077831d3237f73393a91fc879158abc046d852941c26e90de336356957",
          "a road under a grey storm sky"),
    Photo("mate-backgrounds", "usr/share/backgrounds/mate/nature/TwoWings.jpg",
          "665e5abf8a5399070a91a9a8e455fe071e5b61697ff78fdeda4e9843ef545aeb",
          "a dandelion seed before orange flowers"),
    Photo("mate-backgrounds", "usr/share/backgrounds/mate/nature/Wood.jpg",
          "19c78500ac00a622e19907ab9cc7d06d46fe08c4a6142759a84195696150ec07",
          "pale wooden boards"),
    Photo("mate-backgrounds", "usr/share/backgrounds/mate/nature/YellowFlower.jpg",
          "254da96256acb7add685679775a04d1e4a5bc8cd13e5a5a3d61351ce198a5306",
          "a yellow flower, close up"),
    # lomiri-wallpapers-16.04 (Ubuntu's 2018 wallpaper contest: CC-BY-4.0, CC-BY-SA-4.0, CC0-1.0 by file)
    Photo("lomiri-wallpapers-16.04", "usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg",
          "bd86b081f9975e2b83527f71e49b9271a8ab40885428395969d9f7d834d7f050",
          "the cables of a bridge over a wide river"),
    Photo("lomiri-wallpapers-16.04", "usr/share/backgrounds/Dragonfly_by_Bolly.jpg",
          "af5af17841009732def24b09bb1e669a1b09d2b4bdeee7812c371101c30d2bb3",
          "a dragonfly on a twig before a leafy tree"),
    Photo("lomiri-wallpapers-16.04", "usr/share/backgrounds/Picture_0B_by_freespace.jpg",
          "c8c0ab18e48d9e0419fe42881112137f3afafc27dfddc29ec3a6d54c56d225ad",
          "half a fig in a red bowl on concrete"),
    Photo("lomiri-wallpapers-16.04", "usr/share/backgrounds/Picture_1A_by_freespace.jpg",
          "89e86af38d04daaef975665dc2127e9fa76f0fd68f4eea105a2d0ae3390b010b",
          "paint brushes in a jar"),
    Photo("lomiri-wallpapers-16.04", "usr/share/backgrounds/Wine_by_Jakkub_Mede.jpg",
          "d2e96e6d4da40dd804b3d0ce295e94de04a2d7d9b6785d42cd9d92ba58bced74",
          "a drum on a floor cushion by a table with wine"),
    Photo("lomiri-wallpapers-16.04", "usr/share/backgrounds/aitzgorri_by_Aitzol_Berasategi.jpg",
          "66268e7b48f8854d36a28765fac6e23ec1aee251daa6da1f64715f201020ad36",
          "autumn trees on a meadow below mountains"),
    Photo("lomiri-wallpapers-16.04", "usr/share/backgrounds/analogpattern_by_Peter_Nerlich.jpg",
          "15372488a192b2be2eafc67bd3ed31cbfca19abe3929e925607fcbc9cb4d4202",
          "a grainy surface in green and violet light"),
    Photo("lomiri-wallpapers-16.04", "usr/share/backgrounds/free_by_Peter_Nerlich.jpg",
          "85a5453c2fed514c75973016f3d862aca62eb7ca087618822469274ac1092373",
          "a toy bird hanging under ceiling lamps"),
    Photo("lomiri-wallpapers-16.04", "usr/share/backgrounds/friends_by_Aitzol_Berasategi.jpg",
          "cc40e313c74e421edffe3403def413c16878ce14661cce7ec5915baeab35538d",
          "two dogs looking out of a wooden door"),
    Photo("lomiri-wallpapers-16.04", "usr/share/backgrounds/greentock_by_Peter_Nerlich.jpg",
          "e7b20e2db9dcd6e2b278ca55873c2110b35d89cd38b04d0b18728726888e6889",
          "a wall clock seen from below"),
    Photo("lomiri-wallpapers-16.04", "usr/share/backgrounds/life_by_Aitzol_Berasategi.jpg",
          "4c119350ead80201fe256850c3d316309ddfb4bdf10b235ce982dcde0c667c05",
          "a stream running over rocks in a forest"),
    Photo("lomiri-wallpapers-16.04", "usr/share/backgrounds/picosdeeuropa_by_Aitzol_Berasategi.jpg",
          "414d0072b2f6f2c555deafeaef6e45c4fed6fa9ad26eba6560ca8803959cf97a",
          "a path across a meadow below rocky peaks"),
    Photo("lomiri-wallpapers-16.04", "usr/share/backgrounds/seeding_by_Clements_Engelhardt.jpg",
          "a5634d1ab5e41a3568e92d4a894a500c92b891f9ff734e50bd224d6e185a605f",
          "dandelion clocks in a meadow at sunset"),
    Photo("lomiri-wallpapers-16.04", "usr/share/backgrounds/sunset_by_Aitzol_Berasategi.jpg",
          "474dab6a4b9f94dc76c29dfe30e9f5db4af0fd2e33fe5d695f8152b371efca18",
          "the sun setting over hills"),
    # lomiri-wallpapers-20.04 (CC-BY-SA-3.0)
    Photo("lomiri-wallpapers-20.04", "usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg",
          "6572410c09f4492c74ccadde133565a14c0161617d5917d4c820c66d65a44ba7",
          "a nuthatch on a tree trunk"),
    # plasma-workspace-wallpapers (GPL-2+; LGPL-3 in each wallpaper's metadata): the largest size of each
    Photo("plasma-workspace-wallpapers", "usr/share/wallpapers/BytheWater/contents/images/2560x1600.jpg",
          "c272434ef39f2abf1ed48a15a8910088020f3165329a5092f3940ec9464bc05f",
          "the planks of a jetty by a lake"),
    Photo("plasma-workspace-wallpapers", "usr/share/wallpapers/ColdRipple/contents/images/2560x1600.jpg",
          "05bef6722fc0ed81292cceb3ed026c38d17e510f3c84be7d68610c2b1a723c3f",
          "a wooden jetty in grey mist"),
    Photo("plasma-workspace-wallpapers", "usr/share/wallpapers/ColorfulCups/contents/images/2560x1600.jpg",
          "6e0f3a72feb5a4a9fec191b77e34874c3c69e2d93040deb3f07773e73385023d",
          "rows of colourful paper cups"),
    Photo("plasma-workspace-wallpapers", "usr/share/wallpapers/DarkestHour/contents/images/2560x1600.jpg",
          "8e3703fae3a3c217b1fc2b399b706cd3720584268d071ba153e4809daa55f1ce",
          "a lake in blue dusk and fog"),
    Photo("plasma-workspace-wallpapers", "usr/share/wallpapers/EveningGlow/contents/images/2560x1600.jpg",
          "586682dcb362b9f620068f10138f87d0d3649939aef238adc5807cb951976a7a",
          "rowing boats on a lake shore at sunset"),
    Photo("plasma-workspace-wallpapers", "usr/share/wallpapers/FallenLeaf/contents/images/2560x1600.jpg",
          "95603a6560c7e8d50e0e03b3f4adbe39c5258c72528e74e4ecaea1daf4e499de",
          "fallen autumn leaves"),
    Photo("plasma-workspace-wallpapers", "usr/share/wallpapers/Grey/contents/images/2560x1600.jpg",
          "88c31d8944b7e6935d1b9a296654c692f0772cb512491713eb30a972a604c0ed",
          "the curved facade of a building, in black and white"),
    Photo("plasma-workspace-wallpapers", "usr/share/wallpapers/Kite/contents/images/2560x1600.jpg",
          "bdca288ce296a981e80659c021cf707caddc702c0c8d4247e60bd618476d47f8",
          "a kite in a blue sky with clouds"),
    Photo("plasma-workspace-wallpapers", "usr/share/wallpapers/OneStandsOut/contents/images/2560x1600.jpg",
          "cb507baf1dafdcae362264f3aba9483ed4be5f6c9fdd770f0ec0920c6d9e80fd",
          "star-shaped moss with one orange shoot"),
    Photo("plasma-workspace-wallpapers", "usr/share/wallpapers/Path/contents/images/2560x1600.jpg",
          "7477457d7f17b736259f1b021864778ad4ba802cf3214e6728181ff29126bba8",
          "a path through a dark green forest"),
    Photo("plasma-workspace-wallpapers", "usr/share/wallpapers/summer_1am/contents/images/2560x1600.jpg",
          "c868b50789591dd42910153c768053f1ba0a98cb36bbfc2b7a96a1045d0477f8",
          "a lake under a pale summer night sky"),
    # lxqt-themes (CC-BY-SA-3.0)
    Photo("lxqt-themes", "usr/share/lxqt/wallpapers/Butterfly-Kenneth-Wimer.jpg",
          "c237c26f6f0b18db3afa62a0eff13cb8208b79a1ef35aaadcb745d8f9faef146",
          "a butterfly on a dry plant"),
    Photo("lxqt-themes", "usr/share/lxqt/wallpapers/Valendas.png",
          "f2d275c51d116942cea8e7d80d30c7d3c130349a0695caf2aa235f926ae15759",
          "mountain ridges under clouds"),
    Photo("lxqt-themes", "usr/share/lxqt/wallpapers/after-the-rain.jpg",
          "e6cb8b3e09b904cc493ff17fddcd564d4e46a1761d05adf972c285a1fd878234",
          "clouds lit by the setting sun over hills"),
    Photo("lxqt-themes", "usr/share/lxqt/wallpapers/appleflower.png",
          "bae8a8eb8274b29509f1cbbfe250081331c5704a1fea25d5052166a0451e67f3",
          "apple blossom on a twig"),
    Photo("lxqt-themes", "usr/share/lxqt/wallpapers/beam.png",
          "3d199194b048cb793c0ad558337cda3e16f14cd054168d1d813620e24a0a5659",
          "sun rays through clouds over hills"),
    Photo("lxqt-themes", "usr/share/lxqt/wallpapers/butterfly.png",
          "13175434d99075e075de7321942e66169e3c99ac9416024dcf4123bd3b38749c",
          "a swallowtail butterfly on a thistle"),
    Photo("lxqt-themes", "usr/share/lxqt/wallpapers/cloud.png",
          "522dbf79dfaff751cf8ef2f337c9d196a231fa096bc38806a76ce048b8c7b5a2",
          "small clouds in a blue sky"),
    Photo("lxqt-themes", "usr/share/lxqt/wallpapers/drop.png",
          "3b726aea9a6f8af36431c6f1974f982f7f4c5a4443499500bda31be27e4ffde8",
          "a drop of water on a blade of grass"),
    Photo("lxqt-themes", "usr/share/lxqt/wallpapers/flowers.png",
          "3a935d8be4d6c9784f9079ff2814acd2de2c8406e9fe584be03e90264f37c371",
          "a meadow of wild flowers"),
    Photo("lxqt-themes", "usr/share/lxqt/wallpapers/fog.jpg",
          "a8235344ee6b5ab1b6de3ccef731bcc0e6509cf33ce832db87eae1eb75987083",
          "fog over a field and hills"),
    Photo("lxqt-themes", "usr/share/lxqt/wallpapers/this-is-not-windows.jpg",
          "2d885e0438c0ab244f818d33d8f745a1cc486558462faf9bf3948675c68ac227",
          "green hills under a blue sky"),
)


# ----------------------------------------------------------------------------- the split


def held_out(val_fraction: float = 0.2, seed: int = 0) -> list[str]:
    """Paths of the photos held out as val: ``round(val_fraction * 49)`` of them, drawn with ``seed``, sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise SourceError(f"val_fraction must be in [0, 1), got {val_fraction}")
    paths = sorted(p.path for p in PHOTOS)
    return sorted(np.random.default_rng(seed).permutation(paths)[: round(val_fraction * len(paths))].tolist())


VAL_FILES: tuple[str, ...] = tuple(held_out())  # the val photos of the default set (val_fraction 0.2, seed 0)


def pinned_digest(photos: Sequence[Photo] = PHOTOS) -> str:
    """sha256 over the pinned paths and checksums: a set written from another list is another set."""
    lines = sorted(f"{p.package} {p.path} {p.sha256}\n" for p in photos)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- crops


Box = tuple[int, int, int, int]  # left, top, right, bottom, in pixels


def crop_boxes(size: tuple[int, int], count: int, crop: int, rng: np.random.Generator) -> list[tuple[Box, float]]:
    """``count`` square boxes inside an image of ``size``, each with its scale.

    A box's side is its scale (drawn from ``SCALES`` with ``SCALE_WEIGHTS``) times the short
    side, but never under ``crop`` (no upsampling) nor over the short side.
    """
    width, height = size
    short = min(width, height)
    boxes = []
    for _ in range(count):
        scale = SCALES[int(rng.choice(len(SCALES), p=SCALE_WEIGHTS))]
        side = min(short, max(crop, round(scale * short)))
        left, top = int(rng.integers(width - side + 1)), int(rng.integers(height - side + 1))
        boxes.append(((left, top, left + side, top + side), scale))
    return boxes


def open_photo(path: Path) -> Image.Image:
    """The photo as RGB pixels, turned upright as its EXIF says (grey photos become grey RGB)."""
    with Image.open(path) as image:
        image.load()
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of a photo that is upright already
    return image if image.mode == "RGB" else image.convert("RGB")


def caption(photo: Photo, scale: float) -> str:
    """The crop's caption: the photo's description, as a whole view or as a detail."""
    return f"{'a photograph' if scale >= 1.0 else 'a detail from a photograph'} of {photo.description}"


def photo_crops(photo: Photo, root: Path, index: int, crop: int, count: int, seed: int) -> Iterator[dict[str, bytes]]:
    """The members of ``count`` crops of one photo; ``index`` (its place in ``PHOTOS``) picks its random stream."""
    image = open_photo(root / photo.path)
    rng = np.random.default_rng([seed, 1, index])  # a stream of its own, apart from the split's
    for box, scale in crop_boxes(image.size, count, crop, rng):
        pixels = image.resize((crop, crop), Image.Resampling.LANCZOS, box=box)
        meta = {"source": NAME, "package": photo.package, "file": photo.path, "photo": photo.name,
                "photo_size": list(image.size), "box": list(box), "scale": scale}
        yield {"png": encode_png(np.asarray(pixels)), "txt": caption(photo, scale).encode("utf-8"),
               "json": json.dumps(meta, sort_keys=True).encode("utf-8")}


# ----------------------------------------------------------------------------- packages


def photo_root(cache: Path | None = None, fetch: bool = True) -> Path:
    """The unpacked packages' root with every pinned photo verified (fetched first when absent and ``fetch``)."""
    cache = cache or debian.cache_dir()
    try:
        debian.ensure(GROUP, cache, fetch)
    except debian.DebianError as err:
        raise SourceError(str(err), err.exit_code) from None
    root = cache / "root"
    for photo in PHOTOS:
        path = root / photo.path
        if not path.is_file():
            raise SourceError(f"{path}: missing from the unpacked {photo.package}; delete {root} and run "
                              f"`{debian.fetch_command([GROUP])}`", exit_code=1)
        actual = sha256_of(path)
        if actual != photo.sha256:
            raise SourceError(f"{path}: sha256 {actual}, but {photo.name} is pinned to {photo.sha256}; "
                              f"delete {root} and run `{debian.fetch_command([GROUP])}`", exit_code=1)
    return root


def write_photos(
    out_dir: Path | str, crop: int = 128, crops_per_photo: int = 64, val_fraction: float = 0.2, seed: int = 0,
    shard_size: int | None = None, overwrite: bool = False, progress: bool = False, cache: Path | str | None = None,
    fetch: bool = True,
) -> dict[str, int] | None:
    """Crops of the pinned photographs as train/val shards, split by photo (see the module's docstring).

    ``cache`` is the Debian package cache (default ``debian.cache_dir()``); without ``fetch``
    a package missing from it is an error that names the command to fetch it.
    """
    if not MIN_CROP <= crop <= MAX_CROP:
        raise SourceError(f"crop must be in [{MIN_CROP}, {MAX_CROP}] pixels, got {crop}")
    if crops_per_photo < 1:
        raise SourceError(f"crops_per_photo must be at least 1, got {crops_per_photo}")
    val_files = set(held_out(val_fraction, seed))
    packages = {p: list(debian.PACKAGES[p]) for p in debian.GROUPS[GROUP]}
    params = {"source": NAME, "packages": packages, "photos": pinned_digest(), "crop": crop,
              "crops_per_photo": crops_per_photo, "scales": list(SCALES), "scale_weights": list(SCALE_WEIGHTS),
              "resample": "lanczos", "val_fraction": val_fraction, "seed": seed, "shard_size": shard_size}

    def fill(stage: Path, describer: Describer) -> dict[str, Any]:
        root = photo_root(Path(cache) if cache is not None else None, fetch)
        for split, keep in (("train", False), ("val", True)):
            chosen = [(i, p) for i, p in enumerate(PHOTOS) if (p.path in val_files) == keep]
            if not chosen:
                continue
            crops: list[dict[str, bytes]] = []
            for i, photo in progress_of(chosen, f"photos {split}", unit="photo", enabled=progress):
                crops.extend(photo_crops(photo, root, i, crop, crops_per_photo, seed))
            # Shuffled: the crops come photo by photo, and a shard of one photo would be a poor sample.
            order = np.random.default_rng([seed, 2, int(keep)]).permutation(len(crops))
            write_split(stage, split, (crops[k] for k in order), len(crops), shard_size, describer, progress)
        files: dict[str, Any] = {debian.deb_name(p, v): {"sha256": sha} for p, (v, sha) in packages.items()}
        return files | {p.path: {"sha256": p.sha256} for p in PHOTOS}

    return write_set(out_dir, params, fill, NAME, None, overwrite)
