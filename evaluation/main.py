"""Evaluate a run: `python -m evaluation.main {heldout,compare} (--config <yaml> | --run <logging.dir>) [options]
[key=value ...]`.

- `heldout`: score a run's checkpoints (`--checkpoint none|latest|all|DIR`) on its held-out split with its flow
  reward; `eval.json`, a labelled grid and a reward curve under `--out` (default `<logging.dir>/eval`).
  evaluation/heldout.py.
- `compare`: MotionEdit-Bench comparison of `--checkpoint` against `--baseline base|latest|DIR` (MAS, the judge's
  rubric, win rates) on the run's Ray pools; a report under `--out` (default `<logging.dir>/compare`).
  evaluation/compare.py.

`--run` reads the resolved config a run saved (`<logging.dir>/config.json`), so paths the driver filled in (a
prepared model or data set) are the ones evaluated; dotted overrides apply on top. A request that cannot be done
(no checkpoint, no judge, another comparison in `--out`) prints a message, exits 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from evaluation.compare import check_judge, run_compare
from evaluation.heldout import EvalInputError, run_heldout
from motionnft_core.cli import run_command
from motionnft_core.config_loader import load_config_or_exit
from motionnft_core.data.motionedit import DataError
from motionnft_core.models.warmstart import resolve_demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.main", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, metavar="{heldout,compare}")
    heldout = commands.add_parser("heldout", help="score a run's checkpoints on its held-out split (flow reward)")
    compare = commands.add_parser("compare", help="MotionEdit-Bench: --checkpoint against --baseline on the pools")
    for sub, out in ((heldout, "eval"), (compare, "compare")):
        source = sub.add_mutually_exclusive_group(required=True)
        source.add_argument("--config", help="the run's YAML")
        source.add_argument("--run", help="a run dir (logging.dir) holding the resolved config.json")
        sub.add_argument("--out", default="", help=f"output dir (default <logging.dir>/{out})")
        sub.add_argument("--limit", type=int, default=0, help="only the first N rows (0 = all)")
        sub.add_argument("--grid-rows", type=int, default=16, help="examples shown in grid.png")
        sub.add_argument("--grid-scale", type=int, default=0, help="grid upscaling (0 = to >= 96 px per image)")
    heldout.add_argument("--checkpoint", default="latest", help="none | latest | all | a checkpoint or LoRA dir")
    heldout.add_argument("--seed", type=int, default=0, help="noise seed of the edits (same for every checkpoint)")
    compare.add_argument("--checkpoint", default="latest", help="the candidate: base | latest | a checkpoint or "
                         "LoRA dir")  # fmt: skip
    compare.add_argument("--baseline", required=True, help="base | latest | a checkpoint or LoRA dir (eval.* "
                         "settings; evaluation/compare.py)")  # fmt: skip
    compare.add_argument("--split", default="", help="the rows to compare on (hub parquet, JSONL, folder; local or "
                         "s3://); default the run's held-out split")  # fmt: skip
    for sub in (heldout, compare):
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def _run_config_path(run_dir: Path) -> Path:
    """The resolved config a run saved in `<run_dir>/config.json` (JSON is YAML)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--run {run_dir}: no config.json (written by learner.main at the start of a run)")
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A ConfigError found once the cluster is known (pools no node can hold) ends as at load; a request that cannot
    # be done (no judge, a missing checkpoint, a bad split) prints its message.
    return run_command(lambda: _evaluate(args), ((EvalInputError, FileNotFoundError, DataError), "error", 2))


def _evaluate(args: argparse.Namespace) -> None:
    path = args.config or _run_config_path(Path(args.run))
    cfg = load_config_or_exit(path, args.overrides)  # dotted overrides on top of the file
    if args.command == "compare":
        check_judge(cfg)  # before the demo's data and pipeline are built for nothing
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = resolve_demo(cfg)  # --config of a demo run: the same (cached) data and warm-started pipeline it trained
    scale = args.grid_scale or max(1, math.ceil(96 / min(cfg.rollout.height, cfg.rollout.width)))
    if args.command == "compare":
        out = Path(args.out) if args.out else Path(cfg.logging.dir) / "compare"
        run_compare(cfg, args.checkpoint, args.baseline, out, split=args.split, limit=args.limit,
                    grid_rows=args.grid_rows, grid_scale=scale)  # fmt: skip
    else:
        out = Path(args.out) if args.out else Path(cfg.logging.dir) / "eval"
        run_heldout(cfg, args.checkpoint, out, seed=args.seed, limit=args.limit, grid_rows=args.grid_rows,
                    grid_scale=scale)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
