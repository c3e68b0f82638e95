"""`python -m evaluation.main heldout`: a run's checkpoints scored on its held-out split with its flow reward, an
image grid and a reward-vs-step plot.

Run on the Ray pools of the run's config as `compare` runs (evaluation/pools.py: rollout and reward workers,
no judge), the driver (this process) only schedules and writes.
1. The policy is the run's base pipeline (`model.*`, loaded by each rollout worker as in training) plus, for a
   checkpoint, its exported eval-EMA adapter `<ckpt>/lora/pytorch_lora_weights.safetensors`, read by each
   worker on its own node into the adapter training uses (the base policy: that adapter turned off).
   `none` evaluates the base pipeline (the warm-started policy, the start of the RL curve); `latest` the newest
   complete checkpoint under `checkpoint.dir`; `all` the base and every complete checkpoint (a held-out curve);
   a DIR is a checkpoint dir (with `lora/`) or a LoRA dir itself.
2. The held-out split is the run's own (`motionnft_core.data.motionedit.load_splits`: same data, resolution, eval
   fraction, seed). One edit per example is sampled by a rollout worker with the rollout solver and grid, as
   training samples (`rollout.num_steps`, full precision); the noise of example i is a function of (`--seed`,
   its id) only, so every checkpoint is judged on the same noise (paired), whichever worker makes the edit.
3. Each edit is scored by a reward worker with the run's flow reward (`reward.flow.*`, docs/algorithm.md): the
   per-example `reward` (quantized when `reward.flow.quantize`), the unquantized `score` s, and the terms
   `l_q`, `direction`, `move`, `distance`; and with MotionEdit-Bench's MAS (`mas`, 0-100, `eval.mas_*`,
   rewards/mas.py, as published), beside it, for a run whose reward compensates camera motion
   (`reward.flow.camera_compensation`), the MAS of the object motion alone (`mas_camera_compensated`). A table
   and the means are printed and written to `<out>/eval.json`.
4. `<out>/grid.png`: one row per example (the first `--grid-rows`), columns input | ground truth | edit of each
   evaluated policy in order (base first with `all`), labelled on the picture and in eval.json's
   `grid_columns`, each image scaled up `--grid-scale` times (nearest) so that 32 px demo images are visible.
5. `<out>/reward_curve.png` from `<logging.dir>/metrics.jsonl`: the training reward `reward/mean` per step
   (with `reward/flow/score` and any `eval/*` keys the run logged), plus the held-out means of this command
   (one point per evaluated checkpoint step). Skipped, with a message, when there is neither.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import ray
import torch
from PIL import Image

from evaluation.pools import Side, evaluation_pools, policy_side
from evaluation.report import write_grid
from learner.driver.heldout import edit_pngs, wait_until_up
from learner.trainer.checkpoint import CheckpointManager
from motionnft_core import s3
from motionnft_core.config import Config, RolloutConfig
from motionnft_core.data.motionedit import MotionExample, load_splits
from motionnft_core.errors import lost_worker
from motionnft_core.models.tiny import pipeline_source
from motionnft_core.models.warmstart import check_text_length
from motionnft_core.models.weights import LORA_FILE
from rewards.flow_scorer import FLOW_TERMS
from rewards.mas import mas_constants

MAS_COLUMNS = ("mas", "mas_camera_compensated")  # MotionEdit-Bench's MAS; the object-motion MAS of a camera run


class EvalInputError(ValueError):
    """What an evaluation command was asked cannot be done (no rows, no judge, another comparison in --out): the
    command prints the message, not a traceback, exits 2 and writes nothing."""


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class EvalResult:
    """Per-example components (lists aligned with `ids`) and the first edits uint8 (n, 3, H, W), for the grid."""

    ids: list[str]
    prompts: list[str]
    components: dict[str, list[float]]
    edits: torch.Tensor
    step: int | None = None  # checkpoint step, None for the base policy
    extra: dict[str, float] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.components.items()}


def heldout_sampling(rollout: RolloutConfig, seed: int) -> RolloutConfig:
    """The rollout settings of held-out edits: training's solver and grid, the noise of `seed`, full precision."""
    return replace(rollout, seed=seed, fp8=False, fp8_reference=False)


def evaluate_side(
    side: Side, rollouts: list[Any], rewards: list[Any], examples: list[MotionExample], rows: list[Any], cfg: Config,
    *, seed: int, grid_rows: int,
) -> EvalResult:  # fmt: skip
    """Sample one edit per example on the rollout workers (`heldout_sampling`), score them on the reward workers
    (the run's flow reward), fetch the first `grid_rows` edits as PNG. A lost worker (Ray restarts it): sampled
    and scored again once every worker answers, at most `eval.chunk_retries` times."""
    for attempt in range(cfg.eval.chunk_retries + 1):
        try:
            edits = side.sample(rollouts, rows, heldout_sampling(cfg.rollout, seed))
            size = math.ceil(len(rows) / len(rewards))
            scored = [row for part in ray.get([
                rewards[k].score_flow.remote(*rows[s : s + size], *edits[s : s + size], mas=mas_constants(cfg.eval))
                for k, s in enumerate(range(0, len(rows), size))
            ]) for row in part]  # fmt: skip
            pngs = edit_pngs(edits[:grid_rows])
            break
        except ray.exceptions.RayError as error:
            if not lost_worker(error) or attempt == cfg.eval.chunk_retries:
                raise
            print(f"held-out edits lost a worker ({type(error).__name__}); sampling and scoring them again "
                  f"({attempt + 1} of eval.chunk_retries {cfg.eval.chunk_retries})", flush=True)  # fmt: skip
            wait_until_up([*rollouts, *rewards], cfg.eval.worker_wait_s)
    components = {k: [row[k] for row in scored] for k in FLOW_TERMS + MAS_COLUMNS if k in scored[0]}
    shown = torch.stack([decode_png(png) for png in pngs]) if pngs else torch.zeros(0, dtype=torch.uint8)
    return EvalResult([e.id for e in examples], [e.prompt for e in examples], components, shown)


def decode_png(data: bytes) -> torch.Tensor:
    """uint8 (3, H, W) of PNG bytes."""
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------------ loading


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


# ------------------------------------------------------------------------------------------------ entry


def run_heldout(
    cfg: Config, which: str, out_dir: Path, *, seed: int, limit: int, grid_rows: int, grid_scale: int
) -> list[EvalResult]:
    """Evaluate the selected checkpoints on the held-out split on the Ray pools; write eval.json, grid.png,
    reward_curve.png. Every input is checked before the pools start or anything is written."""
    _, held_out = load_splits(cfg)
    if len(held_out) == 0:
        raise EvalInputError("no held-out split: data.eval_fraction must be > 0 to evaluate")
    examples = [held_out[i] for i in range(len(held_out) if limit <= 0 else min(limit, len(held_out)))]
    check_text_length(cfg.model, pipeline_source(cfg.model))  # a warm-started demo pads text as in its warm start
    evaluated = checkpoints_to_evaluate(cfg, which)
    results = []
    with evaluation_pools(cfg, rubric=False) as pools:
        rollouts, rewards = pools.rollouts.actors, pools.rewards.actors
        rows = [ray.put(e) for e in examples]  # put once: rollout and reward workers fetch them by reference
        for step, lora_dir in evaluated:
            result = evaluate_side(policy_side(lora_dir, cfg), rollouts, rewards, examples, rows, cfg, seed=seed,
                                   grid_rows=grid_rows)  # fmt: skip
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
        labels=summary["grid_columns"],
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
