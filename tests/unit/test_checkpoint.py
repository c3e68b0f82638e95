"""Checkpoints: DCP save/resume of the sharded learner, CheckpointManager (local and S3), the diffusers export.

The resume test runs the learner as 2 spawned gloo ranks (tests/learner_harness.py): train a step, save,
train the next step (the uninterrupted run); then fresh trainers load the checkpoint and train that next
step again. A 1-rank trainer in this process also loads the 2-rank checkpoint (DCP reshards).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from diffusers import FluxKontextPipeline

from learner.trainer.checkpoint import (
    MARKER,
    CheckpointManager,
    check_reachable,
    export_lora,
    load_rank,
    load_sharded,
    save_rank,
    save_sharded,
    step_name,
)
from learner.trainer.nft_trainer import NFTTrainer, merge_rank_metrics
from motionnft_core import s3
from motionnft_core.config import CheckpointConfig, ConfigError
from motionnft_core.models.policy import FluxKontextPolicy
from motionnft_core.models.tiny import build_tiny
from motionnft_core.noise import noised
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
from tests.storage_helpers import local_copy

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


def _resume_job(rank: int, world: int, out_dir: str, path: str, s3_root: str) -> dict:
    ckpt = Path(out_dir) / "ckpt"
    policy = load_policy(path, FAMILY)
    samples = make_samples(policy, N_SAMPLES, seed=3)
    a = NFTTrainer(policy, *sections(**HYPER))
    _step(a, samples, world, rank, 0)
    save_sharded(a.state_dict(), ckpt)
    # The same state the way the learner ranks write a cluster checkpoint: each rank stages in its own temp
    # dir (no disk shared between ranks) and uploads its own files.
    written = save_rank(a.state_dict(), s3_root, rank)
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
    c = NFTTrainer(load_policy(path, FAMILY), *sections(**HYPER))
    state = c.state_dict()
    load_rank(state, f"{s3_root}/learner")  # each rank downloads into its own temp dir
    c.load_state_dict(state)
    return {
        "written": written,
        "restored_s3": _state(c),
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
def resume_run(tiny_path, tmp_path_factory, s3_server) -> tuple[dict, Path, str]:
    import boto3

    out, bucket = tmp_path_factory.mktemp("resume"), f"resume-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    s3_root = f"s3://{bucket}/step_00000001"
    return run_jobs(_resume_job, {"ranks2": 2}, out, path=str(tiny_path), s3_root=s3_root)["ranks2"], out, s3_root


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
    run, _, _ = resume_run
    saved, fresh, restored = run["saved"], run["fresh"], run["restored"]
    assert saved["step"] == 1 and fresh["step"] == 0
    assert len(saved["optimizer"]["state"]) == len(saved["theta"])  # AdamW state for every θ tensor
    for which in WEIGHTS:  # a fresh trainer differs, so equality below is the load's doing
        assert any(not torch.equal(saved[which][k], fresh[which][k]) for k in saved[which]), which
    _assert_equal_tree(restored, saved)


def test_each_rank_uploads_its_own_shards_and_they_restore_exactly(resume_run):
    run, _, s3_root = resume_run
    assert run["written"] == ["learner/.metadata", "learner/__0_0.distcp"]  # rank 0's files only
    assert s3.list_prefix(s3_root) == [f"{s3_root}/learner/{n}" for n in (".metadata", "__0_0.distcp", "__1_0.distcp")]
    _assert_equal_tree(run["restored_s3"], run["saved"])


def test_next_step_after_resume_equals_uninterrupted(resume_run):
    run, _, _ = resume_run
    for key in ("loss", "policy_loss", "kl_loss", "grad_norm"):
        assert run["resumed"][key] == run["uninterrupted"][key], key  # same ranks, same math: bitwise
    _assert_equal_tree(run["after_resumed"], run["after"])


def test_two_rank_checkpoint_loads_into_one_rank(resume_run, tiny_path, tmp_path):
    """DCP reshards: the 2-rank checkpoint restores a 1-rank trainer, which then takes the same step."""
    run, out, _ = resume_run
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
    run, out, _ = resume_run
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


def _write_rank(mgr: CheckpointManager, step: int, payload: bytes, ranks: int = 1) -> tuple[str, list[str]]:
    """What the learner ranks do for step N: their shards (rank 0 also the metadata) at `mgr.begin(step)`."""
    target = mgr.begin(step)
    written = [f"learner/__{r}_0.distcp" for r in range(ranks)] + ["learner/.metadata"]
    with tempfile.TemporaryDirectory() as tmp:
        for rel in written:
            local = Path(tmp, rel)
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(payload)
            if s3.is_s3_uri(target):
                s3.upload_file(local, f"{target}/{rel}")
            else:
                Path(target, rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(local, Path(target, rel))
    return target, written


def test_manager_local_commit_latest_and_retention(tmp_path):
    root = tmp_path / "ckpts"
    mgr = CheckpointManager(str(root), keep=2)
    assert mgr.latest() is None
    for step in (10, 20):
        target, written = _write_rank(mgr, step, f"shards of {step}".encode())
        where = mgr.commit(step, target, {"step": step}, written=written)
        assert where == str(root / step_name(step)) and not Path(target).exists()
    # A save that never committed (crashed mid-write) is invisible, however new.
    _write_rank(mgr, 30, b"partial")
    (root / step_name(40)).mkdir()  # a step dir without its marker (e.g. copied by hand) does not count either
    assert mgr.complete_steps() == [10, 20] and mgr.latest() == 20
    assert mgr.driver_state(20) == {"step": 20}
    assert mgr.location(20) == str(root / step_name(20))
    assert (local_copy(mgr, 20, tmp_path / "cache") / "learner" / "__0_0.distcp").read_bytes() == b"shards of 20"
    with pytest.raises(FileNotFoundError, match="COMMITTED"):
        local_copy(mgr, 40, tmp_path / "cache")
    # Retention: committing a third keeps the newest two; the crashed attempt's leftovers are cleared first.
    target = mgr.begin(30)
    assert list(Path(target).iterdir()) == []
    target, written = _write_rank(mgr, 30, b"shards of 30")
    mgr.commit(30, target, {"step": 30}, written=written)
    assert mgr.complete_steps() == [20, 30]
    assert not (root / step_name(10)).exists()
    assert json.loads((root / step_name(30) / "driver.json").read_text()) == {"step": 30}


def test_manager_refuses_a_commit_with_a_rank_file_missing(tmp_path, s3_bucket):
    """A rank that reports a shard the driver cannot find (written to another node's disk) stops the commit:
    shards are never lost silently."""
    for root in (str(tmp_path / "ckpts"), f"s3://{s3_bucket}/runs/missing"):
        mgr = CheckpointManager(root, keep=2)
        target, written = _write_rank(mgr, 5, b"x")
        with pytest.raises(RuntimeError, match=r"1 file\(s\) the learner ranks wrote are not under"):
            mgr.commit(5, target, {"step": 5}, written=[*written, "learner/__1_0.distcp"])
        with pytest.raises(RuntimeError, match="metadata"):
            mgr.commit(5, target, {"step": 5}, written=["learner/__0_0.distcp"])
        assert mgr.latest() is None


def test_check_reachable_refuses_a_local_dir_across_nodes():
    local, shared = CheckpointConfig(dir="/ckpt"), CheckpointConfig(dir="/ckpt", shared_fs=True)
    check_reachable(local, ["n0", "n0"], "n0")  # every rank beside the driver: fine
    check_reachable(shared, ["n1", "n2"], "n0")
    check_reachable(CheckpointConfig(dir="s3://bucket/ckpt"), ["n1", "n2"], "n0")
    with pytest.raises(ConfigError, match=r"checkpoint.dir: '/ckpt' is a local path, but 1 of 2 learner ranks"):
        check_reachable(local, ["n0", "n1"], "n0")


def test_manager_rejects_keep_below_one(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(str(tmp_path), keep=0)


def test_manager_s3_commit_restore_retention(s3_bucket, tmp_path):
    root = f"s3://{s3_bucket}/runs/a"
    mgr = CheckpointManager(root, keep=2)
    assert mgr.latest() is None
    for step in (1, 2):
        target, written = _write_rank(mgr, step, f"shards of {step}".encode())
        assert mgr.commit(step, target, {"step": step}, written=written) == f"{root}/{step_name(step)}"
    # An upload that stopped before its marker (a crash) is never the latest.
    partial = tmp_path / "partial"
    partial.write_bytes(b"partial")
    s3.upload_file(partial, f"{root}/{step_name(3)}/learner/__0_0.distcp")
    s3.upload_file(partial, f"{root}/{step_name(3)}/learner/{MARKER}")  # a marker below the top level is no marker
    assert mgr.complete_steps() == [1, 2] and mgr.latest() == 2
    with pytest.raises(FileNotFoundError, match="COMMITTED"):
        local_copy(mgr, 3, tmp_path / "cache")
    assert mgr.driver_state(2) == {"step": 2}
    restored = local_copy(mgr, 2, tmp_path / "cache")
    assert (restored / "learner" / "__0_0.distcp").read_bytes() == b"shards of 2"
    # Step 2 written again (a re-run after a crash, now on one rank where it had two): same-size shards. The
    # old rank-1 shard must be gone from S3, the step must not look complete while it is rewritten, and the
    # restore must not reuse the cached copy.
    s3.upload_file(partial, f"{root}/{step_name(2)}/learner/__1_0.distcp")
    (restored / "learner" / "stale.distcp").write_bytes(b"old")
    target, written = _write_rank(mgr, 2, b"shards of X")
    assert mgr.complete_steps() == [1]
    mgr.commit(2, target, {"step": 2, "again": True}, written=written)
    assert f"{root}/{step_name(2)}/learner/__1_0.distcp" not in s3.list_prefix(root)
    restored = local_copy(mgr, 2, tmp_path / "cache")
    assert sorted(p.name for p in (restored / "learner").iterdir()) == [".metadata", "__0_0.distcp"]
    assert (restored / "learner" / "__0_0.distcp").read_bytes() == b"shards of X"
    assert mgr.driver_state(2) == {"step": 2, "again": True}
    # Another run sharing the cache dir, same step, same-size shards: each restore gets its own run's bytes.
    other = CheckpointManager(f"s3://{s3_bucket}/runs/b", keep=2)
    target, written = _write_rank(other, 2, b"shards of Y")
    other.commit(2, target, {"step": 2}, written=written)
    assert (local_copy(other, 2, tmp_path / "cache") / "learner" / "__0_0.distcp").read_bytes() == b"shards of Y"
    assert (local_copy(mgr, 2, tmp_path / "cache") / "learner" / "__0_0.distcp").read_bytes() == b"shards of X"
    # Retention on S3: a third complete checkpoint deletes the oldest one's objects.
    target, written = _write_rank(mgr, 4, b"shards of 4")
    mgr.commit(4, target, {"step": 4}, written=written)
    assert mgr.complete_steps() == [2, 4]
    assert s3.list_prefix(f"{root}/{step_name(1)}") == []
