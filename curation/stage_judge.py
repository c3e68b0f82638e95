"""Stage c: the MLLM check of a pair through the judge client the trainer uses (rewards/judge.py), or a scripted
judge (a plain class with the same `rate`, `generate`, `choose` coroutines and a `metrics` dict: tests).

Per candidate pair: the four criteria (curation/prompts.py), each passing when its expected digit reaches
`judge.pass_digit`; if all pass, the motion summary, its rewrite as an imperative instruction, and one of the six
MotionEdit categories. A call that fails for good (JudgeError) makes the pair `unverified`, never `kept`:
unverified pairs go to the manifest only.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from curation import prompts
from curation.config import CurateConfig
from curation.rows import CRITERIA, batch_rows, image, rows_batch
from motionnft_core.data.motionedit import CATEGORIES
from motionnft_core.secret import Secret
from rewards.judge import JudgeClient, JudgeError, expected_digit


class Judge(Protocol):
    metrics: dict[str, int]

    async def rate(self, images: Sequence[torch.Tensor], prompt: str) -> tuple[list[float], int]: ...

    async def generate(self, images: Sequence[torch.Tensor], prompt: str, max_tokens: int) -> tuple[str, int]: ...

    async def choose(self, images: Sequence[torch.Tensor], prompt: str, choices: Sequence[str]) -> tuple[str, int]: ...


@dataclass
class Verdict:
    """What stage c says of one pair."""

    status: str  # kept | dropped | unverified
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)  # criterion -> expected digit
    summary: str = ""
    instruction: str = ""
    category: str = ""
    attempts: int = 0


async def judge_pair(judge: Judge, source: torch.Tensor, target: torch.Tensor, pass_digit: float,
                     max_tokens: int) -> Verdict:  # fmt: skip
    """The verdict on one pair of uint8 (3, H, W) frames."""
    verdict = Verdict(status="unverified")
    frames = [source, target]
    try:
        answers = await asyncio.gather(*(judge.rate(frames, prompts.CRITERIA[name]) for name in CRITERIA))
        for name, (probs, attempts) in zip(CRITERIA, answers, strict=True):
            verdict.scores[name] = expected_digit(probs)
            verdict.attempts += attempts
        failed = [name for name in CRITERIA if verdict.scores[name] < pass_digit]
        if failed:
            verdict.status, verdict.reason = "dropped", "judge: " + ", ".join(failed)
            return verdict
        verdict.summary, attempts = await judge.generate(frames, prompts.SUMMARY, max_tokens)
        verdict.attempts += attempts
        text, attempts = await judge.generate([], prompts.rewrite_prompt(verdict.summary), max_tokens)
        verdict.attempts += attempts
        verdict.instruction = prompts.clean_instruction(text)
        if not verdict.instruction:
            verdict.reason = f"judge: no instruction in {text[:80]!r}"
            return verdict
        verdict.category, attempts = await judge.choose(frames, prompts.category_prompt(verdict.summary), CATEGORIES)
        verdict.attempts += attempts
    except JudgeError as err:
        verdict.status, verdict.reason = "unverified", f"judge failed: {err.reason}"
        verdict.attempts += err.attempts
        return verdict
    verdict.status = "kept"
    return verdict


def load_scripted(spec: str) -> Any:
    """An instance of the `module:Class` judge.scripted names (built without arguments)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)()


class JudgeStage:
    """Judges every `candidate` pair of a batch (Ray Data: `map_batches(JudgeStage, concurrency=judge.workers)`)."""

    def __init__(self, cfg: CurateConfig, urls: Sequence[str] = (), api_key: Secret | None = None):
        self.cfg = cfg
        if cfg.judge.scripted:
            self.judge: Judge = load_scripted(cfg.judge.scripted)
        else:
            self.judge = JudgeClient(list(urls), cfg.judge.client_config(), api_key=api_key)

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        todo = [r for r in rows if r["kind"] == "pair" and r["status"] == "candidate"]
        if not todo:
            return rows

        async def run() -> list[Verdict]:
            try:
                return await asyncio.gather(*(
                    judge_pair(self.judge, torch.from_numpy(image(r, "input").copy()).permute(2, 0, 1),
                               torch.from_numpy(image(r, "target").copy()).permute(2, 0, 1),
                               self.cfg.judge.pass_digit, self.cfg.judge.max_tokens)
                    for r in todo
                ))  # fmt: skip
            finally:
                close = getattr(self.judge, "aclose", None)
                if close is not None:
                    await close()

        for row, verdict in zip(todo, asyncio.run(run()), strict=True):
            row.update(verdict.scores)
            row.update(status=verdict.status, stage="c" if verdict.status != "kept" else "", reason=verdict.reason,
                       summary=verdict.summary, instruction=verdict.instruction, category=verdict.category,
                       judge_attempts=verdict.attempts)  # fmt: skip
        return rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return rows_batch(self.process(batch_rows(batch)))
