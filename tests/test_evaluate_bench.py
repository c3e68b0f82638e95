"""`python -m learner.evaluate --baseline ...` end to end (issue 14): tiny FLUX Kontext, DIS flow, the tiny vLLM
judge of the session. A crash mid-run then a rerun scores every row once and gives the rows an uninterrupted
run would; a checkpoint against itself wins exactly half; a dead judge marks rows failed, never 0."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from common.config import load_config
from learner import evaluate as ev
from learner.checkpoint import MARKER, export_lora, step_name
from learner.eval_table import ScoreStore

RANK, ALPHA, TARGETS = 4, 8, ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def bench_config(tmp_path_factory, vllm_judge):
    """A tiny run: 12 synthetic 32 px examples (3 held out), 2-step evaluation edits, chunks of 2 rows."""
    root = tmp_path_factory.mktemp("bench_run")
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
    }  # fmt: skip
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path)
    policy = ev.load_evaluated_policy(cfg, None)  # a checkpoint with a random (non-zero) adapter
    policy.add_lora(rank=RANK, alpha=ALPHA, target_modules=TARGETS)
    g = torch.Generator().manual_seed(1)
    state = {k: 0.2 * torch.randn(v.shape, generator=g) for k, v in policy.lora_state_dict().items()}
    ckpt = Path(cfg.checkpoint.dir) / step_name(4)
    export_lora(state, ckpt / "lora", family="flux_kontext", rank=RANK, alpha=ALPHA, targets=TARGETS)
    (ckpt / MARKER).write_text("4")
    return path, ckpt


def test_bench_crash_resume_self_comparison_and_a_dead_judge(bench_config, tmp_path, monkeypatch, capsys):
    path, ckpt = bench_config
    sampled: list[tuple[str, str]] = []
    real_sample, real_append = ev.EvalSampler.sample, ScoreStore.append
    policy_of = {}

    def counting_sample(self, prompt, image):
        sampled.append((policy_of[id(self.policy)], prompt))
        return real_sample(self, prompt, image)

    real_score = ev.score_bench_policy

    def tagging_score(name, policy, *args, **kwargs):
        policy_of[id(policy)] = name
        return real_score(name, policy, *args, **kwargs)

    lost: list[dict] = []

    def crashing_append(self, rows):
        if rows and rows[0]["policy"] == "candidate" and not lost:  # the candidate's first chunk: killed
            lost.extend(rows)
            raise RuntimeError("killed while writing")
        return real_append(self, rows)

    monkeypatch.setattr(ev.EvalSampler, "sample", counting_sample)
    monkeypatch.setattr(ev, "score_bench_policy", tagging_score)
    monkeypatch.setattr(ScoreStore, "append", crashing_append)
    out = tmp_path / "vs_base"
    argv = ["--config", str(path), "--checkpoint", str(ckpt), "--baseline", "base", "--out", str(out),
            "--grid-scale", "2"]  # fmt: skip
    with pytest.raises(RuntimeError, match="killed"):
        ev.main(argv)
    assert [p for p, _ in sampled] == ["baseline"] * 3 + ["candidate"] * 2
    assert ev.main(argv) == 0  # the rerun: only the rows not written
    assert [p for p, _ in sampled[5:]] == ["candidate"] * 3

    rows = pq.read_table(out / "rows.parquet").to_pylist()
    assert len(rows) == 3 and not any(r["failed"] for r in rows)
    redone = {r["id"]: r for r in rows}
    for row in lost:  # the lost chunk, scored again after the crash: the same edits and scores
        assert redone[row["id"]]["mas"] == row["mas"] and redone[row["id"]]["overall"] == row["overall"]
    for r in rows:
        assert 0.0 <= r["mas"] <= 100.0 and 0.0 <= r["overall"] <= 5.0 and r["win_mas"] in (0.0, 0.5, 1.0)
        assert len(r["p_fidelity"]) == 6 and r["seed"] == 42 and r["judge_attempts"] >= 3
    report = (out / "report.md").read_text()
    assert "**judge at http://" in report and "eval.mas_alpha = 0.7" in report and "steps 2" in report
    assert Image.open(out / "grid.png").size == (4 * 32 * 2, 3 * 32 * 2)  # input | target | baseline | candidate
    assert "report:" in capsys.readouterr().out

    monkeypatch.setattr(ScoreStore, "append", real_append)
    with pytest.raises(ValueError, match="other candidate"):  # another comparison in the same dir
        ev.main(["--config", str(path), "--checkpoint", "base", "--baseline", "base", "--out", str(out)])

    before = len(sampled)
    same = tmp_path / "self"
    argv = ["--config", str(path), "--checkpoint", str(ckpt), "--baseline", str(ckpt), "--out", str(same),
            "--limit", "2"]  # fmt: skip
    assert ev.main(argv) == 0
    assert len(sampled) - before == 2  # one policy, sampled once
    summary = json.loads((same / "summary.json").read_text())["all"]
    for key in ("win_mas", "win_overall"):
        assert (summary["metrics"][key]["mean"], summary["metrics"][key]["low"]) == (0.5, 0.5)
    assert summary["metrics"]["mas"] == summary["metrics"]["baseline_mas"]

    dead = tmp_path / "dead_judge"
    argv = ["--config", str(path), "--checkpoint", "base", "--baseline", "base", "--out", str(dead), "--limit", "1",
            "reward.judge.url=http://127.0.0.1:9/v1", "reward.judge.max_retries=1", "reward.judge.retry_budget_s=0",
            "reward.judge.backoff_s=0.01"]  # fmt: skip
    assert ev.main(argv) == 0
    (row,) = pq.read_table(dead / "rows.parquet").to_pylist()
    assert row["failed"] and row["overall"] is None and row["win_overall"] is None and row["win_mas"] == 0.5
    assert "cannot reach" in row["judge_error"]
    text = (dead / "report.md").read_text()
    assert "1 of 1, left out of the rubric means" in text and "failures 1" in text
