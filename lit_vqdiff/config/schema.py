"""The typed schema of both stages' configs: one dataclass per section.

A field's trailing comment is its documentation (`lit-vqdiff config --list` prints it).
A value of 0 or "" marked "auto" is filled in from the data set's description
(``dataset.json`` beside the shards) before a run starts, and the run folder's
``config.yaml`` records the value that was used.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional


@dataclass
class RunConfig:
    dir: Optional[str] = None  # an existing run folder resumes it; None starts runs/<stage>-<timestamp>
    root: str = "runs"  # where run folders and the runs/latest-* links go
    seed: int = 0  # seeds weights, data order, masks and noise
    name: Optional[str] = None  # display name in W&B


@dataclass
class ShapesConfig:
    """How shapes-v1 is rendered (train and val use disjoint seeds)."""

    train_samples: int = 24000  # samples rendered into the train split
    val_samples: int = 2000  # samples rendered into the val split
    train_seed: int = 0  # seed of the train split
    val_seed: int = 1  # seed of the val split
    shard_size: int = 2000  # samples per shard
    holdout: str = "none"  # none | compositional (12 attribute combinations never in train; renders into <root>-compositional)


@dataclass
class DataConfig:
    name: str = ""  # data set name; "" = the one its dataset.json records (auto)
    root: str = "data/shapes-v1"  # folder of train-*.tar / val-*.tar shards; data/shapes-v1 renders itself
    train: str = ""  # shards: folders, globs, brace patterns, pipe: or http(s):// (space-separated); "" = root/train-*.tar
    val: str = ""  # as data.train for the held-out split; "" = root/val-*.tar
    sizes: str = ""  # sizes.json path or URL; "" = the one beside the shards
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    batch_size: int = 64  # training samples per step and rank
    val_batch_size: int = 256  # validation samples per batch
    num_workers: int = 2  # DataLoader worker processes per rank
    mode: str = "exact"  # exact (every sample once per epoch) | resampled (shards drawn with replacement)
    drop_last: bool = False  # exact mode: drop the uneven tail instead of padding it
    batches_per_epoch: int = 0  # resampled mode: batches per rank per epoch (0 = from sizes.json)
    shuffle_buffer: int = 2000  # samples in the shuffle buffer of each worker
    image_size: int = 0  # pixels per side after centre crop and resize; 0 = auto (32, 64, 128 or 256)
    channels: int = 0  # 1 (grey) or 3 (RGB); 0 = auto (grey when every image is)
    sample_rate: int = 0  # Hz sounds are resampled to; 0 = auto (the most common rate, at most 16000)
    audio_samples: int = 0  # clip length in samples (cropped or zero-padded); 0 = auto (90th percentile, at most 10 s)
    text_bytes: int = 0  # UTF-8 bytes per caption (longer ones are cut and counted); 0 = auto (the longest, in 16s)
    num_classes: int = 0  # labels 0..num_classes-1; 0 = auto (from the data set's classes)
    resample_audio: bool = True  # resample sounds at another rate (within the two bounds below), else skip them
    min_source_rate: int = 4000  # lowest sample rate that is resampled
    max_source_rate: int = 96000  # highest sample rate that is resampled
    max_skip_fraction: float = 0.01  # share of an epoch's samples per rank that may be skipped before the run stops


@dataclass
class QuantizerConfig:
    kind: str = "vq"  # vq | rvq | fsq
    codebook_size: int = 512  # codes per codebook
    lookup_dim: int = 8  # dimension codes are matched in (a low-dimensional projection)
    # Lookups on the unit sphere (cosine matching). For rvq the lookup input is normalized
    # and the first codebook is cosine-matched; later codebooks quantize the residuals with
    # plain L2 (residuals are not unit vectors, and their length is what they refine).
    l2_normalize: bool = True  # cosine matching of the lookups
    update: str = "ema"  # ema (codebook as running means) | grad (codebook loss)
    ema_decay: float = 0.99  # decay of the EMA codebook update
    commitment: float = 0.25  # weight of the commitment loss
    kmeans_init: bool = True  # initialize codebooks by k-means on the first batch
    restart_dead: bool = True  # move unused codes onto recent encoder outputs
    dead_after: int = 50  # steps without use before a code counts as dead
    num_quantizers: int = 1  # rvq only: residual codebooks
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # fsq only: levels per dimension


@dataclass
class DiscriminatorConfig:
    enabled: bool = False  # add a patch discriminator (hinge GAN)
    start_step: int = 2000  # step the adversarial terms switch on
    weight: float = 0.1  # weight of the generator's adversarial term
    channels: int = 64  # width of the discriminator
    layers: int = 3  # strided layers of the discriminator
    lr: float = 2e-4  # its learning rate


@dataclass
class TokenizerConfig:
    frontend: str = "pixels"  # pixels (image) | wave | spectrogram | stft (audio; stft: log magnitude + phase, inverse STFT back)
    channels: int = 64  # width of the first level
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # width multiplier per level
    num_res_blocks: int = 2  # residual blocks per level
    downsample: Optional[list[int]] = None  # per-level strides; None = 2 per level
    z_channels: int = 64  # encoder output channels
    attention: bool = False  # self-attention in the middle block
    # Images: codes per side; the patch stem takes whatever stride is left to reach it.
    grid: int = 0  # image codes per side; 0 = auto (image_size / 4, at most 16)
    patch: int = 0  # stem stride; 0 = auto (images: image_size / grid / strides; audio: 1)
    mid: bool = True  # the res-(attention)-res block at the lowest resolution
    patch_width: int = 0  # width of the patch stem's and head's full-resolution convs; 0 = 32 (stem) and 16 (head)
    recon_loss: str = "l1"  # l1 | l2
    # Audio magnitude-spectrum term: multi-resolution STFT loss (wave frontend; stft frontend:
    # of the inverse STFT), spectral convergence of linear magnitudes (spectrogram); 0 = off.
    stft_weight: float = 1.0  # weight of the magnitude-spectrum term
    n_fft: int = 0  # spectrogram/stft frontend FFT size; 0 = auto (256 at 8 kHz, scaled with the sample rate)
    hop: int = 0  # spectrogram/stft frontend hop; 0 = auto (n_fft / 4)
    griffin_lim_iters: int = 32  # phase-recovery iterations of the spectrogram decoder
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    prune_unused: bool = False  # drop codes no val sample used from the exported tokenizer


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # on weights of rank >= 2 only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # AdamW betas
    warmup_steps: int = 100  # linear warmup
    schedule: str = "cosine"  # cosine (to 10% at max_steps) | constant
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"  # cpu | gpu | auto
    devices: int = 1  # devices per node; -1 = all
    num_nodes: int = 1  # nodes of a multi-node run
    strategy: str = "auto"  # auto | ddp | ddp_spawn | fsdp
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed (GPU) | bf16-true | auto (bf16-mixed where it pays)
    max_steps: int = 4000  # optimizer steps of the run
    max_minutes: float = 0.0  # wall-clock budget; 0 = none
    val_every_steps: int = 500  # validation interval
    limit_val_batches: int = 0  # 0 = the whole validation split
    log_every_steps: int = 25  # logging interval
    checkpoint_every_minutes: float = 2.0  # refresh last.ckpt this often (<= 0: no time trigger)
    checkpoint_every_steps: int = 0  # also refresh it every N optimizer steps (0: off)
    fast_dev_run: bool = False  # one training and one validation batch, nothing saved
    deterministic: bool = False  # deterministic kernels
    compile: bool = False  # torch.compile the trunks (inductor); the first steps pay for compiling
    channels_last: bool = True  # image tokenizers in NHWC memory (faster convolutions); no effect on 1D audio
    threads: int = 0  # torch intra-op threads; 0 = torch's default


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | csv | none
    mode: str = "offline"  # offline | online | disabled (WANDB_MODE, when set, wins)
    project: str = "lit_vqdiff"  # W&B project
    entity: Optional[str] = None  # W&B entity (team or user)
    media_every_val: int = 1  # log media every N validations
    group: str = ""  # W&B group; "" = the run's own name, which stage 2 hands to the stage-1 runs it starts
    tags: list[str] = field(default_factory=list)  # W&B tags beside stage, modality or task, and data set
    log_checkpoints: bool = True  # the final and best checkpoints as W&B artifacts (the tokenizer always)


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
    num_steps: int = 1000  # diffusion timesteps in training
    schedule: str = "cosine"  # linear | cosine
    prediction: str = "v"  # eps | v
    learn_sigma: bool = False  # also predict the variance (DiT's learned sigma)


@dataclass
class DiscreteConfig:
    """The discrete processes other than masking: uniform (D3PM) and mask_replace (VQ-Diffusion)."""

    num_steps: int = 1000  # diffusion timesteps in training (sampling respaces them to sampling.steps)
    schedule: str = "cosine"  # uniform: cosine | linear (the kept share); mask_replace: cosine | linear | arccos (the masked share)
    replace: float = 0.2  # mask_replace: share of unmasked codes replaced by random ones at the last step
    hybrid: float = 0.0  # weight of the variational bound beside the x0 cross-entropy (D3PM's lambda x T)


@dataclass
class GeneratorConfig:
    objective: str = "mask"  # mask (absorbing) | uniform (D3PM) | mask_replace (VQ-Diffusion) on codes | gaussian on code vectors
    preset: str = "DiT-T"  # DiT-T | DiT-S | DiT-B | DiT-L | DiT-XL
    width: Optional[int] = None  # None = the preset's
    depth: Optional[int] = None  # None = the preset's
    heads: Optional[int] = None  # None = the preset's
    patch_size: int = 1  # codes (or latent cells) per trunk token along each axis
    pos: str = "learned"  # learned | sincos
    cond_depth: int = 2  # layers of the condition encoder (text, codes)
    text_patch_size: int = 1  # caption bytes per position, as a condition or a target (codes use patch_size)
    text_encoder: str = "bytes"  # captions as a condition: bytes (learned from scratch) | minilm (pretrained sentence encoder)
    cond_dropout: float = 0.1  # classifier-free guidance: share of conditions dropped in training
    mask_schedule: str = "cosine"  # cosine | linear | arccos
    label_smoothing: float = 0.0  # of the masked-token cross-entropy
    gaussian: GaussianConfig = field(default_factory=GaussianConfig)
    discrete: DiscreteConfig = field(default_factory=DiscreteConfig)
    ema_decay: float = 0.999  # decay of the EMA weights used for sampling


@dataclass
class SamplingConfig:
    steps: int = 12  # decoding steps of the discrete processes (mask, uniform, mask_replace)
    guidance: float = 2.0  # classifier-free guidance scale (1 = none)
    temperature: float = 1.0  # sampling temperature of codes
    choice_temperature: float = 0.5  # Gumbel noise on the confidences that order the unmasking (annealed to 0)
    # Text targets (image->text): a caption is one string per meaning, and bytes drawn
    # independently at temperature 1, or committed out of reading order, misspell words
    # whose position depends on an earlier word's length ("cenrer").
    text_temperature: float = 0.0  # sampling temperature of caption bytes (0 = greedy)
    text_order: str = "left_to_right"  # confidence | left_to_right
    sampler: str = "ddim"  # gaussian: ddim | ddpm
    ddim_steps: int = 50  # DDIM steps
    ddpm_steps: int = 250  # respaced ancestral sampling (at most gaussian.num_steps)
    n: int = 200  # samples drawn and evaluated at the end of `train stage2`
    val_n: int = 64  # held-out conditions sampled at each validation (0 = off)


@dataclass
class TokenizerRefs:
    image: str = ""  # run folder or tokenizer.pt; "" = runs/latest-stage1-image-<data set> (auto)
    audio: str = ""  # run folder or tokenizer.pt; "" = runs/latest-stage1-audio-<data set> (auto)
    train_if_missing: bool = True  # train a missing tokenizer first (same data, hardware and logger)
    cache: bool = True  # train from the token cache (built once per tokenizer and data)
    cache_dir: str = ""  # "" = <data.root>/tokens/<modalities>-<digest of tokenizers and data>
    stage1_args: list[str] = field(default_factory=list)  # extra overrides for a stage-1 run started here, e.g. [trainer.max_steps=1000]


@dataclass
class Stage2Config:
    stage: str = "stage2"
    task: str = "text->image"  # source->target, e.g. class->image, image->audio, image->text
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
# Choices that come from code (task, generator.preset, generator.mask_schedule) are added by load.py.
CHOICES: dict[str, tuple[str, ...]] = {
    "modality": ("image", "audio"),
    "data.mode": ("exact", "resampled"),
    "data.shapes.holdout": ("none", "compositional"),
    "tokenizer.frontend": ("pixels", "wave", "spectrogram", "stft"),
    "tokenizer.recon_loss": ("l1", "l2"),
    "tokenizer.quantizer.kind": ("vq", "rvq", "fsq"),
    "tokenizer.quantizer.update": ("ema", "grad"),
    "optim.schedule": ("cosine", "constant"),
    "trainer.precision": ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "auto"),
    "logger.kind": ("wandb", "csv", "none"),
    "logger.mode": ("offline", "online", "disabled"),
    "generator.objective": ("mask", "uniform", "mask_replace", "gaussian"),
    "generator.pos": ("learned", "sincos"),
    "generator.text_encoder": ("bytes", "minilm"),
    "generator.gaussian.schedule": ("linear", "cosine"),
    "generator.gaussian.prediction": ("eps", "v"),
    "sampling.sampler": ("ddim", "ddpm"),
    "sampling.text_order": ("confidence", "left_to_right"),
}

# Config groups: `group=name` on the command line merges conf/<group>/<name>.yaml into
# `target` ("" = the root, for presets that touch several sections). A `tokenizer` preset
# (stage 1, after the modality's) holds a tokenizer and the batch size and steps it was
# measured with, so it lives at the root too.
GROUPS: dict[str, str] = {"trainer": "trainer", "logger": "logger", "data": "data", "modality": "", "task": "",
                          "tokenizer": ""}


def task_preset_name(task: str) -> str:
    """conf/task/<name>.yaml for a stage-2 task: 'image->text' -> 'image-to-text'."""
    return task.replace("->", "-to-")


_FIELD_DOC = re.compile(r"^\s+(\w+):[^#]*#\s*(.+)$")


def field_docs(cls: type) -> dict[str, str]:
    """A dataclass's fields and their trailing comments (the documentation of each key)."""
    return {m.group(1): m.group(2).strip() for line in inspect.getsource(cls).splitlines() if (m := _FIELD_DOC.match(line))}


def documented_keys(cls: type, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted key, default, documentation) of every leaf field of a schema, in order."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from documented_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", default, docs.get(f.name, "")
