"""motionnft_core/models/warmstart.py and motionnft_core/models/demo.py: schedules, demo data, a few real warm-start
steps, caching."""

import json
import math
from pathlib import Path

import pytest
import torch

from motionnft_core.config import Config, ConfigError, DemoConfig, ModelConfig
from motionnft_core.config_loader import load_config
from motionnft_core.data.motionedit import MotionEditDataset
from motionnft_core.models.demo import DemoSizes, build_demo_flux_kontext
from motionnft_core.models.policy import EditPolicy
from motionnft_core.models.warmstart import (
    RECORD_NAME,
    check_text_length,
    demo_data,
    encode_pairs,
    lr_factor,
    prepare_demo,
    shifted_times,
    warm_start,
)

FEW_STEPS = DemoConfig(vae_steps=3, vae_batch=4, steps=3, batch=4, warmup=1)
MODEL = ModelConfig(family="flux_kontext", dtype="float32", max_sequence_length=48)


def test_lr_factor_warmup_then_cosine_to_a_tenth():
    assert lr_factor(0, 100, 20) == pytest.approx(1 / 20)
    assert lr_factor(19, 100, 20) == pytest.approx(1.0)
    assert lr_factor(20, 100, 20) == pytest.approx(1.0)
    assert lr_factor(60, 100, 20) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr_factor(100, 100, 20) == pytest.approx(0.1)
    assert lr_factor(0, 10, 0) == pytest.approx(1.0)  # no warm-up


def test_shifted_times_is_the_schedulers_exponential_shift():
    u = torch.tensor([0.25, 0.5, 1.0])
    assert torch.allclose(shifted_times(u, 0.0), u)  # mu = 0: no shift
    # mu = ln 2: 2 / (2 + 1/u - 1) -> u=0.25: 2/5, u=0.5: 2/3, u=1: 1
    assert torch.allclose(shifted_times(u, math.log(2.0)), torch.tensor([0.4, 2 / 3, 1.0]))


@pytest.mark.parametrize(
    ("field", "value"), [("noop_fraction", 1.0), ("steps", -1), ("lr", 0.0), ("warmup", -1), ("grad_clip", 0.0)]
)
def test_settings_reject_bad_values(field, value):
    with pytest.raises(ConfigError, match=f"demo.{field}"):
        DemoConfig(**{field: value})


def test_demo_data_keeps_only_the_motion_and_is_reused(tmp_path):
    path = demo_data(tmp_path / "right", 6, size=32, seed=0, motion="right")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6
    assert all(r["motion_dx"] > 0 and r["motion_dy"] == 0 and r["motion_rot"] == 0 for r in rows)
    assert all(r["prompt"].endswith("to the right") for r in rows)
    indices = [int(r["id"].rsplit("-", 1)[1]) for r in rows]
    assert indices == sorted(indices) and len(set(indices)) == 6  # the first matches, in generator order
    stamp = path.stat().st_mtime_ns
    assert demo_data(tmp_path / "right", 6, size=32, seed=0, motion="right") == path
    assert path.stat().st_mtime_ns == stamp
    ds = MotionEditDataset.from_source(path, resolution=(32, 32), on_error="raise")
    assert len(ds) == 6 and ds[0].input_image.shape == (3, 32, 32)
    up = [json.loads(x) for x in demo_data(tmp_path / "up", 3, size=32, seed=0, motion="up").read_text().splitlines()]
    assert all(r["motion_dy"] < 0 and r["motion_dx"] == 0 for r in up)
    with pytest.raises(ValueError, match="motion"):
        demo_data(tmp_path / "x", 3, size=32, seed=0, motion="sideways")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = demo_data(tmp_path_factory.mktemp("data") / "d", 4, size=32, seed=0, motion="right")
    return MotionEditDataset.from_source(path, resolution=(32, 32), on_error="raise")


def test_warm_start_fits_normalises_and_is_deterministic(tiny_pipelines, pairs, tmp_path):
    base = tiny_pipelines["flux_kontext"]
    out = warm_start(base, pairs, tmp_path / "a", FEW_STEPS, MODEL)
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["n_train"] == 4 and len(record["fm_loss"]) == 3 and len(record["vae_loss"]) == 3
    fitted = EditPolicy.from_pretrained(out, family="flux_kontext", max_sequence_length=48)
    before = EditPolicy.from_pretrained(base, family="flux_kontext", max_sequence_length=48)
    changed = [n for n, p in fitted.transformer.named_parameters()
               if not torch.equal(p, dict(before.transformer.named_parameters())[n])]  # fmt: skip
    assert changed, "flow matching left every transformer weight unchanged"
    # The VAE normalisation makes the training images' latents zero-mean, unit-std (inputs and targets pooled).
    _, x0 = encode_pairs(fitted, pairs)
    inputs = torch.cat([fitted.encode([e.prompt], e.input_image[None]).tensors["image_latents"] for e in pairs])
    z = torch.cat([inputs, x0])
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1.0) < 1e-3
    # Same inputs, same seed -> the same weights; an existing result is reused, not retrained.
    again = EditPolicy.from_pretrained(warm_start(base, pairs, tmp_path / "b", FEW_STEPS, MODEL), family="flux_kontext")
    for (name, p), q in zip(fitted.transformer.named_parameters(), again.transformer.parameters(), strict=True):
        assert torch.equal(p, q), name
    stamp = (out / RECORD_NAME).stat().st_mtime_ns
    assert warm_start(base, pairs, out, FEW_STEPS, MODEL) == out and (out / RECORD_NAME).stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="empty"):
        warm_start(base, pairs[0:0], tmp_path / "c", FEW_STEPS, MODEL)
    # The text padding the warm start used is recorded and enforced (FLUX attends to padding tokens).
    check_text_length(fitted, out)
    with pytest.raises(ValueError, match="max_sequence_length=48"):
        check_text_length(EditPolicy.from_pretrained(out, family="flux_kontext"), out)  # default 512 tokens
    check_text_length(EditPolicy.from_pretrained(out, family="flux_kontext"), base)  # no record: nothing to check


def test_demo_pipeline_sizes(tmp_path):
    path = build_demo_flux_kontext(tmp_path / "demo", seed=0)
    policy = EditPolicy.from_pretrained(path, family="flux_kontext", max_sequence_length=48)
    sizes = DemoSizes()
    assert policy.vae_scale_factor == 2 and policy.seq_len(32, 32) == 64  # 16x16 latent -> 8x8 packed tokens
    assert policy.transformer.config.num_attention_heads * policy.transformer.config.attention_head_dim == 64
    assert policy.latent_channels == sizes.latent_channels
    assert json.loads((path / "demo_sizes.json").read_text())["vae_channels"] == list(sizes.vae_channels)


def _demo_config(tmp_path, **demo) -> Config:
    """A demo run at 32 px on 12 examples with FEW_STEPS of warm start, cached under tmp_path."""
    steps = {k: getattr(FEW_STEPS, k) for k in ("vae_steps", "vae_batch", "steps", "batch", "warmup")}
    overrides = ["demo.enabled=true"] + [f"demo.{k}={v}" for k, v in {**steps, "examples": 12, **demo}.items()]
    overrides += ["rollout.height=32", "rollout.width=32", "reward.judge_weight=0", "data.eval_fraction=0.5",
                  "model.max_sequence_length=48", "model.dtype=float32", f"model.cache_dir={tmp_path}"]  # fmt: skip
    return load_config(None, overrides)


def test_prepare_demo_caches_by_settings(tmp_path):
    first = prepare_demo(_demo_config(tmp_path))
    record = json.loads((first.model / RECORD_NAME).read_text())
    train, held = MotionEditDataset.from_source(first.data, resolution=(32, 32), on_error="raise").split(0.5, 0)
    assert record["n_train"] == len(train) and len(held) > 0  # the held-out side is never warm-started on
    stamp = (first.model / RECORD_NAME).stat().st_mtime_ns
    assert prepare_demo(_demo_config(tmp_path)) == first
    assert (first.model / RECORD_NAME).stat().st_mtime_ns == stamp
    other = prepare_demo(_demo_config(tmp_path, seed=1))
    assert other.data == first.data and other.model != first.model


def test_resolve_demo_fills_model_and_data_and_loads_as_the_pools_load_it(tmp_path):
    from motionnft_core.config_loader import config_from_dict, config_to_dict
    from motionnft_core.data.motionedit import load_splits
    from motionnft_core.models.policy import load_policy
    from motionnft_core.models.warmstart import resolve_demo

    overrides = ["demo.enabled=true", "demo.examples=12", "demo.vae_steps=2", "demo.vae_batch=4", "demo.steps=2",
                 "demo.batch=4", "rollout.height=32", "rollout.width=32", "reward.judge_weight=0",
                 "data.eval_fraction=0.5", "model.max_sequence_length=40", "model.dtype=float32",
                 f"model.cache_dir={tmp_path}"]  # fmt: skip
    cfg = load_config(None, overrides)
    resolved = resolve_demo(cfg)
    assert not resolved.demo.enabled and resolved.model.path and resolved.data.source.endswith(".jsonl")
    assert config_from_dict(config_to_dict(resolved)) == resolved  # the saved config.json loads as it is
    assert resolve_demo(resolved) is resolved  # nothing more to do
    record = json.loads((tmp_path / "demo" / resolved.model.path.rsplit("/", 1)[-1] / RECORD_NAME).read_text())
    assert record["settings"]["max_sequence_length"] == 40 and record["settings"]["steps"] == 2
    train, held = load_splits(resolved)
    assert record["n_train"] == len(train) and len(train) + len(held) == 12  # warm-started on the run's train split
    m = resolved.model
    policy = load_policy(m, m.path, use_gpu=False)
    check_text_length(policy, m.path)  # the run's policies pad text as the warm start did


def test_cli_needs_a_demo_config(tmp_path, capsys):
    from motionnft_core.models.warmstart import main

    configs = Path(__file__).resolve().parents[2] / "configs"
    for argv, key in (
        (["--config", str(configs / "tiny_cpu.yaml")], "demo.enabled"),
        (["--config", str(configs / "learn_demo.yaml"), "demo.motion=sideways"], "demo.motion"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and key in capsys.readouterr().err
