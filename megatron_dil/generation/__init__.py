"""Generation on Megatron-Core: KV-cache decoding at any TP × PP with sampling on the vocabulary-parallel logits.

Modules: ``sampler`` (next token on vocab-parallel logits), ``decode`` (KV-cache loop, PP-aware), ``engine`` (batches),
``model`` (which checkpoint), ``prompts`` (prompt sources), ``writer`` (atomic, resumable output), ``cli``
(``megatron-dil-generate``), ``verifier`` (tiny-task scoring), ``evaluator`` (greedy evaluation during training).
"""
