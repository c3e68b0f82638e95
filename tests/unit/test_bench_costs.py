"""The benchmarks' cost models checked against values computed by hand: attention FLOPs, the scale simulation's
calls, predictions and pool split, and its held calls (the scripts themselves run in tests/system/test_bench.py)."""

from __future__ import annotations

import pytest

from bench.scale_sim import CallCosts, Split, balanced_split, predicted_step_s
from bench.train_step import attention_flops


def test_attention_flops_count_grouped_heads_at_the_query_heads():
    """2 products of b·h·s_q·s_k·d each, 2 FLOPs per multiply-add: 2·2·28·100·80·(128 + 128) = 229,376,000, the
    same for 4 grouped key/value heads as for 28 (each query head still attends over all 80 keys)."""
    q = (2, 28, 100, 128)
    assert attention_flops(q, (2, 28, 80, 128), (2, 28, 80, 128)) == 229_376_000
    assert attention_flops(q, (2, 4, 80, 128), (2, 4, 80, 128)) == 229_376_000


def _measured(reference_rollout: float, ours_rollout: float, compiled: dict[str, float]) -> dict:
    def layout(rollout: float, learner: float = 0.0, reward: float = 0.0) -> dict:
        phases = {"rollout": rollout, "learner": learner, "reward": reward}
        return {"seconds": 1.0, "phases": {k: {"seconds_per_sample": v} for k, v in phases.items()}}

    return {"family": "flux_kontext", "device": "GPU X", "date": "2026-11-27T00:00:00", "solver_steps": 6,
            "layouts": {"reference": layout(reference_rollout), "ours": layout(ours_rollout),
                        "ours+compile": layout(**compiled)}}  # fmt: skip


def test_scale_sim_splits_the_measured_phases_into_calls():
    """6 solver steps, int(0.99 * 6) = 5 trained timesteps. Eager: the reference forwards add 2·5 forwards to the
    rollout, 1.8 - 0.8 = 1.0 s, so 0.1 s each; decode = 0.8 - 6·0.1 = 0.2 s. Compiled: (1.4 - 0.2) / 16 = 0.075 s
    per forward, 1.0 / 5 = 0.2 s per forward+backward, and the roles cost 16·0.075 + 0.2 = 1.4 s (rollout) and
    5·0.2 = 1.0 s (learner) per sample."""
    costs = CallCosts.from_record(_measured(0.8, 1.8, {"rollout": 1.4, "learner": 1.0, "reward": 0.01}))
    assert (costs.forward_s, costs.train_s, costs.decode_s, costs.flow_s) == pytest.approx((0.075, 0.2, 0.2, 0.01))
    assert costs.timesteps == 5 and "GPU X" in costs.source
    assert costs.role_seconds() == pytest.approx({"rollout": 1.4, "reward": 0.01, "learner": 1.0})
    with pytest.raises(ValueError, match="'eager' was not measured"):
        CallCosts.from_record(_measured(0.8, 1.8, {"rollout": 1.4}), "eager")


def test_scale_sim_predicts_steps_and_balances_the_pools():
    """P=4 groups of K=2 on (rollout 2, reward 1, learner 1): rollout 2 groups·2·1.4 = 5.6 s, the last group's
    reward 2·0.01 = 0.02 s (the others hide behind the rollout), learner 8·1.0 = 8 s. Sequential: their sum
    13.62 s; overlapped: max(5.62, 8) = 8 s. Of the splits of 4 GPUs, (1, 1, 2) and (1, 2, 1) leave 4 groups
    on one rollout worker (11.2 s): (2, 1, 1) is the balanced one."""
    costs = CallCosts.from_record(_measured(0.8, 1.8, {"rollout": 1.4, "learner": 1.0, "reward": 0.01}))
    split = Split(2, 1, 1)
    assert predicted_step_s(split, costs, 4, 2, overlapped=False) == pytest.approx(13.62)
    assert predicted_step_s(split, costs, 4, 2, overlapped=True) == pytest.approx(8.0)
    assert balanced_split(4, costs, 4, 2) == split
    assert balanced_split(64, costs, 192, 8).gpus == 64


def test_sim_holds_last_their_gpu_duration_and_hold_forward_and_backward_as_one(tmp_path):
    """A held call takes at least its hold; a forward with gradient and the backward after it take their hold
    together, waited out after the backward; without gradient the forward's own hold applies. Each is logged."""
    import time

    import torch

    from bench.sim_holds import Training, held, read_calls

    log = tmp_path / "calls-1.jsonl"
    slow = held(lambda x: x + 1, lambda x: 0.05 * len(x), "decode", log)
    training = Training(log)
    forward = training.forward(lambda x: 2 * x, lambda x: 0.05 * x.shape[0], held(lambda x: 3 * x, lambda x: 0.0,
                                                                                  "velocity", log))  # fmt: skip
    backward = training.backward(torch.Tensor.backward)
    w = torch.ones(2, requires_grad=True)
    t0 = time.perf_counter()
    backward(forward(w).sum())
    assert time.perf_counter() - t0 >= 0.1 and w.grad.tolist() == [2.0, 2.0]
    with torch.no_grad():
        assert forward(w).tolist() == [3.0, 3.0]
    t0 = time.perf_counter()
    assert slow(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0] and time.perf_counter() - t0 >= 0.15
    calls = read_calls(tmp_path)
    assert [c["call"] for c in calls] == ["forward+backward", "velocity", "decode"]
    assert [c["hold"] for c in calls] == pytest.approx([0.1, 0.0, 0.15])


def test_sim_holds_hold_every_familys_model_calls_once():
    """The scale simulation wraps the class that defines each family's velocity and decode, once: every family is
    held, none twice (a family inheriting a wrapped method would otherwise be wrapped again)."""
    from bench.sim_holds import defining_classes
    from motionnft_core.models.families import policy_classes

    for method in ("velocity", "decode"):
        owners = defining_classes(method)
        assert len(owners) == len(set(owners))
        for family, cls in policy_classes().items():
            defining = next(k for k in cls.__mro__ if method in vars(k))
            assert defining in owners, (family, method)
            assert not any(k in owners for k in cls.__mro__ if k is not defining), (family, method)  # not twice
