"""MAS and the rubric of evaluation edits (docs/evaluation.md), the part of an evaluation a reward worker runs.

A reward worker already holds the run's flow estimator and, when the run has a judge, the judge's addresses
and key; the images it needs (input, target, edit) reach it by reference. So both scores are made here, next
to the images, and only small per-row dicts go back to the driver. For the rows of one call:
1. the flows input -> edit and input -> target in one batched estimator call (`FlowRewardScorer.flows`, its
   own target-flow cache: the training scorer's cache and batcher are not shared), in a thread,
2. meanwhile the rubric of every row through a rubric-mode judge client (rewards/rubric.py: a row the judge
   cannot score within its retry budget comes back marked failed, never 0),
3. MAS and its terms from the flows (rewards/mas.py, `eval.mas_*`),
4. with the baseline's edits of the same rows (`eval.pairwise`), the judge's side-by-side comparison of each
   row in both orders (rewards/pairwise.py), beside the rubric.
Plain asyncio, no Ray: the reward worker (rewards/worker.py) is its shell.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict
from typing import Protocol

import torch

from motionnft_core.config import EvalConfig, FlowRewardConfig, JudgeConfig
from motionnft_core.secret import Secret
from rewards.flow_model import build_flow_estimator
from rewards.flow_scorer import FlowItem, FlowRewardScorer
from rewards.judge import JudgeClient
from rewards.mas import camera_compensated_mas, mas_constants, motion_alignment_score
from rewards.pairwise import judge_pairwise_many
from rewards.rubric import judge_rubric_many, rubric_client


class Row(Protocol):
    """What scoring an edit needs of a data row (motionnft_core.data.motionedit.MotionExample satisfies it)."""

    id: str
    prompt: str
    input_image: torch.Tensor  # uint8 (3, H, W)
    target_image: torch.Tensor


class EvalScorer:
    """MAS (always) and the rubric (when there is a judge) of evaluation edits, one dict per row."""

    def __init__(self, flows: FlowRewardScorer, judge: JudgeClient | None) -> None:
        self.flows, self.judge = flows, judge

    async def score(
        self, rows: Sequence[Row], edits: Sequence[torch.Tensor], cfg: EvalConfig,
        baseline_edits: Sequence[torch.Tensor] | None = None,
    ) -> list[dict]:  # fmt: skip
        """Per row: `{"mas": {mas, d_mag, d_dir, distance, motion_ratio, static}, "rubric": RubricRow fields or
        None, "pairwise": PairwiseRow fields or None}` (floats and lists only). rows: with id, prompt,
        input_image, target_image; edits (and `baseline_edits`, for the side-by-side judging): uint8 (3, H, W)."""
        if len(rows) != len(edits) or (baseline_edits is not None and len(baseline_edits) != len(rows)):
            counts = "" if baseline_edits is None else f", {len(baseline_edits)} baseline edits"
            raise ValueError(f"EvalScorer.score: {len(rows)} rows, {len(edits)} edits{counts}")
        if baseline_edits is not None and self.judge is None:
            raise ValueError("EvalScorer.score: side-by-side judging (baseline_edits) needs a judge")
        items = [FlowItem(r.id, r.input_image, r.target_image, e[None]) for r, e in zip(rows, edits, strict=True)]
        mas_task = asyncio.ensure_future(asyncio.to_thread(self._mas, items, cfg))
        rubric = pairwise = None
        try:
            if self.judge is not None:
                inputs, prompts = [r.input_image for r in rows], [r.prompt for r in rows]
                asks = [judge_rubric_many(self.judge, inputs, list(edits), prompts)]
                if baseline_edits is not None:
                    asks.append(judge_pairwise_many(self.judge, inputs, list(baseline_edits), list(edits), prompts))
                rubric, *rest = await asyncio.gather(*asks)
                pairwise = rest[0] if rest else None
            mas = await mas_task
        finally:
            if not mas_task.done():
                mas_task.cancel()
        return [{"mas": m, "rubric": None if rubric is None else asdict(rubric[i]),
                 "pairwise": None if pairwise is None else asdict(pairwise[i])} for i, m in enumerate(mas)]  # fmt: skip

    def _mas(self, items: list[FlowItem], cfg: EvalConfig) -> list[dict[str, float]]:
        """MAS's terms per row; for a run whose reward compensates camera motion (`reward.flow.camera_compensation`)
        also `mas_camera_compensated`, the MAS of the object motion alone, beside the published MAS."""
        compensated = self.flows.reward_constants.get("camera_compensation", False)
        out = []
        for v_pred, v_gt in self.flows.flows(items):
            terms = motion_alignment_score(v_pred, v_gt, **mas_constants(cfg))
            row = {k: float(v[0]) for k, v in terms.items()}
            if compensated:
                row["mas_camera_compensated"] = float(camera_compensated_mas(v_pred, v_gt, **mas_constants(cfg))[0])
            out.append(row)
        return out

    def counters(self) -> dict[str, int]:
        """The rubric client's requests, retries, timeouts, failures (empty without a judge)."""
        return {} if self.judge is None else dict(self.judge.metrics)


def build_eval_scorer(
    flow_cfg: FlowRewardConfig, judge_cfg: JudgeConfig, judge_urls: Sequence[str], *, device: str, cache_dir: str,
    judge_key: Secret | None = None, flow: FlowRewardScorer | None = None,
) -> EvalScorer:  # fmt: skip
    """The evaluation scorer of a reward worker: the estimator of its training scorer `flow` when it has one
    (else `reward.flow.*` built here), and a rubric client over `judge_urls` (none given: MAS only)."""
    estimator = flow.estimator if flow is not None else build_flow_estimator(flow_cfg, device=device,
                                                                             cache_dir=cache_dir)  # fmt: skip
    judge = rubric_client(list(judge_urls), judge_cfg, judge_key) if judge_urls else None
    return EvalScorer(FlowRewardScorer(estimator, flow_cfg), judge)
