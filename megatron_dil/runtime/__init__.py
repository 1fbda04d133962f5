"""Distributed runtime: process groups, parallel layout, seeding, and the CPU bridge for Megatron-Core."""
from megatron_dil.runtime.distributed import LayoutError, ParallelConfig, initialize, shutdown, validate_layout

__all__ = ["LayoutError", "ParallelConfig", "initialize", "shutdown", "validate_layout"]
