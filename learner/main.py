"""Entry point: `python -m learner.main --config configs/<name>.yaml [section.key=value ...]`.

Under `ray job submit` RAY_ADDRESS is set and the driver joins that cluster; otherwise it starts an embedded
local one (laptop, CI). Everything the run does is in the config; `--help` lists every key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from motionnft_core.cli import run_command
from motionnft_core.config_loader import config_to_dict, describe, load_config_or_exit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m learner.main",
        description="MotionNFT post-training of image-editing diffusion models on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: dotted keys after the options, values parsed as YAML literals, e.g.\n"
        "  python -m learner.main --config configs/tiny_cpu.yaml rollout.group_size=4 nft.beta=0.5\n\n"
        "config keys (section.key (type, default): meaning):\n" + "\n".join(describe()),
    )
    parser.add_argument("--config", help="YAML file; keys it leaves out keep their defaults")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint (a "
                        "fresh start when there is none); refused if its training-relevant config differs")
    parser.add_argument("--overwrite", action="store_true", help="delete the checkpoints already under "
                        "checkpoint.dir and start anew (without it, a fresh start there is refused)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config_or_exit(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=1))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local paths or S3, never a hub

    # Heavy imports (torch, ray) only once the config is known to be good.
    from learner.driver.loop import RunStopped, train
    from motionnft_core.models.warmstart import resolve_demo

    cfg = resolve_demo(cfg)  # demo.enabled: build the demo data and warm-started pipeline (once), train those
    print(f"config: {cfg.logging.dir}/config.json (--print-config shows it)", flush=True)
    # A ConfigError found once checkpoints or the cluster are known (run identity, placement, reach) ends as at load.
    return run_command(lambda: train(cfg, resume=args.resume, overwrite=args.overwrite), (RunStopped, "run stopped", 1))


if __name__ == "__main__":
    sys.exit(main())
