"""Side-by-side judging of a candidate's edit against the baseline's (`eval.pairwise`): the judge sees
[input, edit A, edit B] and answers one digit, 0 = A clearly better, 5 = B (rewards/judge_prompts.py).

MLLM judges favour a position. So each row is asked in both orders, baseline first then candidate first, and
the two answers are averaged on the candidate's side: with E_k = Σ k·p_k the expected digit of an answer,
    q_1 = E_1 / 5            (baseline shown first: a high digit prefers the candidate)
    q_2 = 1 − E_2 / 5        (candidate shown first: a low digit prefers the candidate)
    preference = (q_1 + q_2) / 2   in [0, 1], 0.5 = no preference.
A judge that adds b to every answer whatever the images (E → E + b) moves q_1 by +b/5 and q_2 by −b/5: the
bias cancels. A row either order of which fails within the retry budget is marked failed, never 0.5 or 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rewards.judge import JudgeClient, JudgeError, expected_digit_score


@dataclass(frozen=True)
class PairwiseRow:
    """One row's comparison: `preference` for the candidate in [0, 1] (None when `failed`), the digit
    probabilities of each order, the HTTP attempts of both, and why it failed ("" otherwise)."""

    preference: float | None
    p_baseline_first: list[float] | None
    p_candidate_first: list[float] | None
    attempts: int
    failed: bool
    error: str = ""


def pairwise_preference(baseline_first: Sequence[float], candidate_first: Sequence[float]) -> float:
    """The candidate's preference from both orders' digit probabilities (module docstring): E / 5 is the
    judge's own expected-digit score."""
    q1 = expected_digit_score(baseline_first)
    q2 = 1.0 - expected_digit_score(candidate_first)
    return (q1 + q2) / 2.0


async def judge_pairwise(
    client: JudgeClient, input_image: torch.Tensor, baseline: torch.Tensor, candidate: torch.Tensor, instruction: str
) -> PairwiseRow:
    """Both orders of one row, concurrently; a JudgeError of either gives a failed row (the other still counts
    its attempts)."""
    answers = await asyncio.gather(
        client.compare(input_image, baseline, candidate, instruction),
        client.compare(input_image, candidate, baseline, instruction),
        return_exceptions=True,
    )
    errors = [a for a in answers if isinstance(a, BaseException)]
    for error in errors:
        if not isinstance(error, JudgeError):
            raise error  # a bug (bad input), not a judge failure
    attempts = sum(a.attempts if isinstance(a, JudgeError) else a[1] for a in answers)
    if errors:
        return PairwiseRow(None, None, None, attempts=attempts, failed=True, error=str(errors[0]))
    (first, _), (second, _) = answers
    return PairwiseRow(pairwise_preference(first, second), list(first), list(second), attempts=attempts, failed=False)


async def judge_pairwise_many(
    client: JudgeClient, inputs: Sequence[torch.Tensor], baselines: Sequence[torch.Tensor],
    candidates: Sequence[torch.Tensor], instructions: Sequence[str],
) -> list[PairwiseRow]:  # fmt: skip
    """Every row's comparison, concurrently (the client bounds requests in flight); rows fail independently."""
    if not len(inputs) == len(baselines) == len(candidates) == len(instructions):
        counts = f"{len(inputs)} inputs, {len(baselines)} baselines, {len(candidates)} candidates, " \
                 f"{len(instructions)} instructions"  # fmt: skip
        raise ValueError(f"judge_pairwise_many: {counts}")
    return list(await asyncio.gather(*(
        judge_pairwise(client, i, b, c, t) for i, b, c, t in zip(inputs, baselines, candidates, instructions,
                                                                  strict=True)
    )))  # fmt: skip
