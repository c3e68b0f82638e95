"""The learner's micro-batch from free memory (`learner.micro_batch: 0`, learner/trainer/memory.py): the size
rule by hand, and the trainer's probe: it leaves no trace in the step that follows, and the ranks agree.

This machine has no GPU, so the memory readings come from a scripted gauge (the CUDA allocator's counters are
`CudaMemory`, used by bench/train_step.py on a device); everything around them is the real trainer."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from learner.trainer.memory import fit_micro_batch
from learner.trainer.nft_trainer import NFTTrainer
from motionnft_core.config import ConfigError
from motionnft_core.config_loader import load_config
from tests.learner_harness import load_policy, make_samples, rank_samples, run_jobs, sections

GIB = 2**30


@pytest.mark.parametrize(
    ("peak_1", "peak_2", "budget", "per_rank", "expected"),
    [
        (30 * GIB, 40 * GIB, 72 * GIB, 8, 4),  # base 20 + 10/sample: room for 5 -> 2 micro-batches of 4
        (30 * GIB, 40 * GIB, 130 * GIB, 8, 8),  # room for 11: the whole share at once
        (30 * GIB, 40 * GIB, 45 * GIB, 8, 2),  # room for 2
        (30 * GIB, 40 * GIB, 20 * GIB, 8, 1),  # not even 1 fits: 1, and the run shows the out-of-memory error
        (30 * GIB, 30 * GIB, 31 * GIB, 8, 8),  # no growth measured: the whole share
        (30 * GIB, 40 * GIB, 100 * GIB, 12, 6),  # room for 8 of 12: 2 micro-batches of 6, not 8 + 4 padded to 8
        (30 * GIB, 40 * GIB, 100 * GIB, 3, 3),  # never more than the share
    ],
)
def test_micro_batch_rule(peak_1, peak_2, budget, per_rank, expected):
    assert fit_micro_batch(peak_1, peak_2, budget, per_rank) == expected


def test_micro_batch_rule_needs_samples():
    with pytest.raises(ValueError, match="per_rank"):
        fit_micro_batch(1, 2, 3, 0)


class ScriptedGauge:
    """Peaks of a model whose rank holds `base` and each sample in flight `per_sample` more; counts the samples of
    the probe's forward/backward from the calls it sees (reset, then one micro-batch, then peak)."""

    def __init__(self, base: int, per_sample: int, budget: int) -> None:
        self.base, self.per_sample, self._budget = base, per_sample, budget
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def peak(self) -> int:
        return self.base + self.resets * self.per_sample  # the probes run 1, then 2 samples

    def budget(self, fraction: float) -> int:
        return int(fraction * self._budget)


def _adam(trainer: NFTTrainer) -> list[torch.Tensor]:
    return [t.detach().clone() for state in trainer.optimizer.state.values() for t in state.values()
            if isinstance(t, torch.Tensor)]  # fmt: skip


def _probe_then_step(rank: int, world: int, out_dir: str, path: str, per_sample_gib: list[int]) -> dict:
    """Rank `rank` probes with its own gauge, then steps; returns the choice and θ after the step."""
    policy = load_policy(path, "flux_kontext")
    samples = make_samples(policy, 8, seed=3)
    trainer = NFTTrainer(policy, *sections(micro_batch=0))
    gauge = ScriptedGauge(20 * GIB, per_sample_gib[rank] * GIB, 80 * GIB)  # budget 0.9 * 80 = 72 GiB
    theta_before, adam_before = trainer.gather("theta"), _adam(trainer)
    chosen = trainer.fit_micro_batch(rank_samples(samples, world, rank, 2), -(-8 // world), 0, gauge)
    untouched = trainer.gather("theta")
    adam_same = all(torch.equal(a, b) for a, b in zip(adam_before, _adam(trainer), strict=True))
    grads = [p.grad for p in trainer.theta.values()]
    metrics = trainer.train_step(rank_samples(samples, world, rank, chosen), len(samples), 0)
    return {"chosen": chosen, "probe": trainer.memory_probe, "theta_before": theta_before, "untouched": untouched,
            "grads": grads, "adam_same": adam_same, "metrics": metrics,
            "theta": trainer.gather("theta")}  # fmt: skip


def _fixed_step(rank: int, world: int, out_dir: str, path: str, micro_batch: int) -> dict:
    policy = load_policy(path, "flux_kontext")
    samples = make_samples(policy, 8, seed=3)
    trainer = NFTTrainer(policy, *sections(micro_batch=micro_batch))
    metrics = trainer.train_step(rank_samples(samples, world, rank, micro_batch), len(samples), 0)
    return {"metrics": metrics, "theta": trainer.gather("theta")}


@pytest.mark.slow  # two gloo ranks probing: one of the fast loop's longest tests (CI runs it)
def test_probe_leaves_no_trace_and_ranks_agree_on_the_smallest(tiny_pipelines, tmp_path):
    """Two ranks of 4 samples each, one measuring 10 GiB per sample (room for 5: micro-batch 4), the other 20
    (room for 2): both train with 2; the step after the probe equals a run set to micro-batch 2 from the start."""
    path = str(tiny_pipelines["flux_kontext"])
    out = run_jobs(_probe_then_step, {"probed": 2}, tmp_path / "probed", path=path, per_sample_gib=[10, 20])["probed"]
    fixed = run_jobs(_fixed_step, {"fixed": 2}, tmp_path / "fixed", path=path, micro_batch=2)["fixed"]
    assert out["probe"]["mine"] == 4 and out["chosen"] == 2  # rank 0 would take 4; rank 1's 2 wins
    assert out["probe"]["peak_1"] == 30 * GIB and out["probe"]["peak_2"] == 40 * GIB
    for name, t in out["theta_before"].items():
        assert torch.equal(out["untouched"][name], t)  # no weight moved
    assert all(g is None for g in out["grads"]) and out["adam_same"]  # gradients dropped, AdamW untouched
    for key in ("loss", "policy_loss", "kl_loss", "grad_norm"):
        assert out["metrics"][key] == pytest.approx(fixed["metrics"][key], rel=1e-6), key
    for name, t in fixed["theta"].items():
        torch.testing.assert_close(out["theta"][name], t, rtol=1e-6, atol=1e-8)


def test_a_step_without_a_micro_batch_is_refused(tiny_pipelines, tmp_path):
    store = tmp_path / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        policy = load_policy(tiny_pipelines["flux_kontext"], "flux_kontext")
        trainer = NFTTrainer(policy, *sections(micro_batch=0))
        with pytest.raises(ValueError, match="fit_micro_batch"):
            trainer.train_step(make_samples(policy, 2, seed=0), 2, 0)
    finally:
        dist.destroy_process_group()


def test_config_keeps_the_probe_to_gpus(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {tiny: true}\ndata: {synthetic: 4}\nreward: {judge_weight: 0}\nlearner: {micro_batch: 0}\n")
    with pytest.raises(ConfigError, match="learner.micro_batch"):
        load_config(path, ["cluster.learner_gpus=0"])
    cfg = load_config(path, ["cluster.learner_gpus=1"])
    assert cfg.learner.micro_batch == 0 and cfg.learner.memory_fraction == 0.9
    with pytest.raises(ConfigError, match="learner.memory_fraction"):
        load_config(path, ["cluster.learner_gpus=1", "learner.memory_fraction=1.5"])
