"""Ablation of the motion levers (docs/levers.md): the learning demo (configs/learn_demo.yaml) trained plain, with each
lever alone and with all of them, on demo data where a share of pairs also has a camera pan
(`data.synthetic_pan_share`), several seeds each, and every run scored by the command users run,
`python -m evaluation.main heldout --run DIR --checkpoint all` (the base policy and the final checkpoint, MAS per row).

A lever helps when the 95 % interval of its held-out MAS gain over the plain recipe, paired by seed and row
(`motionnft_core.eval_stats.bootstrap_interval` over the pooled per-row differences), excludes 0. Also reported: the
win rate against the plain recipe (per row: win 1, tie 0.5, loss 0) with its interval, the held-out flow terms, and
the last training steps' mean of the new metrics (reward/preservation/*, reward/flow/camera*).

  python bench/ablation_levers.py                                  # the full ablation: 5 variants x 3 seeds
  python bench/ablation_levers.py --seeds 0 --steps 4 --examples 60 --work /tmp/abl --out /tmp/abl/results

Each run lives in `<work>/<variant>_seed<s>/`; a run whose evaluation is written is not run again, so the command
resumes where it stopped and more seeds or variants can be added later. Results: `<out>/ablation_levers.json` and
`<out>/ablation_levers.md` (the table of docs/levers.md). Rows of a variant that has no run yet are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from motionnft_core.config import ModelConfig  # noqa: E402
from motionnft_core.eval_stats import bootstrap_interval, outcomes  # noqa: E402

CONFIG = ROOT / "configs" / "learn_demo.yaml"
BASELINE = "baseline"
VARIANTS: dict[str, list[str]] = {  # each lever at the strength docs/algorithm.md suggests
    BASELINE: [],
    "preservation": ["reward.preservation_weight=0.3"],
    "motion_focal": ["nft.motion_focal=true", "nft.motion_focal_mix=0.5"],
    "camera": ["reward.flow.camera_compensation=true"],
    "all": ["reward.preservation_weight=0.3", "nft.motion_focal=true", "nft.motion_focal_mix=0.5",
            "reward.flow.camera_compensation=true"],
}  # fmt: skip
FLOW_TERMS = ("score", "l_q", "direction", "move")
NEW_METRICS = ("reward/preservation/score", "reward/preservation/static_share", "reward/flow/camera",
               "reward/flow/camera_excess")  # fmt: skip
CONFIDENCE, SAMPLES, BOOT_SEED = 0.95, 10000, 0


def env() -> dict[str, str]:
    """Offline, token auth off, each run its own embedded Ray cluster, this checkout first on the path."""
    out = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out.update(HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return out


def run_one(variant: str, seed: int, args: argparse.Namespace) -> bool:
    """Train one (variant, seed) and evaluate it (skipped when its evaluation exists); False when a command failed
    (its log says why; the other runs go on)."""
    run_dir = Path(args.work) / f"{variant}_seed{seed}"
    if (run_dir / "eval" / "eval.json").is_file():
        return True
    overrides = [
        f"model.cache_dir={args.cache}", f"logging.dir={run_dir}", f"checkpoint.dir={run_dir / 'ckpt'}",
        f"rollout.seed={seed}", f"learner.seed={seed}", f"learner.steps={args.steps}", f"checkpoint.every={args.steps}",
        f"data.synthetic_pan_share={args.pan_share}", f"data.synthetic_pan_pixels={args.pan_pixels}",
        f"demo.examples={args.examples}", "cluster.learner_ranks=1", *VARIANTS[variant],
    ]  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "run.log"
    began = time.monotonic()
    train = [sys.executable, "-m", "learner.main", "--config", str(CONFIG), "--overwrite", *overrides]
    heldout = [sys.executable, "-m", "evaluation.main", "heldout", "--run", str(run_dir), "--checkpoint", "all",
               "--limit", str(args.eval_limit)]  # fmt: skip
    with log.open("w") as out:
        for cmd in (train, heldout):
            if subprocess.run(cmd, cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                print(f"{variant} seed {seed}: FAILED after {time.monotonic() - began:.0f} s, see {log}", flush=True)
                return False
    print(f"{variant} seed {seed}: {time.monotonic() - began:.0f} s ({run_dir})", flush=True)
    return True


def read_run(run_dir: Path) -> dict:
    """The final checkpoint's per-row held-out components, the base policy's, and the training metrics' tail."""
    results = json.loads((run_dir / "eval" / "eval.json").read_text())["results"]
    base = next(r for r in results if r["step"] is None)
    final = max((r for r in results if r["step"] is not None), key=lambda r: r["step"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tail = rows[-max(1, len(rows) // 3) :]  # the last third of the steps
    metrics = {k: float(np.mean([r[k] for r in tail])) for k in NEW_METRICS if all(k in r for r in tail)}
    return {"ids": final["ids"], "final": final["components"], "base": base["components"], "metrics": metrics,
            "step": final["step"]}  # fmt: skip


def interval(values: np.ndarray) -> dict[str, float]:
    low, high = bootstrap_interval(values, samples=SAMPLES, confidence=CONFIDENCE, seed=BOOT_SEED)
    return {"mean": float(values.mean()), "low": low, "high": high}


def summarize(runs: dict[str, dict[int, dict]]) -> dict:
    """Per variant: MAS and flow terms (means over seeds and rows); against the baseline, paired by seed and row,
    the MAS gain and win rate with 95 % intervals and whether the gain's interval excludes 0."""
    out: dict[str, dict] = {}
    base_runs = runs.get(BASELINE, {})
    for variant, by_seed in runs.items():
        mas = np.concatenate([np.asarray(r["final"]["mas"]) for r in by_seed.values()])
        entry = {"seeds": sorted(by_seed), "rows": int(mas.size), "mas": interval(mas),
                 "flow": {t: float(np.mean([np.mean(r["final"][t]) for r in by_seed.values()])) for t in FLOW_TERMS},
                 "base_mas": float(np.mean([np.mean(r["base"]["mas"]) for r in by_seed.values()])),
                 "metrics": {k: float(np.mean([r["metrics"][k] for r in by_seed.values()]))
                             for k in NEW_METRICS if all(k in r["metrics"] for r in by_seed.values())}}  # fmt: skip
        if all("mas_camera_compensated" in r["final"] for r in by_seed.values()):  # a camera-compensated run's extra
            entry["mas_camera_compensated"] = interval(
                np.concatenate([np.asarray(r["final"]["mas_camera_compensated"]) for r in by_seed.values()]))
        paired = sorted(set(by_seed) & set(base_runs))
        if variant != BASELINE and paired:
            for s in paired:
                if by_seed[s]["ids"] != base_runs[s]["ids"]:
                    raise ValueError(f"{variant} seed {s}: held-out rows differ from the baseline's")
            cand = np.concatenate([np.asarray(by_seed[s]["final"]["mas"]) for s in paired])
            base = np.concatenate([np.asarray(base_runs[s]["final"]["mas"]) for s in paired])
            gain = interval(cand - base)
            entry.update(paired_seeds=paired, mas_gain=gain, helps=gain["low"] > 0, hurts=gain["high"] < 0,
                         win_rate=interval(outcomes(cand, base, margin=0.0)))  # fmt: skip
        out[variant] = entry
    return out


def table(summary: dict, setup: dict) -> str:
    """The markdown table of docs/levers.md."""

    def ci(x: dict, fmt: str = "{:+.2f}") -> str:
        return f"{fmt.format(x['mean'])} [{fmt.format(x['low'])}, {fmt.format(x['high'])}]"

    lines = [
        f"Learning demo, {setup['steps']} steps, seeds {setup['seeds']}, {int(setup['pan_share'] * 100)} % of pairs "
        f"with a {setup['pan_pixels']} px camera pan; held-out rows per seed: {setup.get('rows_per_seed', '?')}. "
        "MAS 0-100 of the final checkpoint; gain and win rate against the plain recipe, paired by seed and row, "
        "with 95 % bootstrap intervals.",
        "",
        "| variant | seeds | MAS | MAS gain vs plain | win rate vs plain | flow score | L_q | direction | new metrics "
        "(training, last third) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, e in summary.items():
        gain = ci(e["mas_gain"]) if "mas_gain" in e else "-"
        win = ci(e["win_rate"], "{:.2f}") if "win_rate" in e else "-"
        verdict = "-" if "mas_gain" not in e else "helps" if e["helps"] else "hurts" if e["hurts"] else "not shown"
        new = ", ".join(f"{k.removeprefix('reward/')} {v:.3f}" for k, v in e["metrics"].items()) or "-"
        lines.append(f"| {variant} | {len(e['seeds'])} | {ci(e['mas'], '{:.2f}')} | {gain} | {win} | "
                     f"{e['flow']['score']:.4f} | {e['flow']['l_q']:.4f} | {e['flow']['direction']:.4f} | {new} | "
                     f"{verdict} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--examples", type=int, default=400, help="demo.examples")
    p.add_argument("--eval-limit", type=int, default=0, help="held-out rows scored per run (0 = all)")
    p.add_argument("--pan-share", type=float, default=0.5)
    p.add_argument("--pan-pixels", type=int, default=3)
    p.add_argument("--work", default="runs/ablation_levers", help="run dirs (one per variant and seed)")
    p.add_argument("--cache", default=ModelConfig.cache_dir, help="model.cache_dir: the demo's data and warm start")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--summarize-only", action="store_true", help="only read the runs there are and write the table")
    args = p.parse_args(argv)
    if BASELINE not in args.variants:
        args.variants.insert(0, BASELINE)
    failed = []
    if not args.summarize_only:
        for seed in args.seeds:  # seed-major: each finished seed gives one more paired comparison of every variant
            for variant in args.variants:
                if not run_one(variant, seed, args):
                    failed.append(f"{variant}_seed{seed}")
    runs: dict[str, dict[int, dict]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            run_dir = Path(args.work) / f"{variant}_seed{seed}"
            if (run_dir / "eval" / "eval.json").is_file():
                runs.setdefault(variant, {})[seed] = read_run(run_dir)
    if BASELINE not in runs:
        raise SystemExit(f"no finished baseline run under {args.work}")
    summary = summarize(runs)
    first = next(iter(runs[BASELINE].values()))
    setup = {"steps": args.steps, "seeds": args.seeds, "pan_share": args.pan_share, "pan_pixels": args.pan_pixels,
             "examples": args.examples, "rows_per_seed": len(first["ids"]), "config": str(CONFIG.relative_to(ROOT)),
             "evaluation": "python -m evaluation.main heldout --run DIR --checkpoint all", "confidence": CONFIDENCE,
             "bootstrap_samples": SAMPLES, "variants": {v: VARIANTS[v] for v in runs}}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation_levers.json").write_text(json.dumps({"setup": setup, "summary": summary}, indent=1) + "\n")
    (out / "ablation_levers.md").write_text(table(summary, setup))
    print(table(summary, setup), flush=True)
    print(f"wrote {out / 'ablation_levers.json'} and {out / 'ablation_levers.md'}", flush=True)
    if failed:
        raise SystemExit(f"failed runs (left out of the table): {', '.join(failed)}")


if __name__ == "__main__":
    main()
