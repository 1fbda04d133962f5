"""How a failing rank reports a user error: one line, never a traceback from every rank."""
from __future__ import annotations

import os


def report_rank_error(prog: str, err: BaseException) -> int:
    """Write ``PROG: error on rank R: ...`` to stderr in a single ``write`` (so the lines of ranks failing at the same
    moment never run into each other in the shared torchrun log) and return exit code 1. With
    ``MEGATRON_DIL_TRACEBACK=1`` the error is raised instead, with its traceback."""
    if os.environ.get("MEGATRON_DIL_TRACEBACK"):
        raise err
    line = (f"{prog}: error on rank {os.environ.get('RANK', '0')}: {type(err).__name__}: {err} "
            f"(MEGATRON_DIL_TRACEBACK=1 shows the traceback)\n")
    os.write(2, line.encode())
    return 1
