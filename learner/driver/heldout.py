"""Evaluation on the Ray pools (docs/evaluation.md): rollout workers sample the edits, reward workers score them,
the driver schedules and gathers a small dict per row.

- Edits: one `RolloutWorker.edit` call per row, rows spread round-robin over the workers given. An edit is a
  function of its row, the policy and `eval.*` only (actors/eval_sampler.py: the seed is the row's, never the
  worker's or the chunk's), so which worker makes it does not matter. It stays in the object store.
- Scores: the rows split into contiguous slices, one `RewardWorker.score_edits` call per reward worker with the
  rows and their edits as references (resolved there): MAS from the training flow estimator and the rubric
  from the judge client the reward worker holds (rewards/eval_scorer.py). The rubric runs there, not here,
  because the judge needs the images: here it would pull every edit through the driver.
- Images reach the driver only as PNG bytes of the few rows a report shows, encoded by a task next to the edit.

During training (`eval.every`), `HeldOutEval` does the same with the step's published weights on the run's own
pools, and returns `eval/*` keys for the step's metrics line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray

from learner.driver.board import encode_png
from learner.driver.pools import Pools
from motionnft_core.config import Config, EvalConfig, RolloutConfig
from motionnft_core.errors import lost_worker
from motionnft_core.eval_stats import outcomes
from motionnft_core.models.weights import LoraExport, PublishedWeights


def sample_edits(rollouts: Sequence[Any], rows: Sequence[Any], how: EvalConfig | RolloutConfig, *,
                 weights: PublishedWeights | None = None, base: bool = False,
                 export: LoraExport | None = None) -> list[Any]:  # fmt: skip
    """One edit reference per row (rows: references of data rows), row i on rollout worker i mod n, by the
    policy of `weights`, of a checkpoint's `export`, or held, with the pipeline's sampler (`eval.*`) or the
    rollout solver (`RolloutWorker.edit`)."""
    return [rollouts[i % len(rollouts)].edit.remote(how, row, weights, base, export) for i, row in enumerate(rows)]


def score_edits(rewards: Sequence[Any], rows: Sequence[Any], edits: Sequence[Any], cfg: EvalConfig,
                baseline_edits: Sequence[Any] | None = None) -> list[Any]:  # fmt: skip
    """MAS and rubric of the edits (and with `baseline_edits`, the side-by-side comparison with them): one call
    per reward worker on a contiguous slice of the rows; references of lists of per-row dicts
    (`EvalScorer.score`), in row order (`gather` flattens them)."""
    size = math.ceil(len(rows) / len(rewards)) if rows else 1
    parts = [rows, edits] if baseline_edits is None else [rows, edits, baseline_edits]
    return [rewards[k].score_edits.remote(cfg, len(parts), *(ref for part in parts for ref in part[s : s + size]))
            for k, s in enumerate(range(0, len(rows), size))]  # fmt: skip


def gather(refs: Sequence[Any]) -> list[dict]:
    """The per-row dicts of `score_edits`' calls, in row order."""
    return [row for part in ray.get(list(refs)) for row in part]


def edit_pngs(edits: Sequence[Any]) -> list[bytes]:
    """PNG bytes of `edits` (references), each encoded by a task where the edit is."""
    encode = ray.remote(num_cpus=0)(encode_png)
    return ray.get([encode.remote(e) for e in edits])


def wait_until_up(actors: Sequence[Any], timeout_s: float) -> None:
    """Until every actor answers `ready` (one Ray is restarting refuses calls meanwhile); TimeoutError after
    `timeout_s`, naming how many did not come back."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get([a.ready.remote() for a in actors], timeout=max(1.0, deadline - time.monotonic()))
            return
        except ray.exceptions.GetTimeoutError:
            pass
        except ray.exceptions.RayActorError:  # ActorUnavailableError while restarting: ask again shortly
            time.sleep(1.0)
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers did not come back within {timeout_s:.0f}s after a crash (eval.worker_wait_s): "
                               "is there a node left for them?")  # fmt: skip


class HeldOutEval:
    """`eval.every` > 0: after every N-th step, the evaluation edits of the first `eval.during_rows` held-out rows
    by the weights given (the driver publishes the step's eval EMA: what that step's checkpoint exports and
    `evaluation.main compare` measures), scored on the run's reward workers, as `eval/*` keys:
    `eval/mas` (mean MAS), `eval/mas_win_rate` and `eval/base_mas` (against the base policy), `eval/overall` and
    `eval/judge_failed` (runs with a judge: the rubric's Overall over the rows the judge scored, and how many it
    could not), `eval/rows`, `timing_s/eval`.

    The base policy's MAS per row is measured once per run and kept by the caller (`DriverState.base_mas`, carried
    by checkpoints, so a resume does not sample it again): a LoRA run's with the adapter off, alongside its first
    evaluation; a full fine-tune's by `measure_base` before its first update, while the rollouts hold the
    pipeline as loaded. A worker lost during an evaluation (Ray restarts it; the training step that uses it next
    counts the crash) drops that evaluation, logged as `eval/lost` 1 with a printed line, not as scores."""

    def __init__(self, cfg: Config, held_out: Sequence[Any]) -> None:
        self.cfg, self.every = cfg.eval, cfg.eval.every
        self.lora = not cfg.nft.full_finetune
        n = min(cfg.eval.during_rows, len(held_out)) if self.every > 0 else 0
        if self.every > 0 and n == 0:
            raise ValueError("eval.every > 0 needs held-out rows: the held-out split is empty (data.eval_fraction)")
        self.rows = [ray.put(held_out[i]) for i in range(n)]  # put once, passed by reference to every call

    def due(self, step: int) -> bool:
        return self.every > 0 and (step + 1) % self.every == 0

    def measure_base(self, pools: Pools, weights: PublishedWeights, base_mas: list[float]) -> None:
        """A full fine-tune's base MAS per row into the empty `base_mas`, by `weights`: call it only while they
        are version 0, the pipeline as loaded (it is gone after the first push). A lost worker leaves it empty:
        that run then logs no win rate."""
        if self.every == 0 or self.lora or base_mas:
            return
        rollouts, rewards = self._workers(pools)
        try:
            base_mas.extend(self._mas(rewards, sample_edits(rollouts, self.rows, self.cfg, weights=weights)))
        except ray.exceptions.RayError as e:  # as evaluation.compare: lost_worker tells which
            if not lost_worker(e):
                raise
            print(f"the base policy's held-out evaluation lost a worker ({type(e).__name__}); this run logs no "
                  "eval/mas_win_rate", flush=True)  # fmt: skip

    def __call__(self, pools: Pools, step: int, weights: PublishedWeights, base_mas: list[float]) -> dict[str, float]:
        """The `eval/*` keys of a step that is `due` (the driver publishes the weights only then); a LoRA run's
        empty `base_mas` is filled here."""
        t0 = time.perf_counter()
        rollouts, rewards = self._workers(pools)
        try:
            scores = score_edits(rewards, self.rows, sample_edits(rollouts, self.rows, self.cfg, weights=weights),
                                 self.cfg)  # fmt: skip
            if not base_mas and self.lora:  # overlaps the policy's own scoring
                base_mas.extend(self._mas(rewards, sample_edits(rollouts, self.rows, self.cfg, base=True)))
            rows = gather(scores)
        except ray.exceptions.RayError as e:
            if not lost_worker(e):
                raise
            print(f"step {step}: the held-out evaluation lost a worker ({type(e).__name__}); none logged this step",
                  flush=True)  # fmt: skip
            return {"eval/lost": 1.0, "timing_s/eval": time.perf_counter() - t0}
        mas = [s["mas"]["mas"] for s in rows]
        out = {"eval/mas": float(np.mean(mas)), "eval/rows": float(len(rows))}
        if base_mas:
            out["eval/base_mas"] = float(np.mean(base_mas))
            out["eval/mas_win_rate"] = float(outcomes(mas, base_mas, margin=self.cfg.tie_margin).mean())
        rubric = [s["rubric"] for s in rows if s["rubric"] is not None]
        if rubric:
            scored = [r["overall"] for r in rubric if not r["failed"]]
            out["eval/judge_failed"] = float(len(rubric) - len(scored))
            if scored:
                out["eval/overall"] = float(np.mean(scored))
        out["timing_s/eval"] = time.perf_counter() - t0
        return out

    def _workers(self, pools: Pools) -> tuple[list[Any], list[Any]]:
        rollouts, rewards = pools.rollouts, pools.rewards
        return [rollouts.actors[w] for w in rollouts.up()], [rewards.actors[w] for w in rewards.up()]

    def _mas(self, rewards: Sequence[Any], edits: Sequence[Any]) -> list[float]:
        return [s["mas"]["mas"] for s in gather(score_edits(rewards, self.rows, edits, self.cfg))]
