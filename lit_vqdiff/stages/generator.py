"""Stage 2: the Diffusion Transformer over frozen tokenizer codes, as a LightningModule.

A training step turns the batch into target tokens and a condition, drops the
condition with probability ``generator.cond_dropout`` (the unconditional branch of
classifier-free guidance) and minimizes the diffusion loss: cross-entropy on the clean
codes behind masked ones (mask), behind uniformly resampled ones (uniform, D3PM) or both
(mask_replace, VQ-Diffusion), or noise/velocity regression on normalized code vectors
(gaussian). Validation measures the loss and, when the run hands it held-out
conditions (``validation_set``), samples them with the EMA weights and scores the
outputs as `eval` does (``eval.scoring.Scorer``), plus media of what it generated.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torchmetrics import MeanMetric

from ..diffusion.gaussian import GaussianDiffusion
from ..diffusion.mask_replace import MaskReplaceDiffusion
from ..diffusion.masked import MaskedDiffusion
from ..diffusion.uniform import UniformDiffusion
from ..eval.conditions import Conditions, decoded_reference
from ..eval.scoring import Scorer
from ..modalities import DecodeSpec, parse_task
from ..nn.conditions import drop_mask
from ..nn.dit import Condition, DiT, trunk_size
from ..nn.tokenizer import Tokenizer
from .base import StageModule

TABLE_ROWS = 32  # samples per validation table
# The frozen tokenizers stay in eval mode on purpose; Lightning's warning about modules
# in eval mode at the start of training would fire on every stage-2 run.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


def discrete_process(g: Any, vocab: int) -> Any:
    """The discrete diffusion ``generator.objective`` names, over ``vocab`` codes (DiT's mask id is ``vocab``)."""
    d = g.discrete
    if g.objective == "uniform":
        return UniformDiffusion(vocab, d.num_steps, schedule=d.schedule, hybrid=d.hybrid)
    if g.objective == "mask_replace":
        return MaskReplaceDiffusion(vocab, d.num_steps, schedule=d.schedule, replace=d.replace, hybrid=d.hybrid)
    return MaskedDiffusion(vocab, schedule=g.mask_schedule, label_smoothing=g.label_smoothing)


class GeneratorModule(StageModule):
    def __init__(self, config: DictConfig | dict[str, Any], tokenizers: dict[str, dict[str, Any]]):
        """``config``: the resolved stage-2 config; ``tokenizers``: per coded modality of the
        task, its artifact's ``spec``, ``checksum`` and latent statistics. The frozen
        tokenizers are built from their specs; their weights come from ``load_tokenizers``
        or, loading a checkpoint, from its state dict."""
        super().__init__(config, extra_hparams={"tokenizers": tokenizers})
        cfg, g = self.cfg, self.cfg.generator
        self.task = parse_task(cfg.task)
        self.gaussian = g.objective == "gaussian"
        self.spec = DecodeSpec.from_config(cfg.data, (self.task.source.name, self.task.target.name))
        # Frozen, eval-mode tokenizers travel inside the module so that a stage-2
        # checkpoint alone can sample (`lit-vqdiff sample --ckpt ...`).
        self.tokenizers = nn.ModuleDict({m: Tokenizer.from_spec(meta["spec"]) for m, meta in tokenizers.items()})
        self.tokenizers.eval().requires_grad_(False)
        frozen = dict(self.tokenizers)
        self.source = self.task.source.space(frozen.get(self.task.source.name), self.spec, g)
        self.target = self.task.target.space(frozen.get(self.task.target.name), self.spec)
        width, depth, heads = trunk_size(g.preset, g.width, g.depth, g.heads)
        self.cond_encoder = self.task.source.condition_encoder(self.source, g, width, heads, self.spec)
        common = dict(width=width, depth=depth, heads=heads, pos=g.pos, **self.task.source.dit_condition(width, self.spec))
        if self.gaussian:
            tok = self.target.tokenizer
            assert tok is not None
            self.dit = DiT(input="latent", in_channels=tok.quantizer.lookup_dim, patch_size=g.patch_size,
                           seq_shape=tok.latent_shape, learn_sigma=g.gaussian.learn_sigma, **common)
            self.diffusion: Any = GaussianDiffusion(g.gaussian.num_steps, g.gaussian.schedule, g.gaussian.prediction, g.gaussian.learn_sigma)
            stats = tokenizers[self.task.target.name]
            shape = (1, -1) + (1,) * len(tok.latent_shape)
            self.register_buffer("latent_mean", torch.tensor(stats["latent_mean"]).reshape(shape))
            self.register_buffer("latent_std", torch.tensor(stats["latent_std"]).reshape(shape))
        else:
            patch = g.text_patch_size if self.task.target.name == "text" else g.patch_size
            self.dit = DiT(input="tokens", vocab_size=self.target.vocab, seq_shape=self.target.shape, patch_size=patch, **common)
            self.diffusion = discrete_process(g, self.target.vocab)
        if cfg.trainer.compile:
            # In place (nn.Module.compile), so checkpoints keep the eager parameter names.
            self.dit.compile()
            self.cond_encoder.compile()
        self.val_loss = MeanMetric()
        self.validation_set: Conditions | None = None  # held-out conditions every validation samples
        self.scorer: Scorer | None = None  # how validation scores them (default: shapes-v1 attributes, captions)
        self._val_scores: dict[str, float] | None = None

    def load_tokenizers(self, tokenizers: dict[str, Tokenizer]) -> None:
        """Copy trained tokenizers' weights into the frozen ones (their specs must match)."""
        for modality, tokenizer in tokenizers.items():
            self.tokenizers[modality].load_state_dict(tokenizer.state_dict())

    # ------------------------------------------------------------------ pieces

    def condition(self, source: Any, drop: torch.Tensor | None = None) -> Condition:
        return self.cond_encoder(source, drop)

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
        cond = self.condition(self.source.tokens(batch), drop)
        x0 = self.to_latents(target) if self.gaussian else target
        return self.diffusion.loss(self.dit, x0, cond)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        # important! dropping the condition in training is what gives the model an
        # unconditional branch for classifier-free guidance at sampling time.
        drop = drop_mask(self.source.batch_size(batch), self.cfg.generator.cond_dropout, device=self.device)
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
        n = self.source.batch_size(batch)
        # The condition is encoded once per sample; every denoising step reuses it.
        cond = self.cond_encoder(source)
        uncond = self.cond_encoder(source, torch.ones(n, dtype=torch.bool, device=self.device))
        if self.gaussian:
            tok = self.target.tokenizer
            assert tok is not None
            shape = (n, tok.quantizer.lookup_dim, *tok.latent_shape)
            if s.sampler == "ddim":
                latents = self.diffusion.ddim_sample(self.dit, shape, cond, uncond, guidance=guidance, steps=s.ddim_steps, generator=generator, device=self.device)
            else:
                latents = self.diffusion.ddpm_sample(self.dit, shape, cond, uncond, guidance=guidance, steps=s.ddpm_steps, generator=generator, device=self.device)
            return self.from_latents(latents)
        # Only masking commits codes in an order of its choosing; the other processes redraw every position.
        ordering = {"choice_temperature": s.choice_temperature, "order": decoding["order"]} if self.cfg.generator.objective == "mask" else {}
        return self.diffusion.sample(self.dit, (n, *self.target.shape), cond, uncond, steps=steps, temperature=temperature,
                                     guidance=guidance, generator=generator, device=self.device, **ordering)

    def decoding(self) -> dict[str, Any]:
        """Mask-decoding temperature and order for this target (captions have their own)."""
        s = self.cfg.sampling
        if self.task.target.name == "text":
            return {"temperature": s.text_temperature, "order": s.text_order}
        return {"temperature": s.temperature, "order": "confidence"}

    def decode(self, tokens: torch.Tensor) -> Any:
        return self.target.decode(tokens)

    @torch.no_grad()
    def sample_items(self, conditions: Conditions, start: int = 0, stop: int | None = None,
                     generator: torch.Generator | None = None) -> list[Any]:
        """Generated items (uint8 pictures, waveforms, captions) for conditions [start, stop)."""
        batch = conditions.batch(self.task.source, self.spec, start, stop)
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return self.task.target.items(self.decode(self.generate(batch, generator=generator)))

    # ------------------------------------------------------------------ validation

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, _ = self.diffusion_loss(batch, None)
        self.val_loss.update(loss.detach())
        if batch_idx == 0 and self.validation_set is not None:
            # Sampled here rather than at epoch end: this is where the EMA weights are in place.
            self._val_scores = self.sample_validation_set(self.validation_set)

    def sample_validation_set(self, conditions: Conditions) -> dict[str, float]:
        generator = torch.Generator(self.device).manual_seed(self.cfg.run.seed)
        items = self.sample_items(conditions, generator=generator)
        target = self.task.target
        scorer = self.scorer or Scorer(target.name, self.spec.sample_rate)
        references = [decoded_reference(target, c, self.spec) for c in conditions.items]
        attributes, labels = [c.attributes for c in conditions.items], [c.label for c in conditions.items]
        scores = scorer.score(items, attributes, references, labels)
        self.media.update(target.media(items, self.spec, "val/samples"))
        self.media["val/table"] = ("table", self.sample_table(conditions, items, references,
                                                              scorer.per_item(items, attributes, references, labels)))
        return {k: float(v) for k, v in scores.items() if k != "n" and not k.startswith("n_")}  # counts are not metrics

    def sample_table(self, conditions: Conditions, items: list[Any], references: list[Any],
                     scored: tuple[str, list[float | None]] | None) -> dict[str, Any]:
        """The validation's samples as a table: condition, output, reference, per-sample score."""
        source, target = self.task.source, self.task.target
        if source.coded:  # pictures and sounds are shown as themselves
            shown = source.items(conditions.batch(source, self.spec)[source.batch_key])
            kind = source.name
        else:
            shown = [c.entry.get("text") or f"{c.entry.get('label')}: {c.entry.get('name')}" for c in conditions.items]
            kind = "text"
        columns, kinds = ["condition", "output", "reference"], [kind, target.name, target.name]
        rows = [[c, out, ref] for c, out, ref in zip(shown, items, references)]
        if scored is not None:
            columns.append(scored[0])
            kinds.append("number")
            rows = [row + [value] for row, value in zip(rows, scored[1])]
        return {"columns": columns, "kinds": kinds, "rows": rows[:TABLE_ROWS], "sample_rate": self.spec.sample_rate}

    def on_validation_epoch_end(self) -> None:
        logs = {"val/loss": self.val_loss.compute()}
        self.val_loss.reset()
        if self._val_scores is not None:
            logs.update({f"val/{k}": torch.tensor(v) for k, v in self._val_scores.items()})
            self._val_scores = None
        self.log_dict(logs)
