"""The pipeline: plan -> data -> tokenizers -> token cache -> train -> export -> sample -> evaluate.

``plan`` comes first and writes nothing: it reads the data set's description, fills the
config's auto values from it, works out which tokenizers exist and which stage 1 must
train, and builds every model on the meta device, so that a value that cannot work
(a grid that does not divide the image, a patch that does not divide the codes, a
tokenizer trained on other data) is a ConfigError naming its key before any file or
folder is made. The stages then run in order; `lit-vqdiff train|tokenize|sample` each
call one function here.
"""

from __future__ import annotations

import copy
import fcntl
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import torch
from omegaconf import DictConfig, OmegaConf

from . import runs, training
from .artifact import load_tokenizer, read_artifact, save_artifact
from .callbacks import EMAWeights, load_checkpoint_file, stop_on_signals
from .config import ConfigError, Stage2Config, apply_overrides, load_config, override, saved_config
from .data.datamodule import ShardDataModule
from .data.description import is_shapes, resolve_data
from .data.prepare import ensure_dataset, holdout_root, load_description, reported_to_waiters, wait_for_rank_zero
from .data.tokens import build_cache, check_cache, data_fingerprint, default_cache_dir
from .errors import Stopped
from .eval.classifier import data_classifier
from .eval.conditions import Conditions, decoded_reference, from_classes, from_inputs, from_prompts, from_val_shards, real_items
from .eval.evaluate import MANIFEST, SAMPLES_INFO, evaluate_dir
from .eval.frechet import SPACES
from .eval.scoring import HOLDOUT_LABELS, Scorer
from .modalities import MODALITIES, DecodeSpec, parse_task
from .modalities.text import sentence_encoder_checksum
from .nn.tokenizer import Tokenizer
from .stages.generator import GeneratorModule
from .stages.tokenizer import TokenizerModule
from .progress import progress
from .loggers import artifact_name, close_loggers, declare_input, log_artifact, log_summary
from .training import fit, run_figures

# What a stage-2 run hands to a stage-1 run it starts. Precision is not handed over: each
# stage keeps its own default (stage 1 trains in fp32); stage1_args can set it.
HARDWARE_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "threads")
# Every data key but the batch sizes and shuffle buffer, which stage 1 sets for itself.
STAGE_OWN_DATA_KEYS = ("batch_size", "val_batch_size", "shuffle_buffer")
AUTO_IMAGE_GRID = 16  # auto tokenizer.grid: image_size / 4, at most this
SPEC_RATE, SPEC_N_FFT = 8000, 256  # auto n_fft: 256 at 8 kHz, scaled with the sample rate
CACHE_WAIT_S = 3600.0  # how long other ranks wait for rank 0 to build the token cache
SAMPLE_BATCH = 100


# ---------------------------------------------------------------------- plan


@dataclass
class Plan:
    """A run's config with every auto value resolved, and what must happen before it trains."""

    cfg: DictConfig
    description: dict[str, Any] | None
    description_at: str
    # stage 2: per coded modality, an existing artifact, or the stage-1 config to train one
    artifacts: dict[str, Path] = field(default_factory=dict)
    stage1: dict[str, "Plan"] = field(default_factory=dict)

    @property
    def shapes(self) -> bool:
        return is_shapes(self.description)


def _needs(cfg: DictConfig) -> list[str]:
    if cfg.stage == "stage1":
        return [cfg.modality]
    task = parse_task(cfg.task)
    return [task.source.name, task.target.name]


def resolve(cfg: DictConfig) -> Plan:
    """``cfg`` (a copy) with its auto values filled from the data set's description (and, for
    stage 1, the tokenizer's geometry); no tokenizer is looked up yet. Writes nothing."""
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(cfg, False)
    try:
        description, where = load_description(cfg.data)
    except FileNotFoundError as err:  # data.train names shards that are not there
        raise ConfigError(str(err)) from None
    if holdout_root(cfg.data) != cfg.data.root:
        cfg.data.root = holdout_root(cfg.data)
        description, where = load_description(cfg.data)
    try:
        resolve_data(cfg.data, description, _needs(cfg), where)
    except ConfigError:
        if description is None and not cfg.data.train and not list(Path(cfg.data.root).glob("*.tar")):
            raise ConfigError(f"data.root={cfg.data.root}: no shards there; write them first (`lit-vqdiff shards write "
                              f"images|sounds|mnist|fashion --out {cfg.data.root}`) or set data.train/data.val") from None
        raise
    if cfg.stage == "stage1":
        resolve_tokenizer(cfg)
    return Plan(cfg, description, where)


def plan(cfg: DictConfig) -> Plan:
    """Resolve ``cfg`` (a copy) against its data and tokenizers; raise ConfigError on anything
    that cannot work. Writes nothing."""
    result = resolve(cfg)
    cfg = result.cfg
    if cfg.stage == "stage1":
        _check_builds(lambda: TokenizerModule(cfg), "the tokenizer")
        return result
    if not cfg.logger.group:
        # One W&B group for this pipeline: the stage-1 runs it starts inherit it.
        cfg.logger.group = artifact_name("pipeline", str(cfg.data.name), cfg.task.replace("->", "-to-"), time.strftime("%Y%m%d-%H%M%S"))
    specs: dict[str, dict[str, Any]] = {}
    for modality in parse_task(cfg.task).tokenized:
        specs[modality] = _plan_tokenizer(result, modality)
    _check_generator(cfg, specs)
    return result


def resolve_tokenizer(cfg: DictConfig) -> None:
    """Fill a stage-1 config's geometry: the image stem's stride from the code grid, the
    spectrogram's FFT size and hop from the sample rate."""
    t, d = cfg.tokenizer, cfg.data
    strides = list(t.downsample) if t.downsample is not None else [2] * (len(t.channel_mult) - 1)
    levels = math.prod(strides)
    if cfg.modality == "image":
        grid = t.grid or max(1, min(AUTO_IMAGE_GRID, d.image_size // 4))
        why = f"the code grid (tokenizer.grid={t.grid or f'{grid}, auto'})"
        if d.image_size % grid:
            raise ConfigError(f"data.image_size={d.image_size}: must be a multiple of {why}")
        factor = d.image_size // grid
        patch = t.patch or factor // levels
        if patch < 1 or patch * levels != factor:
            raise ConfigError(f"tokenizer.patch={patch} x strides {strides} = {patch * levels} does not take "
                              f"data.image_size={d.image_size} to {why}: it needs a total stride of {factor}")
        t.grid, t.patch = grid, patch
        return
    t.patch = t.patch or 1
    if t.frontend == "spectrogram":
        t.n_fft = t.n_fft or 2 * round(SPEC_N_FFT * d.sample_rate / SPEC_RATE / 2)
        t.hop = t.hop or t.n_fft // 4
    elif d.audio_samples % (levels * t.patch):
        raise ConfigError(f"data.audio_samples={d.audio_samples}: the wave frontend needs a multiple of its total stride "
                          f"{levels * t.patch} (tokenizer.patch x tokenizer.downsample)")


def _check_builds(build: Any, what: str) -> Any:
    """Build a model on the meta device (no memory, no time); a ValueError becomes a ConfigError."""
    try:
        with torch.device("meta"):
            return build()
    except ValueError as err:
        raise ConfigError(f"{what} cannot be built with these settings: {err}") from None


def _tokenizer_ref(cfg: DictConfig, modality: str) -> tuple[Path, bool]:
    """(where the task's ``modality`` tokenizer is, whether that was the data set's default)."""
    ref = cfg.tokenizers[modality]
    if ref:
        return Path(ref), False
    return Path(cfg.run.root) / runs.tokenizer_link_name(modality, cfg.data.name), True


def _artifact_file(ref: Path) -> Path:
    return ref / runs.TOKENIZER_ARTIFACT if ref.is_dir() or not ref.suffix else ref


SIGNAL_KEYS = {"image": ("image_size", "channels"), "audio": ("sample_rate", "audio_samples")}


def _signal_mismatch(signal: Mapping[str, Any], data: Any, modality: str) -> list[str]:
    return [f"data.{k}={data[k]} (tokenizer: {signal.get(k, 3 if k == 'channels' else None)})"
            for k in SIGNAL_KEYS[modality] if int(signal.get(k, 3 if k == "channels" else 0)) != int(data[k])]


def _plan_tokenizer(result: Plan, modality: str) -> dict[str, Any]:
    """The spec of the task's ``modality`` tokenizer: an existing artifact's, or the one stage 1 will train."""
    cfg = result.cfg
    ref, default = _tokenizer_ref(cfg, modality)
    artifact = _artifact_file(ref)
    if artifact.exists():
        spec = read_artifact(artifact)["spec"]
        mismatch = _signal_mismatch(spec["signal"], cfg.data, modality)
        if not mismatch:
            cfg.tokenizers[modality] = str(ref)
            result.artifacts[modality] = artifact
            return spec
        if not (default and cfg.tokenizers.train_if_missing):
            raise ConfigError(f"tokenizers.{modality}={ref}: trained on other {modality} sizes than this run's "
                              f"{', '.join(mismatch)}; pass a matching tokenizer or train one")
        print(f"the latest {modality} tokenizer of {cfg.data.name} ({ref}) was trained at other sizes "
              f"({', '.join(mismatch)}): stage 1 trains a new one")
    elif not cfg.tokenizers.train_if_missing:
        raise ConfigError(f"tokenizers.{modality}={ref}: no tokenizer artifact; train one with "
                          f"`make train-stage1 ARGS=\"modality={modality} ...\"` or set tokenizers.train_if_missing=true")
    if _multi_process(cfg):
        raise ConfigError(f"tokenizers.{modality}={ref}: no usable tokenizer artifact; with several processes, "
                          f"train stage 1 as its own command first: `lit-vqdiff train stage1 modality={modality} ...`")
    try:
        stage1 = plan(load_config("stage1", stage1_overrides(cfg, modality)))
    except ConfigError as err:
        raise ConfigError(f"while preparing the stage-1 run for {modality}: {err}") from None
    result.stage1[modality] = stage1
    cfg.tokenizers[modality] = ""  # filled in with the trained run when it exists
    return _spec_of(stage1.cfg)


def _spec_of(stage1_cfg: DictConfig) -> dict[str, Any]:
    with torch.device("meta"):
        return Tokenizer.from_config(stage1_cfg).spec()


def _check_generator(cfg: DictConfig, specs: dict[str, dict[str, Any]]) -> None:
    """Build the generator on the meta device with these tokenizers; name the key at fault."""
    g = cfg.generator
    with torch.device("meta"):
        shapes = {m: tuple(Tokenizer.from_spec(s).code_shape) for m, s in specs.items()}
    for modality, shape in shapes.items():
        bad = [n for n in shape if n % g.patch_size]
        if bad:
            raise ConfigError(f"generator.patch_size={g.patch_size}: does not divide the {modality} codes {shape} "
                              f"(tokenizers.{modality}); use a patch size that divides {bad[0]}")
    dummy = {m: {"spec": s, "checksum": "", "latent_mean": [0.0] * _lookup_dim(s), "latent_std": [1.0] * _lookup_dim(s)}
             for m, s in specs.items()}
    _check_builds(lambda: GeneratorModule(cfg, dummy), f"the generator for task={cfg.task}")


def _lookup_dim(spec: Mapping[str, Any]) -> int:
    q = spec["quantizer"]
    return int(q.get("lookup_dim") or len(q.get("levels") or [1]))


def _multi_process(cfg: DictConfig) -> bool:
    t = cfg.trainer
    return t.devices != 1 or t.num_nodes > 1 or any(s in t.strategy for s in ("ddp", "fsdp"))


def stage1_overrides(cfg: DictConfig, modality: str) -> list[str]:
    """What a stage-2 run hands to the stage-1 run it starts for a missing tokenizer: every
    data key (its resolved values), the hardware, logger, run folder root and seed, then
    ``tokenizers.stage1_args``."""
    # modality=... picks a preset file (conf/modality/), so it stays a plain word.
    passthrough = [f"modality={modality}", override("run.root", cfg.run.root), override("run.seed", cfg.run.seed)]
    passthrough += [override(f"trainer.{k}", cfg.trainer[k]) for k in HARDWARE_KEYS]
    passthrough += [override(f"logger.{k}", v) for k, v in cfg.logger.items() if v is not None]
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for key, value in data.items():
        if key in STAGE_OWN_DATA_KEYS:
            continue
        if isinstance(value, dict):
            passthrough += [override(f"data.{key}.{k}", v) for k, v in value.items()]
        else:
            passthrough.append(override(f"data.{key}", value))
    return passthrough + list(cfg.tokenizers.stage1_args)


# ---------------------------------------------------------------------- training


def train(cfg: DictConfig) -> Path:
    """`lit-vqdiff train stage1|stage2`: plan, then train the stage ``cfg.stage`` names; returns the run folder.

    A stop signal anywhere (see ``callbacks.stop_on_signals``) raises ``Stopped`` with a
    message that says what was kept and which command goes on from there.
    """
    planned = plan(cfg)
    # Seeded before any module is built: its initial weights are part of a reproducible run.
    L.seed_everything(planned.cfg.run.seed, workers=True, verbose=False)
    stage = planned.cfg.stage
    training.completed_fit = None
    with stop_on_signals():
        try:
            return train_stage1(planned) if stage == "stage1" else train_stage2(planned)
        except Stopped as stop:
            done = training.completed_fit
            if done is None or done[0] != stage:
                raise
            # Stopped after its training (export, sampling, evaluation): that part is saved.
            finish = f"`lit-vqdiff train {stage} run.dir={done[1]}` finishes the rest"
            if stop.where:
                message = f"{stop.message}; the training itself is complete and saved: {finish}"
            else:
                message = f"{stop.cause} after the training: it is complete and saved: {finish}"
            raise Stopped(stop.signame, message, where=stop.where or "after the training", again=stop.again) from None


def train_stage1(planned: Plan) -> Path:
    """Fit a tokenizer, export its artifact and point the runs/latest-* links at it."""
    cfg = planned.cfg
    ensure_dataset(cfg.data)
    run_dir, resume = runs.resolve_run(cfg)
    module = TokenizerModule(cfg, verifier=planned.shapes)
    datamodule = ShardDataModule(cfg.data, (cfg.modality,), seed=cfg.run.seed)
    monitor = BEST_STAGE1[cfg.modality]
    trainer = fit(cfg, module, datamodule, run_dir, resume, callbacks=[best_checkpoint(run_dir, *monitor)], keep_logging=True)
    try:
        if trainer.global_rank != 0 or cfg.trainer.fast_dev_run or not runs.is_global_zero():
            return run_dir
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        checksum = export_tokenizer(cfg, module, datamodule, run_dir, metrics)
        link = runs.update_latest(cfg.run.root, runs.latest_link_name("stage1", cfg.modality), run_dir)
        runs.update_latest(cfg.run.root, runs.tokenizer_link_name(cfg.modality, cfg.data.name), run_dir)
        summary = {"stage": "stage1", "modality": cfg.modality, "data": cfg.data.name, **run_figures(trainer, module),
                   **metrics, "best": best_figure(trainer)}
        runs.write_summary(run_dir, summary)
        log_artifact(trainer, tokenizer_artifact(cfg.modality, cfg.data.name), "tokenizer", [run_dir / runs.TOKENIZER_ARTIFACT],
                     {"checksum": checksum, "data": cfg.data.name, **metrics}, aliases=["latest", f"sha-{checksum[:12]}"])
        log_checkpoints(trainer, cfg, run_dir)
        log_summary(trainer, summary)
    finally:
        close_loggers(trainer)
    print(f"stage 1 ({cfg.modality}, {cfg.data.name}) done in {module.train_seconds / 60:.1f} min: {run_dir} ({link.name})")
    for key in sorted(metrics):
        print(f"  {key} = {metrics[key]:.4f}")
    return run_dir


# What "best" means for a run's best.ckpt: (metric, mode).
BEST_STAGE1 = {"image": ("val/psnr", "max"), "audio": ("val/lsd", "min")}


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, quiet about the folder it shares with last.ckpt."""

    @property
    def state_key(self) -> str:
        # Saved under ModelCheckpoint's key, so checkpoints written before this class existed resume their best.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # last.ckpt lives in the same folder, so a resumed run always finds it non-empty.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)


def best_checkpoint(run_dir: Path, monitor: str, mode: str) -> ModelCheckpoint:
    """Keeps ``checkpoints/best.ckpt``: the validation with the best ``monitor`` so far."""
    return BestCheckpoint(dirpath=run_dir / runs.CHECKPOINT_DIR, filename="best", monitor=monitor, mode=mode,
                           save_top_k=1, save_last=False, enable_version_counter=False, auto_insert_metric_name=False)


def best_figure(trainer: Any) -> dict[str, Any] | None:
    """What the best checkpoint scored, and when."""
    keeper = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    if keeper is None or keeper.best_model_score is None:
        return None
    return {"metric": keeper.monitor, "value": round(float(keeper.best_model_score), 4), "checkpoint": keeper.best_model_path}


def best_stage2(planned: Plan) -> tuple[str, str]:
    """The validation figure best.ckpt follows for a stage-2 run on this data."""
    cfg = planned.cfg
    target = parse_task(cfg.task).target.name
    if cfg.sampling.val_n > 0:
        if planned.shapes:
            return "val/exact_match", "max"
        if target == "text":
            return "val/cer", "min"
        if target in SPACES:
            return f"val/fd_{SPACES[target]}", "min"
    return "val/loss", "min"


def tokenizer_artifact(modality: str, data: str) -> str:
    return artifact_name("tokenizer", modality, data)


def log_checkpoints(trainer: Any, cfg: DictConfig, run_dir: Path) -> None:
    """The final and best checkpoints as W&B artifacts (``logger.log_checkpoints``)."""
    if not cfg.logger.log_checkpoints:
        return
    name = artifact_name("checkpoint", run_dir.name)
    for which in ("last", "best"):
        path = run_dir / runs.CHECKPOINT_DIR / f"{which}.ckpt"
        if path.is_file():
            log_artifact(trainer, f"{name}-{which}", "model", [path], {"stage": cfg.stage, "step": trainer.global_step},
                         aliases=["latest"])


@torch.no_grad()
def export_tokenizer(cfg: DictConfig, module: TokenizerModule, datamodule: ShardDataModule, run_dir: Path,
                     metrics: dict[str, float]) -> str:
    """Write <run>/tokenizer.pt: weights, code counts and latent statistics over the val split.

    With ``tokenizer.prune_unused`` the codes no val sample used are dropped first; the
    artifact then holds the old -> new ``remap`` table and counts of the new codes.
    """
    tokenizer = module.tokenizer.cpu().eval()
    q = tokenizer.quantizer
    key = MODALITIES[cfg.modality].batch_key
    counts = torch.zeros(q.num_codebooks, q.codebook_size, dtype=torch.long)
    total, total_sq, n = 0.0, 0.0, 0
    loader = datamodule.val_dataloader()
    try:
        for batch in loader:
            x = batch[key][batch["valid"].bool()]
            codes = tokenizer.encode(x)
            rows = codes.reshape(1, -1) if q.num_codebooks == 1 else codes.movedim(1, 0).reshape(q.num_codebooks, -1)
            counts += torch.stack([torch.bincount(r, minlength=q.codebook_size) for r in rows])
            vec = tokenizer.code_vectors(codes).float()
            dims = [0] + list(range(2, vec.dim()))
            total = total + vec.sum(dims)
            total_sq = total_sq + vec.pow(2).sum(dims)
            n += vec.numel() // vec.shape[1]
    finally:
        loader.close()  # its workers are persistent: the fit's teardown is over, nothing else stops them
    mean = total / max(n, 1)
    std = (total_sq / max(n, 1) - mean.pow(2)).clamp_min(1e-12).sqrt()
    remap = None
    if cfg.tokenizer.prune_unused:
        remap = tokenizer.prune_codes(counts)
        # Dropped codes were never counted, so their counts land harmlessly on index 0.
        counts = torch.zeros(counts.shape[0], q.codebook_size, dtype=torch.long).scatter_add_(1, remap.clamp_min(0), counts)
    config = OmegaConf.to_container(cfg, resolve=True)
    return save_artifact(run_dir / runs.TOKENIZER_ARTIFACT, tokenizer, counts, mean, std, metrics, remap, config)


def ensure_tokenizers(planned: Plan) -> tuple[dict[str, Tokenizer], dict[str, dict[str, Any]]]:
    """The frozen tokenizers of the task, training stage 1 first for those the plan found missing."""
    cfg = planned.cfg
    tokenizers, meta = {}, {}
    for modality in parse_task(cfg.task).tokenized:
        if modality in planned.stage1:
            print(f"no usable {modality} tokenizer for {cfg.data.name}: training stage 1 ({modality}) first")
            run_dir = train_stage1(planned.stage1[modality])
            planned.artifacts[modality] = run_dir / runs.TOKENIZER_ARTIFACT
            cfg.tokenizers[modality] = str(run_dir)
        tok, info = load_tokenizer(planned.artifacts[modality])
        tokenizers[modality] = tok
        meta[modality] = {"spec": info["spec"], "checksum": info["checksum"], "path": info["path"],
                          "latent_mean": info["latent_mean"].tolist(), "latent_std": info["latent_std"].tolist()}
    return tokenizers, meta


def _rank_zero_of_node() -> bool:
    return int(os.environ.get("RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0


def prepare_token_cache(cfg: DictConfig, tokenizers: dict[str, Tokenizer], meta: dict[str, dict[str, Any]],
                        wait_s: float = CACHE_WAIT_S) -> DictConfig | None:
    """The data config of the token cache for these tokenizers and this data, building the
    cache first if it is missing (rank 0; other processes wait); None when the task needs no codes."""
    if not tokenizers:
        return None
    checksums = {m: meta[m]["checksum"] for m in tokenizers}
    sentence_states = parse_task(cfg.task).cached(cfg.generator).get("text") == "states"
    if sentence_states:
        checksums["text"] = f"minilm-{sentence_encoder_checksum()}"
    fingerprint = data_fingerprint(cfg.data)
    cache = Path(cfg.tokenizers.cache_dir) if cfg.tokenizers.cache_dir else default_cache_dir(cfg.data, checksums, fingerprint)
    with stop_on_signals():
        if check_cache(cache, checksums, fingerprint):
            pass
        elif not _rank_zero_of_node():
            try:
                wait_for_rank_zero(lambda: check_cache(cache, checksums, fingerprint), cache, f"the token cache {cache}", wait_s)
            except Stopped as stop:
                raise stop.during(f"while waiting for rank 0 to build the token cache {cache}", "nothing to keep") from None
        else:
            cache.parent.mkdir(parents=True, exist_ok=True)
            # Two runs starting at once (e.g. two sweep agents) build it once: the second
            # waits on the lock, then finds the cache complete.
            with open(cache.parent / f".{cache.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not check_cache(cache, checksums, fingerprint):
                    print(f"building the token cache {cache} (once for these tokenizers and data)")
                    try:
                        # Written whole or not at all (a staged folder); a failure or a stop is
                        # reported beside it to the ranks waiting for it.
                        with reported_to_waiters(cache):
                            summary = build_cache(cfg.data, tokenizers, checksums, cache, fingerprint=fingerprint,
                                                  sentence_states=sentence_states)
                    except Stopped as stop:
                        raise stop.during(f"while building the token cache {cache}",
                                          "nothing of it was kept; the next run builds it again") from None
                    print(f"token cache: {json.dumps(summary['splits'])}")
    data = copy.deepcopy(cfg.data)
    data.root, data.train, data.val, data.sizes = str(cache), "", "", ""
    return data


def tokenize(cfg: DictConfig) -> dict[str, Any]:
    """`lit-vqdiff tokenize`: make sure the token cache of the task's tokenizers exists."""
    planned = plan(cfg)
    if not parse_task(planned.cfg.task).tokenized:
        raise ConfigError(f"task={planned.cfg.task} uses no tokenizer: there is nothing to cache")
    ensure_dataset(planned.cfg.data)
    tokenizers, meta = ensure_tokenizers(planned)
    data = prepare_token_cache(planned.cfg, tokenizers, meta)
    assert data is not None
    return {"cache": data.root, "tokenizers": {m: meta[m]["checksum"][:12] for m in tokenizers}}


def validation_scorer(planned: Plan, conditions: Conditions | None) -> Scorer | None:
    """How validation scores its conditions: as `eval` does, its reference features embedded once,
    the data set's classifier trained (and cached) now rather than mid-run."""
    if conditions is None:
        return None
    cfg = planned.cfg
    target = parse_task(cfg.task).target
    spec = DecodeSpec.from_config(cfg.data, (target.name,))
    real = not planned.shapes and target.name in ("image", "audio")
    second = real_items(cfg.data, "train", target, spec, len(conditions)) if real else None
    labelled = real and target.name == "image" and bool((planned.description or {}).get("classes"))
    classifier = data_classifier(cfg.data.root) if labelled and any(c.label is not None for c in conditions.items) else None
    scorer = Scorer(target.name, spec.sample_rate, real=real, second_real=second, classifier=classifier,
                    holdout=cfg.data.shapes.holdout != "none")
    scorer.fix_references([decoded_reference(target, c, spec) for c in conditions.items])
    return scorer


def validation_conditions(planned: Plan) -> Conditions | None:
    """The held-out conditions every validation samples (``sampling.val_n`` of them)."""
    cfg = planned.cfg
    if cfg.sampling.val_n <= 0:
        return None
    return from_val_shards(cfg.data, parse_task(cfg.task), cfg.sampling.val_n, planned.description)


def train_stage2(planned: Plan) -> Path:
    """Fit the generator, then sample ``sampling.n`` held-out conditions and print the evaluation."""
    cfg = planned.cfg
    ensure_dataset(cfg.data)
    tokenizers, meta = ensure_tokenizers(planned)
    cached = prepare_token_cache(cfg, tokenizers, meta) if cfg.tokenizers.cache else None
    run_dir, resume = runs.resolve_run(cfg)
    module = GeneratorModule(cfg, meta)
    module.load_tokenizers(tokenizers)
    module.validation_set = validation_conditions(planned)
    module.scorer = validation_scorer(planned, module.validation_set)
    task = parse_task(cfg.task)
    datamodule = ShardDataModule(cached or cfg.data, task.inputs(cached is not None, cfg.generator), seed=cfg.run.seed)
    keepers = [EMAWeights(decay=cfg.generator.ema_decay), best_checkpoint(run_dir, *best_stage2(planned))]
    trainer = fit(cfg, module, datamodule, run_dir, resume, callbacks=keepers, keep_logging=True)
    try:
        if trainer.global_rank != 0 or cfg.trainer.fast_dev_run or not runs.is_global_zero():
            return run_dir
        for modality, info in meta.items():  # lineage: the tokenizer artifacts this generator reads
            declare_input(trainer, tokenizer_artifact(modality, cfg.data.name), f"sha-{info['checksum'][:12]}", "tokenizer")
        runs.update_latest(cfg.run.root, runs.latest_link_name("stage2"), run_dir)
        module.eval()  # the EMA weights: the averaging callback copied them in at the end of fit
        summary: dict[str, Any] = {"stage": "stage2", "task": cfg.task, "data": cfg.data.name, **run_figures(trainer, module),
                                   "best": best_figure(trainer)}
        if cfg.sampling.n > 0:
            out = run_dir / "samples"
            conditions = from_val_shards(cfg.data, task, cfg.sampling.n, planned.description).cycled(cfg.sampling.n)
            summary["sampling"] = sample_to_dir(module, conditions, out, seed=cfg.run.seed)
            summary["eval"] = evaluate_dir(out)
            if cfg.data.shapes.holdout != "none" and planned.shapes:
                # The combinations training never saw, on their own, with as many samples.
                heldout = HOLDOUT_LABELS[cfg.data.shapes.holdout]
                conditions = from_val_shards(cfg.data, task, cfg.sampling.n, planned.description, labels=heldout)
                out = run_dir / "samples-heldout"
                summary["sampling_heldout"] = sample_to_dir(module, conditions.cycled(cfg.sampling.n), out, seed=cfg.run.seed)
                summary["eval_heldout"] = evaluate_dir(out)
        runs.write_summary(run_dir, summary)
        log_checkpoints(trainer, cfg, run_dir)
        log_summary(trainer, summary)
    finally:
        close_loggers(trainer)
    print(json.dumps(summary, indent=2))
    print(f"stage 2 ({cfg.task}, {cfg.data.name}) done in {module.train_seconds / 60:.1f} min; samples in {run_dir / 'samples'}")
    return run_dir


# ---------------------------------------------------------------------- sampling


def load_generator_module(path: Path | str | None = None, map_location: str = "cpu") -> GeneratorModule:
    """A GeneratorModule (EMA weights, eval mode) from a checkpoint or a run folder."""
    path = Path(path or Path("runs") / runs.latest_link_name("stage2"))
    if path.is_dir() or (path.is_symlink() and path.resolve().is_dir()):
        path = runs.checkpoint_path(runs.resolve_run_dir(path))
    if not path.exists() and not path.with_name(path.name + ".prev").exists():
        raise FileNotFoundError(f"no stage-2 checkpoint at {path}; train one with `make train-stage2` or pass --ckpt")
    ckpt = load_checkpoint_file(path, map_location=map_location)
    hp = ckpt.get("hyper_parameters") or {}
    if "config" not in hp or hp["config"].get("stage") != "stage2":
        raise ValueError(f"{path}: not a stage-2 checkpoint (no stage2 config in its hyper-parameters)")
    saved = hp["config"]
    cfg = saved_config(OmegaConf.to_container(saved) if OmegaConf.is_config(saved) else dict(saved), source=str(path))
    module = GeneratorModule(cfg, hp.get("tokenizers", {}))
    # "state_dict" holds the EMA weights (the weight-averaging callback puts them there).
    module.load_state_dict(ckpt["state_dict"])
    module.checkpoint_path = str(path)
    return module.eval()


@torch.no_grad()
def sample_to_dir(module: GeneratorModule, conditions: Conditions, out: Path | str, batch_size: int = SAMPLE_BATCH,
                  seed: int = 0) -> dict[str, Any]:
    """Generate one sample per condition into ``out``: the outputs, the conditioning files
    (``cond/``), the held-out references (``refs/``) and ``manifest.jsonl``."""
    if not len(conditions):
        raise ValueError("no conditions to sample")
    out = Path(out)
    cfg, task, spec = module.cfg, module.task, module.spec
    generator = torch.Generator(module.device).manual_seed(seed)
    lines: list[dict[str, Any]] = []
    with stop_on_signals():
        try:
            out.mkdir(parents=True, exist_ok=True)
            # The manifest marks a folder complete, so it goes first and comes back last: a
            # sampling that is stopped or fails leaves no manifest for files it did not finish.
            for stale in (MANIFEST, SAMPLES_INFO):
                (out / stale).unlink(missing_ok=True)
            for start in progress(range(0, len(conditions), batch_size), f"sampling into {out}", unit="batch"):
                items = module.sample_items(conditions, start, start + batch_size, generator=generator)
                for index, (condition, item) in enumerate(zip(conditions.items[start : start + batch_size], items), start=start):
                    lines.append(_write_sample(out, index, condition, item, task, spec))
        except Stopped as stop:
            raise stop.during(f"while sampling into {out}", f"{len(lines)} of {len(conditions)} samples written and "
                                                            f"no {MANIFEST}; sample again") from None
    s = cfg.sampling
    decoding = module.decoding()
    settings: dict[str, Any] = {"guidance": s.guidance, "temperature": decoding["temperature"]}
    if task.target.name == "text":
        settings["order"] = decoding["order"]
    settings.update({"sampler": s.sampler, "ddim_steps": s.ddim_steps} if cfg.generator.objective == "gaussian" else {"steps": s.steps})
    summary = {"out": str(out), "task": task.name, "n": len(lines), "conditions": conditions.source,
               "objective": cfg.generator.objective, **settings}
    info = {**summary, "data": OmegaConf.to_container(cfg.data, resolve=True), "sample_rate": spec.sample_rate}
    _write_atomically(out / SAMPLES_INFO, json.dumps(info, indent=1) + "\n")
    _write_atomically(out / MANIFEST, "".join(json.dumps(line) + "\n" for line in lines))  # last: the folder is whole
    return summary


def _write_sample(out: Path, index: int, condition: Any, item: Any, task: Any, spec: Any) -> dict[str, Any]:
    """Write one sample, its conditioning file and reference; returns its manifest entry."""
    ident = f"{index:06d}"
    entry: dict[str, Any] = {"id": ident, "task": task.name, "condition": dict(condition.entry)}
    if condition.file is not None:
        ext, data = condition.file
        (out / "cond").mkdir(exist_ok=True)
        (out / "cond" / f"{ident}.{ext}").write_bytes(data)
        entry["condition"] = {task.source.name: f"cond/{ident}.{ext}"}
    if condition.attributes:
        entry["attributes"] = condition.attributes
    if condition.label is not None:
        entry["label"] = condition.label
    reference = decoded_reference(task.target, condition, spec)
    if reference is not None:
        entry["reference"] = task.target.write(out / "refs" / ident, reference, spec).relative_to(out).as_posix()
        entry["source_key"] = condition.key
    entry["output"] = task.target.write(out / ident, item, spec).relative_to(out).as_posix()
    return entry


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def sample_command(n: int, out: str, ckpt: str | None, overrides: list[str], task: str | None = None,
                   prompts: list[str] | None = None, inputs: str | None = None, classes: str | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """What `lit-vqdiff sample` does: load, apply sampling.* overrides, generate, write.

    Conditions: the given ``prompts``, ``inputs`` (a folder) or ``classes`` (ids or names),
    each sampled ``n`` times; else the first ``n`` held-out samples of the run's data set.
    """
    bad = [o for o in overrides if not o.startswith("sampling.")]
    if bad:
        raise ConfigError(f"sample takes only sampling.* overrides, got {bad}")
    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    given = [name for name, value in (("--prompt/--prompts", prompts), ("--inputs", inputs), ("--classes", classes)) if value]
    if len(given) > 1:
        raise ConfigError(f"pass one source of conditions, not {' and '.join(given)}")
    apply_overrides(OmegaConf.structured(Stage2Config), overrides)  # fail on bad values before loading anything
    module = load_generator_module(ckpt)
    if task and task != module.cfg.task:
        raise ValueError(f"checkpoint {module.checkpoint_path} was trained for {module.cfg.task}, not {task}; "
                         f"pass its run with --ckpt, or train this task with `make train-stage2 ARGS=\"task={task}\"`")
    module.cfg = apply_overrides(module.cfg, overrides)
    source = module.task.source.name
    wanted = {"text": "--prompt/--prompts", "class": "--classes"}.get(source, "--inputs")
    if given and given[0] != wanted:
        raise ConfigError(f"task {module.task.name} is conditioned on {source}: pass {wanted}, not {given[0]}")
    description, _ = load_description(module.cfg.data)
    if prompts:
        conditions = from_prompts(prompts).repeated(n)
    elif inputs:
        conditions = from_inputs(inputs, module.task.source).repeated(n)
    elif classes:
        conditions = from_classes(classes, module.cfg.data.num_classes, description).repeated(n)
    else:
        conditions = from_val_shards(module.cfg.data, module.task, n, description).cycled(n)
    summary = sample_to_dir(module, conditions, out, seed=seed)
    summary["checkpoint"] = module.checkpoint_path
    return summary
