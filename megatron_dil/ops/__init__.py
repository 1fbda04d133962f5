"""Tensor operations shared by the trainer and the losses."""
from megatron_dil.ops.logprobs import SequenceLogProbs, sequence_logprobs, vocab_parallel_logprobs

__all__ = ["SequenceLogProbs", "sequence_logprobs", "vocab_parallel_logprobs"]
