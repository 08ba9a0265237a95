"""Config loading: typed schema, presets, overrides, and errors that name what is wrong."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lit_vqdiff.cli import main
from lit_vqdiff.config import (
    CONF_DIR, ConfigError, apply_overrides, config_hash, load_config, load_saved, override, save_config,
)


def test_defaults_load_for_both_stages():
    s1, s2 = load_config("stage1"), load_config("stage2")
    assert s1.stage == "stage1" and s1.modality == "image" and s1.tokenizer.frontend == "pixels"
    assert s2.stage == "stage2" and s2.task == "text->image"
    assert s1.logger.kind == "wandb" and s1.logger.mode == "offline"


def test_overrides_are_typed():
    cfg = load_config("stage1", ["trainer.max_steps=7", "optim.lr=0.01", "tokenizer.channel_mult=[1,2]", "run.name=abc"])
    assert cfg.trainer.max_steps == 7 and isinstance(cfg.trainer.max_steps, int)
    assert cfg.optim.lr == pytest.approx(0.01)
    assert list(cfg.tokenizer.channel_mult) == [1, 2]
    assert cfg.run.name == "abc"


def test_unknown_key_names_key_and_closest_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config("stage1", ["trainer.max_step=3"])
    assert "trainer.max_step" in str(err.value) and "trainer.max_steps" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config("stage2", ["max_steps=3"])
    assert "'max_steps'" in str(err.value) and "trainer.max_steps" in str(err.value)


@pytest.mark.parametrize(
    "override, expected",
    [("trainer.max_steps=None", "int"), ("trainer.max_steps=0.5", "int"), ("optim.lr=fast", "float"),
     ("trainer.deterministic=maybe", "bool")],
)
def test_wrong_type_names_key_value_and_type(override, expected):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        load_config("stage1", [override])
    message = str(err.value)
    assert key in message and repr(value) in message and expected in message


def test_closed_choices_are_checked():
    with pytest.raises(ConfigError, match=r"modality=video.*\['image', 'audio'\]"):
        load_config("stage1", ["modality=video"])
    with pytest.raises(ConfigError, match="task=text->video"):
        load_config("stage2", ["task=text->video"])
    with pytest.raises(ConfigError, match="trainer.precision=bf15-mixed.*did you mean 'bf16-mixed'"):
        load_config("stage1", ["trainer.precision=bf15-mixed"])


def test_group_presets_and_their_errors():
    cfg = load_config("stage2", ["trainer=ddp", "logger=csv"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == -1 and cfg.logger.kind == "csv"
    assert load_config("stage1", ["logger=none"]).logger.kind == "none"
    with pytest.raises(ConfigError, match=r"trainer=tpu: no preset tpu.yaml in .*conf/trainer; choose one of .*cpu.*ddp"):
        load_config("stage1", ["trainer=tpu"])


def test_modality_picks_its_tokenizer_preset():
    image, sound = load_config("stage1"), load_config("stage1", ["modality=audio"])
    assert image.tokenizer.frontend == "pixels"
    assert sound.tokenizer.frontend != "pixels"
    with pytest.raises(ConfigError, match="frontend=pixels needs modality=image"):
        load_config("stage1", ["modality=audio", "tokenizer.frontend=pixels"])


def test_task_picks_its_preset_and_explicit_overrides_win(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "task").mkdir(exist_ok=True)
    (conf / "task" / "image-to-text.yaml").write_text("trainer:\n  max_steps: 123\n")
    assert load_config("stage2", ["task=image->text"], conf_dir=conf).trainer.max_steps == 123
    default = load_config("stage2", conf_dir=conf).trainer.max_steps
    assert default != 123 and load_config("stage2", ["task=image->audio"], conf_dir=conf).trainer.max_steps == default
    assert load_config("stage2", ["trainer.max_steps=7", "task=image->text"], conf_dir=conf).trainer.max_steps == 7
    with pytest.raises(ConfigError, match="sampling.text_order=random.*left_to_right"):
        load_config("stage2", ["sampling.text_order=random"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config("stage1", ["trainer.max_steps"])


def test_saved_config_round_trip_and_hash(tmp_path):
    cfg = load_config("stage2", ["task=image->audio", "trainer.max_steps=11"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_saved(tmp_path / "config.yaml")
    assert again.task == "image->audio" and again.trainer.max_steps == 11
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(apply_overrides(again, ["trainer.max_steps=12"])) != config_hash(cfg)


@pytest.mark.parametrize("task, expected", [("text->image", 4), ("image->text", 2)])
def test_configs_saved_with_cond_patch_size_load_as_the_same_model(tmp_path, task, expected):
    """`cond_patch_size` patched text conditions only; a caption target used `patch_size`."""
    cfg = OmegaConf.to_container(load_config("stage2", [f"task={task}"]))
    generator = cfg["generator"]
    del generator["text_patch_size"]
    generator.update(cond_patch_size=4, patch_size=2)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    old = load_saved(tmp_path / "config.yaml")
    assert old.generator.text_patch_size == expected and "cond_patch_size" not in old.generator


def test_resuming_run_dir_uses_the_saved_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("stage1", ["trainer.max_steps=33", "optim.lr=0.002"]), run / "config.yaml")
    cfg = load_config("stage1", [f"run.dir={run}", "trainer.max_steps=50"])
    assert cfg.trainer.max_steps == 50 and cfg.optim.lr == pytest.approx(0.002)
    with pytest.raises(ConfigError, match="holds a stage1 run, not stage2"):
        load_config("stage2", [f"run.dir={run}"])


def test_the_command_that_started_a_run_resumes_it_presets_included(tmp_path):
    # A requeued job repeats its command word for word, presets (group=name) and all.
    run = tmp_path / "run"
    run.mkdir()
    command = ["logger=csv", "trainer=ddp", "trainer.max_steps=33", "modality=audio", "tokenizer=speech"]
    save_config(load_config("stage1", command), run / "config.yaml")
    cfg = load_config("stage1", [f"run.dir={run}", *command])
    fresh = load_config("stage1", command)
    fresh.run.dir = str(run)
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(fresh)
    longer = load_config("stage1", [f"run.dir={run}", *command, "trainer.max_steps=50"])
    assert longer.trainer.max_steps == 50 and longer.logger.kind == cfg.logger.kind
    with pytest.raises(ConfigError, match="logger=nowhere: no preset"):
        load_config("stage1", [f"run.dir={run}", "logger=nowhere"])


def test_cli_bad_config_exits_2_before_creating_anything(tmp_path, capsys):
    root = tmp_path / "runs"
    code = main(["train", "stage1", f"run.root={root}", "trainer.max_stepz=3"])
    assert code == 2
    assert "trainer.max_stepz" in capsys.readouterr().err
    assert not root.exists()
    code = main(["train", "stage2", f"run.root={root}", "trainer.max_steps=None"])
    assert code == 2 and not root.exists()


def test_console_script_reports_config_errors(tmp_path):
    exe = Path(sys.executable).with_name("lit-vqdiff")
    result = subprocess.run([str(exe), "config", "stage1", "optim.lr=abc"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "optim.lr" in result.stderr and "Traceback" not in result.stderr
    ok = subprocess.run([str(exe), "config", "stage2", "task=image->text"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "task: image->text" in ok.stdout


@pytest.mark.parametrize("value", ["", "a b", "it's", "007", "true", "null", "x\\y", "${oops}", "a=b", "d/x-{0..3}.tar"])
def test_quoted_string_overrides_parse_back_unchanged(value):
    assert load_config("stage2", [override("data.train", value)]).data.train == value


@pytest.mark.parametrize("value", [3, 1.5, True])
def test_other_overrides_keep_their_type(value):
    parsed = OmegaConf.from_dotlist([override("k", value)]).k
    assert parsed == value and type(parsed) is type(value)
