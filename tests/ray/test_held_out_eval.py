"""`HeldOutEval` (learner/driver/heldout.py), the in-training evaluation, on the session's real Ray cluster with
stand-in workers: its MAS, base MAS and win rate by hand, and a worker that dies mid-evaluation (a real actor
death, `os._exit`), which drops that evaluation instead of the run. The real workers' edits and scores run end
to end in tests/system/test_e2e.py; here the workers only answer what the driver asks, so the numbers are known."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from learner.driver.heldout import HeldOutEval
from learner.driver.pools import Pools
from learner.driver.recovery import WorkerPool
from motionnft_core.config_loader import load_config

ROWS = [10, 20, 30]  # held-out rows; a stand-in edit of row r by policy version v is the value r + v
BASE = -1  # the stand-in's version of the base policy (LoRA adapter off)


def _held_out_eval(*overrides: str) -> HeldOutEval:
    cfg = load_config("configs/tiny_cpu.yaml", ["eval.every=1", "eval.during_rows=3", *overrides])
    return HeldOutEval(cfg, ROWS)


@pytest.fixture(scope="module")
def stand_ins(ray_cluster):
    """make(dies=False, fails=False) -> Pools of one rollout and one reward stand-in (a rollout that dies when
    asked for an edit, a reward worker whose scorer raises)."""
    ray = ray_cluster

    class Rollout:  # defined here: pickled by value
        def __init__(self, dies: bool) -> None:
            self.dies = dies

        def ready(self) -> bool:
            return True

        def edit(self, cfg, row, weights, base, export) -> float:  # a real worker: uint8 (3, H, W)
            if self.dies:
                os._exit(1)
            return float(row + (BASE if base else weights.version))

    class Reward:
        def __init__(self, fails: bool) -> None:
            self.fails = fails

        def ready(self) -> bool:
            return True

        def score_edits(self, cfg, parts, *rows_then_edits) -> list[dict]:
            if self.fails:
                raise ValueError("a bug in the scorer")
            n = len(rows_then_edits) // parts
            return [{"mas": {"mas": float(edit)}, "rubric": None} for edit in rows_then_edits[n : 2 * n]]

    made: list = []

    def make(dies: bool = False, fails: bool = False) -> Pools:
        rollout = ray.remote(num_cpus=0)(Rollout).remote(dies)
        reward = ray.remote(num_cpus=0)(Reward).remote(fails)
        made.extend([rollout, reward])
        return Pools(WorkerPool("rollout", [rollout], 10, 3600.0), WorkerPool("reward", [reward], 10, 3600.0),
                     learner=None, judges=[])  # fmt: skip

    yield make
    for actor in made:
        ray.kill(actor)


@pytest.fixture(scope="module")
def pools(stand_ins) -> Pools:
    return stand_ins()


def _weights(version: int) -> SimpleNamespace:
    """Stands for PublishedWeights, of which the stand-in reads the version (a stdlib type: workers unpickle it)."""
    return SimpleNamespace(version=version)


def test_lora_run_measures_its_base_alongside_the_first_evaluation(pools):
    held_out, base_mas = _held_out_eval(), []
    out = held_out(pools, step=0, weights=_weights(2), base_mas=base_mas)
    assert base_mas == [9.0, 19.0, 29.0]  # the adapter off, once per run
    assert out["eval/mas"] == 22.0 and out["eval/rows"] == 3.0  # mean of 12, 22, 32
    assert out["eval/base_mas"] == 19.0 and out["eval/mas_win_rate"] == 1.0
    assert "eval/overall" not in out and out["timing_s/eval"] > 0
    base_mas[:] = [12.0, 30.0, 20.0]  # carried by the checkpoint: not measured again; a win, a loss and a tie
    again = held_out(pools, step=1, weights=_weights(2), base_mas=base_mas)
    assert base_mas == [12.0, 30.0, 20.0] and again["eval/mas_win_rate"] == pytest.approx(0.5)
    tied = _held_out_eval("eval.tie_margin=2.5")(pools, step=2, weights=_weights(2), base_mas=base_mas)
    assert tied["eval/mas_win_rate"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)  # 32 vs 30 is a tie within 2.5


def test_full_finetune_measures_its_base_with_version_0(pools):
    held_out, base_mas = _held_out_eval("nft.full_finetune=true"), []
    held_out.measure_base(pools, _weights(0), base_mas)
    assert base_mas == [10.0, 20.0, 30.0]
    held_out.measure_base(pools, _weights(5), base_mas)  # measured already: never with later weights
    assert base_mas == [10.0, 20.0, 30.0]
    out = held_out(pools, step=0, weights=_weights(1), base_mas=base_mas)
    assert out["eval/base_mas"] == 20.0 and out["eval/mas_win_rate"] == 1.0
    lora, kept = _held_out_eval(), []
    lora.measure_base(pools, _weights(0), kept)  # a LoRA run's base is the adapter off, measured later
    assert kept == []


def test_a_worker_lost_mid_evaluation_drops_that_evaluation_not_the_run(stand_ins, capsys):
    base_mas: list[float] = []
    out = _held_out_eval()(stand_ins(dies=True), step=4, weights=_weights(2), base_mas=base_mas)
    assert out.keys() == {"eval/lost", "timing_s/eval"} and out["eval/lost"] == 1.0 and base_mas == []
    assert "step 4: the held-out evaluation lost a worker (" in capsys.readouterr().out
    _held_out_eval("nft.full_finetune=true").measure_base(stand_ins(dies=True), _weights(0), base_mas)
    assert base_mas == []  # that run logs no win rate
    assert "the base policy's held-out evaluation lost a worker" in capsys.readouterr().out


def test_an_error_that_is_no_lost_worker_is_raised(stand_ins):
    import ray

    with pytest.raises(ray.exceptions.RayTaskError, match="a bug in the scorer"):
        _held_out_eval()(stand_ins(fails=True), step=0, weights=_weights(2), base_mas=[])
    with pytest.raises(ray.exceptions.RayTaskError, match="a bug in the scorer"):
        _held_out_eval("nft.full_finetune=true").measure_base(stand_ins(fails=True), _weights(0), [])
