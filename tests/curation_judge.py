"""Scripted judges for the curation tests: plain classes with the judge client's `rate`, `generate` and `choose`
coroutines and its `metrics` counters (curation/stage_judge.py), whose answers the test decides. Named in a config
as `judge.scripted: tests.curation_judge:PassingJudge`."""

from __future__ import annotations

from collections.abc import Sequence

from rewards.judge import JudgeError

SUMMARY = "The red square moves right while the blue square moves left."
INSTRUCTION = "Make the red square move to the right."


def peaked(digit: int) -> list[float]:
    """Digit probabilities with all mass on `digit` (expected digit = digit)."""
    return [1.0 if k == digit else 0.0 for k in range(6)]


class ScriptedJudge:
    """Answers `digits[criterion]` (default 5) to each criterion prompt, `SUMMARY` / `INSTRUCTION` as text and the
    first choice; `fail_on` names a prompt kind (rate, generate, choose) that raises JudgeError instead."""

    digits: dict[str, int] = {}
    fail_on: str = ""
    text = INSTRUCTION

    def __init__(self) -> None:
        self.metrics = {"requests": 0, "failures": 0}
        self.prompts: list[str] = []

    def _call(self, kind: str, prompt: str) -> None:
        self.metrics["requests"] += 1
        self.prompts.append(prompt)
        if kind == self.fail_on:
            self.metrics["failures"] += 1
            raise JudgeError(f"scripted {kind} failure", None, 2)

    async def rate(self, images: Sequence, prompt: str) -> tuple[list[float], int]:
        self._call("rate", prompt)
        from curation.prompts import CRITERIA

        name = next(n for n, p in CRITERIA.items() if p == prompt)
        return peaked(self.digits.get(name, 5)), 1

    async def generate(self, images: Sequence, prompt: str, max_tokens: int) -> tuple[str, int]:
        self._call("generate", prompt)
        return (SUMMARY if images else f'"{self.text}"'), 1

    async def choose(self, images: Sequence, prompt: str, choices: Sequence[str]) -> tuple[str, int]:
        self._call("choose", prompt)
        return choices[1], 1


class PassingJudge(ScriptedJudge):
    """Every criterion 5: every pair that reaches stage c is kept."""
