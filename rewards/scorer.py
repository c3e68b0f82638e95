"""A group's reward: the flow reward and the MLLM judge, scored concurrently and blended (phase 3 of a step,
docs/architecture.md).

`RewardScorer` is plain asyncio: concurrent `score` calls (one per group, from many rollouts) park their
candidates in a queue; one batcher task drains up to `reward.batch_pairs` candidate pairs or waits at most
`reward.max_wait_ms`, then runs a single batched flow call in a thread while the judge requests of the same groups
are in flight. The reward worker (rewards/worker.py) is its Ray shell. A weight of 0 means that model is never
built (`build_reward_scorer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from motionnft_core import telemetry
from motionnft_core.config import RewardConfig
from motionnft_core.secret import Secret
from rewards.flow_scorer import FlowItem, FlowRewardScorer, build_flow_scorer, preservation_constants
from rewards.judge import JudgeClient
from rewards.preservation import blend_preservation

T = TypeVar("T")


@dataclass
class GroupReward:
    """Per-candidate reward components of one group: small lists of floats the driver may fetch."""

    prompt_id: str
    reward: list[float]  # R = w_flow * r_flow + w_mllm * r_mllm (then (1 - w) * R + w * r_pres, preservation on)
    components: dict[str, list[float]] = field(default_factory=dict)  # flow/l_q, flow/reward, judge/score, ...
    timing: dict[str, float] = field(default_factory=dict)
    judge_digit_probs: list = field(default_factory=list)  # per candidate: the judge's P(digit 0..5) (lineage)
    heat: Any = None  # nft.motion_focal: the prompt's |input->target flow| (H, W); the driver holds a reference


def blend(flow: torch.Tensor | None, judge: torch.Tensor | None, *, flow_weight: float, judge_weight: float):
    """R = w_flow * r_flow + w_mllm * r_mllm; a component with weight 0 may be None."""
    total = torch.zeros(())
    if flow_weight > 0:
        total = total + flow_weight * flow
    if judge_weight > 0:
        total = total + judge_weight * judge
    return total


@dataclass
class _Pending:
    item: FlowItem
    future: asyncio.Future


class RewardScorer:
    """Blends `reward.flow_weight` x flow reward and `reward.judge_weight` x judge score per candidate; the
    judge clients are used round-robin, one group each."""

    def __init__(self, flow: FlowRewardScorer | None, judges: Sequence[JudgeClient], cfg: RewardConfig) -> None:
        if cfg.flow_weight > 0 and flow is None:
            raise ValueError("reward.flow_weight > 0 needs a flow scorer")
        if cfg.judge_weight > 0 and not judges:
            raise ValueError("reward.judge_weight > 0 needs at least one judge client")
        self.flow, self.judges = flow, list(judges)
        self.flow_weight, self.judge_weight = cfg.flow_weight, cfg.judge_weight
        self.preservation_weight = cfg.preservation_weight
        if self.preservation_weight > 0 and (flow is None or flow.preservation is None):
            raise ValueError("reward.preservation_weight > 0 needs a flow scorer built with its preservation "
                             "constants (preservation_constants)")  # fmt: skip
        self.batch_pairs, self.max_wait_s = cfg.batch_pairs, cfg.max_wait_ms / 1000
        self._queue: asyncio.Queue[_Pending] | None = None
        self._batcher: asyncio.Task | None = None
        self._next_judge = 0
        self.metrics = {"groups": 0, "flow_calls": 0, "flow_pairs": 0}

    async def score(self, prompt_id: str, prompt: str, input_image, target_image, candidates) -> GroupReward:
        """Score K candidates (uint8 (K,3,H,W)) of one prompt against its input and ground-truth target."""
        t0 = time.perf_counter()
        flow_task = judge_task = None
        if self.flow_weight > 0:
            flow_task = asyncio.ensure_future(self._flow(FlowItem(prompt_id, input_image, target_image, candidates)))
        if self.judge_weight > 0:
            judge = self.judges[self._next_judge % len(self.judges)]
            self._next_judge += 1
            judge_task = asyncio.ensure_future(_timed("judge", judge.score_many(input_image, candidates, prompt)))
        components: dict[str, list[float]] = {}
        r_flow = r_judge = r_pres = heat = None
        digit_probs: list = []
        try:
            if flow_task is not None:
                parts = await flow_task
                r_flow = parts["reward"].double()
                if "heat" in parts:  # per prompt, not a per-candidate term
                    parts = dict(parts)
                    heat = parts.pop("heat")
                if self.preservation_weight > 0:  # its own metrics, not part of the flow reward's
                    parts = dict(parts)
                    r_pres = parts.pop("preservation").double()
                    components["preservation/score"] = r_pres.tolist()
                    components["preservation/static_share"] = parts.pop("static_share").double().tolist()
                components.update({f"flow/{k}": v.double().tolist() for k, v in parts.items()})
            if judge_task is not None:
                scores = await judge_task
                r_judge = torch.tensor([s.score for s in scores], dtype=torch.float64)
                components["judge/score"] = r_judge.tolist()
                digit_probs = [s.digit_probs for s in scores]
        finally:
            for task in (flow_task, judge_task):  # a failure of one component cancels the other, never half-scores
                if task is not None and not task.done():
                    task.cancel()
        reward = blend(r_flow, r_judge, flow_weight=self.flow_weight, judge_weight=self.judge_weight)
        if r_pres is not None:
            reward = blend_preservation(reward, r_pres, weight=self.preservation_weight)
        self.metrics["groups"] += 1
        elapsed = time.perf_counter() - t0
        telemetry.seconds("score", elapsed)
        return GroupReward(prompt_id, reward.tolist(), components, {"reward_s": elapsed}, digit_probs, heat)

    async def _flow(self, item: FlowItem) -> dict[str, torch.Tensor]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._batcher = asyncio.create_task(self._run_batches())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(item, future))
        return await future

    async def _run_batches(self) -> None:
        """Drain the queue into batches of <= batch_pairs candidate pairs (at least one group each)."""
        queue = self._queue
        assert queue is not None
        batch: list[_Pending] = []
        try:
            while True:
                batch = [await queue.get()]
                pairs = len(batch[0].item.candidates)
                deadline = time.perf_counter() + self.max_wait_s
                while pairs < self.batch_pairs:
                    timeout = deadline - time.perf_counter()
                    if timeout <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(queue.get(), timeout)
                    except TimeoutError:
                        break
                    batch.append(nxt)
                    pairs += len(nxt.item.candidates)
                live = [p for p in batch if not p.future.cancelled()]
                if not live:
                    continue
                try:
                    with telemetry.timed("flow"):  # one batched call, for every group in it
                        results = await asyncio.to_thread(self.flow.score, [p.item for p in live])
                except Exception as e:  # noqa: BLE001 - handed to every waiting caller, never swallowed
                    for p in live:
                        if not p.future.done():
                            p.future.set_exception(e)
                    continue
                self.metrics["flow_calls"] += 1
                self.metrics["flow_pairs"] += pairs
                for p, r in zip(live, results, strict=True):
                    if not p.future.done():
                        p.future.set_result(r)
        finally:  # cancelled by close: no caller waits forever on a batch that will never run, or on the queue
            while not queue.empty():
                batch.append(queue.get_nowait())
            for p in batch:
                if not p.future.done():
                    p.future.cancel()

    async def close(self) -> None:
        """Stop the batcher task (a scorer that never scored a flow has none): cancelled and awaited, so no
        pending task is left for the event loop to destroy when the process ends. Waiting callers get
        CancelledError. Scoring again after close starts a new batcher."""
        batcher, self._batcher, self._queue = self._batcher, None, None
        if batcher is None or batcher.done():
            return
        batcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await batcher

    def judge_metrics(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for j in self.judges:
            for k, v in j.metrics.items():
                out[k] = out.get(k, 0) + v
        return out

    def counters(self) -> dict[str, int]:
        """Everything counted since this scorer was built: groups and flow batches, the flow estimator's calls
        and target-flow cache, the judge's requests, retries, timeouts and failures (namespaced flow/, judge/)."""
        flow = {} if self.flow is None else {f"flow/{k}": v for k, v in self.flow.counters().items()}
        judge = {f"judge/{k}": v for k, v in self.judge_metrics().items()}
        return {**self.metrics, **flow, **judge}


async def _timed(phase: str, work: Awaitable[T]) -> T:
    """Await `work`, observing its seconds as `phase` (a task of its own, so the time is its own)."""
    with telemetry.timed(phase):
        return await work


def build_reward_scorer(cfg: RewardConfig, judge_urls: Sequence[str], *, device: str, cache_dir: str,
                        judge_key: Secret | None = None, heat: bool = False) -> RewardScorer:  # fmt: skip
    """The scorer a reward worker runs: the flow reward on `device` and one judge client over the replicas'
    URLs (failing over between them, authorized with `judge_key`); a component whose weight is 0 is never built
    (no RAFT weights loaded, no judge contacted). `heat` (nft.motion_focal): each group's reward carries its
    prompt's ground-truth motion magnitude."""
    flow = None
    if cfg.flow_weight > 0:
        flow = build_flow_scorer(cfg.flow, device=device, cache_dir=cache_dir, preservation=preservation_constants(cfg),
                                 heat=heat)  # fmt: skip
    judges = [JudgeClient(judge_urls, cfg.judge, judge_key)] if cfg.judge_weight > 0 else []  # fails over
    return RewardScorer(flow, judges, cfg)
