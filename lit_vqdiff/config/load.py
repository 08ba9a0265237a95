"""Loading configs: YAML presets under conf/, key=value overrides, and the checks that need
no data.

Order of precedence (later wins): schema defaults < presets named in the stage file's
``defaults`` (conf/<group>/<name>.yaml) < the rest of conf/<stage>.yaml < presets picked
on the command line as ``group=name`` (and stage 1's conf/modality/<modality>.yaml, stage
2's conf/task/<src>-to-<tgt>.yaml) < ``key=value`` overrides. Every error is raised
before any run folder or file is created, and names the key and value at fault. Checks
that need the data set's description (sizes against the tokenizer's strides) come later,
in ``pipeline.plan``, still before anything is written.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ..diffusion.masked import SCHEDULES
from ..errors import ConfigError
from ..modalities import TASKS
from ..nn.dit import DIT_PRESETS
from .schema import CHOICES, GROUPS, SCHEMAS, task_preset_name

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # shipped inside the package
USER_CONF_ENV = "LIT_VQDIFF_CONFIG_DIR"  # a folder of the user's own presets (``--config-dir`` sets it)


def conf_dirs(conf_dir: Path | str | None = None) -> list[Path]:
    """Where presets are looked up, first match wins: the user's folder (``LIT_VQDIFF_CONFIG_DIR``),
    then ``conf_dir`` (the shipped presets by default). A user's ``data/photos.yaml`` adds a
    preset; a user's ``trainer/gpu.yaml`` replaces the shipped one."""
    dirs = [Path(conf_dir) if conf_dir is not None else CONF_DIR]
    user = os.environ.get(USER_CONF_ENV)
    if user:
        if not Path(user).is_dir():
            raise ConfigError(f"{USER_CONF_ENV}={user}: not a folder of presets")
        dirs.insert(0, Path(user))
    return dirs


def find_preset(dirs: Sequence[Path], relative: str) -> Path | None:
    """The first ``dir/relative`` that exists, or None."""
    return next((d / relative for d in dirs if (d / relative).is_file()), None)


def presets(dirs: Sequence[Path], group: str) -> list[str]:
    """Preset names of a group over every folder."""
    return sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})


# ----------------------------------------------------------------------------- loading


def load_config(stage: str, overrides: list[str] | tuple[str, ...] = (), conf_dir: Path | str | None = None) -> DictConfig:
    """Schema + conf/<stage>.yaml + group presets + key=value overrides, validated (presets
    from ``conf_dirs(conf_dir)``: the user's folder first, then the shipped one)."""
    if stage not in SCHEMAS:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {sorted(SCHEMAS)}")
    dirs = conf_dirs(conf_dir)
    pairs = [_split_override(o) for o in overrides]
    resumed = _resumed_config(stage, dict(pairs).get("run.dir"))
    if resumed is not None:
        # Resuming: the run's own saved config is the base. The command that started the run
        # (a requeued job repeats it) re-applies its presets, then its key=value overrides,
        # so the same command gives the same config and a larger trainer.max_steps still wins.
        dirs = conf_dirs(conf_dir)
        for key, value in pairs:
            if key in GROUPS and OmegaConf.is_dict(resumed.get(key)):
                resumed = _merge_group(resumed, dirs, key, value)
        for key, value in pairs:
            if not (key in GROUPS and OmegaConf.is_dict(resumed.get(key))):
                resumed = _apply_override(resumed, key, value)
        validate(resumed)
        return resumed
    cfg = OmegaConf.structured(SCHEMAS[stage])
    stage_file = find_preset(dirs, f"{stage}.yaml") or dirs[-1] / f"{stage}.yaml"
    stage_yaml = _read_yaml(stage_file)
    # The stage file's own `defaults` presets come first, so that its body can refine them.
    for group, name in dict(stage_yaml.pop("defaults", None) or {}).items():
        cfg = _merge_group(cfg, dirs, group, str(name))
    cfg = _merge(cfg, stage_yaml, source=str(stage_file))

    chosen: dict[str, str] = {}
    plain: list[tuple[str, str]] = []
    for key, value in pairs:
        if key in GROUPS and OmegaConf.is_dict(cfg.get(key)):
            chosen[key] = value  # `trainer=ddp` picks a preset instead of replacing the section
        else:
            plain.append((key, value))
    # Stage 1's defaults follow the modality (conf/modality/<name>.yaml: tokenizer
    # architecture, batch size, steps); explicit overrides still win.
    if stage == "stage1":
        modality = dict(plain).get("modality", cfg.modality)
        if find_preset(dirs, f"modality/{modality}.yaml"):
            chosen = {"modality": modality, **chosen}
    # Stage 2's may follow the task (conf/task/<src>-to-<tgt>.yaml), e.g. a shorter run
    # for a task that learns faster.
    if stage == "stage2":
        preset = task_preset_name(str(dict(plain).get("task", cfg.task)))
        if find_preset(dirs, f"task/{preset}.yaml"):
            chosen = {"task": preset, **chosen}
    for group, name in chosen.items():
        cfg = _merge_group(cfg, dirs, group, str(name))
    for key, value in plain:
        cfg = _apply_override(cfg, key, value)
    validate(cfg)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def _resumed_config(stage: str, run_dir: str | None) -> DictConfig | None:
    if not run_dir or not (Path(run_dir) / "config.yaml").is_file():
        return None
    cfg = load_saved(Path(run_dir) / "config.yaml")
    if cfg.stage != stage:
        raise ConfigError(f"run.dir={run_dir} holds a {cfg.stage} run, not {stage}")
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _merge_group(cfg: DictConfig, dirs: Sequence[Path], group: str, name: str) -> DictConfig:
    if group not in GROUPS:
        raise ConfigError(f"unknown config group {group!r} in defaults; expected one of {sorted(GROUPS)}")
    path = find_preset(dirs, f"{group}/{name}.yaml")
    if path is None:
        where = " or ".join(str(d / group) for d in dirs)
        raise ConfigError(f"{group}={name}: no preset {name}.yaml in {where}; choose one of {presets(dirs, group)} "
                          f"or set {group}.<key>=...")
    data = _read_yaml(path)
    return _merge(cfg, {GROUPS[group]: data} if GROUPS[group] else data, source=str(path))


def _merge(cfg: DictConfig, data: dict[str, Any], source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, data)  # type: ignore[return-value]
    except ConfigKeyError as err:
        key = _full_key(err)
        raise ConfigError(f"{source}: {_unknown_key_message(cfg, key)}") from None
    except ValidationError as err:
        raise ConfigError(f"{source}: {_type_message(err)}") from None


def apply_overrides(cfg: DictConfig, overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """``key=value`` overrides applied to an already loaded config, then validated."""
    for key, value in (_split_override(o) for o in overrides):
        cfg = _apply_override(cfg, key, value)
    validate(cfg)
    return cfg


def override(key: str, value: Any) -> str:
    """``key=value`` that parses back to ``value``: strings are YAML-quoted, since the
    parser reads an empty value as null and ``007`` or ``true`` as a number or a bool, and
    ``${`` is escaped so that it is not read as an interpolation."""
    if isinstance(value, str):
        return f"{key}='" + value.replace("'", "''").replace("${", "\\${") + "'"
    return f"{key}={value}"


def _split_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip().lstrip("-")  # tolerate --key=value as W&B's ${args} renders it
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    return key, value


def _apply_override(cfg: DictConfig, key: str, value: str) -> DictConfig:
    if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING and not _key_exists(cfg, key):
        raise ConfigError(_unknown_key_message(cfg, key))
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))  # type: ignore[return-value]
    except ValidationError as err:
        expected = _expected_type(cfg, key)
        raise ConfigError(f"{key}={value}: {value!r} is not a valid {expected} ({_first_line(err)})") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{key}={value}: {_first_line(err)}") from None


_MISSING = object()


def _key_exists(cfg: DictConfig, key: str) -> bool:
    node: Any = cfg
    for part in key.split("."):
        if not OmegaConf.is_dict(node) or part not in node:
            return False
        node = node._get_node(part)
    return True


def _expected_type(cfg: DictConfig, key: str) -> str:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    node = parent._get_node(leaf) if OmegaConf.is_dict(parent) else None
    typ = getattr(node, "_metadata", None) and node._metadata.ref_type
    name = getattr(typ, "__name__", None) or str(typ).replace("typing.", "")
    if isinstance(node, ListConfig):
        return "list, e.g. [1,2]"
    return name


def all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every leaf key of a config as a dotted path."""
    out = []
    for key in cfg.keys():
        full = f"{prefix}{key}"
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            out.extend(all_keys(node, full + "."))
        else:
            out.append(full)
    return out


def _unknown_key_message(cfg: DictConfig, key: str) -> str:
    keys = all_keys(cfg)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    leaf = key.rpartition(".")[2]
    close += [k for k in keys if k.rpartition(".")[2] == leaf and k not in close]
    if not close:
        by_leaf = {k.rpartition(".")[2]: k for k in keys}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.6)]
    hint = f"; did you mean {', '.join(close[:3])}?" if close else ""
    return f"unknown config key {key!r}{hint}"


def _full_key(err: OmegaConfBaseException) -> str:
    full = getattr(err, "full_key", None)
    if full:
        return str(full)
    return str(getattr(err, "key", "?"))


def _type_message(err: ValidationError) -> str:
    return f"{_full_key(err)}: {_first_line(err)}"


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def choices() -> dict[str, tuple[str, ...]]:
    """Every closed-choice key: the schema's, plus those whose choices live in code."""
    return {**CHOICES, "task": TASKS, "generator.preset": tuple(DIT_PRESETS), "generator.mask_schedule": SCHEDULES}


def validate(cfg: DictConfig) -> None:
    """Closed-choice values and cross-field rules the type system cannot express."""
    for key, options in choices().items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            continue
        if value not in options:
            close = difflib.get_close_matches(str(value), options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}={value}: expected one of {list(options)}{hint}")
    positive = ["data.batch_size", "data.val_batch_size", "trainer.max_steps", "trainer.num_nodes"]
    for key in positive:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value}: must be positive")
    if cfg.trainer.devices == 0 or cfg.trainer.devices < -1:
        raise ConfigError(f"trainer.devices={cfg.trainer.devices}: must be positive, or -1 for every device")
    if cfg.trainer.precision == "16-mixed" and cfg.trainer.accelerator == "cpu":
        # Lightning would silently swap in bf16-mixed; a run must train in the precision it names.
        raise ConfigError("trainer.precision=16-mixed: float16 mixed precision needs a GPU "
                          "(trainer.accelerator=gpu); on CPU use trainer.precision=bf16-mixed or 32-true")
    if "fsdp" in cfg.trainer.strategy and cfg.trainer.accelerator == "cpu":
        raise ConfigError(f"trainer.strategy={cfg.trainer.strategy}: FSDP needs trainer.accelerator=gpu; on CPU use ddp or ddp_spawn")
    _validate_data(cfg.data)
    if cfg.stage == "stage1":
        _validate_tokenizer(cfg)
    else:
        _validate_generator(cfg)


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value}: {why}")


def _validate_data(d: DictConfig) -> None:
    for key in ("num_workers", "shuffle_buffer", "batches_per_epoch", "num_classes"):
        _require(d[key] >= 0, f"data.{key}", d[key], "must be >= 0")
    _require(0.0 <= d.max_skip_fraction <= 1.0, "data.max_skip_fraction", d.max_skip_fraction, "must be in [0, 1]")
    _require(d.image_size == 0 or 8 <= d.image_size <= 1024, "data.image_size", d.image_size, "must be 0 (auto) or 8..1024 pixels")
    _require(d.channels in (0, 1, 3), "data.channels", d.channels, "must be 0 (auto), 1 (grey) or 3 (RGB)")
    _require(d.sample_rate == 0 or 1000 <= d.sample_rate <= 192000, "data.sample_rate", d.sample_rate,
             "must be 0 (auto) or 1000..192000 Hz")
    _require(d.audio_samples >= 0, "data.audio_samples", d.audio_samples, "must be 0 (auto) or positive")
    if d.sample_rate and d.audio_samples:
        seconds = d.audio_samples / d.sample_rate
        _require(0.1 <= seconds <= 60, "data.audio_samples", d.audio_samples,
                 f"is {seconds:.2f} s at data.sample_rate={d.sample_rate}; clips of 0.1..60 s are supported")
    _require(0 <= d.text_bytes <= 4096, "data.text_bytes", d.text_bytes, "must be 0 (auto) or 1..4096")
    _require(d.min_source_rate > 0, "data.min_source_rate", d.min_source_rate, "must be positive")
    _require(d.max_source_rate >= d.min_source_rate, "data.max_source_rate", d.max_source_rate,
             f"is below data.min_source_rate={d.min_source_rate}")


def _validate_tokenizer(cfg: DictConfig) -> None:
    t = cfg.tokenizer
    if t.frontend == "pixels" and cfg.modality != "image":
        raise ConfigError(f"tokenizer.frontend=pixels needs modality=image, got modality={cfg.modality}")
    if t.frontend != "pixels" and cfg.modality == "image":
        raise ConfigError(f"tokenizer.frontend={t.frontend} is for sounds; modality=image needs tokenizer.frontend=pixels")
    _require(t.grid >= 0, "tokenizer.grid", t.grid, "must be 0 (auto) or positive")
    _require(t.patch >= 0, "tokenizer.patch", t.patch, "must be 0 (auto) or positive")
    _require(t.n_fft >= 0 and t.hop >= 0, "tokenizer.n_fft/hop", f"{t.n_fft}/{t.hop}", "must be 0 (auto) or positive")
    if t.n_fft and t.hop:
        _require(t.hop <= t.n_fft, "tokenizer.hop", t.hop, f"must not exceed tokenizer.n_fft={t.n_fft}")
    _require(t.patch_width >= 0, "tokenizer.patch_width", t.patch_width, "must be 0 (default widths) or positive")
    if t.frontend == "stft":
        # The inverse STFT needs windows that overlap-add to a nonzero sum everywhere.
        _require(t.n_fft > 0 and t.hop > 0, "tokenizer.n_fft/hop", f"{t.n_fft}/{t.hop}",
                 "the stft frontend needs both set (e.g. tokenizer.n_fft=256 tokenizer.hop=64 at 8 kHz)")
        _require(t.hop <= t.n_fft // 2, "tokenizer.hop", t.hop,
                 f"the stft frontend's inverse needs overlapping frames: at most tokenizer.n_fft / 2 = {t.n_fft // 2}")


def _validate_generator(cfg: DictConfig) -> None:
    g = cfg.generator
    _require(g.patch_size in (1, 2, 4, 8), "generator.patch_size", g.patch_size, "must be 1, 2, 4 or 8")
    _require(g.text_patch_size >= 1, "generator.text_patch_size", g.text_patch_size, "must be positive")
    text_bytes = cfg.data.text_bytes
    if text_bytes and "text" in cfg.task.split("->") and g.text_encoder == "bytes":
        _require(text_bytes % g.text_patch_size == 0, "data.text_bytes", text_bytes,
                 f"must be a multiple of generator.text_patch_size={g.text_patch_size}")
    source, target = cfg.task.split("->")
    d = g.discrete
    _require(d.num_steps >= 1, "generator.discrete.num_steps", d.num_steps, "must be positive")
    _require(0.0 <= d.replace < 1.0, "generator.discrete.replace", d.replace, "must be in [0, 1)")
    _require(d.hybrid >= 0.0, "generator.discrete.hybrid", d.hybrid, "must be >= 0")
    schedules = {"uniform": ("cosine", "linear"), "mask_replace": SCHEDULES}
    if g.objective in schedules:
        _require(d.schedule in schedules[g.objective], "generator.discrete.schedule", d.schedule,
                 f"expected one of {list(schedules[g.objective])} for generator.objective={g.objective}")
        _require(cfg.sampling.steps <= d.num_steps, "sampling.steps", cfg.sampling.steps,
                 f"must not exceed generator.discrete.num_steps={d.num_steps}")
    if g.objective == "gaussian" and target not in ("image", "audio"):
        raise ConfigError(f"generator.objective=gaussian needs an image or audio target; task={cfg.task} targets {target}")
    if g.text_encoder == "minilm" and target == "text":
        raise ConfigError("generator.text_encoder=minilm encodes captions as a condition; "
                          f"task={cfg.task} generates them (use generator.text_encoder=bytes)")
    _require(cfg.sampling.steps >= 1, "sampling.steps", cfg.sampling.steps, "must be positive")
    _require(cfg.sampling.n >= 0 and cfg.sampling.val_n >= 0, "sampling.n/val_n", f"{cfg.sampling.n}/{cfg.sampling.val_n}",
             "must be >= 0")


# ----------------------------------------------------------------------------- saving


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True, sort_keys=False)


def config_hash(cfg: DictConfig) -> str:
    """Stable digest of the resolved config: equal on every rank of a correct run."""
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def save_config(cfg: DictConfig, path: Path | str) -> None:
    Path(path).write_text(to_yaml(cfg))


def load_saved(path: Path | str) -> DictConfig:
    """A config saved in a run folder, validated against the current schema."""
    return saved_config(_read_yaml(Path(path)), source=str(path))


def saved_config(data: dict[str, Any], source: str) -> DictConfig:
    """A config as a run or a checkpoint saved it, upgraded from older key names, validated."""
    stage = data.get("stage")
    if stage not in SCHEMAS:
        raise ConfigError(f"{source}: 'stage' must be one of {sorted(SCHEMAS)}, got {stage!r}")
    cfg = _merge(OmegaConf.structured(SCHEMAS[stage]), _upgraded(data), source=source)
    validate(cfg)
    return cfg


def _upgraded(data: dict[str, Any]) -> dict[str, Any]:
    """Older saved configs in today's keys, with the model they describe unchanged."""
    generator = data.get("generator")
    if isinstance(generator, dict) and "cond_patch_size" in generator:
        # `cond_patch_size` patched text conditions only; a text target used `patch_size`.
        generator = dict(generator)
        cond_patch = generator.pop("cond_patch_size")
        text_target = str(data.get("task", "")).endswith("->text")
        generator["text_patch_size"] = generator.get("patch_size", 1) if text_target else cond_patch
        data = {**data, "generator": generator}
    return data
