"""``megatron-dil-iterate``: alignment from demonstrations alone (self-play pairs, iterated DIL / SPIN).

    torchrun --nproc_per_node 2 -m megatron_dil.iterate --config examples/tiny/iterate.yaml [key=value ...]

See megatron_dil/iterate/config.py for ITER.yaml and megatron_dil/iterate/loop.py for the stages and outputs. A rerun
of the same command resumes at the first unfinished stage.
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_dil.runtime.cpu_compat import silence_expected_warnings

silence_expected_warnings()  # before Megatron-Core is imported (it warns at import time)

from megatron_dil.config import ConfigError, load_config  # noqa: E402
from megatron_dil.iterate.config import IterateConfig  # noqa: E402
from megatron_dil.runtime.errors import report_rank_error  # noqa: E402

PROG = "megatron-dil-iterate"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="iterate config YAML (IterateConfig)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. iterations=4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(IterateConfig, args.config, args.overrides)
    except ConfigError as err:
        print(f"{PROG}: config error: {err}", file=sys.stderr)
        return 2
    from megatron_dil.iterate.loop import iterate

    try:
        table = iterate(cfg)
    except (ValueError, OSError, FloatingPointError, RuntimeError) as err:
        return report_rank_error(PROG, err)
    if os.environ.get("RANK", "0") == "0":
        print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
