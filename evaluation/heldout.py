"""`python -m evaluation.main heldout`: a run's checkpoints scored on its held-out split with its flow reward, an
image grid and a reward-vs-step plot.

Scored in this process (not on the Ray pools): the flow reward's components per example are what the command
reports, and the edits are sampled with the rollout solver and grid, as training samples them.
1. The policy is the run's base pipeline (`model.*`, loaded exactly as rollout workers load it) plus, for a
   checkpoint, its exported eval-EMA adapter `<ckpt>/lora/pytorch_lora_weights.safetensors`, loaded with
   diffusers' own `load_lora_weights` (so this also checks that the export is what diffusers expects).
   `none` evaluates the base pipeline (the warm-started policy, the start of the RL curve); `latest` the newest
   complete checkpoint under `checkpoint.dir`; `all` the base and every complete checkpoint (a held-out curve);
   a DIR is a checkpoint dir (with `lora/`) or a LoRA dir itself.
2. The held-out split is the run's own (`motionnft_core.data.motionedit.load_splits`: same data, resolution, eval
   fraction, seed). One edit per example is sampled with the rollout solver and grid (`rollout.num_steps`); the
   noise of example i is a function of (`--seed`, its id) only, so every checkpoint is judged on the same noise
   (paired).
3. Each edit is scored with the run's flow reward (`reward.flow.*`, docs/algorithm.md): the per-example `reward`
   (quantized when `reward.flow.quantize`), the unquantized `score` s, and the terms `l_q`, `direction`,
   `move`, `distance`. A table and the means are printed and written to `<out>/eval.json`.
4. `<out>/grid.png`: one row per example (the first `--grid-rows`), columns input | ground truth | edit of each
   evaluated policy in order (base first with `all`), labelled on the picture and in eval.json's
   `grid_columns`, each image scaled up `--grid-scale` times (nearest) so that 32 px demo images are visible.
5. `<out>/reward_curve.png` from `<logging.dir>/metrics.jsonl`: the training reward `reward/mean` per step
   (with `reward/flow/score` and any `eval/*` keys the run logged), plus the held-out means of this command
   (one point per evaluated checkpoint step). Skipped, with a message, when there is neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import torch

from actors.sampler import Sampler
from evaluation.report import write_grid
from learner.trainer.checkpoint import CheckpointManager
from motionnft_core import s3
from motionnft_core.config import Config, RolloutConfig
from motionnft_core.data.motionedit import load_splits
from motionnft_core.models.policy import EditPolicy, load_policy
from motionnft_core.models.tiny import pipeline_source
from motionnft_core.models.warmstart import check_text_length
from motionnft_core.models.weights import LORA_FILE, check_lora_export, lora_export_here
from rewards.flow_scorer import FlowItem, FlowRewardScorer, build_flow_scorer

COMPONENTS = ("reward", "score", "l_q", "direction", "move", "distance")


class EvalInputError(ValueError):
    """What an evaluation command was asked cannot be done (no rows, no judge, another comparison in --out): the
    command prints the message, not a traceback, exits 2 and writes nothing."""


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


# ------------------------------------------------------------------------------------------------ entry


def run_heldout(
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
