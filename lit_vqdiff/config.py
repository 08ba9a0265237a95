"""Typed configuration: dataclass schema, YAML files under conf/, and key=value overrides.

Order of precedence (later wins): schema defaults < presets named in the stage file's
``defaults`` (conf/<group>/<name>.yaml) < the rest of conf/<stage>.yaml < presets picked
on the command line as ``group=name`` (and stage 1's conf/modality/<modality>.yaml, stage
2's conf/task/<src>-to-<tgt>.yaml) <
``key=value`` overrides. Every error is raised before any run folder
or file is created, and names the key and value at fault.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A configuration problem a user can fix; the CLI prints it and exits with status 2."""


# ----------------------------------------------------------------------------- schema


@dataclass
class RunConfig:
    dir: Optional[str] = None  # an existing run folder resumes it; None starts runs/<stage>-<timestamp>
    root: str = "runs"
    seed: int = 0
    name: Optional[str] = None  # display name in W&B


@dataclass
class ShapesConfig:
    """How `lit-vqdiff shards write shapes` renders shapes-v1 (train and val use disjoint seeds)."""

    train_samples: int = 24000
    val_samples: int = 2000
    train_seed: int = 0
    val_seed: int = 1
    shard_size: int = 2000


@dataclass
class DataConfig:
    name: str = "shapes-v1"
    root: str = "data/shapes-v1"
    train: str = ""  # shard pattern (brace, pipe: or http(s)://) or a folder; "" = every train-*.tar under root
    val: str = ""
    sizes: str = ""  # sizes.json path or URL; "" = the one beside the shards
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    batch_size: int = 64
    val_batch_size: int = 256
    num_workers: int = 2
    mode: str = "exact"  # exact | resampled
    drop_last: bool = False  # exact mode: drop the uneven tail instead of padding it
    batches_per_epoch: int = 0  # resampled mode: batches per rank per epoch (0 = from sizes.json)
    shuffle_buffer: int = 2000
    image_size: int = 32
    sample_rate: int = 8000
    audio_samples: int = 8000
    text_bytes: int = 48
    # Audio at another rate is resampled when its rate lies in [min_source_rate,
    # max_source_rate]; outside that range, or with resample_audio=false, the sample is
    # skipped and counted as `sample_rate`.
    resample_audio: bool = True
    min_source_rate: int = 4000
    max_source_rate: int = 96000
    max_skip_fraction: float = 0.01  # share of an epoch's samples per rank that may be skipped before the run stops


@dataclass
class QuantizerConfig:
    kind: str = "vq"  # vq | rvq | fsq
    codebook_size: int = 512
    lookup_dim: int = 8
    # Lookups on the unit sphere (cosine matching). For rvq the lookup input is normalized
    # and the first codebook is cosine-matched; later codebooks quantize the residuals with
    # plain L2 (residuals are not unit vectors, and their length is what they refine).
    l2_normalize: bool = True
    update: str = "ema"  # ema | grad
    ema_decay: float = 0.99
    commitment: float = 0.25
    kmeans_init: bool = True
    restart_dead: bool = True
    dead_after: int = 50
    num_quantizers: int = 1  # rvq only
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # fsq only


@dataclass
class DiscriminatorConfig:
    enabled: bool = False
    start_step: int = 2000
    weight: float = 0.1
    channels: int = 64
    layers: int = 3
    lr: float = 2e-4


@dataclass
class TokenizerConfig:
    frontend: str = "pixels"  # pixels (image) | wave | spectrogram (audio)
    channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 2
    downsample: Optional[list[int]] = None  # per-level strides; None = 2 per level
    z_channels: int = 64
    attention: bool = False
    patch: int = 1  # >1: patch stem/head (strided conv in, sub-pixel conv out) around the conv stack
    mid: bool = True  # the res-(attention)-res block at the lowest resolution
    recon_loss: str = "l1"  # l1 | l2
    # Audio magnitude-spectrum term: multi-resolution STFT loss (wave frontend), spectral
    # convergence of linear magnitudes (spectrogram frontend); 0 = off.
    stft_weight: float = 1.0
    n_fft: int = 256  # spectrogram frontend
    hop: int = 64
    griffin_lim_iters: int = 32
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    prune_unused: bool = False


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | constant
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping (the measured defaults train without it)


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_steps: int = 4000
    max_minutes: float = 0.0  # wall-clock budget; 0 = none
    val_every_steps: int = 500
    limit_val_batches: int = 0  # 0 = the whole validation split
    log_every_steps: int = 25
    checkpoint_every_minutes: float = 2.0  # refresh last.ckpt this often (<= 0: no time trigger)
    checkpoint_every_steps: int = 0  # also refresh it every N optimizer steps (0: off)
    fast_dev_run: bool = False
    deterministic: bool = False
    compile: bool = False  # torch.compile the trunks (inductor); the first steps pay for compiling
    channels_last: bool = True  # image tokenizers in NHWC memory (faster convolutions); no effect on 1D audio
    threads: int = 0  # torch intra-op threads; 0 = torch's default


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | csv | none
    mode: str = "offline"  # offline | online | disabled (WANDB_MODE, when set, wins)
    project: str = "lit_vqdiff"
    entity: Optional[str] = None
    media_every_val: int = 1  # log media every N validations


@dataclass
class Stage1Config:
    stage: str = "stage1"
    modality: str = "image"  # image | audio
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class GaussianConfig:
    num_steps: int = 1000
    # Cosine schedule with v-prediction: the setting measured on shapes-v1 text->image (the
    # 8x8 latents are few and small, where the linear schedule spends most steps near noise).
    schedule: str = "cosine"  # linear | cosine
    prediction: str = "v"  # eps | v
    learn_sigma: bool = False


@dataclass
class GeneratorConfig:
    objective: str = "mask"  # mask | gaussian
    preset: str = "DiT-T"
    width: Optional[int] = None  # None = the preset's
    depth: Optional[int] = None
    heads: Optional[int] = None
    patch_size: int = 1  # codes (or latent cells) per trunk token along each axis
    pos: str = "learned"  # learned | sincos
    cond_depth: int = 2  # layers of the condition encoder (text bytes, codes)
    text_patch_size: int = 1  # caption bytes per position, as a condition or a target (codes use patch_size)
    cond_dropout: float = 0.1  # classifier-free guidance: share of conditions dropped in training
    mask_schedule: str = "cosine"
    label_smoothing: float = 0.0
    gaussian: GaussianConfig = field(default_factory=GaussianConfig)
    ema_decay: float = 0.999


@dataclass
class SamplingConfig:
    steps: int = 12  # mask diffusion decoding steps
    guidance: float = 2.0
    temperature: float = 1.0
    # Gumbel noise on the confidences that order the unmasking (annealed to 0). text->image,
    # 200-400 samples: 1.0 gave 0.975 and 0.9925, 0.5 gave 0.995 on both checkpoints.
    choice_temperature: float = 0.5
    # Text targets (image->text): a caption is one string per meaning, and bytes drawn
    # independently at temperature 1, or committed out of reading order, misspell words
    # whose position depends on an earlier word's length ("cenrer").
    text_temperature: float = 0.0
    text_order: str = "left_to_right"  # confidence | left_to_right
    sampler: str = "ddim"  # gaussian: ddim | ddpm
    ddim_steps: int = 50
    ddpm_steps: int = 250  # respaced ancestral sampling (at most gaussian.num_steps)
    n: int = 200  # samples drawn and evaluated at the end of `train stage2`
    val_n: int = 64  # fixed conditions sampled at each validation for val/exact_match (0 = off)


@dataclass
class TokenizerRefs:
    image: str = "runs/latest-stage1"
    audio: str = "runs/latest-stage1-audio"
    train_if_missing: bool = True
    cache: bool = True  # train from the token cache (built once per tokenizer checksum)
    cache_dir: str = ""  # "" = <data.root>/tokens/<modalities>-<digest of the tokenizers' checksums>
    # Extra overrides for the stage-1 run that trains a missing tokenizer, on top of the data,
    # hardware and logger settings it shares with stage 2: e.g. [trainer.max_steps=1000]
    stage1_args: list[str] = field(default_factory=list)


@dataclass
class Stage2Config:
    stage: str = "stage2"
    task: str = "text->image"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizers: TokenizerRefs = field(default_factory=TokenizerRefs)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


SCHEMAS: dict[str, type] = {"stage1": Stage1Config, "stage2": Stage2Config}

# Values with a closed set of choices; checked after merging so the error names the key.
CHOICES: dict[str, tuple[str, ...]] = {
    "modality": ("image", "audio"),
    "task": ("class->image", "text->image", "image->audio", "audio->image", "image->text", "text->audio"),
    "data.mode": ("exact", "resampled"),
    "tokenizer.frontend": ("pixels", "wave", "spectrogram"),
    "tokenizer.recon_loss": ("l1", "l2"),
    "tokenizer.quantizer.kind": ("vq", "rvq", "fsq"),
    "tokenizer.quantizer.update": ("ema", "grad"),
    "optim.schedule": ("cosine", "constant"),
    "trainer.precision": ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"),
    "logger.kind": ("wandb", "csv", "none"),
    "logger.mode": ("offline", "online", "disabled"),
    "generator.objective": ("mask", "gaussian"),
    "generator.pos": ("learned", "sincos"),
    "generator.gaussian.schedule": ("linear", "cosine"),
    "generator.gaussian.prediction": ("eps", "v"),
    "sampling.sampler": ("ddim", "ddpm"),
    "sampling.text_order": ("confidence", "left_to_right"),
}

# Config groups: `group=name` on the command line merges conf/<group>/<name>.yaml into
# `target` ("" = the root, for presets that touch several sections).
GROUPS: dict[str, str] = {"trainer": "trainer", "logger": "logger", "data": "data", "modality": "", "task": ""}


def task_preset_name(task: str) -> str:
    """conf/task/<name>.yaml for a stage-2 task: 'image->text' -> 'image-to-text'."""
    return task.replace("->", "-to-")


# ----------------------------------------------------------------------------- loading


def load_config(stage: str, overrides: list[str] | tuple[str, ...] = (), conf_dir: Path | str = CONF_DIR) -> DictConfig:
    """Schema + conf/<stage>.yaml + group presets + key=value overrides, validated."""
    if stage not in SCHEMAS:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {sorted(SCHEMAS)}")
    conf_dir = Path(conf_dir)
    pairs = [_split_override(o) for o in overrides]
    resumed = _resumed_config(stage, dict(pairs).get("run.dir"))
    if resumed is not None:
        # Resuming: the run's own saved config is the base; overrides still apply on top
        # (e.g. a larger trainer.max_steps), groups do not re-apply their presets.
        for key, value in pairs:
            resumed = _apply_override(resumed, key, value)
        validate(resumed)
        return resumed
    cfg = OmegaConf.structured(SCHEMAS[stage])
    stage_file = conf_dir / f"{stage}.yaml"
    stage_yaml = _read_yaml(stage_file)
    # The stage file's own `defaults` presets come first, so that its body can refine them.
    for group, name in dict(stage_yaml.pop("defaults", None) or {}).items():
        cfg = _merge_group(cfg, conf_dir, group, str(name))
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
        if (conf_dir / "modality" / f"{modality}.yaml").exists():
            chosen = {"modality": modality, **chosen}
    # Stage 2's may follow the task (conf/task/<src>-to-<tgt>.yaml), e.g. a shorter run
    # for a task that learns faster.
    if stage == "stage2":
        preset = task_preset_name(str(dict(plain).get("task", cfg.task)))
        if (conf_dir / "task" / f"{preset}.yaml").exists():
            chosen = {"task": preset, **chosen}
    for group, name in chosen.items():
        cfg = _merge_group(cfg, conf_dir, group, str(name))
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


def _merge_group(cfg: DictConfig, conf_dir: Path, group: str, name: str) -> DictConfig:
    if group not in GROUPS:
        raise ConfigError(f"unknown config group {group!r} in defaults; expected one of {sorted(GROUPS)}")
    path = conf_dir / group / f"{name}.yaml"
    if not path.exists():
        options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        raise ConfigError(f"{group}={name}: no preset conf/{group}/{name}.yaml; choose one of {options} or set {group}.<key>=...")
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


def validate(cfg: DictConfig) -> None:
    """Closed-choice values and cross-field rules the type system cannot express."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            continue
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}={value}: expected one of {list(choices)}{hint}")
    positive = ["data.batch_size", "trainer.max_steps", "trainer.num_nodes"]
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
    if OmegaConf.select(cfg, "data.num_workers", default=0) < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers}: must be >= 0")
    if cfg.stage == "stage1" and cfg.tokenizer.frontend == "pixels" and cfg.modality != "image":
        raise ConfigError(f"tokenizer.frontend=pixels needs modality=image, got modality={cfg.modality}")


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
