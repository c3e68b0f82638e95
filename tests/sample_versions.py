"""The policy version each step's groups are sampled with, by the driver's rule, for whole-run tests to hold the
lineage against: step s is submitted at the first step t whose look-ahead reaches it (a checkpoint step looks no
further than itself; others `rollout.max_staleness` steps, up to the last), with the version published before
step t, that is the number of earlier steps that trained a valid group."""

from __future__ import annotations


def sample_versions(published: list[bool], ahead: int, every: int) -> list[int]:
    """`published[t]`: step t trained (and so published a version); `every`: `checkpoint.every`."""
    steps = len(published)

    def horizon(t: int) -> int:
        saves = t == steps - 1 or (every > 0 and (t + 1) % every == 0)
        return t if saves else min(t + ahead, steps - 1)

    return [sum(published[: min(t for t in range(steps) if horizon(t) >= s)]) for s in range(steps)]
