"""Turn a folder of videos into MotionEdit training pairs: `python -m curation.main --config
configs/curate_<name>.yaml [key=value ...]` (docs/curation.md). A rerun with the same output.dir continues where
an interrupted run stopped. `--help-config` lists every key with its default.
"""

from __future__ import annotations

import argparse
import os
import sys

from curation.config import describe_keys, load_curate_config_or_exit
from motionnft_core.cli import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m curation.main", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("--config", help="the curation YAML (configs/curate_*.yaml)")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.help_config:
        print("\n".join(describe_keys()))
        return 0
    cfg = load_curate_config_or_exit(args.config, args.overrides)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from curation.pipeline import run_curation  # Ray and the models only once the config is good

    # A ConfigError found once the cluster is known ends as at load.
    return run_command(lambda: run_curation(cfg), (FileNotFoundError, "error", 2))


if __name__ == "__main__":
    sys.exit(main())
