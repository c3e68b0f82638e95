"""`python -m evaluation.main compare ...` end to end on the Ray pools of the session's cluster (edits
on rollout workers, MAS, rubric and side-by-side judging on a reward worker): tiny FLUX Kontext, DIS flow, the tiny
vLLM judge of the session. A crash mid-run then a rerun (on another number of rollout workers, one of which is
killed mid-chunk) scores every row once and gives the rows an uninterrupted run would; the edit a worker makes from
the checkpoint's export is the one diffusers' own LoRA loader makes in process; a checkpoint against itself wins
exactly half; a dead judge marks rows failed, never 0; every actor a run started is gone after it."""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from actors.eval_sampler import EvalSampler
from evaluation import compare as ev
from evaluation import main as cli
from evaluation.report import LABEL_BAND
from evaluation.table import ScoreStore
from motionnft_core.config_loader import load_config
from motionnft_core.models.weights import load_exported_policy
from tests.eval_runs import ALPHA, RANK, TARGETS, adapter_state, cpu_pools, write_checkpoint, write_config


@pytest.fixture(scope="module")
def compare_config(tmp_path_factory, vllm_judge):
    """A tiny run: 12 synthetic 32 px examples (3 held out), 2-step evaluation edits, chunks of 2 rows."""
    root = tmp_path_factory.mktemp("compare_run")
    tree = {
        "model": {"tiny": True, "family": "flux_kontext", "dtype": "float32", "cache_dir": str(root / "cache")},
        "data": {"synthetic": 12, "synthetic_size": 32, "eval_fraction": 0.5, "seed": 0},
        "rollout": {"group_size": 2, "prompts_per_step": 1, "height": 32, "width": 32},
        "reward": {"flow_weight": 1.0, "judge_weight": 0.0, "flow": {"estimator": "dis"},
                   "judge": {"url": vllm_judge.url, "max_model_len": 2048}},
        "nft": {"lora_rank": RANK, "lora_alpha": ALPHA, "lora_targets": TARGETS},
        "eval": {"num_steps": 2, "chunk_rows": 2, "bootstrap_samples": 200},
        "checkpoint": {"dir": str(root / "ckpt")},
        "logging": {"dir": str(root / "run")},
        "cluster": cpu_pools(2, judge=True),
    }  # fmt: skip
    path = write_config(root, tree)
    cfg = load_config(path)
    ckpt = write_checkpoint(cfg, 4, adapter_state(cfg, seed=1))  # a checkpoint with a random (non-zero) adapter
    return path, ckpt


def _alive_actors(expected: int | None = None) -> int:
    """Actors of the session's cluster not dead (from the GCS: the test cluster runs no dashboard); with
    `expected`, waits up to 10 s for that count (`ray.kill` returns before the actor is gone)."""
    deadline = time.monotonic() + 10
    while True:
        alive = sum(a["State"] != "DEAD" for a in ray._private.state.actors().values())
        if expected is None or alive == expected or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.mark.slow  # 65 s, and 20 s more to set up: past what the fast loop can hold
def test_compare_on_the_pools_crash_resume_self_comparison_and_a_dead_judge(compare_config, ray_cluster, tmp_path,
                                                                          monkeypatch, capsys):  # fmt: skip
    path, ckpt = compare_config
    actors_before = _alive_actors()
    calls: list[str] = []
    scored: list[tuple[str, int]] = []
    real_score, real_append = ev.score_compare_policy, ScoreStore.append

    def counting_score(name, *args, **kwargs):  # the driver's view: which policy, how many rows sampled
        calls.append(name)
        scored.append((name, real_score(name, *args, **kwargs)))
        return scored[-1][1]

    lost: list[dict] = []

    def crashing_append(self, rows):
        if rows and rows[0]["policy"] == "candidate" and not lost:  # the candidate's first chunk: killed
            lost.extend(rows)
            raise RuntimeError("killed while writing")
        return real_append(self, rows)

    monkeypatch.setattr(ev, "score_compare_policy", counting_score)
    monkeypatch.setattr(ScoreStore, "append", crashing_append)
    out = tmp_path / "vs_base"
    argv = ["compare", "--config", str(path), "--checkpoint", str(ckpt), "--baseline", "base", "--out", str(out),
            "--grid-scale", "2", "eval.pairwise=true"]  # fmt: skip
    with pytest.raises(RuntimeError, match="killed"):
        cli.main(argv)
    assert calls == ["baseline", "candidate"] and scored == [("baseline", 3)] and len(lost) == 2
    assert _alive_actors(actors_before) == actors_before  # the failed run stopped what it started
    # The rerun scores the rows not written only, on one worker in one chunk (rows move to other workers and
    # chunks), and that worker is killed while it samples the candidate's chunk (Ray restarts it, with an empty
    # adapter): the chunk is sampled and scored again, the worker loads the checkpoint again before it edits.
    real_sample, killed = ev.Side.sample, []

    def killing_sample(self, rollouts, rows, cfg):
        refs = real_sample(self, rollouts, rows, cfg)
        if self.export is not None and not killed:  # the candidate's chunk
            killed.append(rollouts[0])
            ray.kill(rollouts[0], no_restart=False)
        return refs

    monkeypatch.setattr(ev.Side, "sample", killing_sample)
    assert cli.main([*argv, "cluster.rollout_workers=1", "eval.chunk_rows=3"]) == 0 and killed
    assert scored[1:] == [("candidate", 3)]
    monkeypatch.setattr(ev.Side, "sample", real_sample)

    rows = pq.read_table(out / "rows.parquet").to_pylist()
    assert len(rows) == 3 and not any(r["failed"] for r in rows)
    redone = {r["id"]: r for r in rows}
    for row in lost:  # the lost chunk, scored again after the crash: the same edits and scores, and the same
        again = redone[row["id"]]  # side-by-side answer with the baseline's edits sampled again
        assert again["mas"] == row["mas"] and again["overall"] == row["overall"]
        assert again["pairwise"] == pytest.approx(row["pairwise"], abs=1e-6)
    for r in rows:
        assert 0.0 <= r["mas"] <= 100.0 and 0.0 <= r["overall"] <= 5.0 and r["win_mas"] in (0.0, 0.5, 1.0)
        assert len(r["p_fidelity"]) == 6 and r["seed"] == 42 and r["judge_attempts"] >= 3
        assert 0.0 <= r["pairwise"] <= 1.0 and r["win_pairwise"] in (0.0, 0.5, 1.0) and not r["pairwise_failed"]
        assert len(r["p_pair_baseline_first"]) == len(r["p_pair_candidate_first"]) == 6 and r["pairwise_attempts"] >= 2
    assert any(r["mas"] != r["baseline_mas"] for r in rows)  # the adapter was loaded: the policies differ
    report = (out / "report.md").read_text()
    assert "**judge at http://" in report and "eval.mas_alpha = 0.7" in report and "steps 2" in report
    assert "requests " in report  # the reward worker's rubric client counted its requests
    assert "side-by-side win rate %" in report and "0 of 3 rows failed" in report
    grid = Image.open(out / "grid.png")  # input | target | baseline | candidate, labelled above
    assert grid.size == (4 * 32 * 2, LABEL_BAND + 3 * 32 * 2)
    printed = capsys.readouterr().out
    assert "report:" in printed and "sampling the baseline's 3 edits again" in printed
    assert "candidate: chunk 1/1 lost a worker" in printed

    # The worker's edit from the export (read into the training adapter) = diffusers' loader in process.
    cfg = load_config(path)
    example = ev.compare_examples(cfg, "", 1)[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the rollout actor (Ray gives a fractional-CPU actor one thread)
    try:
        direct = EvalSampler(load_exported_policy(cfg, ckpt / "lora"), cfg.eval).sample(example.prompt,
                                                                                           example.input_image)
    finally:
        torch.set_num_threads(threads)
    pooled = ev._read_png(ev._edit_png(out / "edits", "candidate", example.id))
    assert torch.equal(pooled, direct), (pooled.int() - direct.int()).abs().max()

    monkeypatch.setattr(ScoreStore, "append", real_append)
    capsys.readouterr()  # another comparison in the same dir: refused with a message, no traceback
    other = ["compare", "--config", str(path), "--checkpoint", "base", "--baseline", "base", "--out", str(out)]
    assert cli.main(other) == 2
    assert "holds a comparison with other candidate" in capsys.readouterr().err

    one_worker = ["cluster.rollout_workers=1"]
    same = tmp_path / "self"
    argv = ["compare", "--config", str(path), "--checkpoint", str(ckpt), "--baseline", str(ckpt), "--out", str(same),
            "--limit", "2", "eval.pairwise=true", *one_worker]  # fmt: skip
    assert cli.main(argv) == 0
    assert scored[2:] == [("baseline", 2)]  # one policy, sampled once
    summary = json.loads((same / "summary.json").read_text())["all"]
    for key in ("win_mas", "win_overall", "win_pairwise"):  # identical edits side by side: a tie, not asked
        assert (summary["metrics"][key]["mean"], summary["metrics"][key]["low"]) == (0.5, 0.5)
    assert summary["metrics"]["mas"] == summary["metrics"]["baseline_mas"]

    dead = tmp_path / "dead_judge"
    argv = ["compare", "--config", str(path), "--checkpoint", "base", "--baseline", "base", "--out", str(dead),
            "--limit", "1",
            "reward.judge.url=http://127.0.0.1:9/v1", "reward.judge.max_retries=1", "reward.judge.retry_budget_s=0",
            "reward.judge.backoff_s=0.01", *one_worker]  # fmt: skip
    assert cli.main(argv) == 0
    (row,) = pq.read_table(dead / "rows.parquet").to_pylist()
    assert row["failed"] and row["overall"] is None and row["win_overall"] is None and row["win_mas"] == 0.5
    assert "cannot reach" in row["judge_error"]
    text = (dead / "report.md").read_text()
    assert "1 of 1, left out of the rubric means" in text and "failures 1" in text
    assert _alive_actors(actors_before) == actors_before
