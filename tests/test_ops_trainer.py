"""Trainer presets and precisions, and two CPU ranks (gloo, ddp_spawn) for both stages:
identical weights after the steps and one config hash on every rank."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import tiny_stage1, tiny_stage2, resolved
from test_ops_logging import history, wandb_records
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from lit_vqdiff import perf
from lit_vqdiff.callbacks import EMAWeights
from lit_vqdiff.cli import main
from lit_vqdiff.config import CONF_DIR, ConfigError, config_hash, load_config
from lit_vqdiff.data.datamodule import ShardDataModule
from lit_vqdiff.nn.tokenizer import Tokenizer
from lit_vqdiff.stages.generator import GeneratorModule
from lit_vqdiff.modalities import parse_task
from lit_vqdiff.runs import resolve_run
from lit_vqdiff.stages.tokenizer import TokenizerModule
from lit_vqdiff.training import build_trainer, fit

PRESETS = {  # accelerator, devices, num_nodes, strategy, precision
    "cpu": ("cpu", 1, 1, "auto", "32-true"),
    "gpu": ("gpu", 1, 1, "auto", "bf16-mixed"),
    "ddp": ("gpu", -1, 1, "ddp", "bf16-mixed"),
    "fsdp": ("gpu", -1, 1, "fsdp", "bf16-mixed"),
    "multinode": ("gpu", -1, 2, "ddp", "bf16-mixed"),
}
HARDWARE = ("accelerator", "devices", "num_nodes", "strategy", "precision")


def test_every_trainer_preset_is_listed_and_loads():
    assert sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml")) == sorted(PRESETS)
    for name, expected in PRESETS.items():
        cfg = load_config("stage1", [f"trainer={name}"])
        assert tuple(cfg.trainer[k] for k in HARDWARE) == expected, name
    assert load_config("stage2", ["trainer=multinode", "trainer.num_nodes=4"]).trainer.num_nodes == 4


def test_multinode_preset_builds_a_trainer_over_its_nodes(tmp_path):
    cfg = load_config("stage1", ["trainer=multinode", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=3", "logger=none"])
    trainer = build_trainer(cfg, tmp_path)
    assert trainer.num_nodes == 3 and trainer.world_size == 3 and type(trainer.strategy).__name__ == "DDPStrategy"


@pytest.mark.parametrize("precision, plugin", [("32-true", Precision), ("bf16-mixed", MixedPrecision)])
def test_cpu_precisions_build_a_trainer(tmp_path, precision, plugin):
    cfg = load_config("stage1", [f"trainer.precision={precision}", "logger=none"])
    trainer = build_trainer(cfg, tmp_path)
    assert type(trainer.precision_plugin) is plugin and trainer.precision == precision


@pytest.mark.parametrize("speedup, chosen, plugin", [(3.8, "bf16-mixed", MixedPrecision), (0.55, "32-true", Precision)])
def test_auto_precision_takes_bf16_only_where_this_cpu_multiplies_it_faster(tmp_path, monkeypatch, speedup, chosen, plugin):
    # 3.8: AVX512-BF16 on AMD Zen 5; 0.55: a Xeon that converts bf16 to fp32 for every matmul.
    monkeypatch.setattr(perf, "_cpu_bf16_speedup", speedup)
    cfg = load_config("stage1", ["trainer.precision=auto", "logger=none"])
    trainer = build_trainer(cfg, tmp_path)
    assert type(trainer.precision_plugin) is plugin and trainer.precision == chosen
    assert perf.resolve_precision("auto", "gpu") == "bf16-mixed"
    assert perf.resolve_precision("bf16-true", "cpu") == "bf16-true"  # a named precision is kept


def test_the_bf16_probe_measures_a_ratio_once(monkeypatch):
    monkeypatch.setattr(perf, "_cpu_bf16_speedup", None)
    first = perf.cpu_bf16_speedup(size=64, seconds=0.01)
    assert 0.02 < first < 50
    assert perf.cpu_bf16_speedup() == first  # cached: every trainer of a process agrees


@pytest.mark.parametrize("override, named", [("trainer.precision=16-mixed", "trainer.precision=16-mixed"),
                                             ("trainer=fsdp", "trainer.strategy=fsdp")])
def test_cpu_unsupported_settings_fail_before_any_run_folder(tmp_path, capsys, override, named):
    extra = [override, "trainer.accelerator=cpu"]
    with pytest.raises(ConfigError, match=named):
        load_config("stage1", extra)
    runs = tmp_path / "runs"
    assert main(["train", "stage1", f"run.root={runs}", *extra]) == 2
    assert named in capsys.readouterr().err and not runs.exists()


# ----------------------------------------------------------------------------- two ranks


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RankProbe(L.Callback):
    """Each rank writes what it ended with: weights digest, config hashes, first batch keys."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.first_keys: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.first_keys:
            self.first_keys = list(batch["key"])

    def on_train_end(self, trainer, pl_module):
        record = {"weights": weights_digest(pl_module), "config_hash": config_hash(pl_module.cfg),
                  "module_hash": pl_module.config_hash, "gathered": pl_module.rank_config_hashes,
                  "global_step": trainer.global_step, "world_size": trainer.world_size, "first_keys": self.first_keys}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def two_rank_fit(cfg, module, modalities, out: Path, callbacks=()) -> tuple[dict, dict, Path]:
    run_dir, resume = resolve_run(cfg)
    assert resume is None
    datamodule = ShardDataModule(cfg.data, modalities, seed=cfg.run.seed)
    fit(cfg, module, datamodule, run_dir, resume, callbacks=[RankProbe(out), *callbacks])
    first, second = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    return first, second, run_dir


def assert_ranks_agree(first: dict, second: dict, cfg, steps: int) -> None:
    assert first["world_size"] == second["world_size"] == 2
    assert first["global_step"] == second["global_step"] == steps
    assert first["first_keys"] and set(first["first_keys"]).isdisjoint(second["first_keys"])  # each rank its own data
    assert first["weights"] == second["weights"]
    expected = config_hash(cfg)
    assert first["config_hash"] == second["config_hash"] == first["module_hash"] == second["module_hash"] == expected
    assert first["gathered"] == second["gathered"] == [expected, expected]


DDP = ("trainer.strategy=ddp_spawn", "trainer.devices=2", "trainer.max_steps=4", "trainer.val_every_steps=4")


@pytest.mark.slow
def test_two_ranks_stage1_hold_identical_weights(shapes_root, tmp_path):
    cfg = resolved("stage1", tiny_stage1(shapes_root, tmp_path / "runs", *DDP, "logger=wandb"))
    first, second, run_dir = two_rank_fit(cfg, TokenizerModule(cfg), (cfg.modality,), tmp_path)
    assert_ranks_agree(first, second, cfg, steps=4)
    rows = history(wandb_records(run_dir))  # one W&B run (rank 0's), with the validation in it
    assert [row["trainer/global_step"] for row in rows if "val/psnr" in row] == [3]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4


def untrained_tokenizer(shapes_root: Path) -> tuple[dict, dict]:
    """An untrained image tokenizer with made-up latent statistics: stage 2's code paths need no more."""
    cfg = resolved("stage1", tiny_stage1(shapes_root, shapes_root / "unused", "tokenizer.channels=16"))
    tok = Tokenizer.from_config(cfg).eval()
    dim = tok.quantizer.lookup_dim
    meta = {"spec": tok.spec(), "checksum": "0" * 64, "path": "", "latent_mean": [0.0] * dim, "latent_std": [1.0] * dim}
    return {"image": tok}, {"image": meta}


@pytest.mark.slow
def test_two_ranks_stage2_hold_identical_weights(shapes_root, tmp_path):
    cfg = resolved("stage2", tiny_stage2(shapes_root, tmp_path / "runs", *DDP, "generator.width=32"))
    tokenizers, meta = untrained_tokenizer(shapes_root)
    module = GeneratorModule(cfg, meta)
    module.load_tokenizers(tokenizers)
    ema = EMAWeights(decay=cfg.generator.ema_decay)
    first, second, _ = two_rank_fit(cfg, module, parse_task(cfg.task).inputs(cached=False), tmp_path, callbacks=[ema])
    assert_ranks_agree(first, second, cfg, steps=4)


def probe_on_a_fake_clock(tmp_path, monkeypatch):
    """A default Trainer, its data-wait probe, and the clock (a one-item list) the probe reads."""
    from lit_vqdiff import perf

    clock = [0.0]
    monkeypatch.setattr(perf.time, "perf_counter", lambda: clock[0])
    trainer = build_trainer(load_config("stage1", [f"run.root={tmp_path}", "logger=none"]), tmp_path)
    return trainer, next(c for c in trainer.callbacks if isinstance(c, perf.DataWaitTimer)), clock


def test_data_wait_counts_callback_work_as_training_not_waiting(tmp_path, monkeypatch):
    """A slow callback after the step (an EMA update, a checkpoint save) is training time;
    only the gap between the last callback and the next batch is waiting for data."""
    trainer, timer, clock = probe_on_a_fake_clock(tmp_path, monkeypatch)
    assert trainer.callbacks[-1] is timer.closer  # after every other callback
    for _ in range(3):
        timer.on_train_batch_start(trainer, None, None, 0)
        clock[0] += 1.0  # forward, backward, optimizer
        timer.mark_end(trainer)  # the probe's own batch end...
        clock[0] += 0.5  # ...then the callbacks listed after it
        timer.closer.on_train_batch_end(trainer, None, None, None, 0)
        clock[0] += 0.1  # fetching the next batch
    timer.on_train_batch_start(trainer, None, None, 0)
    assert timer.step_s == pytest.approx(4.5) and timer.wait_s == pytest.approx(0.3)
    timer.on_validation_start(trainer, None)  # validation between steps is neither
    clock[0] += 7.0
    timer.on_train_batch_start(trainer, None, None, 0)
    assert timer.wait_s == pytest.approx(0.3)


def test_data_wait_is_the_time_blocked_on_a_loader_that_counts_it(tmp_path, monkeypatch):
    """With a loader that keeps `fetch_seconds`, only that part of a gap between steps is a
    data wait; the rest (schedulers, logging, the module's batch-end hook) is loop time."""
    trainer, timer, clock = probe_on_a_fake_clock(tmp_path, monkeypatch)
    loader = SimpleNamespace(fetch_seconds=0.0)
    monkeypatch.setattr(type(trainer), "train_dataloader", property(lambda self: loader))
    for _ in range(4):
        timer.on_train_batch_start(trainer, None, None, 0)
        clock[0] += 1.0
        timer.closer.on_train_batch_end(trainer, None, None, None, 0)
        clock[0] += 0.3  # loop bookkeeping...
        loader.fetch_seconds += 0.2  # ...of which 0.2 s blocked on the loader
    timer.on_train_batch_start(trainer, None, None, 0)
    assert timer.wait_s == pytest.approx(0.8) and timer.loop_s == pytest.approx(0.4)
    assert timer.fraction == pytest.approx(0.8 / 5.2) and timer.loop_fraction == pytest.approx(0.4 / 5.2)


def test_stream_loader_counts_the_seconds_spent_producing_batches(shapes_root):
    dm = ShardDataModule(resolved("stage1", [f"data.root={shapes_root}", "data.num_workers=0", "data.batch_size=8"]).data,
                         ("image",))
    dm.set_epoch(0)
    loader = dm.train_dataloader()
    assert loader.fetch_seconds == 0.0
    batches = iter(loader)
    next(batches)
    first = loader.fetch_seconds
    assert first > 0.0  # decoding 8 PNGs takes time
    next(batches)
    assert loader.fetch_seconds > first


def test_process_group_is_closed_when_the_run_ends(tmp_path):
    import socket

    import torch.distributed as dist

    from lit_vqdiff.callbacks import CloseProcessGroup

    with socket.socket() as s:  # a free port for a one-rank gloo group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        trainer = build_trainer(load_config("stage1", [f"run.root={tmp_path}", "logger=none"]), tmp_path)
        closer = next(c for c in trainer.callbacks if isinstance(c, CloseProcessGroup))
        closer.teardown(trainer, None, "fit")
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
