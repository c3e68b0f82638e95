"""Held-out evaluation of a checkpoint: flow reward and its components, an image grid, a reward-vs-step plot.

`python -m learner.evaluate (--config <yaml> | --run <logging.dir>) [key=value ...] [--checkpoint none|latest|all|DIR]
[--out DIR]`; `--run` reads the resolved config a run saved (`<logging.dir>/config.json`), so paths the driver
filled in (a prepared model or data set) are the ones evaluated.

1. The policy is the run's base pipeline (`model.*`, loaded exactly as rollout workers load it) plus, for a
   checkpoint, its exported eval-EMA adapter `<ckpt>/lora/pytorch_lora_weights.safetensors`, loaded with
   diffusers' own `load_lora_weights` (so this also checks that the export is what diffusers expects).
   `none` evaluates the base pipeline (the warm-started policy, the start of the RL curve); `latest` the newest
   complete checkpoint under `checkpoint.dir`; `all` the base and every complete checkpoint (a held-out curve);
   a DIR is a checkpoint dir (with `lora/`) or a LoRA dir itself.
2. The held-out split is the run's own (`data.motionedit.load_splits`: same data, resolution, eval fraction, seed).
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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from actors.sampler import Sampler
from common import s3
from common.config import Config, RolloutConfig, load_config_or_exit
from data.motionedit import load_splits
from learner.checkpoint import CheckpointManager
from models.policy import EditPolicy, load_policy
from models.tiny import pipeline_source
from models.warmstart import check_text_length, resolve_demo
from rewards.flow_scorer import FlowItem, FlowRewardScorer, build_flow_scorer

COMPONENTS = ("reward", "score", "l_q", "direction", "move", "distance")
LORA_FILE = "pytorch_lora_weights.safetensors"


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
    sampler = Sampler(policy, replace(rollout, seed=seed))
    pairs = sampler.sample(list(examples), step=0, version=0, group_size=1)  # step 0: the same noise everywhere
    items = [
        FlowItem(e.id, e.input_image, e.target_image, images) for e, (_, images) in zip(examples, pairs, strict=True)
    ]
    scored = scorer.score(items)
    components = {k: [float(v) for r in scored for v in r[k]] for k in COMPONENTS}
    edits = torch.cat([images for _, images in pairs])
    return EvalResult([e.id for e in examples], [e.prompt for e in examples], components, edits)


# ------------------------------------------------------------------------------------------------ loading


def load_evaluated_policy(cfg: Config, lora_dir: Path | None) -> EditPolicy:
    """Base pipeline as the rollout workers load it; the adapter in `lora_dir` (diffusers layout) on top."""
    path = pipeline_source(cfg.model)
    policy = load_policy(cfg.model, path, use_gpu=torch.cuda.is_available())
    check_text_length(policy, path)  # a warm-started demo pipeline must see text padded as in its warm start
    if lora_dir is not None:
        check_lora_export(lora_dir, rank=cfg.nft.lora_rank, alpha=cfg.nft.lora_alpha)
        policy.pipe.load_lora_weights(str(lora_dir), adapter_name="default")
    return policy


def check_lora_export(lora_dir: Path, *, rank: int, alpha: int) -> None:
    """Raise unless `lora_dir` holds an export whose rank / alpha match the run's `nft.lora_rank` / `lora_alpha`."""
    from safetensors import safe_open

    path = Path(lora_dir) / LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no exported LoRA at {path} (written by checkpoint.export_lora)")
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if raw is None:
        return  # an export without metadata: diffusers infers rank from the tensors
    meta = json.loads(raw)
    found = (meta.get("transformer.r"), meta.get("transformer.lora_alpha"))
    if found != (rank, alpha):
        raise ValueError(
            f"{path}: adapter has rank/alpha {found}, the config says nft.lora_rank/nft.lora_alpha = {(rank, alpha)}"
        )


def checkpoints_to_evaluate(cfg, which: str) -> list[tuple[int | None, Path | None]]:
    """[(step, lora dir)] for `which` = none | latest | all | a directory; step None = the base policy."""
    if which == "none":
        return [(None, None)]
    if which in ("latest", "all"):
        manager = CheckpointManager(cfg.checkpoint.dir, keep=cfg.checkpoint.keep, cache_dir=cfg.model.cache_dir,
                                    retry=s3.S3Retry.from_config(cfg.checkpoint))
        steps = manager.complete_steps()
        if which == "latest":
            if not steps:
                raise FileNotFoundError(f"--checkpoint latest: no complete checkpoint under {cfg.checkpoint.dir}")
            steps = steps[-1:]
        found = [(s, manager.local_copy(s) / "lora") for s in steps]
        return found if which == "latest" else [(None, None), *found]
    path = Path(which)
    if (path / LORA_FILE).is_file():
        return [(_step_of(path.parent), path)]
    if (path / "lora" / LORA_FILE).is_file():
        return [(_step_of(path), path / "lora")]
    raise FileNotFoundError(f"--checkpoint {which}: neither {path / 'lora' / LORA_FILE} nor {path / LORA_FILE} exists")


def _step_of(path: Path) -> int | None:
    name = path.name
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


def write_grid(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    edits: torch.Tensor | Sequence[torch.Tensor],
    path: Path,
    scale: int = 1,
) -> Path:
    """PNG with one row per example: input | ground truth | edit [| edit ...] (one edit column per batch in
    `edits`, e.g. the base policy's and each checkpoint's), each cell (H*scale, W*scale); uint8 (N, 3, H, W)."""
    from PIL import Image

    edit_batches = [edits] if isinstance(edits, torch.Tensor) else list(edits)
    batches = [inputs, targets, *edit_batches]
    if not edit_batches or any(b.shape != inputs.shape or b.dtype != torch.uint8 for b in batches) or inputs.ndim != 4:
        raise ValueError(
            "write_grid needs uint8 (N, 3, H, W) batches of one shape, got "
            + ", ".join(f"{tuple(b.shape)} {b.dtype}" for b in batches)
        )
    if scale < 1:
        raise ValueError(f"grid scale must be >= 1, got {scale}")
    rows = torch.cat(batches, dim=3)  # (N, 3, H, C*W)
    grid = torch.cat(list(rows), dim=1)  # (3, N*H, C*W)
    image = Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy())
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


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


def run(
    cfg: Config, which: str, out_dir: Path, *, seed: int, limit: int, grid_rows: int, grid_scale: int
) -> list[EvalResult]:
    """Evaluate the selected checkpoints on the held-out split; write eval.json, grid.png, reward_curve.png."""
    _, held_out = load_splits(cfg)
    if len(held_out) == 0:
        raise ValueError("no held-out split: data.eval_fraction must be > 0 to evaluate")
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
        prog="python -m learner.evaluate", description=__doc__.splitlines()[0],
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
    path = args.config or _run_config_path(Path(args.run))
    cfg = load_config_or_exit(path, args.overrides)  # dotted overrides on top of the file
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = resolve_demo(cfg)  # --config of a demo run: the same (cached) data and warm-started pipeline it trained
    scale = args.grid_scale or max(1, math.ceil(96 / min(cfg.rollout.height, cfg.rollout.width)))
    out = Path(args.out) if args.out else Path(cfg.logging.dir) / "eval"
    run(cfg, args.checkpoint, out, seed=args.seed, limit=args.limit, grid_rows=args.grid_rows, grid_scale=scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
