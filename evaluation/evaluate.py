"""Held-out evaluation of a checkpoint: flow reward and its components, an image grid, a reward-vs-step plot.

`python -m evaluation.evaluate (--config <yaml> | --run <logging.dir>) [key=value ...] [--checkpoint
none|latest|all|DIR]
[--out DIR]`; `--run` reads the resolved config a run saved (`<logging.dir>/config.json`), so paths the driver
filled in (a prepared model or data set) are the ones evaluated.

1. The policy is the run's base pipeline (`model.*`, loaded exactly as rollout workers load it) plus, for a
   checkpoint, its exported eval-EMA adapter `<ckpt>/lora/pytorch_lora_weights.safetensors`, loaded with
   diffusers' own `load_lora_weights` (so this also checks that the export is what diffusers expects).
   `none` evaluates the base pipeline (the warm-started policy, the start of the RL curve); `latest` the newest
   complete checkpoint under `checkpoint.dir`; `all` the base and every complete checkpoint (a held-out curve);
   a DIR is a checkpoint dir (with `lora/`) or a LoRA dir itself.
2. The held-out split is the run's own (`motionnft_core.data.motionedit.load_splits`: same data, resolution, eval
fraction, seed).
   One edit per example is sampled with the rollout solver and grid (`rollout.num_steps`); the noise of example
   i is a function of (`--seed`, its id) only, so every checkpoint is judged on the same noise (paired).
3. Each edit is scored with the run's flow reward (`reward.flow.*`, DESIGN §3): the per-example `reward`
   (quantized when `reward.flow.quantize`), the unquantized `score` s, and the terms `l_q`, `direction`,
   `move`, `distance`. A table and the means are printed and written to `<out>/eval.json`.
4. `<out>/grid.png`: one row per example (the first `--grid-rows`), columns input | ground truth | edit of each
   evaluated policy in order (base first with `all`; eval.json's `grid_columns` names them), each image scaled
   up `--grid-scale` times (nearest) so that 32 px demo images are visible.
5. `<out>/reward_curve.png` from `<logging.dir>/metrics.jsonl`: the training reward `reward/mean` per step
   (with `reward/flow/score` and any `eval/*` keys the run logged), plus the held-out means of this command
   (one point per evaluated checkpoint step). Skipped, with a message, when there is neither.

MotionEdit-Bench comparison (issue 14, DESIGN §8): `--baseline base|latest|DIR [--split PATH|s3://...]` compares
`--checkpoint` (one policy) with the baseline on `--split` (default: the run's held-out split), the first
`--limit` rows, into `--out` (default `<logging.dir>/bench`), on the Ray pools of the run's config: Ray is
joined as training joins it (`cluster.address`, RAY_ADDRESS under `ray job submit`, else an embedded cluster),
and the driver (this process) only schedules and writes; edits and images stay in the object store
(learner/driver/heldout.py).
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
   (input | target | baseline | candidate, the first `--grid-rows` rows, their edits fetched as PNG bytes)
   and `win_rates.png`.
During training, `eval.every` runs the same scoring on `eval.during_rows` held-out rows (learner/driver/heldout.py).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import ray
import torch
from PIL import Image

from actors.sampler import Sampler
from evaluation.report import ReportInfo, comparison_grid, plot_win_rates, summary_table, write_grid, write_report
from evaluation.table import ScoreStore, pair_rows, score_row, write_rows
from learner.driver.heldout import edit_pngs, gather, sample_edits, score_edits, wait_until_up
from learner.driver.loop import init_ray
from learner.driver.placement import alive_nodes, placement_problems, pool_asks
from learner.driver.pools import start_judges, start_reward_worker, start_rollout_worker
from learner.trainer.checkpoint import CheckpointManager
from motionnft_core import s3
from motionnft_core.config import Config, ConfigError, RolloutConfig
from motionnft_core.config_loader import load_config_or_exit
from motionnft_core.data.motionedit import MotionEditDataset, MotionExample, load_splits
from motionnft_core.errors import lost_worker
from motionnft_core.eval_stats import GroupSummary, summarize
from motionnft_core.models.policy import EditPolicy, load_policy
from motionnft_core.models.tiny import pipeline_source
from motionnft_core.models.warmstart import check_text_length, resolve_demo
from motionnft_core.models.weights import LORA_FILE, LoraExport, check_lora_export, lora_export_here
from motionnft_core.secret import secret_from_env
from rewards.flow_scorer import FlowItem, FlowRewardScorer, build_flow_scorer
from rewards.judge_prompts import prompt_digest
from rewards.rubric import judge_model_name
from rewards.scorer import build_reward_scorer

COMPONENTS = ("reward", "score", "l_q", "direction", "move", "distance")


class EvalInputError(ValueError):
    """What the command was asked cannot be done (no rows, no judge, another comparison in --out): the command
    prints the message, not a traceback, and exits 2."""

BENCH_POLICIES = ("baseline", "candidate")  # sampled in this order: the baseline is usually shared by runs


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class EvalResult:
    """Per-example components (lists aligned with `ids`) and the sampled edits uint8 (N, 3, H, W)."""

    ids: list[str]
    prompts: list[str]
    components: dict[str, list[float]]
    edits: torch.Tensor
    step: int | None = None  # checkpoint step, None for the base policy
    extra: dict[str, float] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.components.items()}


def evaluate_policy(
    policy: EditPolicy, examples: list, scorer: FlowRewardScorer, rollout: RolloutConfig, *, seed: int
) -> EvalResult:
    """Sample one edit per example with the rollout solver and grid (`rollout.*`, noise seeded by (seed, id)) and
    score it against its ground truth."""
    if not examples:
        raise ValueError("evaluate_policy: no examples to evaluate")
    sampler = Sampler(policy, replace(rollout, seed=seed, fp8=False, fp8_reference=False))  # scores: full precision
    pairs = sampler.sample(list(examples), step=0, version=0, group_size=1)  # step 0: the same noise everywhere
    items = [
        FlowItem(e.id, e.input_image, e.target_image, images) for e, (_, images) in zip(examples, pairs, strict=True)
    ]
    scored = scorer.score(items)
    components = {k: [float(v) for r in scored for v in r[k]] for k in COMPONENTS}
    edits = torch.cat([images for _, images in pairs])
    return EvalResult([e.id for e in examples], [e.prompt for e in examples], components, edits)


# ------------------------------------------------------------------------------------------------ loading


def load_evaluated_policy(cfg: Config, lora: str | Path | None) -> EditPolicy:
    """Base pipeline as the rollout workers load it; the adapter exported at `lora` (a diffusers layout dir, or
    an s3:// prefix fetched here) on top."""
    path = pipeline_source(cfg.model)
    policy = load_policy(cfg.model, path, use_gpu=torch.cuda.is_available())
    check_text_length(policy, path)  # a warm-started demo pipeline must see text padded as in its warm start
    if lora is not None:
        with lora_export_here(lora, cache_dir=cfg.model.cache_dir, retry=s3.S3Retry.from_config(cfg.checkpoint)) as d:
            check_lora_export(d, rank=cfg.nft.lora_rank, alpha=cfg.nft.lora_alpha)
            policy.pipe.load_lora_weights(str(d), adapter_name="default")
    return policy


def checkpoints_to_evaluate(cfg, which: str) -> list[tuple[int | None, str | None]]:
    """[(step, where its LoRA export is)] for `which` = none | latest | all | a directory or s3:// prefix (a
    checkpoint, or its `lora/` itself); step None = the base policy. The export's location is a dir or an
    s3:// prefix: nothing is downloaded here, whoever loads it fetches it on its own node
    (`motionnft_core.models.weights.lora_export_here`), and only the export, never the checkpoint's learner shards."""
    if which == "none":
        return [(None, None)]
    retry = s3.S3Retry.from_config(cfg.checkpoint)
    if which in ("latest", "all"):
        manager = CheckpointManager(cfg.checkpoint.dir, keep=cfg.checkpoint.keep, retry=retry)
        steps = manager.complete_steps()
        if which == "latest":
            if not steps:
                raise FileNotFoundError(f"--checkpoint latest: no complete checkpoint under {cfg.checkpoint.dir}")
            steps = steps[-1:]
        found: list[tuple[int | None, str | None]] = [(s, f"{manager.location(s)}/lora") for s in steps]
        return found if which == "latest" else [(None, None), *found]
    root = which.rstrip("/")
    if s3.is_s3_uri(root):
        objects = set(s3.list_prefix(root, retry=retry))
        has = {lora for lora in (root, f"{root}/lora") if f"{lora}/{LORA_FILE}" in objects}
    else:
        has = {lora for lora in (root, f"{root}/lora") if (Path(lora) / LORA_FILE).is_file()}
    if root in has:  # a LoRA dir itself: its parent is the checkpoint
        return [(_step_of(PurePosixPath(root).parent.name), root)]
    if f"{root}/lora" in has:
        return [(_step_of(PurePosixPath(root).name), f"{root}/lora")]
    raise FileNotFoundError(f"--checkpoint {which}: neither {root}/lora/{LORA_FILE} nor {root}/{LORA_FILE} exists")


def _step_of(name: str) -> int | None:
    return int(name.removeprefix("step_")) if name.startswith("step_") and name[5:].isdigit() else None


# ------------------------------------------------------------------------------------------------ outputs


def format_table(result: EvalResult) -> str:
    """One line per example and a mean line."""
    head = f"{'id':<22} {'reward':>6} {'score':>6} {'l_q':>6} {'dir':>6} {'move':>6}  prompt"
    lines = [head]
    c = result.components
    for i, (eid, prompt) in enumerate(zip(result.ids, result.prompts, strict=True)):
        lines.append(
            f"{eid[:22]:<22} {c['reward'][i]:6.3f} {c['score'][i]:6.3f} {c['l_q'][i]:6.3f} "
            f"{c['direction'][i]:6.3f} {c['move'][i]:6.3f}  {prompt}"
        )
    m = result.means()
    lines.append(
        f"{'MEAN (n=' + str(len(result.ids)) + ')':<22} {m['reward']:6.3f} {m['score']:6.3f} {m['l_q']:6.3f} "
        f"{m['direction']:6.3f} {m['move']:6.3f}"
    )
    return "\n".join(lines)


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl (one JSON object per line, each with a "step")."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not a JSON line ({err})") from err
        if "step" not in row:
            raise ValueError(f"{path}:{n}: metrics row has no 'step'")
        rows.append(row)
    return rows


def plot_reward_curve(rows: list[dict], held_out: list[tuple[int, dict[str, float]]], path: Path) -> Path:
    """Training reward per step (raw and a 10-step running mean), logged eval keys, held-out means per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, style in (("reward/mean", "-"), ("reward/flow/score", "--")):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, style, alpha=0.35, label=f"train {key}")
        window = 10
        smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                  for i in range(len(values))]  # fmt: skip
        ax.plot(steps, smooth, style, label=f"train {key} ({window}-step mean)")
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/") and isinstance(r[k], int | float)})
    for key in eval_keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, "o-", label=key)
    for key, marker in (("score", "s"), ("reward", "^")):
        points = [(step, means[key]) for step, means in held_out]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker + ":", markersize=7, label=f"held-out {key} (this eval)")
    ax.set_xlabel("training step")
    ax.set_ylabel("flow reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ MotionEdit-Bench


def bench_examples(cfg: Config, split: str, limit: int) -> list[MotionExample]:
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


def bench_policy_dir(cfg: Config, which: str, flag: str) -> str | None:
    """`base`/`none` -> None (the base pipeline); `latest` or a checkpoint / LoRA dir or s3:// prefix -> where its
    LoRA export is."""
    if which in ("base", "none"):
        return None
    if which == "all":
        raise EvalInputError(f"{flag} all: a comparison takes one candidate and one baseline")
    ((_, lora_dir),) = checkpoints_to_evaluate(cfg, which)
    return lora_dir


@contextmanager
def bench_workers(cfg: Config) -> Iterator[tuple[list[Any], list[Any]]]:
    """(rollout workers, reward workers) of a comparison, started as training starts them: Ray joined with
    `learner.driver.loop.init_ray` (`cluster.address` / RAY_ADDRESS, as under `ray job submit`, an already initialized
    Ray as it is, else an embedded one-machine cluster), `cluster.rollout_workers` rollout workers on the
    `cluster.rollout_*` resources holding the run's policy (its LoRA adapter empty: the base policy), and
    `cluster.reward_workers` reward workers with the run's flow estimator and a rubric client for the judge at
    `reward.judge.url` (API key from `reward.judge.api_key_env`) or for `cluster.judge_replicas` vLLM replicas
    started here on `reward.judge.model_path` / the tiny judge. Every actor started is stopped on exit, and an
    embedded cluster started here is shut down."""
    j, c = cfg.reward.judge, cfg.cluster
    if not (j.url or j.model_path or j.tiny):
        raise EvalInputError("the rubric needs a judge: reward.judge.url, reward.judge.model_path or reward.judge.tiny")
    started = not ray.is_initialized()
    embedded = init_ray(cfg)
    judges: list[Any] = []
    workers: list[Any] = []
    try:
        check_bench_placement(cfg)
        key = secret_from_env(j.api_key_env, generate=not j.url)
        judges = start_judges(cfg, key, local=embedded, rubric=True)
        urls = (j.url,) if j.url else tuple(ray.get([judge.url.remote() for judge in judges]))
        if not urls:
            raise EvalInputError("the rubric needs a judge: cluster.judge_replicas is 0 and reward.judge.url is empty")
        flow_only = functools.partial(
            build_reward_scorer, replace(cfg.reward, flow_weight=1.0, judge_weight=0.0), (),
            device="cuda" if c.reward_gpus > 0 else "cpu", cache_dir=cfg.model.cache_dir,
        )  # fmt: skip
        rewards = [start_reward_worker(cfg, flow_only, urls, key) for _ in range(c.reward_workers)]
        workers += rewards
        policy = functools.partial(load_policy, cfg.model, use_gpu=c.rollout_gpus > 0,
                                   lora=None if cfg.nft.full_finetune else cfg.nft)  # fmt: skip
        no_probe = replace(cfg, rollout=replace(cfg.rollout, parity_check=False))  # no learner to compare with
        rollouts = [start_rollout_worker(no_probe, policy, None, i) for i in range(c.rollout_workers)]
        workers += rollouts
        ray.get([w.ready.remote() for w in workers])
        yield rollouts, rewards
    finally:
        for judge in judges:  # the vLLM processes stop cleanly before their actors go
            try:
                ray.get(judge.stop.remote(), timeout=60)
            except Exception as e:  # noqa: BLE001 - shutdown continues, but says what failed
                print(f"warning: judge replica did not stop cleanly: {e!r}", flush=True)
        for actor in [*workers, *judges]:
            ray.kill(actor)
        if started:
            ray.shutdown()


def check_bench_placement(cfg: Config) -> None:
    """Raise ConfigError naming the keys of a pool of the comparison (rollout, reward, judge) that no node or
    node type can ever hold, instead of waiting forever for it (learner/driver/placement.py; no learner here)."""
    rubric = replace(cfg, reward=replace(cfg.reward, judge_weight=1.0))  # replicas whatever the training weight
    asks = [p for p in pool_asks(rubric) if p.name != "learner"]
    if problems := placement_problems(asks, alive_nodes(), cfg.cluster.node_types):
        raise ConfigError("pools that can never be placed:\n  " + "\n  ".join(problems))


def _edit_png(edits_dir: Path, policy: str, example_id: str) -> Path:
    return edits_dir / policy / f"{hashlib.sha1(example_id.encode()).hexdigest()[:16]}.png"


def _read_png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


@dataclass(frozen=True)
class Side:
    """One policy of a comparison as the rollout workers sample it: a checkpoint's LoRA export (each worker loads
    it on its own node before its first edit, and again after Ray restarted it), or the base policy (`base`:
    the adapter off; a full fine-tuning run's base is the pipeline as loaded)."""

    export: LoraExport | None
    base: bool

    def sample(self, rollouts: list[Any], rows: list[Any], cfg: Config) -> list[Any]:
        return sample_edits(rollouts, rows, cfg.eval, base=self.base, export=self.export)


def bench_side(lora: str | None, cfg: Config) -> Side:
    """The side of the export at `lora` (None: the base policy)."""
    if lora is None:
        return Side(None, base=not cfg.nft.full_finetune)
    export = LoraExport(lora, cfg.nft.lora_rank, cfg.nft.lora_alpha, cfg.model.cache_dir,
                        s3.S3Retry.from_config(cfg.checkpoint))  # fmt: skip
    return Side(export, base=False)


def score_bench_policy(
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
    edits = side.sample(rollouts, [rows[i] for i in chunks[0]], cfg)
    for c, chunk in enumerate(chunks):
        ahead = None  # the next chunk's edits, sampled while this one is scored
        for attempt in range(cfg.eval.chunk_retries + 1):
            try:
                baseline = None if against is None else [against[0][examples[i].id] for i in chunk]
                scores = score_edits(rewards, [rows[i] for i in chunk], edits, cfg.eval, baseline)
                if ahead is None and c + 1 < len(chunks):
                    ahead = side.sample(rollouts, [rows[i] for i in chunks[c + 1]], cfg)
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
                edits = side.sample(rollouts, [rows[i] for i in chunk], cfg)
                if against is not None:
                    redone = against[1].sample(rollouts, [rows[i] for i in chunk], cfg)
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


def run_bench(
    cfg: Config, candidate: str, baseline: str, out_dir: Path, *, split: str, limit: int, grid_rows: int,
    grid_scale: int,
) -> dict[str, GroupSummary]:  # fmt: skip
    """Candidate vs baseline on MotionEdit-Bench (issue 14) on the Ray pools (`bench_workers`): `<out>/scores/`
    (resumable), `rows.parquet`, `summary.json`, `report.md`, `grid.png`, `win_rates.png`. The same policy on
    both sides is sampled once."""
    examples = bench_examples(cfg, split, limit)
    ids = [e.id for e in examples]
    dirs = {"baseline": bench_policy_dir(cfg, baseline, "--baseline"),
            "candidate": bench_policy_dir(cfg, candidate, "--checkpoint")}  # fmt: skip
    check_bench_manifest(out_dir, bench_manifest(cfg, dirs, split))
    store, edits_dir = ScoreStore(out_dir / "scores"), out_dir / "edits"
    grid_ids = set(ids[:grid_rows])
    same = dirs["candidate"] == dirs["baseline"]
    side_by_side = cfg.eval.pairwise and not same
    todo = [name for name in (("baseline",) if same else BENCH_POLICIES) if store.pending(name, ids)]
    judge_metrics: dict[str, int] = {}
    if todo:
        with bench_workers(cfg) as (rollouts, rewards):
            rows = [ray.put(e) for e in examples]  # put once: rollout and reward workers fetch them by reference
            sides = {name: bench_side(dirs[name], cfg) for name in BENCH_POLICIES}
            kept: dict[str, Any] = {}  # the baseline's edits, by id, while the candidate's are judged beside them
            for name in todo:
                if side_by_side and name == "candidate":
                    resample_baseline(kept, sides["baseline"], rollouts, examples, rows, store, cfg)
                score_bench_policy(name, sides[name], rollouts, rewards, examples, rows, store, cfg,
                                   edits_dir=edits_dir, grid_ids=grid_ids,
                                   keep=kept if side_by_side and name == "baseline" else None,
                                   against=(kept, sides["baseline"]) if side_by_side and name == "candidate"
                                   else None)  # fmt: skip
            for counters in ray.get([w.counters.remote() for w in rewards]):
                for key, value in counters.items():
                    if key.startswith("eval_judge/"):
                        name = key.removeprefix("eval_judge/")
                        judge_metrics[name] = judge_metrics.get(name, 0) + value
    if same:  # the same policy and seeds make the same edits: the candidate's rows are the baseline's
        pending = set(store.pending("candidate", ids))
        tie = {"pairwise": 0.5, "pairwise_attempts": 0, "pairwise_failed": False, "pairwise_error": ""}
        store.append([{**r, "policy": "candidate", **(tie if cfg.eval.pairwise else {})}
                      for r in store.table().to_pylist()
                      if r["policy"] == "baseline" and r["id"] in pending])  # fmt: skip
    return write_bench_outputs(cfg, examples, store, dirs, out_dir, split=split, judge_metrics=judge_metrics,
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
    edits = side.sample(rollouts, [rows[i] for i in missing], cfg)
    kept.update((examples[i].id, edit) for i, edit in zip(missing, edits, strict=True))


def write_bench_outputs(
    cfg: Config, examples: list[MotionExample], store: ScoreStore, dirs: dict[str, str | None], out_dir: Path, *,
    split: str, judge_metrics: dict[str, int], grid_rows: int, grid_scale: int,
) -> dict[str, GroupSummary]:  # fmt: skip
    """From the scores in `store`: rows.parquet, summary.json, grid.png, win_rates.png and report.md."""
    rows = pair_rows(store.table(), [e.id for e in examples], margin=cfg.eval.tie_margin)
    write_rows(rows, out_dir / "rows.parquet")
    groups = summarize(rows, cfg.eval)
    (out_dir / "summary.json").write_text(json.dumps({k: asdict(g) for k, g in groups.items()}, indent=1))
    same, edits_dir = dirs["candidate"] == dirs["baseline"], out_dir / "edits"
    edit_of = {p: "baseline" if same else p for p in BENCH_POLICIES}  # whose PNG shows each column
    shown = [e for e in examples[:grid_rows]
             if all(_edit_png(edits_dir, edit_of[p], e.id).is_file() for p in BENCH_POLICIES)]  # fmt: skip
    grids = []
    if shown:
        baselines, candidates = ([_read_png(_edit_png(edits_dir, edit_of[p], e.id)) for e in shown]
                                 for p in BENCH_POLICIES)  # fmt: skip
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
                  **({"guidance": cfg.eval.kontext_guidance} if cfg.model.family == "flux_kontext" else
                     {"true_cfg": cfg.eval.qwen_true_cfg, "negative_prompt": cfg.eval.negative_prompt}),
                  "size": f"{cfg.rollout.height}x{cfg.rollout.width}", "flow": cfg.reward.flow.estimator},
        judge_metrics=judge_metrics, grids=grids, plots=["win_rates.png"],
    )  # fmt: skip
    report = write_report(out_dir / "report.md", groups, info, cfg.eval)
    print(summary_table(groups), flush=True)
    print(f"report: {report}", flush=True)
    return groups


MANIFEST = "bench.json"
MANIFEST_EVAL_KEYS = ("num_steps", "seed", "kontext_guidance", "qwen_true_cfg", "negative_prompt", "mas_alpha",
                      "mas_tau", "mas_d_min", "mas_d_max", "mas_eps", "mas_q", "mas_min_motion_ratio",
                      "pairwise")  # fmt: skip


def bench_manifest(cfg: Config, dirs: dict[str, str | None], split: str) -> dict:
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
        "eval": {k: getattr(cfg.eval, k) for k in MANIFEST_EVAL_KEYS},
        "flow": flow,
        "judge": {"served_model_name": j.served_model_name, "model_path": j.model_path, "tiny": j.tiny},
        "prompt_digest": prompt_digest(),  # not the judge's URL: a resume may find it elsewhere
    }  # fmt: skip


def check_bench_manifest(out_dir: Path, manifest: dict) -> None:
    """First run: write `<out>/bench.json`. A rerun (a resume) must have the same manifest, or its rows would mix
    two comparisons: refuse, naming what differs."""
    path = out_dir / MANIFEST
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = sorted(k for k in saved.keys() | manifest.keys() if saved.get(k) != manifest.get(k))
        if differ:
            raise EvalInputError(f"{out_dir} holds a comparison with other {', '.join(differ)} ({path}); "
                             "use another --out, or delete it to start over")  # fmt: skip
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1))


def _policy_label(lora: str | None) -> str:
    return "base policy (no adapter)" if lora is None else lora


# ------------------------------------------------------------------------------------------------ entry


def run(
    cfg: Config, which: str, out_dir: Path, *, seed: int, limit: int, grid_rows: int, grid_scale: int
) -> list[EvalResult]:
    """Evaluate the selected checkpoints on the held-out split; write eval.json, grid.png, reward_curve.png."""
    _, held_out = load_splits(cfg)
    if len(held_out) == 0:
        raise EvalInputError("no held-out split: data.eval_fraction must be > 0 to evaluate")
    examples = [held_out[i] for i in range(len(held_out) if limit <= 0 else min(limit, len(held_out)))]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = build_flow_scorer(cfg.reward.flow, device=device, cache_dir=cfg.model.cache_dir)
    results = []
    for step, lora_dir in checkpoints_to_evaluate(cfg, which):
        policy = load_evaluated_policy(cfg, lora_dir)
        result = evaluate_policy(policy, examples, scorer, cfg.rollout, seed=seed)
        result.step = step
        results.append(result)
        print(f"\n== {'base policy (no adapter)' if lora_dir is None else lora_dir} ==", flush=True)
        print(format_table(result), flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "config_checkpoint_dir": cfg.checkpoint.dir,
        "seed": seed,
        "n_examples": len(examples),
        "grid_columns": ["input", "ground truth", *(_label(res.step) for res in results)],
        "results": [
            {"step": res.step, "mean": res.means(), "ids": res.ids, "components": res.components} for res in results
        ],
    }
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=1))
    n = min(grid_rows, len(examples))
    write_grid(
        torch.stack([e.input_image for e in examples[:n]]),
        torch.stack([e.target_image for e in examples[:n]]),
        [res.edits[:n] for res in results],
        out_dir / "grid.png",
        scale=grid_scale,
    )
    print(f"grid ({' | '.join(summary['grid_columns'])}; {n} rows): {out_dir / 'grid.png'}")
    metrics_path = Path(cfg.logging.dir) / "metrics.jsonl"
    rows = read_metrics(metrics_path) if metrics_path.is_file() else []
    held = [(0 if res.step is None else res.step, res.means()) for res in results]
    if rows or len(held) > 1:
        plot_reward_curve(rows, held, out_dir / "reward_curve.png")
        print(f"reward curve: {out_dir / 'reward_curve.png'}")
    else:
        print(f"no {metrics_path} and a single evaluation: reward_curve.png not written")
    return results


def _label(step: int | None) -> str:
    return "edit: base policy" if step is None else f"edit: step {step}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.evaluate", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="the run's YAML")
    source.add_argument("--run", help="a run dir (logging.dir) holding the resolved config.json")
    parser.add_argument("--checkpoint", default="latest", help="none | latest | all | a checkpoint or LoRA dir")
    parser.add_argument("--out", default="", help="output dir (default <logging.dir>/eval)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the edits (same for every checkpoint)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N held-out examples (0 = all)")
    parser.add_argument("--grid-rows", type=int, default=16, help="examples shown in grid.png")
    parser.add_argument("--grid-scale", type=int, default=0, help="grid upscaling (0 = to >= 96 px per image)")
    parser.add_argument("--baseline", default="", help="MotionEdit-Bench comparison of --checkpoint against this: "
                        "base | latest | a checkpoint or LoRA dir (eval.* settings; the module docstring)")
    parser.add_argument("--split", default="", help="with --baseline: the rows to compare on (hub parquet, JSONL, "
                        "folder; local or s3://); default the run's held-out split")  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def _run_config_path(run_dir: Path) -> Path:
    """The resolved config a run saved in `<run_dir>/config.json` (JSON is YAML)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--run {run_dir}: no config.json (written by learner.main at the start of a run)")
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = args.config or _run_config_path(Path(args.run))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    cfg = load_config_or_exit(path, args.overrides)  # dotted overrides on top of the file
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = resolve_demo(cfg)  # --config of a demo run: the same (cached) data and warm-started pipeline it trained
    scale = args.grid_scale or max(1, math.ceil(96 / min(cfg.rollout.height, cfg.rollout.width)))
    if args.baseline:
        out = Path(args.out) if args.out else Path(cfg.logging.dir) / "bench"
        try:
            run_bench(cfg, args.checkpoint, args.baseline, out, split=args.split, limit=args.limit,
                      grid_rows=args.grid_rows, grid_scale=scale)  # fmt: skip
        except ConfigError as e:  # found once the cluster is known: pools no node can hold
            print(f"config error: {e}", file=sys.stderr, flush=True)
            return 2
        except (EvalInputError, FileNotFoundError) as e:  # e.g. a missing checkpoint or split
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        return 0
    if args.split:
        raise SystemExit("--split needs --baseline (the flow-score evaluation uses the run's held-out split)")
    out = Path(args.out) if args.out else Path(cfg.logging.dir) / "eval"
    try:
        run(cfg, args.checkpoint, out, seed=args.seed, limit=args.limit, grid_rows=args.grid_rows, grid_scale=scale)
    except (EvalInputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
