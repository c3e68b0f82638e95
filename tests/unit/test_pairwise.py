"""Side-by-side judging (rewards/pairwise.py, `eval.pairwise`): the preference from both orders by hand,
a judge's position bias cancelling, a failed order marking the row failed (never 0.5), and the comparison
carried through the table, the statistics and the report. The judge transport is scripted; the real vLLM judge
answers the same three-image calls in test_evaluate_bench."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pyarrow as pa
import pytest
import torch

from evaluation.report import ReportInfo, format_report, summary_table
from evaluation.table import SCORE_SCHEMA, pair_rows, score_row
from motionnft_core.config import EvalConfig, JudgeConfig
from motionnft_core.eval_stats import ALL, summarize
from rewards.judge import JudgeClient, _data_url, expected_digit
from rewards.judge_prompts import pairwise_prompt
from rewards.pairwise import judge_pairwise_many, pairwise_preference

BASELINE = torch.zeros(3, 8, 8, dtype=torch.uint8)
CANDIDATE = torch.full((3, 8, 8), 200, dtype=torch.uint8)


def _probs_with_mean(e: float) -> list[float]:
    """Digit probabilities on the two digits around `e` with expected digit exactly `e`."""
    low = min(int(math.floor(e)), 4)
    p = [0.0] * 6
    p[low], p[low + 1] = low + 1 - e, e - low
    return p


def test_preference_by_hand():
    assert expected_digit([0.1, 0.1, 0.2, 0.2, 0.2, 0.2]) == pytest.approx(2.9)
    one_hot = [[1.0 if k == d else 0.0 for k in range(6)] for d in range(6)]
    assert pairwise_preference(one_hot[5], one_hot[0]) == 1.0  # both orders: the candidate clearly better
    assert pairwise_preference(one_hot[0], one_hot[5]) == 0.0
    # baseline first E = 2.5 -> q1 = 0.5; candidate first E = 4 -> q2 = 1 - 0.8 = 0.2; mean 0.35
    assert pairwise_preference([0, 0, 0.5, 0.5, 0, 0], one_hot[4]) == pytest.approx(0.35)
    with pytest.raises(ValueError, match="6 digit probabilities"):
        expected_digit([0.5, 0.5])


def test_a_constant_position_bias_cancels():
    for truth in (0.2, 0.5, 0.7):
        for bias in (-1.0, 0.0, 1.0):  # the judge adds `bias` digits to whatever it answers
            first = _probs_with_mean(5 * truth + bias)  # baseline first: the candidate is edit B
            second = _probs_with_mean(5 * (1 - truth) + bias)  # candidate first: the candidate is edit A
            assert pairwise_preference(first, second) == pytest.approx(truth, abs=1e-12)


def _client(seen: list) -> tuple[JudgeClient, httpx.MockTransport]:
    """A judge preferring the candidate with truth 0.7 and a bias of +1 digit towards the second image; an
    instruction with [slow] never answers in time."""
    client = JudgeClient("http://judge:1/v1", JudgeConfig(backoff_s=0.001, max_backoff_s=0.01, max_retries=1,
                                                          retry_budget_s=0))  # fmt: skip
    candidate_url = _data_url(CANDIDATE, client.cfg.image_format)

    def handle(request: httpx.Request) -> httpx.Response:
        content = json.loads(request.content)["messages"][0]["content"]
        urls, text = [c["image_url"]["url"] for c in content[:-1]], content[-1]["text"]
        seen.append((len(urls), text))
        if "[slow]" in text:
            raise httpx.ReadTimeout("timed out", request=request)
        e = (5 * 0.7 if urls[2] == candidate_url else 5 * 0.3) + 1.0
        top = [{"token": str(d), "logprob": math.log(p) if p > 0 else -9999.0}
               for d, p in enumerate(_probs_with_mean(e))]  # fmt: skip
        return httpx.Response(200, json={"choices": [{"logprobs": {"content": [{"top_logprobs": top}]}}]})

    return client, httpx.MockTransport(handle)


def test_both_orders_are_asked_the_bias_cancels_and_a_failed_order_fails_the_row():
    seen: list = []
    client, transport = _client(seen)

    async def go():
        client._state().http._transport = transport  # only the transport is scripted
        return await judge_pairwise_many(client, [BASELINE] * 2, [BASELINE] * 2, [CANDIDATE] * 2,
                                         ["turn the head", "turn the head [slow]"])  # fmt: skip

    good, slow = asyncio.run(go())
    assert not good.failed and good.preference == pytest.approx(0.7, abs=1e-9) and good.attempts == 2
    assert expected_digit(good.p_baseline_first) == pytest.approx(4.5) and expected_digit(
        good.p_candidate_first) == pytest.approx(2.5)  # fmt: skip
    assert slow.failed and slow.preference is None and "timeout" in slow.error  # not 0.5, not 0
    assert slow.attempts == 4  # both orders, each tried 1 + max_retries times
    assert all(n == 3 for n, _ in seen)  # input, edit A, edit B
    assert seen[0][1] == pairwise_prompt("turn the head") and "0: edit A is clearly better." in seen[0][1]
    assert client.metrics["failures"] == 2 and client.metrics["timeouts"] == 4


TERMS = {"mas": 50.0, "d_mag": 0.1, "d_dir": 0.1, "distance": 0.2, "motion_ratio": 1.0, "static": 0.0}
RUBRIC = {"fidelity": 3.0, "preservation": 3.0, "coherence": 3.0, "overall": 3.0, "digit_probs": None, "attempts": 3,
          "failed": False, "error": ""}  # fmt: skip


def _rows(preferences: list[float | None] | None) -> list[dict]:
    """Paired rows of equal MAS and rubric whose candidate rows carry `preferences` (None: a failed comparison;
    `preferences` None: no comparison asked, one row)."""
    rows = []
    for i, p in enumerate(preferences or [None]):
        if preferences is None:
            pair = None
        elif p is None:
            pair = {"preference": None, "p_baseline_first": None, "p_candidate_first": None, "attempts": 4,
                    "failed": True, "error": "judge failed after 2 attempt(s): timeout"}  # fmt: skip
        else:
            pair = {"preference": p, "p_baseline_first": [0.0] * 5 + [1.0], "p_candidate_first": [1.0] + [0.0] * 5,
                    "attempts": 2, "failed": False, "error": ""}  # fmt: skip
        rows.append(score_row("candidate", f"ex{i}", "Pose/Posture", 42, TERMS, RUBRIC, pair))
        rows.append(score_row("baseline", f"ex{i}", "Pose/Posture", 42, TERMS, RUBRIC))
    table = pa.Table.from_pylist(rows, schema=SCORE_SCHEMA)
    return pair_rows(table, [f"ex{i}" for i in range(len(rows) // 2)], margin=0.0)


def test_the_comparison_goes_through_the_table_the_statistics_and_the_report():
    rows = _rows([0.9, 0.5, 0.2, None])
    assert [r["win_pairwise"] for r in rows] == [1.0, 0.5, 0.0, None]
    assert rows[3]["pairwise_failed"] and "baseline_pairwise" not in rows[0]
    cfg = EvalConfig(bootstrap_samples=200)
    groups = summarize(rows, cfg)
    everything = groups[ALL]
    assert everything.pairwise_failed == 1 and everything.metrics["win_pairwise"].n == 3
    assert everything.metrics["win_pairwise"].mean == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
    assert everything.metrics["pairwise"].mean == pytest.approx((0.9 + 0.5 + 0.2) / 3)
    table = summary_table(groups)
    assert "side-by-side win rate %" in table and table.splitlines()[2].endswith("| 1 |")
    info = ReportInfo(candidate="c", baseline="b", split="s", judge_model="j", prompt_digest="d")
    assert "1 of 4 rows failed and are left out of it" in format_report(groups, info, cfg)
    plain = summarize(_rows(None), cfg)  # no comparison asked: no column, no line
    assert "side-by-side" not in summary_table(plain) and "side by side" not in format_report(plain, info, cfg)
