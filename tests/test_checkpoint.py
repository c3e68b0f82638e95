"""Checkpoints: DCP save/resume of the sharded learner, CheckpointManager (local and S3), the diffusers export.

The resume test runs the learner as 2 spawned gloo ranks (tests/learner_harness.py): train a step, save,
train the next step (the uninterrupted run); then fresh trainers load the checkpoint and train that next
step again. A 1-rank trainer in this process also loads the 2-rank checkpoint (DCP reshards).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from diffusers import FluxKontextPipeline

from common import s3
from common.noise import noised
from learner.checkpoint import MARKER, CheckpointManager, export_lora, load_sharded, save_sharded, step_name
from learner.trainer import NFTTrainer, merge_rank_metrics
from models.policy import FluxKontextPolicy
from models.tiny import build_tiny
from tests.learner_harness import (
    TARGETS,
    TEXT_TOKENS,
    full_tree,
    load_policy,
    make_samples,
    rank_samples,
    run_jobs,
    sections,
)

FAMILY = "flux_kontext"
N_SAMPLES = 4
HYPER = {"lr": 1e-2}  # large enough that one step moves every tensor visibly
WEIGHTS = ("theta", "old", "ema")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return build_tiny(FAMILY, tmp_path_factory.getbasetemp() / "tiny" / FAMILY)  # shared with test_fsdp_learner


def _state(trainer: NFTTrainer) -> dict:
    """Everything a checkpoint must restore, unsharded (collective)."""
    return {
        **{which: trainer.gather(which) for which in WEIGHTS},
        "optimizer": full_tree(trainer.state_dict()["optimizer"]),
        "step": trainer.step,
    }


def _step(trainer: NFTTrainer, samples, world: int, rank: int, step: int) -> dict[str, float]:
    mine = trainer.train_step(rank_samples(samples, world, rank, trainer.learner.micro_batch), len(samples), step)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, mine)
    return merge_rank_metrics(per_rank)


def _probe(policy, samples) -> tuple[torch.Tensor, torch.Tensor, object]:
    """A fixed (x_t, t, cond) to compare velocities at."""
    s = samples[0]
    eps = torch.randn(s.x0.shape, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([0.6])
    return noised(s.x0[None], eps[None], t), t, s.cond


def _resume_job(rank: int, world: int, out_dir: str, path: str) -> dict:
    ckpt = Path(out_dir) / "ckpt"
    policy = load_policy(path, FAMILY)
    samples = make_samples(policy, N_SAMPLES, seed=3)
    a = NFTTrainer(policy, *sections(**HYPER))
    _step(a, samples, world, rank, 0)
    save_sharded(a.state_dict(), ckpt)
    saved = _state(a)
    uninterrupted = _step(a, samples, world, rank, 1)
    after = _state(a)

    # The trained θ as a diffusers LoRA file, and the velocity it gives inside the (sharded) trainer.
    theta = a.gather("theta")
    if rank == 0:
        export_lora(theta, Path(out_dir) / "lora", family=FAMILY, rank=4, alpha=8, targets=list(TARGETS))
    x_t, t, cond = _probe(policy, samples)
    with torch.no_grad():
        v_trainer = a.policy.velocity(x_t, t, cond)

    b = NFTTrainer(load_policy(path, FAMILY), *sections(**HYPER))
    fresh = _state(b)
    state = b.state_dict()
    load_sharded(state, ckpt)
    b.load_state_dict(state)
    restored = _state(b)
    resumed = _step(b, samples, world, rank, 1)
    return {
        "saved": saved,
        "fresh": fresh,
        "restored": restored,
        "uninterrupted": uninterrupted,
        "resumed": resumed,
        "after": after,
        "after_resumed": _state(b),
        "probe": (x_t, t, cond, v_trainer),
    }


@pytest.fixture(scope="module")
def resume_run(tiny_path, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("resume")
    return run_jobs(_resume_job, {"ranks2": 2}, out, path=str(tiny_path))["ranks2"], out


def _assert_equal_tree(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_dcp_resume_restores_everything_exactly(resume_run):
    run, _ = resume_run
    saved, fresh, restored = run["saved"], run["fresh"], run["restored"]
    assert saved["step"] == 1 and fresh["step"] == 0
    assert len(saved["optimizer"]["state"]) == len(saved["theta"])  # AdamW state for every θ tensor
    for which in WEIGHTS:  # a fresh trainer differs, so equality below is the load's doing
        assert any(not torch.equal(saved[which][k], fresh[which][k]) for k in saved[which]), which
    _assert_equal_tree(restored, saved)


def test_next_step_after_resume_equals_uninterrupted(resume_run):
    run, _ = resume_run
    for key in ("loss", "policy_loss", "kl_loss", "grad_norm"):
        assert run["resumed"][key] == run["uninterrupted"][key], key  # same ranks, same math: bitwise
    _assert_equal_tree(run["after_resumed"], run["after"])


def test_two_rank_checkpoint_loads_into_one_rank(resume_run, tiny_path, tmp_path):
    """DCP reshards: the 2-rank checkpoint restores a 1-rank trainer, which then takes the same step."""
    run, out = resume_run
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        policy = load_policy(tiny_path, FAMILY)
        trainer = NFTTrainer(policy, *sections(**HYPER))
        state = trainer.state_dict()
        load_sharded(state, out / "ckpt")
        trainer.load_state_dict(state)
        restored = _state(trainer)
        metrics = _step(trainer, make_samples(policy, N_SAMPLES, seed=3), 1, 0, 1)
        after = _state(trainer)
    finally:
        dist.destroy_process_group()
    _assert_equal_tree(restored, run["saved"])
    # The restored state is exact (above) and so is the loss, which is computed before the update. The update
    # itself sums gradients in a world-size-dependent order, and AdamW's step lr * m / (sqrt(v) + eps) has a
    # size independent of |g|, so entries whose gradient nearly cancels move by up to a few 1e-6 at lr 1e-2
    # (measured 1e-7 .. 1.7e-6 over runs; the tiny tokenizers, hence the data, differ per build).
    loss_rel = abs(metrics["loss"] - run["uninterrupted"]["loss"]) / run["uninterrupted"]["loss"]
    diffs = {w: max(float((v - run["after"][w][k]).abs().max()) for k, v in after[w].items()) for w in WEIGHTS}
    print(f"1 rank vs 2 ranks after the resumed step: loss rel diff {loss_rel:.1e}, max |diff| {diffs}")
    assert loss_rel < 1e-12
    assert max(diffs.values()) < 2e-5


# ------------------------------------------------------------------------------------------------ LoRA export


def test_exported_lora_loads_into_diffusers_and_matches_the_trainer(resume_run, tiny_path):
    run, out = resume_run
    x_t, t, cond, v_trainer = run["probe"]
    files = sorted(p.name for p in (out / "lora").iterdir())
    assert files == ["pytorch_lora_weights.safetensors"]
    pipe = FluxKontextPipeline.from_pretrained(tiny_path)
    pipe.load_lora_weights(out / "lora")
    policy = FluxKontextPolicy(pipe, max_sequence_length=TEXT_TOKENS)
    with torch.no_grad():
        v_loaded = policy.velocity(x_t, t, cond)
        with policy.adapters_disabled():
            v_base = policy.velocity(x_t, t, cond)
    effect = float((v_trainer - v_base).abs().max())
    assert effect > 1e-3  # the adapter does change the output ...
    torch.testing.assert_close(v_loaded, v_trainer, rtol=0, atol=1e-6)  # ... exactly as in the trainer


def test_export_lora_rejects_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="'flux_dev'"):
        export_lora({}, tmp_path, family="flux_dev", rank=4, alpha=8, targets=["to_q"])


# ------------------------------------------------------------------------------------------------ manager


def _fake_learner_state(staging: Path, payload: bytes) -> None:
    (staging / "learner").mkdir()
    (staging / "learner" / "__0_0.distcp").write_bytes(payload)


def test_manager_local_commit_latest_and_retention(tmp_path):
    root = tmp_path / "ckpts"
    mgr = CheckpointManager(str(root), keep=2, cache_dir=tmp_path / "cache")
    assert mgr.latest() is None
    for step in (10, 20):
        staging = mgr.staging_dir(step)
        _fake_learner_state(staging, f"shards of {step}".encode())
        where = mgr.commit(step, staging, {"step": step})
        assert where == str(root / step_name(step)) and not staging.exists()
    # A save that never committed (crashed mid-write) is invisible, however new.
    _fake_learner_state(mgr.staging_dir(30), b"partial")
    (root / step_name(40)).mkdir()  # a step dir without its marker (e.g. copied by hand) does not count either
    assert mgr.complete_steps() == [10, 20] and mgr.latest() == 20
    assert mgr.driver_state(20) == {"step": 20}
    assert (mgr.local_copy(20) / "learner" / "__0_0.distcp").read_bytes() == b"shards of 20"
    with pytest.raises(FileNotFoundError, match="COMMITTED"):
        mgr.local_copy(40)
    # Retention: committing a third keeps the newest two.
    staging = mgr.staging_dir(30)  # the crashed attempt's leftovers are cleared first
    assert list(staging.iterdir()) == []
    _fake_learner_state(staging, b"shards of 30")
    mgr.commit(30, staging, {"step": 30})
    assert mgr.complete_steps() == [20, 30]
    assert not (root / step_name(10)).exists()
    assert json.loads((root / step_name(30) / "driver.json").read_text()) == {"step": 30}


def test_manager_rejects_keep_below_one(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(str(tmp_path), keep=0, cache_dir=tmp_path / "cache")


def test_manager_s3_commit_restore_retention(s3_bucket, tmp_path):
    root = f"s3://{s3_bucket}/runs/a"
    mgr = CheckpointManager(root, keep=2, cache_dir=tmp_path / "cache")
    assert mgr.latest() is None
    for step in (1, 2):
        staging = mgr.staging_dir(step)
        _fake_learner_state(staging, f"shards of {step}".encode())
        assert mgr.commit(step, staging, {"step": step}) == f"{root}/{step_name(step)}"
        assert not staging.exists()
    # An upload that stopped before its marker (a crash) is never the latest.
    partial = tmp_path / "partial"
    partial.write_bytes(b"partial")
    s3.upload_file(partial, f"{root}/{step_name(3)}/learner/__0_0.distcp")
    s3.upload_file(partial, f"{root}/{step_name(3)}/learner/{MARKER}")  # a marker below the top level is no marker
    assert mgr.complete_steps() == [1, 2] and mgr.latest() == 2
    with pytest.raises(FileNotFoundError, match="COMMITTED"):
        mgr.local_copy(3)
    assert mgr.driver_state(2) == {"step": 2}
    restored = mgr.local_copy(2)
    assert (restored / "learner" / "__0_0.distcp").read_bytes() == b"shards of 2"
    # Step 2 written again (a re-run after a crash, now on one rank where it had two): same-size shards. The
    # old rank-1 shard must be gone from S3, and the restore must not reuse the cached copy.
    s3.upload_file(partial, f"{root}/{step_name(2)}/learner/__1_0.distcp")
    (restored / "learner" / "stale.distcp").write_bytes(b"old")
    staging = mgr.staging_dir(2)
    _fake_learner_state(staging, b"shards of X")
    mgr.commit(2, staging, {"step": 2, "again": True})
    assert f"{root}/{step_name(2)}/learner/__1_0.distcp" not in s3.list_prefix(root)
    restored = mgr.local_copy(2)
    assert sorted(p.name for p in (restored / "learner").iterdir()) == ["__0_0.distcp"]
    assert (restored / "learner" / "__0_0.distcp").read_bytes() == b"shards of X"
    assert mgr.driver_state(2) == {"step": 2, "again": True}
    # Another run sharing the cache dir, same step, same-size shards: each restore gets its own run's bytes.
    other = CheckpointManager(f"s3://{s3_bucket}/runs/b", keep=2, cache_dir=tmp_path / "cache")
    staging = other.staging_dir(2)
    _fake_learner_state(staging, b"shards of Y")
    other.commit(2, staging, {"step": 2})
    assert (other.local_copy(2) / "learner" / "__0_0.distcp").read_bytes() == b"shards of Y"
    assert (mgr.local_copy(2) / "learner" / "__0_0.distcp").read_bytes() == b"shards of X"
    # Retention on S3: a third complete checkpoint deletes the oldest one's objects.
    staging = mgr.staging_dir(4)
    _fake_learner_state(staging, b"shards of 4")
    mgr.commit(4, staging, {"step": 4})
    assert mgr.complete_steps() == [2, 4]
    assert s3.list_prefix(f"{root}/{step_name(1)}") == []
