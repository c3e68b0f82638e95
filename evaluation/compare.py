"""`python -m evaluation.main compare`: a candidate policy against a baseline on MotionEdit-Bench (docs/evaluation.md).

`--checkpoint` (one policy) against `--baseline base|latest|DIR` on `--split PATH|s3://...` (default: the run's
held-out split), the first `--limit` rows, into `--out` (default `<logging.dir>/compare`), on the Ray pools of
the run's config, built by training's own builder (evaluation/pools.py): Ray is
joined as training joins it (`learner/driver/ray_session.py`: `cluster.address`, RAY_ADDRESS under
`ray job submit`, else an embedded cluster), and the driver (this process) only schedules and writes; edits and
images stay in the object store (learner/driver/heldout.py). Every input (the judge, the rows, the policies, an
earlier comparison in `--out`) is checked before anything is written or started: a refused start writes nothing.

1. Rollout workers (`cluster.rollout_workers`, placed as in training) make each policy's edits with the
   pipeline's own sampler and settings (`eval.num_steps` 28, `eval.seed` 42, Kontext guidance 2.5,
   Qwen-Image-Edit true CFG 4.0 with negative prompt " ": actors/eval_sampler.py), one row per call, so a
   row's edit is the same whichever worker makes it and however the run was chunked or resumed. A checkpoint's
   diffusers LoRA export is read by each worker on its node into the adapter training uses; the base policy
   is that adapter turned off.
2. Reward workers (`cluster.reward_workers`) score MAS (rewards/mas.py, `eval.mas_*`) with the run's flow
   estimator (`reward.flow.*`) and the rubric (Fidelity, Preservation, Coherence 0-5, Overall = mean;
   rewards/rubric.py) with a judge client of their own, next to the images (rewards/eval_scorer.py): the judge
   at `reward.judge.url`, or vLLM replicas started on the pool (`reward.judge.model_path` / the tiny judge).
   A row the judge cannot score within its retry budget is marked failed, never scored 0.
3. Rows are written a chunk (`eval.chunk_rows`) at a time under `<out>/scores/` (evaluation/table.py), the
   next chunk sampled while one is scored: a rerun after a crash scores only the rows missing. The baseline
   goes first; the same policy on both sides is sampled once (so a checkpoint against itself ties every row:
   win rate exactly 0.5). Every actor started here is stopped at the end, also after an error.
   With `eval.pairwise`, the judge also compares each row's two edits side by side in both orders
   (rewards/pairwise.py): the baseline's edits stay in the object store until the candidate's are judged beside
   them (a resumed run samples the ones it lacks again); the same policy on both sides ties without asking.
4. `<out>/rows.parquet` (a row per example: MAS and its terms, the rubric with digit probabilities, both sides,
   win/tie/loss), `summary.json` and `report.md` (per-category and overall means and win rates with bootstrap
   intervals, the MAS parameters, the judge's model and prompt digest; evaluation/report.py), `grid.png`
   (input | target | baseline | candidate, labelled, the first `--grid-rows` rows, their edits fetched as PNG
   bytes) and `win_rates.png`.
During training, `eval.every` runs the same scoring on `eval.during_rows` held-out rows (learner/driver/heldout.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from PIL import Image

from evaluation.heldout import EvalInputError, checkpoints_to_evaluate
from evaluation.pools import Side, evaluation_pools, policy_side
from evaluation.report import ReportInfo, comparison_grid, plot_win_rates, summary_table, write_report
from evaluation.table import ScoreStore, pair_rows, score_row, write_rows
from learner.driver.heldout import edit_pngs, gather, score_edits, wait_until_up
from motionnft_core.config import Config
from motionnft_core.data.motionedit import MotionEditDataset, MotionExample, load_splits
from motionnft_core.errors import lost_worker
from motionnft_core.eval_stats import GroupSummary, summarize
from motionnft_core.models.families import policy_class
from rewards.judge_prompts import prompt_digest
from rewards.rubric import judge_model_name

COMPARE_POLICIES = ("baseline", "candidate")  # sampled in this order: the baseline is usually shared by runs
MANIFEST = "compare.json"


def compare_examples(cfg: Config, split: str, limit: int) -> list[MotionExample]:
    """The rows to compare on: `split` (MotionEdit-Bench's hub parquet, a reference JSONL manifest or a folder,
    local or s3://) at the run's resolution, or the run's own held-out split; the first `limit` (0 = all)."""
    if split:
        dataset = MotionEditDataset.from_source(
            split, resolution=(cfg.rollout.height, cfg.rollout.width), on_error=cfg.data.on_error,
            cache_dir=cfg.model.cache_dir, upscale_small=cfg.data.upscale_small,
        )  # fmt: skip
    else:
        _, dataset = load_splits(cfg)
    if len(dataset) == 0:
        raise EvalInputError(f"no rows to evaluate in {split or 'the held-out split (data.eval_fraction)'}")
    return [dataset[i] for i in range(len(dataset) if limit <= 0 else min(limit, len(dataset)))]


def compare_policy_dir(cfg: Config, which: str, flag: str) -> str | None:
    """`base`/`none` -> None (the base pipeline); `latest` or a checkpoint / LoRA dir or s3:// prefix -> where its
    LoRA export is."""
    if which in ("base", "none"):
        return None
    if which == "all":
        raise EvalInputError(f"{flag} all: a comparison takes one candidate and one baseline")
    ((_, lora_dir),) = checkpoints_to_evaluate(cfg, which)
    return lora_dir


def check_judge(cfg: Config) -> None:
    """The rubric needs a judge: one at `reward.judge.url`, or replicas this command starts."""
    j = cfg.reward.judge
    if not (j.url or j.model_path or j.tiny):
        raise EvalInputError("the rubric needs a judge: reward.judge.url, reward.judge.model_path or reward.judge.tiny")
    if not j.url and cfg.cluster.judge_replicas < 1:
        raise EvalInputError("the rubric needs a judge: cluster.judge_replicas is 0 and reward.judge.url is empty")


def _edit_png(edits_dir: Path, policy: str, example_id: str) -> Path:
    return edits_dir / policy / f"{hashlib.sha1(example_id.encode()).hexdigest()[:16]}.png"


def _read_png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


def score_compare_policy(
    name: str, side: Side, rollouts: list[Any], rewards: list[Any], examples: list[MotionExample],
    rows: list[Any], store: ScoreStore, cfg: Config, *, edits_dir: Path, grid_ids: set[str],
    keep: dict[str, Any] | None = None, against: tuple[dict[str, Any], Side] | None = None,
) -> int:  # fmt: skip
    """Sample (rollout workers), MAS-score and judge (reward workers) the rows of `examples` (`rows`: their
    references) that `name` has no row for in `store`, a chunk of `eval.chunk_rows` at a time, each chunk
    written before the next is scored while the next one's edits are being sampled; the edits of `grid_ids`
    kept as PNG. `keep`: filled with each row's edit reference by id; `against`: the baseline's edit
    references by id and its side, judged side by side with each edit.

    A chunk that loses a worker (Ray restarts it) is sampled and scored again once every worker answers, at
    most `eval.chunk_retries` times; so is the baseline's side of it (its edits may have gone with a node).
    Returns the number of rows scored now."""
    pending = set(store.pending(name, [e.id for e in examples]))
    todo = [i for i, e in enumerate(examples) if e.id in pending]
    if not todo:
        return 0
    chunks = [todo[s : s + cfg.eval.chunk_rows] for s in range(0, len(todo), cfg.eval.chunk_rows)]
    edits = side.sample(rollouts, [rows[i] for i in chunks[0]], cfg.eval)
    for c, chunk in enumerate(chunks):
        ahead = None  # the next chunk's edits, sampled while this one is scored
        for attempt in range(cfg.eval.chunk_retries + 1):
            try:
                baseline = None if against is None else [against[0][examples[i].id] for i in chunk]
                scores = score_edits(rewards, [rows[i] for i in chunk], edits, cfg.eval, baseline)
                if ahead is None and c + 1 < len(chunks):
                    ahead = side.sample(rollouts, [rows[i] for i in chunks[c + 1]], cfg.eval)
                scored = gather(scores)
                shown = [(i, edit) for i, edit in zip(chunk, edits, strict=True) if examples[i].id in grid_ids]
                pngs = edit_pngs([edit for _, edit in shown])
                break
            except ray.exceptions.RayError as error:
                if not lost_worker(error) or attempt == cfg.eval.chunk_retries:
                    raise
                print(f"{name}: chunk {c + 1}/{len(chunks)} lost a worker ({type(error).__name__}); sampling and "
                      f"scoring it again ({attempt + 1} of eval.chunk_retries {cfg.eval.chunk_retries})",
                      flush=True)  # fmt: skip
                wait_until_up([*rollouts, *rewards], cfg.eval.worker_wait_s)
                edits = side.sample(rollouts, [rows[i] for i in chunk], cfg.eval)
                if against is not None:
                    redone = against[1].sample(rollouts, [rows[i] for i in chunk], cfg.eval)
                    against[0].update((examples[i].id, edit) for i, edit in zip(chunk, redone, strict=True))
        if keep is not None:
            keep.update((examples[i].id, edit) for i, edit in zip(chunk, edits, strict=True))
        for (i, _), png in zip(shown, pngs, strict=True):
            path = _edit_png(edits_dir, name, examples[i].id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
        store.append([
            score_row(name, examples[i].id, examples[i].category, cfg.eval.seed, s["mas"], s["rubric"], s["pairwise"])
            for i, s in zip(chunk, scored, strict=True)
        ])  # fmt: skip
        done = len(examples) - len(todo) + sum(len(x) for x in chunks[: c + 1])
        print(f"{name}: {done}/{len(examples)} rows scored", flush=True)
        edits = ahead
    return len(todo)


def run_compare(
    cfg: Config, candidate: str, baseline: str, out_dir: Path, *, split: str, limit: int, grid_rows: int,
    grid_scale: int,
) -> dict[str, GroupSummary]:  # fmt: skip
    """Candidate vs baseline on MotionEdit-Bench on the Ray pools (`compare_pools`): `<out>/scores/`
    (resumable), `rows.parquet`, `summary.json`, `report.md`, `grid.png`, `win_rates.png`. The same policy on
    both sides is sampled once."""
    check_judge(cfg)
    examples = compare_examples(cfg, split, limit)
    ids = [e.id for e in examples]
    dirs = {"baseline": compare_policy_dir(cfg, baseline, "--baseline"),
            "candidate": compare_policy_dir(cfg, candidate, "--checkpoint")}  # fmt: skip
    manifest = compare_manifest(cfg, dirs, split)
    check_compare_manifest(out_dir, manifest)  # reads only: nothing is written before the pools are up
    store, edits_dir = ScoreStore(out_dir / "scores"), out_dir / "edits"
    grid_ids = set(ids[:grid_rows])
    same = dirs["candidate"] == dirs["baseline"]
    side_by_side = cfg.eval.pairwise and not same
    todo = [name for name in (("baseline",) if same else COMPARE_POLICIES) if store.pending(name, ids)]
    judge_metrics: dict[str, int] = {}
    if todo:
        with evaluation_pools(cfg, rubric=True) as pools:
            write_manifest(out_dir, manifest)
            rollouts, rewards = pools.rollouts.actors, pools.rewards.actors
            rows = [ray.put(e) for e in examples]  # put once: rollout and reward workers fetch them by reference
            sides = {name: policy_side(dirs[name], cfg) for name in COMPARE_POLICIES}
            kept: dict[str, Any] = {}  # the baseline's edits, by id, while the candidate's are judged beside them
            for name in todo:
                if side_by_side and name == "candidate":
                    resample_baseline(kept, sides["baseline"], rollouts, examples, rows, store, cfg)
                score_compare_policy(name, sides[name], rollouts, rewards, examples, rows, store, cfg,
                                     edits_dir=edits_dir, grid_ids=grid_ids,
                                     keep=kept if side_by_side and name == "baseline" else None,
                                     against=(kept, sides["baseline"]) if side_by_side and name == "candidate"
                                     else None)  # fmt: skip
            for counters in ray.get([w.counters.remote() for w in rewards]):
                for key, value in counters.items():
                    if key.startswith("eval_judge/"):
                        name = key.removeprefix("eval_judge/")
                        judge_metrics[name] = judge_metrics.get(name, 0) + value
    write_manifest(out_dir, manifest)  # kept (it names what the scores are of), or after a resume without one
    if same:  # the same policy and seeds make the same edits: the candidate's rows are the baseline's
        pending = set(store.pending("candidate", ids))
        tie = {"pairwise": 0.5, "pairwise_attempts": 0, "pairwise_failed": False, "pairwise_error": ""}
        store.append([{**r, "policy": "candidate", **(tie if cfg.eval.pairwise else {})}
                      for r in store.table().to_pylist()
                      if r["policy"] == "baseline" and r["id"] in pending])  # fmt: skip
    return write_compare_outputs(cfg, examples, store, dirs, out_dir, split=split, judge_metrics=judge_metrics,
                                 grid_rows=grid_rows, grid_scale=grid_scale)  # fmt: skip


def resample_baseline(
    kept: dict[str, Any], side: Side, rollouts: list[Any], examples: list[MotionExample], rows: list[Any],
    store: ScoreStore, cfg: Config,
) -> None:  # fmt: skip
    """Side-by-side judging of a resumed run: the baseline's edits of the rows the candidate still has to score
    that this process did not sample (the baseline was scored before a crash) are sampled again into `kept`.
    An edit is a function of its row, the policy and `eval.*`, so they are the edits the baseline was scored on."""
    pending = set(store.pending("candidate", [e.id for e in examples]))
    missing = [i for i, e in enumerate(examples) if e.id in pending and e.id not in kept]
    if not missing:
        return
    print(f"side by side: sampling the baseline's {len(missing)} edits again (scored by an earlier run)", flush=True)
    edits = side.sample(rollouts, [rows[i] for i in missing], cfg.eval)
    kept.update((examples[i].id, edit) for i, edit in zip(missing, edits, strict=True))


def write_compare_outputs(
    cfg: Config, examples: list[MotionExample], store: ScoreStore, dirs: dict[str, str | None], out_dir: Path, *,
    split: str, judge_metrics: dict[str, int], grid_rows: int, grid_scale: int,
) -> dict[str, GroupSummary]:  # fmt: skip
    """From the scores in `store`: rows.parquet, summary.json, grid.png, win_rates.png and report.md."""
    rows = pair_rows(store.table(), [e.id for e in examples], margin=cfg.eval.tie_margin)
    write_rows(rows, out_dir / "rows.parquet")
    groups = summarize(rows, cfg.eval)
    (out_dir / "summary.json").write_text(json.dumps({k: asdict(g) for k, g in groups.items()}, indent=1))
    same, edits_dir = dirs["candidate"] == dirs["baseline"], out_dir / "edits"
    edit_of = {p: "baseline" if same else p for p in COMPARE_POLICIES}  # whose PNG shows each column
    shown = [e for e in examples[:grid_rows]
             if all(_edit_png(edits_dir, edit_of[p], e.id).is_file() for p in COMPARE_POLICIES)]  # fmt: skip
    grids = []
    if shown:
        baselines, candidates = ([_read_png(_edit_png(edits_dir, edit_of[p], e.id)) for e in shown]
                                 for p in COMPARE_POLICIES)  # fmt: skip
        comparison_grid([e.input_image for e in shown], [e.target_image for e in shown], baselines, candidates,
                        out_dir / "grid.png", scale=grid_scale)  # fmt: skip
        grids.append("grid.png")
    plot_win_rates(groups, out_dir / "win_rates.png")
    info = ReportInfo(
        candidate=_policy_label(dirs["candidate"]), baseline=_policy_label(dirs["baseline"]),
        split=split or f"held-out split of {cfg.data.source or 'the run data'} (data.eval_fraction "
        f"{cfg.data.eval_fraction}, data.seed {cfg.data.seed})",
        judge_model=judge_model_name(cfg.reward.judge), prompt_digest=prompt_digest(),
        sampling={"family": cfg.model.family, "steps": cfg.eval.num_steps, "seed": cfg.eval.seed,
                  **policy_class(cfg.model.family).eval_sampling(cfg.eval),
                  "size": f"{cfg.rollout.height}x{cfg.rollout.width}", "flow": cfg.reward.flow.estimator},
        judge_metrics=judge_metrics, grids=grids, plots=["win_rates.png"],
    )  # fmt: skip
    report = write_report(out_dir / "report.md", groups, info, cfg.eval)
    print(summary_table(groups), flush=True)
    print(f"report: {report}", flush=True)
    return groups


MANIFEST_EVAL_KEYS = ("num_steps", "seed", "kontext_guidance", "qwen_true_cfg", "negative_prompt", "mas_alpha",
                      "mas_tau", "mas_d_min", "mas_d_max", "mas_eps", "mas_q", "mas_min_motion_ratio",
                      "pairwise")  # fmt: skip


def compare_manifest(cfg: Config, dirs: dict[str, str | None], split: str) -> dict:
    """What the scores in an out dir depend on: the two policies, the data, the model, the sampling and MAS
    settings, the flow estimator and the judge (its model and prompt). Not the statistics' settings."""
    flow = {k: v for k, v in asdict(cfg.reward.flow).items() if k not in ("max_batch", "cache_size")}
    j = cfg.reward.judge
    return {
        "candidate": _policy_label(dirs["candidate"]), "baseline": _policy_label(dirs["baseline"]),
        "split": split or {"source": cfg.data.source, "synthetic": cfg.data.synthetic,
                           "eval_fraction": cfg.data.eval_fraction, "seed": cfg.data.seed},
        "size": [cfg.rollout.height, cfg.rollout.width],
        "model": {"family": cfg.model.family, "path": cfg.model.path, "tiny": cfg.model.tiny, "dtype": cfg.model.dtype},
        "eval": {**{k: getattr(cfg.eval, k) for k in MANIFEST_EVAL_KEYS},
                 **policy_class(cfg.model.family).eval_sampling(cfg.eval)},  # the family's own guidance keys
        "flow": flow,
        "judge": {"served_model_name": j.served_model_name, "model_path": j.model_path, "tiny": j.tiny},
        "prompt_digest": prompt_digest(),  # not the judge's URL: a resume may find it elsewhere
    }  # fmt: skip


def check_compare_manifest(out_dir: Path, manifest: dict) -> None:
    """A rerun (a resume) must have the manifest of the comparison already in `out_dir`, or its rows would mix
    two comparisons: refuse, naming what differs. Writes nothing."""
    path = out_dir / MANIFEST
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = sorted(k for k in saved.keys() | manifest.keys() if saved.get(k) != manifest.get(k))
        if differ:
            raise EvalInputError(f"{out_dir} holds a comparison with other {', '.join(differ)} ({path}); "
                                 "use another --out, or delete it to start over")  # fmt: skip


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """`<out>/compare.json`, once the comparison has started (`check_compare_manifest` passed)."""
    path = out_dir / MANIFEST
    if not path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=1))


def _policy_label(lora: str | None) -> str:
    return "base policy (no adapter)" if lora is None else lora
