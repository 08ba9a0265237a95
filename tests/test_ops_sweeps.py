"""Sweep contract, offline: W&B's own sweep engine proposes runs from conf/sweeps/*.yaml,
the command line is rendered as `wandb agent` renders it, and the CLI trains with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_stage1, tiny_stage2
from omegaconf import OmegaConf
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args
from wandb.sdk.lib import config_util

from lit_vqdiff.cli import main
from lit_vqdiff.config import CONF_DIR, load_config

with warnings.catch_warnings():
    # sweeps 0.3 declares its models the pydantic v1 way; pydantic v2 warns at import
    warnings.simplefilter("ignore")
    import sweeps

SWEEPS = {"stage1": CONF_DIR / "sweeps" / "stage1.yaml", "stage2": CONF_DIR / "sweeps" / "stage2.yaml"}


def propose(sweep_file: Path, n: int) -> list[dict[str, Any]]:
    """``n`` proposals of the sweep engine, as the plain Python values the agent receives."""
    cfg = yaml.safe_load(sweep_file.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn/scipy chatter inside the engine
        runs = sweeps.next_runs(cfg, [], validate=True, n=n)
    return [{k: plain(v["value"]) for k, v in run.config.items()} for run in runs]


def plain(value: Any) -> Any:
    """The agent gets values as JSON from the server: numpy scalars arrive as Python ones."""
    return value.item() if hasattr(value, "item") else value


def render_agent_command(sweep_file: Path, proposal: dict[str, Any]) -> list[str]:
    """The argv `wandb agent` runs for ``proposal`` (its macro expansion, with
    ${args_no_hyphens} built by wandb's own create_sweep_command_args)."""
    cfg = yaml.safe_load(sweep_file.read_text())
    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in proposal.items()}})
    macros |= {"env": ["/usr/bin/env"], "interpreter": ["python"], "program": [cfg["program"]]}
    argv: list[str] = []
    for chunk in map(str, create_sweep_command(list(cfg["command"]))):
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += macros.get(chunk[2:-1]) or []
        else:
            argv.append(chunk)
    return argv


def saved_value(run_dir: Path, key: str) -> Any:
    return OmegaConf.select(OmegaConf.create(yaml.safe_load((run_dir / "config.yaml").read_text())), key)


@pytest.fixture(scope="module")
def tokenizer_runs(shapes_root, tmp_path_factory) -> Path:
    """A runs folder with a (barely trained) image tokenizer for stage-2 proposals."""
    runs = tmp_path_factory.mktemp("sweep-runs")
    assert main(["train", "stage1", *tiny_stage1(shapes_root, runs, "trainer.max_steps=2", "trainer.val_every_steps=2")]) == 0
    return runs


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_sweep_file_proposals_parse_with_their_types(stage):
    proposals = propose(SWEEPS[stage], n=4)
    assert len(proposals) == 4
    for proposal in proposals:
        argv = render_agent_command(SWEEPS[stage], proposal)
        assert argv[:4] == ["/usr/bin/env", "lit-vqdiff", "train", stage]
        overrides = argv[4:]
        assert all("=" in o and not o.startswith("-") for o in overrides)
        cfg = load_config(stage, overrides)
        for key, value in proposal.items():
            got = OmegaConf.select(cfg, key)
            assert got == value and type(got) is type(value), (key, got, value)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_agent_command_trains_with_the_proposed_values(stage, shapes_root, tmp_path, request):
    proposal = propose(SWEEPS[stage], n=1)[0]
    argv = render_agent_command(SWEEPS[stage], proposal)
    runs = tmp_path / "runs"
    tiny = tiny_stage1(shapes_root, runs) if stage == "stage1" else tiny_stage2(shapes_root, runs)
    if stage == "stage2":
        tiny += [f"tokenizers.image={request.getfixturevalue('tokenizer_runs')}/latest-stage1", "generator.width=32"]
    # The test's size overrides go before the sweep's own arguments, which keep the last word.
    argv = argv[:4] + tiny + ["trainer.max_steps=3", "trainer.val_every_steps=3", "logger=wandb"] + argv[4:]

    # What the agent sets up for its run: ids and the proposal as a config file.
    params = tmp_path / "sweep-params.yaml"
    config_util.save_config_file_from_dict(str(params), {k: {"value": v} for k, v in proposal.items()})
    env = dict(os.environ, WANDB_SWEEP_ID="sweep0", WANDB_RUN_ID=f"{stage}-proposal", WANDB_SWEEP_PARAM_PATH=str(params),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = (runs / f"latest-{stage}").resolve()
    for key, value in proposal.items():
        saved = saved_value(run_dir, key)
        assert saved == value and type(saved) is type(value), (key, saved, value)
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 3
    # W&B follows the agent: its run id, and the resolved config with the proposed values.
    logs = list((run_dir / "wandb").glob(f"offline-run-*-{stage}-proposal/run-{stage}-proposal.wandb"))
    assert len(logs) == 1 and not (run_dir / "wandb-id.txt").exists()
    reader = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(reader), "leet", "inspect", "--json", str(logs[0])], capture_output=True, text=True, check=True, timeout=60)
    record = next(json.loads(line) for line in out.stdout.splitlines() if '"type":"run"' in line)
    config = OmegaConf.create({k: v for k, v in record["run"]["config"]["update"].items() if "." not in k})
    assert all(OmegaConf.select(config, key) == value for key, value in proposal.items())


@pytest.mark.parametrize(
    "stage, key, value",
    [("stage1", "tokenizer.quantizer.codebook_size", None), ("stage1", "tokenizer.quantizer.codebook_size", 128.0),
     ("stage2", "generator.depth", None), ("stage2", "generator.depth", 4.5)],
)
def test_values_that_do_not_fit_the_schema_are_rejected(stage, key, value, shapes_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = render_agent_command(SWEEPS[stage], {key: value})
    assert main(argv[2:4] + [f"run.root={runs}", f"data.root={shapes_root}"] + argv[4:]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{key}={value}: '{value}' is not a valid int" in err
    assert not runs.exists()  # rejected before any run folder was made
