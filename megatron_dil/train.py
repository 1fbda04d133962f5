"""Train with a preference loss (DIL by default) on Megatron-Core.

    torchrun --nproc_per_node 8 -m megatron_dil.train --config RUN.yaml [section.key=value ...]

Sections of RUN.yaml (see megatron_dil/training/config.py and the README): output_dir, model | init.checkpoint,
parallel, data, loss, train, reference, checkpoint, logging. The resolved config is saved as OUTPUT_DIR/config.yaml.
"""
from __future__ import annotations

import argparse
import sys

from megatron_dil.runtime.cpu_compat import silence_expected_warnings

silence_expected_warnings()  # before Megatron-Core is imported (it warns at import time)

from megatron_dil.config import ConfigError, load_config  # noqa: E402
from megatron_dil.runtime.errors import report_rank_error  # noqa: E402
from megatron_dil.training.config import RunConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-dil-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides parsed as YAML values, e.g. train.lr=5e-7 parallel.tensor=2")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run = load_config(RunConfig, args.config, args.overrides)
    except ConfigError as err:
        print(f"megatron-dil-train: config error: {err}", file=sys.stderr)
        return 2
    from megatron_dil.training.trainer import train

    try:
        train(run)
    except (ValueError, OSError, FloatingPointError, RuntimeError) as err:
        # Bad input (layout, data, tokenizer, damaged checkpoint, stale reference cache, non-finite steps, a full
        # disk): one line per failing rank instead of a traceback from every rank.
        return report_rank_error("megatron-dil-train", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
