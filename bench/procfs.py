"""Memory readings from /proc/self/status, shared by the benchmarks that report peak memory (Linux)."""
from __future__ import annotations


def status_kib(field: str) -> int:
    """A /proc/self/status field in KiB, e.g. VmRSS (resident now), VmHWM (peak resident), RssAnon (allocated)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")
