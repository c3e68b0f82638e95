"""The per-row results of an evaluation, kept so that a crashed run resumes without redoing a row.

Scores are written as they are made: each batch of scored edits is one parquet chunk under `<out>/scores/`,
written to a temporary name and renamed (atomic on a POSIX filesystem), so after a crash a chunk is either
whole or absent. A rerun reads the chunks back and scores only the (policy, id) pairs not in them; a pair
found twice (two runs racing into one dir) keeps its first chunk's row. One row per scored edit (long form):
`policy` ("candidate" or "baseline"), `id`, `category`, `seed`, MAS and its terms, the rubric on 0-5 with the
judge's digit probabilities, and the judge's attempts, `judge_failed` and `judge_error`; a candidate's row also
holds the side-by-side comparison with the baseline's edit when there was one (`eval.pairwise`: `pairwise`, the
candidate's preference in [0, 1], with both orders' digit probabilities, attempts, failure and error), so the
row and its comparison are written, and resumed, together.

`pair_rows` joins a candidate's and the baseline's rows of each example (in the order of the ids given, so
the result does not depend on the chunking) and adds the win/tie/loss columns (`win_pairwise` from the
preference: above 0.5 a win); `write_rows` writes that as
`<out>/rows.parquet`. Everything scored is a function of the seeds, so the table is too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from motionnft_core.eval_stats import RUBRIC_SCORES, outcomes

POLICIES = ("candidate", "baseline")
MAS_TERMS = ("mas", "d_mag", "d_dir", "distance", "motion_ratio")
# Only for a run trained with reward.flow.camera_compensation: the MAS of the object motion alone (None otherwise;
# MotionEdit-Bench's own `mas` stays as published).
MAS_EXTRA = ("mas_camera_compensated",)
CRITERIA = ("fidelity", "preservation", "coherence")
_probs = pa.list_(pa.float64())
SCORE_SCHEMA = pa.schema(
    [("policy", pa.string()), ("id", pa.string()), ("category", pa.string()), ("seed", pa.int64())]
    + [(name, pa.float64()) for name in MAS_TERMS]
    + [("static", pa.bool_())]
    + [(name, pa.float64()) for name in MAS_EXTRA]
    + [(name, pa.float64()) for name in RUBRIC_SCORES]
    + [(f"p_{name}", _probs) for name in CRITERIA]
    + [("judge_attempts", pa.int64()), ("judge_failed", pa.bool_()), ("judge_error", pa.string())]
)
# The side-by-side comparison (rewards/pairwise.py), on the candidate's rows only: None without one.
PAIRWISE_FIELDS = [
    pa.field("pairwise", pa.float64()), pa.field("p_pair_baseline_first", _probs),
    pa.field("p_pair_candidate_first", _probs), pa.field("pairwise_attempts", pa.int64()),
    pa.field("pairwise_failed", pa.bool_()), pa.field("pairwise_error", pa.string()),
]  # fmt: skip
SCORE_SCHEMA = pa.schema(list(SCORE_SCHEMA) + PAIRWISE_FIELDS)
_PAIRWISE_NAMES = {f.name for f in PAIRWISE_FIELDS}
# One row per example: its keys, the candidate's scores, the baseline's under `baseline_`, then the comparison.
_PER_POLICY = [f for f in SCORE_SCHEMA if f.name not in ("policy", "id", "category", "seed", *_PAIRWISE_NAMES)]
ROW_SCHEMA = pa.schema(
    [("id", pa.string()), ("category", pa.string()), ("seed", pa.int64())]
    + _PER_POLICY
    + [pa.field(f"baseline_{f.name}", f.type) for f in _PER_POLICY]
    + PAIRWISE_FIELDS
    + [("failed", pa.bool_()), ("win_mas", pa.float64()), ("win_overall", pa.float64()),
       ("win_pairwise", pa.float64())]
)  # fmt: skip
_CHUNK = re.compile(r"chunk-(\d{6})\.parquet")


class ScoreStore:
    """Scored edits of one evaluation, as append-only atomic parquet chunks in `directory` (module docstring)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def _chunks(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _CHUNK.fullmatch(p.name))

    def table(self) -> pa.Table:
        """Every row written so far, the first of each (policy, id), in chunk order."""
        chunks = [pq.read_table(p, schema=SCORE_SCHEMA) for p in self._chunks()]
        table = pa.concat_tables(chunks) if chunks else SCORE_SCHEMA.empty_table()
        seen: set[tuple[str, str]] = set()
        keep = []
        for i, key in enumerate(zip(table["policy"].to_pylist(), table["id"].to_pylist(), strict=True)):
            if key not in seen:
                seen.add(key)
                keep.append(i)
        return table.take(keep) if len(keep) < table.num_rows else table

    def scored_ids(self, policy: str) -> set[str]:
        """Ids this policy already has a row for (scored or failed: a failed row is not retried by a rerun)."""
        table = self.table()
        return {i for p, i in zip(table["policy"].to_pylist(), table["id"].to_pylist(), strict=True) if p == policy}

    def pending(self, policy: str, ids: Iterable[str]) -> list[str]:
        """`ids` (in order) that this policy has no row for yet: what a (re)run still has to score."""
        done = self.scored_ids(policy)
        return [i for i in ids if i not in done]

    def append(self, rows: Sequence[Mapping[str, Any]]) -> Path | None:
        """Write `rows` (SCORE_SCHEMA's keys) as the next chunk, atomically; None for no rows."""
        if not rows:
            return None
        for row in rows:
            if row["policy"] not in POLICIES:
                raise ValueError(f"policy {row['policy']!r} is not one of {POLICIES}")
        table = pa.Table.from_pylist([dict(r) for r in rows], schema=SCORE_SCHEMA)
        self.directory.mkdir(parents=True, exist_ok=True)
        chunks = self._chunks()
        number = int(_CHUNK.fullmatch(chunks[-1].name).group(1)) + 1 if chunks else 0
        path = self.directory / f"chunk-{number:06d}.parquet"
        _write_atomically(table, path)
        return path


def score_row(
    policy: str, example_id: str, category: str | None, seed: int, mas: Mapping[str, Any], rubric: Mapping[str, Any],
    pairwise: Mapping[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One SCORE_SCHEMA row from MAS's terms (`rewards.mas.motion_alignment_score` of this edit, as floats), its
    rubric (the fields of `rewards.rubric.RubricRow`, e.g. `dataclasses.asdict` of one) and, for a candidate
    compared side by side, the fields of its `rewards.pairwise.PairwiseRow`."""
    probs = rubric.get("digit_probs") or {}
    row = {"policy": policy, "id": example_id, "category": category, "seed": seed}
    row.update({name: float(mas[name]) for name in MAS_TERMS})
    row["static"] = bool(mas["static"])
    row.update({name: None if mas.get(name) is None else float(mas[name]) for name in MAS_EXTRA})
    row.update({name: rubric[name] for name in RUBRIC_SCORES})
    row.update({f"p_{name}": probs.get(name) for name in CRITERIA})
    row.update(judge_attempts=rubric["attempts"], judge_failed=rubric["failed"], judge_error=rubric["error"])
    p = pairwise or {}
    row.update(pairwise=p.get("preference"), p_pair_baseline_first=p.get("p_baseline_first"),
               p_pair_candidate_first=p.get("p_candidate_first"), pairwise_attempts=p.get("attempts"),
               pairwise_failed=p.get("failed"), pairwise_error=p.get("error"))  # fmt: skip
    return row


def pair_rows(scores: pa.Table, ids: Sequence[str], *, margin: float) -> list[dict[str, Any]]:
    """One dict per id (ROW_SCHEMA's keys), in the order of `ids`: candidate and baseline side by side.

    `failed`: either side's judge failed (`judge_failed` / `baseline_judge_failed` say which, `judge_error` why).
    `win_mas` compares MAS (1 / 0.5 / 0, ties within `margin`); `win_overall` compares Overall, None for a failed row;
    `win_pairwise` compares the side-by-side preference with 0.5, None without one or when it failed
    (`pairwise_failed`). Raises KeyError naming an id that lacks a candidate or a baseline row.
    """
    by_key = {(r["policy"], r["id"]): r for r in scores.to_pylist()}
    out = []
    for example_id in ids:
        missing = [p for p in POLICIES if (p, example_id) not in by_key]
        if missing:
            raise KeyError(f"id {example_id!r} has no {' or '.join(missing)} row in the scores")
        cand, base = by_key[("candidate", example_id)], by_key[("baseline", example_id)]
        row = {"id": example_id, "category": cand["category"], "seed": cand["seed"]}
        row.update({f.name: cand[f.name] for f in _PER_POLICY})
        row.update({f"baseline_{f.name}": base[f.name] for f in _PER_POLICY})
        row.update({name: cand[name] for name in _PAIRWISE_NAMES})
        preference = None if cand["pairwise_failed"] else cand["pairwise"]
        row["win_pairwise"] = None if preference is None else float(outcomes([preference], [0.5], margin=margin)[0])
        row["failed"] = bool(cand["judge_failed"] or base["judge_failed"])
        row["win_mas"] = float(outcomes([cand["mas"]], [base["mas"]], margin=margin)[0])
        row["win_overall"] = (
            None if row["failed"] else float(outcomes([cand["overall"]], [base["overall"]], margin=margin)[0])
        )
        out.append(row)
    return out


def write_rows(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """The paired per-row table as parquet (ROW_SCHEMA), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(pa.Table.from_pylist([dict(r) for r in rows], schema=ROW_SCHEMA), path)
    return path


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """`write_rows`' table back as dicts."""
    return pq.read_table(path, schema=ROW_SCHEMA).to_pylist()


def _write_atomically(table: pa.Table, path: Path) -> None:
    """Parquet to `.<name>.tmp` beside `path`, fsynced, then renamed over it: readers see all of it or nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
