"""Alignment from demonstrations alone: self-play pairs (demonstration ≻ own sample) and iterated DIL / SPIN."""
