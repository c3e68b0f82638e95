"""Every word the MLLM judge is asked, in one file (docs/algorithm.md): the training-score question, the evaluation
rubric and the evaluation's side-by-side comparison. The wording is our own; the paper used Gemini with a prompt adapted
from EditScore's action category that it did not publish, so rubric figures are comparable among runs of this code, not
to the paper's to the decimal. Changing any text here changes what the judge measures, so reports name the judge model
and `prompt_digest()`, a hash of all of this text: two reports with different digests were not judged alike.

The rubric criteria (instruction fidelity, preservation, coherence) are MotionEdit-Bench's; each is asked
separately as one digit 0-5 (rewards/judge.py reads the digit's probabilities).
"""

import hashlib
import json

_SCORE_PROMPT = """You are shown two images: first the original image, then an edited version of it.
The edit was supposed to follow this instruction:
{instruction}
Rate the edited image from 0 to 5 for how accurately and how well the edit was carried out.
0: the wrong object was edited, or the instruction was not followed at all.
5: the right object was edited, the instruction was followed, and the result looks high quality.
Answer with a single digit from 0 to 5 and nothing else."""

_RUBRIC_PROMPT = """You are shown two images: first the original image, then an edited version of it.
The edit was supposed to follow this instruction:
{instruction}
Judge only one aspect of the edited image: {aspect}
{question}
0: {worst}
5: {best}
Answer with a single digit from 0 to 5 and nothing else."""

_PAIRWISE_PROMPT = """You are shown three images: first the original image, then two edited versions of it, edit A (the
second image) and edit B (the third image). Both edits were supposed to follow this instruction:
{instruction}
Which edit is better overall: it carries out the requested motion, pose, position or interaction on the subject
the instruction names, keeps everything else of the original unchanged, and looks natural and clean?
0: edit A is clearly better.
5: edit B is clearly better.
2 or 3: both are about equally good (or equally bad).
Answer with a single digit from 0 to 5 and nothing else."""

# MotionEdit-Bench-style criteria, each scored 0-5 (wording our own).
RUBRIC: dict[str, dict[str, str]] = {
    "instruction_fidelity": {
        "aspect": "instruction fidelity.",
        "question": "Does the edited image carry out the instruction: the requested motion, pose, position or "
        "interaction, applied to the subject the instruction names?",
        "worst": "the instruction was ignored, or a different subject was changed.",
        "best": "the requested change is fully and exactly carried out on the right subject.",
    },
    "preservation": {
        "aspect": "preservation of the original.",
        "question": "Apart from the requested change, does the edited image keep the original: the subject's "
        "identity and appearance, the other objects, the background, lighting and framing?",
        "worst": "the image is changed beyond recognition.",
        "best": "everything the instruction does not ask to change is unchanged.",
    },
    "coherence": {
        "aspect": "visual coherence.",
        "question": "Is the edited image physically and visually plausible: natural anatomy and pose, consistent "
        "geometry, contacts and shadows, and free of artifacts, blur or distortion?",
        "worst": "the image is broken or physically implausible.",
        "best": "the image is fully natural and clean.",
    },
}


def score_prompt(instruction: str) -> str:
    """Text of the training-score question (reference method: one digit 0-5)."""
    return _SCORE_PROMPT.format(instruction=instruction)


def rubric_prompt(criterion: str, instruction: str) -> str:
    """Text of the rubric question for one criterion of RUBRIC."""
    if criterion not in RUBRIC:
        raise ValueError(f"criterion {criterion!r} is not one of {sorted(RUBRIC)}")
    return _RUBRIC_PROMPT.format(instruction=instruction, **RUBRIC[criterion])


def pairwise_prompt(instruction: str) -> str:
    """Text of the side-by-side question (evaluation, `eval.pairwise`): 0 = the first edit shown is clearly better,
    5 = the second one."""
    return _PAIRWISE_PROMPT.format(instruction=instruction)


def prompt_digest() -> str:
    """12 hex digits of sha256 over every prompt template and rubric criterion: which wording judged a report."""
    text = json.dumps([_SCORE_PROMPT, _RUBRIC_PROMPT, RUBRIC, _PAIRWISE_PROMPT], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
