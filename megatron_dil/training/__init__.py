"""The DIL trainer: run config, policy/reference setup, the step, reference cache, checkpoints, monitoring."""
