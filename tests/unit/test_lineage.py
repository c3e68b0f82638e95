"""Per-sample lineage files (learner/driver/lineage.py), without Ray: one row per candidate, each step once across a
resume. (A logged candidate replayed bit-exactly: tests/system/test_e2e.py.)"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import torch

from learner.driver.lineage import Lineage
from rewards.scorer import GroupReward

META = {"version": 3, "worker": "rollout-1", "seeds": [11, 12], "digests": ["aa", "bb"]}


def _reward(prompt_id: str, judge: bool) -> GroupReward:
    components = {"flow/reward": [0.5, 0.25]} | ({"judge/score": [0.8, 0.6]} if judge else {})
    probs = [[0.0, 0.0, 0.1, 0.1, 0.3, 0.5], [0.1] * 6] if judge else []
    return GroupReward(prompt_id, [0.6, 0.4], components, judge_digit_probs=probs)


def test_rows_per_candidate_and_each_step_once_across_a_resume(tmp_path):
    lineage = Lineage(tmp_path)
    r, valid = torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64), torch.tensor([True, False])
    for step in range(4):
        lineage.write(step, ["p0", "p1"], [META, META], [_reward("p0", True), _reward("p1", False)], r, valid)
    rows = pq.read_table(lineage.path(1)).to_pylist()
    assert [(x["prompt_id"], x["k"], x["seed"], x["image_digest"]) for x in rows] == [
        ("p0", 0, 11, "aa"), ("p0", 1, 12, "bb"), ("p1", 0, 11, "aa"), ("p1", 1, 12, "bb")]  # fmt: skip
    assert [x["optimality"] for x in rows] == [0.9, 0.1, 0.5, 0.5] and [x["valid"] for x in rows] == [1, 1, 0, 0]
    assert json.loads(rows[0]["judge_digit_probs"])[-1] == 0.5 and rows[2]["judge_digit_probs"] is None
    assert rows[3]["judge/score"] is None and rows[1]["flow/reward"] == 0.25 and rows[0]["version"] == 3
    Lineage(tmp_path, resume_at=2)  # resumed from the checkpoint of step 2: steps 2 and 3 will be redone
    assert sorted(p.name for p in (tmp_path / "lineage").iterdir()) == ["step_00000000.parquet",
                                                                       "step_00000001.parquet"]  # fmt: skip
