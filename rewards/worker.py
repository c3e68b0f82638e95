"""The reward worker: the async Ray shell around `RewardScorer` (rewards/scorer.py), one per reward GPU, and
around `EvalScorer` (rewards/eval_scorer.py) for evaluation edits (MAS, rubric)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
import torch

from motionnft_core import telemetry
from motionnft_core.config import EvalConfig
from motionnft_core.faults import fault_point
from motionnft_core.net import whereabouts
from rewards.eval_scorer import EvalScorer
from rewards.flow_scorer import FLOW_TERMS, FlowItem
from rewards.mas import camera_compensated_mas, motion_alignment_score
from rewards.scorer import GroupReward, RewardScorer


class RewardWorker:
    """Wrap at the call site: `ray.remote(num_gpus=g)(RewardWorker)`; the scorer is built in the actor's process.
    `name` tags its metrics (default: reward-<head of its actor id>). `build_eval` makes the evaluation scorer
    from the training scorer's flow model (so the estimator is loaded once), on the first evaluation call."""

    def __init__(
        self,
        build_scorer: Callable[[], RewardScorer],
        name: str = "",
        build_eval: Callable[..., EvalScorer] | None = None,  # called with flow=<FlowRewardScorer | None>
    ) -> None:
        telemetry.bind("reward", name or telemetry.actor_name("reward"))
        self.scorer = build_scorer()
        self.build_eval, self.evaluator = build_eval, None
        self.calls = 0
        self.busy = telemetry.Busy()  # busy while any group is being scored (calls overlap)

    def ready(self) -> bool:
        return True

    def where(self) -> str:
        return whereabouts()

    @ray.method(num_returns=2)
    async def score(self, example: Any, candidates: torch.Tensor) -> tuple[GroupReward, torch.Tensor | None]:
        """The group's reward, and apart from it the prompt's motion heat (nft.motion_focal; None otherwise). The
        heat is a return value of its own, not put here: its owner is then the caller, so the learner can still
        fetch it after this worker is gone; the driver passes it on by reference and never fetches it."""
        self.calls += 1
        with self.busy.call():
            fault_point("reward.score", self.calls)
            out = await self.scorer.score(
                example.id, example.prompt, example.input_image, example.target_image, candidates
            )
        heat, out.heat = out.heat, None
        return out, heat

    async def score_edits(self, cfg: EvalConfig, parts: int, *rows_then_edits: Any) -> list[dict]:
        """MAS and rubric of evaluation edits: n data rows, then their n edits (uint8 (3, H, W)), then with
        `parts` 3 the baseline's n edits (side-by-side judging), all passed as top-level arguments so Ray resolves
        them here; one small dict per row (`EvalScorer.score`)."""
        if self.evaluator is None:
            if self.build_eval is None:
                raise RuntimeError("this reward worker was started without an evaluation scorer (build_eval)")
            self.evaluator = self.build_eval(flow=self.scorer.flow)
        n, rest = divmod(len(rows_then_edits), parts)
        if parts not in (2, 3) or rest:
            raise ValueError(f"score_edits: {len(rows_then_edits)} arguments in {parts} parts, expected n rows, "
                             "n edits and (parts 3) n baseline edits")  # fmt: skip
        rows, edits, baseline = rows_then_edits[:n], rows_then_edits[n : 2 * n], rows_then_edits[2 * n :]
        with self.busy.call(), telemetry.timed("eval_score"):
            return await self.evaluator.score(rows, edits, cfg, baseline if parts == 3 else None)

    async def score_flow(self, *rows_then_edits: Any, mas: dict[str, float] | None = None) -> list[dict[str, float]]:
        """The training flow reward of evaluation edits (evaluation.main heldout): n data rows, then their n edits
        (uint8 (3, H, W)), as top-level arguments so Ray resolves them here; per row its terms (`FLOW_TERMS`). With
        `mas` (`rewards.mas.mas_constants`) also MotionEdit-Bench's `mas` of each edit from the same flows, and,
        when the run's reward compensates camera motion, `mas_camera_compensated` beside it."""
        n, rest = divmod(len(rows_then_edits), 2)
        if rest:
            raise ValueError(f"score_flow: {len(rows_then_edits)} arguments, expected n rows then their n edits")
        rows, edits = rows_then_edits[:n], rows_then_edits[n:]
        items = [FlowItem(r.id, r.input_image, r.target_image, e[None]) for r, e in zip(rows, edits, strict=True)]
        with self.busy.call(), telemetry.timed("eval_score"):
            scored = self.scorer.flow.score(items)
            out = [{k: float(s[k][0]) for k in FLOW_TERMS} for s in scored]
            if mas is not None:
                compensated = self.scorer.flow.reward_constants.get("camera_compensation", False)
                for row, (v_pred, v_gt) in zip(out, self.scorer.flow.flows(items), strict=True):  # cached targets
                    row["mas"] = float(motion_alignment_score(v_pred, v_gt, **mas)["mas"][0])
                    if compensated:
                        row["mas_camera_compensated"] = float(camera_compensated_mas(v_pred, v_gt, **mas)[0])
        return out

    async def close(self) -> None:
        """Before the worker is killed: its scorer's batcher task ends here, instead of being destroyed pending
        when the process exits (asyncio then prints "Task was destroyed but it is pending!")."""
        await self.scorer.close()

    def counters(self) -> dict[str, int]:
        judged = {} if self.evaluator is None else {f"eval_judge/{k}": v for k, v in self.evaluator.counters().items()}
        return {**self.scorer.counters(), **judged}
