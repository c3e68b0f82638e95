"""The FSDP2 NFT learner (docs/algorithm.md): sharded vs single-process equivalence, gradients reach every LoRA tensor,
the old/EMA updates, the NFT direction, both model families (the Ray LearnerGroup: tests/ray/test_learner_group.py).

Multi-rank runs spawn gloo ranks on the CPU (tests/learner_harness.py); single-rank runs use a world-1 group
in this process (`world1`, tests/conftest.py).
Everything uses the tiny pipelines at 32x32 (4 latent tokens) and 2 training timesteps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from actors.sampler import ReferenceForwards, Sampler
from learner.trainer.nft_loss import ema_decay, old_policy_decay
from learner.trainer.nft_trainer import LOSS_KEYS, NFTTrainer, merge_rank_metrics
from learner.trainer.nft_trainer import THETA as THETA_NAME
from motionnft_core.config import ClusterConfig, RolloutConfig
from motionnft_core.models.weights import PolicyWeights, WeightManifest
from motionnft_core.noise import noised
from tests.learner_harness import (
    TARGETS,
    full,
    load_policy,
    make_samples,
    rank_samples,
    run_jobs,
    sections,
)

ROLLOUT = RolloutConfig(group_size=2, num_steps=3, height=32, width=32, micro_batch=4)
TWO_RANKS = ClusterConfig(learner_ranks=2, learner_gpus=0, cpus_per_actor=1)

N_SAMPLES = 5  # uneven on 2 ranks: 3 + 2 real samples, the second rank pads one micro-batch slot
MICRO_BATCH = 2
EQUIV_TOL = 1e-6  # sharded vs single-process, float32 (measured max |diff| is printed)
LR_DIRECTION = 3e-2  # the NFT-direction test wants a visible move in a few steps
# LoRA also on modules of the root FSDP unit, which stays unsharded after a forward: there `set_adapter` flips
# `requires_grad` of the unsharded parameters only (the docs/algorithm.md pitfall); without the trainer's reshard
# before switching adapters, the "old" root-unit tensors are left trainable (checked: the test below fails).
ROOT_UNIT_TARGETS = ("x_embedder", "proj_out")


# ------------------------------------------------------------------------------------ sharded == single process


def _gathered(trainer: NFTTrainer) -> dict[str, dict[str, torch.Tensor] | None]:
    return {which: trainer.gather(which) for which in ("theta", "old", "ema")}


def _two_steps_job(rank: int, world: int, out_dir: str, path: str) -> dict:
    """Two NFT steps on N_SAMPLES samples; everything the tests compare, gathered on rank 0."""
    policy = load_policy(path, "flux_kontext")
    samples = make_samples(policy, N_SAMPLES, seed=1)
    trainer = NFTTrainer(policy, *sections(micro_batch=MICRO_BATCH, lora_targets=TARGETS + ROOT_UNIT_TARGETS))
    assert any(n.startswith("x_embedder.") for n in trainer.theta)
    lora = set(trainer.theta) | {n for n in dict(policy.transformer.named_parameters()) if ".old." in n}
    base = {n: p for n, p in policy.transformer.named_parameters() if n not in lora}
    base_before = {n: full(p) for n, p in base.items()}
    snapshots, metrics, grads = [_gathered(trainer)], [], []
    for step in range(2):
        mine = trainer.train_step(rank_samples(samples, world, rank, MICRO_BATCH), N_SAMPLES, step)
        per_rank = [None] * world
        dist.all_gather_object(per_rank, mine)
        metrics.append(merge_rank_metrics(per_rank))
        grads.append({n: None if p.grad is None else full(p.grad) for n, p in trainer.theta.items()})
        snapshots.append(_gathered(trainer))
    base_changed = [n for n, p in base.items() if not torch.equal(full(p), base_before[n])]
    frozen_flags = {
        "old_requires_grad": [n for n, p in trainer.old.items() if p.requires_grad or p.grad is not None],
        "base_requires_grad": [n for n, p in base.items() if p.requires_grad or p.grad is not None],
    }
    return {"metrics": metrics, "grads": grads, "snapshots": snapshots, "base_changed": base_changed, **frozen_flags}


@pytest.fixture(scope="module")
def two_step_runs(tiny_paths, tmp_path_factory) -> dict[str, dict]:
    """The same two steps on 2 gloo ranks (FSDP2-sharded) and on 1 rank, run side by side."""
    out = tmp_path_factory.mktemp("equiv")
    return run_jobs(_two_steps_job, {"world2": 2, "world1": 1}, out, path=str(tiny_paths["flux_kontext"]))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_ranks_match_one_rank(two_step_runs):
    w2, w1 = two_step_runs["world2"], two_step_runs["world1"]
    for step in range(2):
        m2, m1 = w2["metrics"][step], w1["metrics"][step]
        assert m2["n_valid"] == m1["n_valid"] == N_SAMPLES  # the padding slots count for nothing
        for key in (*LOSS_KEYS, "grad_norm", "old_decay"):
            assert m2[key] == pytest.approx(m1[key], rel=EQUIV_TOL, abs=EQUIV_TOL), key
    diffs = {}
    for step in range(3):
        for which in ("theta", "old", "ema"):
            diffs[f"{which}@{step}"] = _max_diff(w2["snapshots"][step][which], w1["snapshots"][step][which])
    for step in range(2):
        diffs[f"grad@{step}"] = _max_diff(w2["grads"][step], w1["grads"][step])
    loss_rel = [abs(w2["metrics"][k]["loss"] / w1["metrics"][k]["loss"] - 1) for k in range(2)]
    print("loss rel diff per step:", [f"{x:.1e}" for x in loss_rel])
    print("max |world2 - world1|:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) < EQUIV_TOL, diffs


def test_lora_gradients_reach_every_tensor(two_step_runs):
    """Step 0 starts at B = 0: every lora_B gets a gradient and every lora_A exactly none (dL/dA = B^T ... = 0).
    Step 1 (B moved off 0): every θ tensor has a nonzero gradient, on sharded and single-rank runs alike."""
    for run in two_step_runs.values():
        step0, step1 = run["grads"]
        assert all(g is not None for g in step0.values()) and all(g is not None for g in step1.values())
        for name, g in step0.items():
            if ".lora_A." in name:
                assert float(g.abs().max()) == 0.0, name
            else:
                assert float(g.abs().max()) > 0.0, name
        zero = [n for n, g in step1.items() if float(g.abs().max()) == 0.0]
        assert not zero, f"θ tensors without gradient in step 1: {zero}"


def test_old_and_base_change_only_by_the_decay_update(two_step_runs):
    for run in two_step_runs.values():
        assert run["base_changed"] == [] and run["base_requires_grad"] == [] and run["old_requires_grad"] == []
        snaps = run["snapshots"]
        assert _max_diff(snaps[0]["old"], snaps[0]["theta"]) == 0.0  # old = θ at the start
        for k in (1, 2):  # after optimizer step k
            d, e = old_policy_decay(k), ema_decay(k)
            theta, old_prev, ema_prev = snaps[k]["theta"], snaps[k - 1]["old"], snaps[k - 1]["ema"]
            expected_old = {n: d * old_prev[n] + (1 - d) * theta[n] for n in theta}
            expected_ema = {n: e * ema_prev[n] + (1 - e) * theta[n] for n in theta}
            assert _max_diff(snaps[k]["old"], expected_old) < 1e-7
            assert _max_diff(snaps[k]["ema"], expected_ema) < 1e-7
            assert _max_diff(theta, snaps[k - 1]["theta"]) > 0  # θ itself moved


# ------------------------------------------------------------------------------------ plain trainer, world 1


def _velocity_error(trainer: NFTTrainer, probes) -> float:
    """mean ||v_θ(x_t, t) - (eps - x0)||^2 over fixed probes: how well θ predicts the flow target."""
    errors = []
    with torch.no_grad():
        for sample, eps, t in probes:
            x_t = noised(sample.x0[None], eps[None], t)
            v = trainer.policy.velocity(x_t, t, sample.cond)
            errors.append(float(((v - (eps - sample.x0)[None]) ** 2).mean()))
    return sum(errors) / len(errors)


def _train_with_r(path: Path, r: float, steps: int) -> tuple[float, float]:
    policy = load_policy(path, "flux_kontext")
    samples = make_samples(policy, 2, seed=5, r=[r, r])
    g = torch.Generator().manual_seed(11)
    probes = [(s, torch.randn(s.x0.shape, generator=g), s.sigmas[j : j + 1]) for s in samples for j in range(3)]
    trainer = NFTTrainer(policy, *sections(lr=LR_DIRECTION, micro_batch=2))
    before = _velocity_error(trainer, probes)
    for step in range(steps):
        trainer.train_step(samples, len(samples), step)
    return before, _velocity_error(trainer, probes)


def test_nft_moves_toward_positives_and_away_from_negatives(world1, tiny_paths):
    """r = 1 trains v_θ toward the flow target eps - x0 (x̂⁺ -> x0); r = 0 pushes it away (x̂⁻ -> x0)."""
    start_pos, after_pos = _train_with_r(tiny_paths["flux_kontext"], 1.0, steps=4)
    start_neg, after_neg = _train_with_r(tiny_paths["flux_kontext"], 0.0, steps=4)
    assert start_pos == start_neg  # same init (seeded LoRA, B = 0: the base model), same probes
    print(f"velocity error: start {start_pos:.4f}, after r=1 {after_pos:.4f}, after r=0 {after_neg:.4f}")
    assert after_pos < 0.97 * start_pos
    assert after_neg > 1.03 * start_neg


@pytest.mark.parametrize("family", ["flux_kontext", "qwen_image_edit"])
def test_train_step_runs_for_both_families(world1, tiny_paths, family):
    policy = load_policy(tiny_paths[family], family)
    samples = make_samples(policy, 3, seed=2)
    trainer = NFTTrainer(policy, *sections(micro_batch=2))
    theta0 = trainer.gather("theta")
    metrics = trainer.train_step(rank_samples(samples, 1, 0, 2), len(samples), 0)  # 2 + (1 + 1 padding)
    assert metrics["n_valid"] == 3 and metrics["old_decay"] == old_policy_decay(1)
    for key in (*LOSS_KEYS, "grad_norm"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics["grad_norm"] > 0
    theta1 = trainer.gather("theta")
    assert set(theta1) == set(theta0) == set(policy.lora_state_dict(THETA_NAME))
    with_grad = {
        n.replace(".default.", ".")
        for n, p in trainer.theta.items()
        if p.grad is not None and full(p.grad).abs().max() > 0
    }
    moved = {n for n in theta0 if ".lora_B." in n and not torch.equal(theta0[n], theta1[n])}
    # Every lora_B gets a gradient and moves off 0 (lora_A has none while B = 0; it only shrinks by AdamW's
    # weight decay), except where the output is never used: Qwen-Image has no single-stream blocks, so its last
    # block's text stream (text queries, text output projection) feeds nothing, and those LoRA tensors get
    # exactly zero gradient (in the real 60-block model too).
    dead = {f"transformer_blocks.1.attn.{m}.lora_B.weight" for m in ("add_q_proj", "to_add_out")}
    expected = {n for n in theta0 if ".lora_B." in n} - (dead if family == "qwen_image_edit" else set())
    assert with_grad == expected and moved == expected


def test_activation_checkpointing_gives_the_same_step(world1, tiny_paths):
    """Recomputing block activations in backward (the large-model memory option) changes no number."""
    results = []
    for checkpointing in (False, True):
        policy = load_policy(tiny_paths["flux_kontext"], "flux_kontext")
        samples = make_samples(policy, 2, seed=4)
        trainer = NFTTrainer(policy, *sections(lr=1e-2, activation_checkpointing=checkpointing))
        assert policy.transformer.gradient_checkpointing is checkpointing
        for step in range(2):  # step 1 has gradients through lora_A too
            metrics = trainer.train_step(samples, len(samples), step)
        results.append((metrics, trainer.gather("theta")))
    (m_plain, theta_plain), (m_ckpt, theta_ckpt) = results
    assert m_ckpt["loss"] == pytest.approx(m_plain["loss"], rel=1e-12)
    assert _max_diff(theta_ckpt, theta_plain) < 1e-7


def test_trainer_rejects_bad_calls(world1, tiny_paths):
    trainer = NFTTrainer(load_policy(tiny_paths["flux_kontext"], "flux_kontext"), *sections())
    with pytest.raises(ValueError, match="at least one sample"):
        trainer.train_step([], 4, 0)
    with pytest.raises(ValueError, match="'thetaa'"):
        trainer.gather("thetaa")


# ------------------------------------------------------------------------------------ full fine-tuning


def test_full_finetune_trains_every_weight_and_moves_the_old_copy(world1, tiny_paths, tmp_path):
    """nft.full_finetune: θ is the whole transformer, old and ref are frozen sharded copies, and the published
    old weights load into a rollout policy as "full" weights; the export loads with from_pretrained."""
    from diffusers import FluxTransformer2DModel

    from learner.trainer.checkpoint import export_transformer

    policy = load_policy(tiny_paths["flux_kontext"], "flux_kontext")
    base = {n: p.detach().clone() for n, p in policy.transformer.named_parameters()}
    samples = make_samples(policy, 3, seed=2)
    trainer = NFTTrainer(policy, *sections(micro_batch=2, full_finetune=True, lr=1e-3))
    metrics = trainer.train_step(rank_samples(samples, 1, 0, 2), len(samples), 0)
    assert metrics["grad_norm"] > 0 and metrics["n_valid"] == 3
    theta, old = trainer.gather("theta"), trainer.gather("old")
    assert set(theta) == set(old) == set(base)  # every weight, under the transformer's own names
    moved = [n for n in base if not torch.equal(theta[n], base[n])]
    assert len(moved) > len(base) // 2
    d = old_policy_decay(1)
    for n in base:
        torch.testing.assert_close(old[n], d * base[n] + (1 - d) * theta[n], rtol=0, atol=1e-6)
    ref = {n: full(p).detach() for n, p in trainer.frozen["ref"].named_parameters()}
    assert all(torch.equal(ref[n], base[n]) for n in base)  # the reference never trains

    rollout = load_policy(tiny_paths["flux_kontext"], "flux_kontext")
    weights = PolicyWeights(rollout, "full")
    weights.load(1, WeightManifest.of(old, version=1, kind="full").pack(), old)
    assert all(torch.equal(p, old[n]) for n, p in rollout.transformer.named_parameters())
    with pytest.raises(ValueError, match="kind 'lora'"):  # a LoRA publish cannot land in a full-weight rollout
        weights.load(2, WeightManifest.of(old, version=2, kind="lora").pack(), old)

    out = export_transformer(trainer.gather("ema"), dict(policy.transformer.config), tmp_path / "transformer")
    loaded = FluxTransformer2DModel.from_pretrained(out)
    ema = trainer.gather("ema")
    assert all(torch.equal(p, ema[n]) for n, p in loaded.named_parameters())


# ------------------------------------------------------------------------------------ reference forwards


def test_rollout_reference_forwards_train_like_learner_ones(world1, tiny_paths):
    """nft.reference_forwards: rollout. v_old/v_ref computed by the rollout (its adapter = the published old
    policy, adapters off = the base) at the shared training draws give the learner's own step."""
    from motionnft_core.models.policy import Conditioning

    path = tiny_paths["flux_kontext"]
    nft, learner = sections(micro_batch=2, lr=1e-2)
    learner_side = NFTTrainer(load_policy(path, "flux_kontext"), nft, learner)
    rollout_side = NFTTrainer(load_policy(path, "flux_kontext"), nft, learner)
    samples = make_samples(learner_side.policy, 4, seed=5)
    for trainer in (learner_side, rollout_side):  # step 0 moves θ, so old != base afterwards
        trainer.train_step(rank_samples(samples, 1, 0, 2), len(samples), 0)
    old = learner_side.gather("old")

    rollout = load_policy(path, "flux_kontext")
    rollout.add_lora(rank=nft.lora_rank, alpha=nft.lora_alpha, target_modules=list(nft.lora_targets))
    PolicyWeights(rollout, "lora").load(1, WeightManifest.of(old, version=1, kind="lora").pack(), old)
    sampler = Sampler(rollout, ROLLOUT, ReferenceForwards(seed=learner.seed, fraction=nft.timestep_fraction))
    with torch.no_grad():
        refs = sampler._reference_velocities(
            torch.stack([s.x0 for s in samples]), Conditioning.cat([s.cond for s in samples]), samples[0].sigmas,
            [(s.prompt_id, s.k) for s in samples], step=1,
        )  # fmt: skip
    assert not torch.allclose(refs["v_old"], refs["v_ref"])  # the old policy is not the base any more
    shipped = [dataclasses.replace(s, v_old=refs["v_old"][i], v_ref=refs["v_ref"][i]) for i, s in enumerate(samples)]

    a = learner_side.train_step(rank_samples(samples, 1, 0, 2), len(samples), 1)
    b = rollout_side.train_step(rank_samples(shipped, 1, 0, 2), len(shipped), 1)
    for key in (*LOSS_KEYS, "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    theta_a, theta_b = learner_side.gather("theta"), rollout_side.gather("theta")
    for n in theta_a:
        torch.testing.assert_close(theta_b[n], theta_a[n], rtol=0, atol=1e-6)
