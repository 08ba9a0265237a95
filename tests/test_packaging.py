"""The package outside the repository: a wheel built from the project's files, installed into
a fresh virtual environment, runs `config` (its presets ship inside it), a fast_dev_run, and
`export`, whose safetensors the Python API loads; a user's own preset folder extends and
overrides the shipped presets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from conftest import tiny_stage1

from lit_vqdiff import __version__
from lit_vqdiff.cli import main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the built wheel; its dependencies come from this environment (read-only)."""
    root = tmp_path_factory.mktemp("pkg")
    wheels = root / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                            str(REPO)], capture_output=True, text=True, cwd=root)
    assert build.returncode == 0, build.stderr
    wheel = next(wheels.glob("lit_vqdiff-*.whl"))
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    site = Path(subprocess.check_output([env_dir / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # The dependencies (torch, lightning, ...) without this checkout's editable lit_vqdiff.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    return env_dir


def run(env_dir: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(env_dir / "bin" / "python"), "-m", "lit_vqdiff.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300)


def test_the_wheel_works_outside_the_repository(installed, tmp_path, shapes_root):
    probe = subprocess.run([str(installed / "bin" / "python"), "-c", "import lit_vqdiff, pathlib; print(lit_vqdiff.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert REPO.as_posix() not in probe.stdout and "site-packages" in probe.stdout  # the wheel, not this checkout
    assert run(installed, tmp_path, "--version").stdout.strip() == f"lit-vqdiff {__version__}"
    shown = run(installed, tmp_path, "config", "stage2", "trainer=gpu", "--raw")
    assert shown.returncode == 0, shown.stderr
    assert "accelerator: gpu" in shown.stdout  # a shipped preset, found inside the package
    listing = run(installed, tmp_path, "config", "--list")
    assert "trainer    cpu, ddp, fsdp, gpu, multinode" in listing.stdout and "# image | audio" in listing.stdout

    common = tiny_stage1(shapes_root, tmp_path / "runs")
    fast = run(installed, tmp_path, "train", "stage1", *common, "trainer.fast_dev_run=true")
    assert fast.returncode == 0, fast.stderr[-2000:]
    trained = run(installed, tmp_path, "train", "stage1", *common, "trainer.max_steps=4", "trainer.val_every_steps=4")
    assert trained.returncode == 0, trained.stderr[-2000:]
    exported = run(installed, tmp_path, "export", str(tmp_path / "runs" / "latest-stage1"), "--out", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert json.loads(exported.stdout)["files"] == ["config.yaml", "export.json", "weights.safetensors"]
    check = subprocess.run([str(installed / "bin" / "python"), "-c",
                            "from lit_vqdiff import load_tokenizer; import numpy as np;"
                            f"t = load_tokenizer({str(tmp_path / 'export')!r}); print(tuple(t.encode([np.zeros((32, 32, 3), np.uint8)]).shape))"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert check.stdout.strip() == "(1, 8, 8)", check.stderr[-2000:]


def test_user_presets_extend_and_override_the_shipped_ones(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "trainer").mkdir()
    (mine / "data" / "photos.yaml").write_text("root: /somewhere/photos\nimage_size: 64\n")
    (mine / "trainer" / "gpu.yaml").write_text("accelerator: gpu\ndevices: 2\nprecision: bf16-mixed\n")
    assert main(["--config-dir", str(mine), "config", "stage2", "data=photos", "trainer=gpu", "--raw"]) == 0
    out = capsys.readouterr().out
    assert "root: /somewhere/photos" in out and "image_size: 64" in out  # a new preset
    assert "devices: 2" in out  # the user's gpu.yaml wins over the shipped one
    assert main(["--config-dir", str(mine), "config", "--list"]) == 0
    assert "photos" in capsys.readouterr().out.split("data")[1].splitlines()[0]
    os.environ.pop("LIT_VQDIFF_CONFIG_DIR")  # --config-dir set it for this process
    assert main(["config", "stage2", "data=photos", "--raw"]) == 2  # without it, no such preset
    assert "data=photos: no preset photos.yaml" in capsys.readouterr().err
