"""Stage 2: the Diffusion Transformer over frozen tokenizer codes, and `train stage2`.

A training step turns the batch into target tokens and a condition, drops the
condition with probability ``generator.cond_dropout`` (the unconditional branch of
classifier-free guidance) and minimizes the diffusion loss: cross-entropy on masked
codes (mask objective) or noise/velocity regression on normalized code vectors
(Gaussian objective). Validation measures the loss and, on a fixed set of shapes-v1
conditions, samples with the EMA weights and reports verifier accuracy.
"""

from __future__ import annotations

import warnings
import json
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torchmetrics import MeanMetric

from .. import media
from ..config import override
from ..data import shapes, verify
from ..diffusion.gaussian import GaussianDiffusion
from ..diffusion.masked import MaskedDiffusion
from ..nn.conditions import ByteTextEncoder, ClassCondition, CodeEncoder, Condition, drop_mask
from ..nn.dit import DiT, trunk_size
from ..nn.tokenizer import Tokenizer
from ..tasks import TokenSpace, parse_task, raw_batch, stage_inputs, token_space
from .base import StageModule

MEDIA_ITEMS = 16

# The frozen tokenizers stay in eval mode on purpose; Lightning's warning about modules
# in eval mode at the start of training would fire on every stage-2 run.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


class GeneratorModule(StageModule):
    def __init__(self, cfg: DictConfig, tokenizers: dict[str, Tokenizer], tokenizer_meta: dict[str, dict[str, Any]]):
        super().__init__(cfg, extra_hparams={"tokenizers": tokenizer_meta})
        g = cfg.generator
        self.source_modality, self.target_modality = parse_task(cfg.task)
        self.gaussian = g.objective == "gaussian"
        if self.gaussian and self.target_modality not in ("image", "audio"):
            raise ValueError(f"generator.objective=gaussian needs an image or audio target; task {cfg.task} targets {self.target_modality}")
        # Frozen, eval-mode tokenizers travel inside the module so that a stage-2
        # checkpoint alone can sample (`lit-vqdiff sample --ckpt ...`).
        self.tokenizers = nn.ModuleDict(tokenizers)
        self.tokenizers.eval().requires_grad_(False)
        text_bytes = cfg.data.text_bytes
        self.source = token_space(self.source_modality, dict(self.tokenizers), text_bytes)
        self.target = token_space(self.target_modality, dict(self.tokenizers), text_bytes)
        width, depth, heads = trunk_size(g.preset, g.width, g.depth, g.heads)
        self.cond_encoder = self._condition_encoder(self.source, width, heads)
        class_cond = self.source.modality == "class"
        common = dict(width=width, depth=depth, heads=heads, pos=g.pos,
                      cond_dim=None if class_cond else width, pooled_cond_dim=None if class_cond else width,
                      num_classes=shapes.NUM_CLASSES if class_cond else None)
        if self.gaussian:
            tok = self.target.tokenizer
            assert tok is not None
            self.dit = DiT(input="latent", in_channels=tok.quantizer.lookup_dim, patch_size=g.patch_size,
                           seq_shape=tok.latent_shape, learn_sigma=g.gaussian.learn_sigma, **common)
            self.diffusion: Any = GaussianDiffusion(g.gaussian.num_steps, g.gaussian.schedule, g.gaussian.prediction, g.gaussian.learn_sigma)
            stats = tokenizer_meta[self.target_modality]
            shape = (1, -1) + (1,) * len(tok.latent_shape)
            self.register_buffer("latent_mean", torch.tensor(stats["latent_mean"]).reshape(shape))
            self.register_buffer("latent_std", torch.tensor(stats["latent_std"]).reshape(shape))
        else:
            patch = g.text_patch_size if self.target.modality == "text" else g.patch_size
            self.dit = DiT(input="tokens", vocab_size=self.target.vocab, seq_shape=self.target.shape, patch_size=patch, **common)
            self.diffusion = MaskedDiffusion(self.target.vocab, schedule=g.mask_schedule, label_smoothing=g.label_smoothing)
        if cfg.trainer.compile:
            # In place (nn.Module.compile), so checkpoints keep the eager parameter names.
            self.dit.compile()
            self.cond_encoder.compile()
        self.val_loss = MeanMetric()
        self._val_conditions: dict[str, torch.Tensor] | None = None
        self._val_readings: dict[str, float] | None = None

    def _condition_encoder(self, source: TokenSpace, width: int, heads: int) -> nn.Module:
        g = self.cfg.generator
        if source.modality == "class":
            return ClassCondition(shapes.NUM_CLASSES)
        if source.modality == "text":
            return ByteTextEncoder(width, g.cond_depth, heads, source.shape[0], patch=g.text_patch_size)
        # Codes as a condition are grouped like codes as a target.
        return CodeEncoder(source.vocab, source.shape, width, g.cond_depth, heads, patch=g.patch_size)

    # ------------------------------------------------------------------ pieces

    def condition(self, batch: dict[str, Any], drop: torch.Tensor | None = None) -> Condition:
        return self.cond_encoder(self.source.tokens(batch), drop)

    def to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> normalized code vectors, the Gaussian objective's data."""
        tok = self.target.tokenizer
        assert tok is not None
        return (tok.code_vectors(codes).float() - self.latent_mean) / self.latent_std

    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        tok = self.target.tokenizer
        assert tok is not None
        return tok.quantizer.encode_vectors(latents.float() * self.latent_std + self.latent_mean)

    # ------------------------------------------------------------------ training

    def diffusion_loss(self, batch: dict[str, Any], drop: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        target = self.target.tokens(batch)
        cond = self.condition(batch, drop)
        x0 = self.to_latents(target) if self.gaussian else target
        return self.diffusion.loss(self.dit, x0, cond)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        # important! dropping the condition in training is what gives the model an
        # unconditional branch for classifier-free guidance at sampling time.
        drop = drop_mask(len(self.source.tokens(batch)), self.cfg.generator.cond_dropout, device=self.device)
        loss, stats = self.diffusion_loss(batch, drop)
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True)
        if "accuracy" in stats:
            self.log("train/token_accuracy", stats["accuracy"], on_step=True)
        return self.finite_or_skip(loss)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for name, p in self.named_parameters() if not name.startswith("tokenizers.")]
        opt = self.build_optimizer(params)
        return {"optimizer": opt, "lr_scheduler": self.scheduler(opt)}

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], steps: int | None = None, guidance: float | None = None,
                 temperature: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Target tokens for the conditions in ``batch`` (raw inputs or cached codes)."""
        s = self.cfg.sampling
        steps = steps or s.steps
        guidance = s.guidance if guidance is None else guidance
        decoding = self.decoding()
        temperature = decoding["temperature"] if temperature is None else temperature
        source = self.source.tokens(batch)
        n = source.shape[0]
        cond = self.cond_encoder(source)
        uncond = self.cond_encoder(source, torch.ones(n, dtype=torch.bool, device=source.device))
        if self.gaussian:
            tok = self.target.tokenizer
            assert tok is not None
            shape = (n, tok.quantizer.lookup_dim, *tok.latent_shape)
            if s.sampler == "ddim":
                latents = self.diffusion.ddim_sample(self.dit, shape, cond, uncond, guidance=guidance, steps=s.ddim_steps, generator=generator, device=self.device)
            else:
                latents = self.diffusion.ddpm_sample(self.dit, shape, cond, uncond, guidance=guidance, steps=s.ddpm_steps, generator=generator, device=self.device)
            return self.from_latents(latents)
        return self.diffusion.sample(self.dit, (n, *self.target.shape), cond, uncond, steps=steps, temperature=temperature,
                                     guidance=guidance, choice_temperature=s.choice_temperature,
                                     order=decoding["order"], generator=generator, device=self.device)

    def decoding(self) -> dict[str, Any]:
        """Mask-decoding temperature and order for this target (captions have their own)."""
        s = self.cfg.sampling
        if self.target.modality == "text":
            return {"temperature": s.text_temperature, "order": s.text_order}
        return {"temperature": s.temperature, "order": "confidence"}

    def decode(self, tokens: torch.Tensor) -> Any:
        return self.target.decode(tokens)

    def read_outputs(self, outputs: Any) -> list[verify.Reading]:
        """Verifier readings of decoded outputs of the target modality."""
        if self.target_modality == "image":
            return verify.verify_images(media.to_uint8_images(outputs))
        if self.target_modality == "audio":
            return verify.verify_sounds(outputs.float().cpu().numpy(), self.cfg.data.sample_rate)
        return verify.verify_captions(outputs)

    # ------------------------------------------------------------------ validation

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, _ = self.diffusion_loss(batch, None)
        self.val_loss.update(loss.detach())
        if batch_idx == 0 and self.cfg.sampling.val_n > 0:
            # Sampled here rather than at epoch end: this is where the EMA weights are in place.
            self._val_readings = self.sample_fixed_conditions()

    def fixed_condition_samples(self) -> list[shapes.Sample]:
        return [shapes.make_sample(self.cfg.data.shapes.val_seed, i) for i in range(self.cfg.sampling.val_n)]

    def sample_fixed_conditions(self) -> dict[str, float]:
        samples = self.fixed_condition_samples()
        if self._val_conditions is None:
            self._val_conditions = raw_batch(samples, self.source_modality, self.cfg.data.text_bytes)
        batch = {k: v.to(self.device) for k, v in self._val_conditions.items()}
        generator = torch.Generator(self.device).manual_seed(self.cfg.run.seed)
        outputs = self.decode(self.generate(batch, generator=generator))
        scores = verify.score(self.read_outputs(outputs), [s.attributes.as_dict() for s in samples])
        self.collect_media(samples, outputs)
        return scores

    def on_validation_epoch_end(self) -> None:
        logs = {"val/loss": self.val_loss.compute()}
        self.val_loss.reset()
        if self._val_readings is not None:
            logs["val/exact_match"] = torch.tensor(self._val_readings["exact_match"])
            for key in shapes.ATTRIBUTES:
                logs[f"val/acc_{key}"] = torch.tensor(self._val_readings[key])
            self._val_readings = None
        self.log_dict(logs)

    def collect_media(self, samples: list[shapes.Sample], outputs: Any) -> None:
        k = min(MEDIA_ITEMS, len(samples))
        if self.target_modality == "image":
            grid = media.image_grid(media.to_uint8_images(outputs[:k]), ncols=8)
            self.media["val/samples"] = ("image", grid)
        elif self.target_modality == "audio":
            waves = [w.float().cpu().numpy() for w in outputs[:4]]
            self.media["val/sounds"] = ("audio", waves, self.cfg.data.sample_rate)
            self.media["val/spectrograms"] = ("image", np.concatenate([media.spectrogram_image(w) for w in waves], axis=1))
        else:
            self.text_samples = list(zip([s.caption for s in samples[:k]], outputs[:k]))


# ---------------------------------------------------------------------- train stage2

# Precision is not handed over: each stage keeps its own default (stage 1 trains in fp32,
# the tokenizer `make train-stage1` makes and the README measures); stage1_args can set it.
HARDWARE_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "threads")
DATA_KEYS = ("name", "root", "train", "val", "num_workers")


def _multi_process(cfg: DictConfig) -> bool:
    t = cfg.trainer
    return t.devices != 1 or t.num_nodes > 1 or any(s in t.strategy for s in ("ddp", "fsdp"))


def stage1_overrides(cfg: DictConfig, modality: str) -> list[str]:
    """What a stage-2 run hands to the stage-1 run it starts for a missing tokenizer: the
    same data, hardware, logger, run folder root and seed, then ``tokenizers.stage1_args``."""
    # modality=... picks a preset file (conf/modality/), so it stays a plain word.
    passthrough = [f"modality={modality}", override("run.root", cfg.run.root), override("run.seed", cfg.run.seed)]
    passthrough += [override(f"trainer.{k}", cfg.trainer[k]) for k in HARDWARE_KEYS]
    passthrough += [override(f"logger.{k}", v) for k, v in cfg.logger.items() if v is not None]
    passthrough += [override(f"data.{k}", v) for k, v in cfg.data.items() if k in DATA_KEYS]
    return passthrough + list(cfg.tokenizers.stage1_args)


def ensure_tokenizers(cfg: DictConfig) -> tuple[dict[str, Tokenizer], dict[str, dict[str, Any]]]:
    """Load the frozen tokenizers the task needs, training stage 1 first where one is missing."""
    from pathlib import Path

    from ..artifact import load_tokenizer
    from ..tasks import needed_tokenizers
    from ..training import stage_config_for
    from .tokenizer import train_stage1

    tokenizers, meta = {}, {}
    for modality in needed_tokenizers(cfg.task):
        ref = Path(cfg.tokenizers[modality])
        artifact = ref / "tokenizer.pt" if ref.is_dir() or not ref.suffix else ref
        if not artifact.exists():
            if not cfg.tokenizers.train_if_missing:
                raise FileNotFoundError(f"tokenizers.{modality}={ref}: no tokenizer artifact; train one with "
                                        f"`make train-stage1 ARGS=\"modality={modality}\"` or set tokenizers.train_if_missing=true")
            if _multi_process(cfg):
                raise FileNotFoundError(f"tokenizers.{modality}={ref}: no tokenizer artifact; with several processes, "
                                        f"train stage 1 as its own command first: `lit-vqdiff train stage1 modality={modality} ...`")
            print(f"no {modality} tokenizer at {ref}: training stage 1 ({modality}) first")
            artifact = train_stage1(stage_config_for("stage1", stage1_overrides(cfg, modality))) / "tokenizer.pt"
        tok, info = load_tokenizer(artifact)
        tokenizers[modality] = tok
        meta[modality] = {"spec": info["spec"], "checksum": info["checksum"], "path": info["path"],
                          "latent_mean": info["latent_mean"].tolist(), "latent_std": info["latent_std"].tolist()}
    return tokenizers, meta


def prepare_token_cache(cfg: DictConfig, tokenizers: dict[str, Tokenizer], meta: dict[str, dict[str, Any]]) -> DictConfig | None:
    """The data config of the token cache for these tokenizers, building the cache first
    if it is missing (rank 0; other processes wait); None when the task needs no codes."""
    import copy
    import fcntl
    import os
    import time
    from pathlib import Path

    from ..data.tokens import build_cache, check_cache, default_cache_dir

    if not tokenizers:
        return None
    checksums = {m: meta[m]["checksum"] for m in tokenizers}
    cache = Path(cfg.tokenizers.cache_dir) if cfg.tokenizers.cache_dir else default_cache_dir(cfg.data, checksums)
    if not check_cache(cache, checksums):
        if int(os.environ.get("RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            cache.parent.mkdir(parents=True, exist_ok=True)
            # Two runs starting at once (e.g. two sweep agents) build it once: the second
            # waits on the lock, then finds the cache complete.
            with open(cache.parent / f".{cache.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not check_cache(cache, checksums):
                    print(f"building the token cache {cache} (once for these tokenizers)")
                    summary = build_cache(cfg.data, tokenizers, checksums, cache)
                    print(f"token cache: {json.dumps(summary['splits'])}")
        else:
            while not check_cache(cache, checksums):
                time.sleep(1.0)
    data = copy.deepcopy(cfg.data)
    data.root, data.train, data.val, data.sizes = str(cache), "", "", ""
    return data


def tokenize_command(cfg: DictConfig) -> dict[str, Any]:
    """`lit-vqdiff tokenize`: make sure the token cache of the task's tokenizers exists."""
    from ..data.prepare import ensure_dataset

    ensure_dataset(cfg.data)
    tokenizers, meta = ensure_tokenizers(cfg)
    if not tokenizers:
        raise ValueError(f"task {cfg.task} uses no tokenizer: there is nothing to cache")
    data = prepare_token_cache(cfg, tokenizers, meta)
    assert data is not None
    return {"cache": data.root, "tokenizers": {m: meta[m]["checksum"][:12] for m in tokenizers}}


def train_stage2(cfg: DictConfig) -> Any:
    """Fit the generator, then sample ``sampling.n`` conditions and print the evaluation."""
    from .. import runs
    from ..callbacks import EMAWeights
    from ..data.datamodule import ShardDataModule
    from ..data.prepare import ensure_dataset
    from ..evaluate import evaluate_dir
    from ..sampling import sample_to_dir
    from ..training import fit, is_global_zero, resolve_run, run_figures, write_summary

    ensure_dataset(cfg.data)
    tokenizers, meta = ensure_tokenizers(cfg)
    cached = prepare_token_cache(cfg, tokenizers, meta) if cfg.tokenizers.cache else None
    run_dir, resume = resolve_run(cfg)
    module = GeneratorModule(cfg, tokenizers, meta)
    datamodule = ShardDataModule(cached or cfg.data, stage_inputs(cfg.task, cached is not None), seed=cfg.run.seed)
    ema = EMAWeights(decay=cfg.generator.ema_decay)
    trainer = fit(cfg, module, datamodule, run_dir, resume, callbacks=[ema])
    if trainer.global_rank != 0 or cfg.trainer.fast_dev_run or not is_global_zero():
        return run_dir
    runs.update_latest(cfg.run.root, "latest-stage2", run_dir)
    module.eval()  # the EMA weights: the averaging callback copied them in at the end of fit
    summary: dict[str, Any] = {"stage": "stage2", "task": cfg.task, **run_figures(trainer, module)}
    if cfg.sampling.n > 0:
        out = run_dir / "samples"
        summary["sampling"] = sample_to_dir(module, cfg.sampling.n, out, seed=cfg.run.seed)
        summary["eval"] = evaluate_dir(out)
    write_summary(run_dir, summary)
    print(json.dumps(summary, indent=2))
    print(f"stage 2 ({cfg.task}) done in {module.train_seconds / 60:.1f} min; samples in {run_dir / 'samples'}")
    return run_dir
