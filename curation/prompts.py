"""Every word stage c asks the MLLM judge, in one file: the four MotionEdit criteria, the motion summary, its rewrite
as an imperative edit instruction, and the six-way category. The wording is our own (the MotionEdit paper describes
the checks but does not publish its prompts). `prompt_digest()` hashes all of it and goes into run.json and every
manifest row's run: two curated sets with different digests were not judged alike.

Each criterion is one digit 0-5 about [first frame, last frame]; it passes when its expected digit reaches
`judge.pass_digit`.
"""

from __future__ import annotations

import hashlib
import json

from motionnft_core.data.motionedit import CATEGORIES

_FRAMES = "You are shown two frames of the same video clip, a few seconds apart: first the start, then the end."

CRITERIA: dict[str, str] = {
    "setting_consistency": _FRAMES + """
Is the setting consistent between them: the same background, the same viewpoint (no camera cut, no large camera
move) and the same lighting?
0: a different place, viewpoint or lighting.
5: the same place, viewpoint and lighting; only the subject's motion differs.
Answer with a single digit from 0 to 5 and nothing else.""",
    "meaningful_motion": _FRAMES + """
Does a subject (a person, an animal or an object) visibly change its pose, position, state or interaction between
the two frames, in a way a person could describe as an action (for example: not holding the cup -> drinking)?
0: nothing meaningful changes.
5: a clear, describable motion change.
Answer with a single digit from 0 to 5 and nothing else.""",
    "subject_integrity": _FRAMES + """
Is the moving subject fully intact in both frames: not occluded, not cut off by the frame's edge, not distorted,
and not appearing or disappearing?
0: the subject is hidden, broken or missing in a frame.
5: the subject is whole and clearly visible in both.
Answer with a single digit from 0 to 5 and nothing else.""",
    "visual_quality": _FRAMES + """
Are both frames of good visual quality: sharp, well exposed, free of motion blur, compression artifacts and
overlays such as subtitles or watermarks?
0: poor quality.
5: clean, sharp frames.
Answer with a single digit from 0 to 5 and nothing else.""",
}

SUMMARY = _FRAMES + """
In one sentence, describe how the main subject's pose, position, state or interaction changes from the first frame
to the last. Describe only the change."""

REWRITE = """Rewrite this description of a change between two images as one short imperative image-editing
instruction that asks for the change, naming the subject (for example: "Make the woman turn her head toward the
dog."). Answer with the instruction only.
Description: {summary}"""

CATEGORY = _FRAMES + """
The change between them: {summary}
Which kind of motion change is it? Answer with exactly one of: {categories}."""


def rewrite_prompt(summary: str) -> str:
    return REWRITE.format(summary=summary)


def category_prompt(summary: str) -> str:
    return CATEGORY.format(summary=summary, categories="; ".join(CATEGORIES))


def clean_instruction(text: str) -> str:
    """The first line of a generated instruction, without surrounding quotes or a leading label."""
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    for label in ("Instruction:", "instruction:"):
        line = line.removeprefix(label).strip()
    return line.strip("\"'` ").strip()


def prompt_digest() -> str:
    """12 hex digits of sha256 over every prompt above and the category labels."""
    text = json.dumps([CRITERIA, SUMMARY, REWRITE, CATEGORY, list(CATEGORIES)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
