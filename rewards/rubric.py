"""MotionEdit-Bench rubric through the judge client (docs/evaluation.md): Fidelity, Preservation, Coherence on
0-5 and Overall = their mean, per edited image.

The questions are the judge's rubric mode (`JudgeClient` with `reward.judge.mode = rubric`, text in
rewards/judge_prompts.py): one call per criterion, the expected digit `Σ k·p_k` of the first token's
probabilities over 0..5 is the criterion's score (the client maps it to [0, 1]; here it is put back on 0-5).
Retries, timeouts, unparseable answers and the retry budget are the client's, counted in `client.metrics`.
What this module adds is the evaluation's rule for a row the judge could not score within that budget: the
row is marked failed (scores None, the reason kept), never scored 0, and the other rows go on; the statistics
leave failed rows out and report how many there were.
"""

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from motionnft_core.config import JudgeConfig
from motionnft_core.secret import Secret
from rewards.judge import MAX_DIGIT, JudgeClient, JudgeError, JudgeScore
from rewards.judge_prompts import RUBRIC

# Report names of the judge's rubric criteria, in RUBRIC's order.
CRITERIA = {"instruction_fidelity": "fidelity", "preservation": "preservation", "coherence": "coherence"}


@dataclass(frozen=True)
class RubricRow:
    """The rubric of one edit. Scores are on 0-5 (None when `failed`); `digit_probs` maps each report name to
    the judge's six digit probabilities; `attempts` counts HTTP attempts (all criteria); `error` says why a
    failed row failed ("" otherwise)."""

    fidelity: float | None
    preservation: float | None
    coherence: float | None
    overall: float | None
    digit_probs: dict[str, list[float]] | None
    attempts: int
    failed: bool
    error: str = ""


def rubric_client(base_urls: str | Sequence[str], cfg: JudgeConfig, api_key: Secret | None = None) -> JudgeClient:
    """A judge client asking the rubric (whatever `reward.judge.mode` the training run used)."""
    return JudgeClient(base_urls, replace(cfg, mode="rubric"), api_key)


def rubric_from_judge(score: JudgeScore) -> RubricRow:
    """A rubric-mode JudgeScore on the 0-5 scale of the benchmark: criterion = 5 · sub-score = Σ k·p_k."""
    if score.sub_scores is None or set(score.sub_scores) != set(CRITERIA):
        raise ValueError(f"not a rubric score (criteria {sorted(CRITERIA)}): {score.sub_scores!r}")
    values = {CRITERIA[name]: MAX_DIGIT * score.sub_scores[name] for name in RUBRIC}
    return RubricRow(
        **values,
        overall=sum(values.values()) / len(values),
        digit_probs={CRITERIA[name]: list(probs) for name, probs in score.digit_probs.items()},
        attempts=score.attempts,
        failed=False,
    )


def failed_row(error: JudgeError) -> RubricRow:
    """The row of an edit the judge could not score within its retry budget."""
    return RubricRow(None, None, None, None, None, attempts=error.attempts, failed=True, error=str(error))


async def judge_rubric(
    client: JudgeClient, input_image: torch.Tensor, edit: torch.Tensor, instruction: str
) -> RubricRow:
    """The rubric of one edit (uint8 (3, H, W) images); a JudgeError (budget spent) gives a failed row."""
    if client.cfg.mode != "rubric":
        raise ValueError(f"judge client in mode {client.cfg.mode!r}: build it with rubric_client()")
    try:
        return rubric_from_judge(await client.score(input_image, edit, instruction))
    except JudgeError as err:  # counted in client.metrics["failures"]; the row is reported as failed
        return failed_row(err)


async def judge_rubric_many(
    client: JudgeClient, inputs: Sequence[torch.Tensor], edits: Sequence[torch.Tensor], instructions: Sequence[str]
) -> list[RubricRow]:
    """The rubric of many edits, concurrently (the client bounds requests in flight by max_concurrency).

    Rows are independent: one failed row does not cancel the others. Bad inputs (not uint8 (3, H, W), an empty
    instruction) still raise ValueError: they are bugs upstream, not judge failures.
    """
    if not len(inputs) == len(edits) == len(instructions):
        counts = f"{len(inputs)} inputs, {len(edits)} edits, {len(instructions)} instructions"
        raise ValueError(f"judge_rubric_many: {counts}")
    return list(await asyncio.gather(*(
        judge_rubric(client, i, e, t) for i, e, t in zip(inputs, edits, instructions, strict=True)
    )))  # fmt: skip


def judge_model_name(cfg: JudgeConfig) -> str:
    """What judged, for every report: the weights the service serves, or the external endpoint and its model."""
    if cfg.url:
        return f"{cfg.served_model_name} at {cfg.url}"
    if cfg.tiny:
        return "tiny random-weight Qwen2-VL (reward.judge.tiny: its rubric carries no signal)"
    return f"{Path(cfg.model_path.rstrip('/')).name} ({cfg.model_path})"
