"""Build Megatron-Core ``GPTModel`` chunks for this rank from a ``ModelConfig``.

Transformer Engine's layer spec is used when TE imports and CUDA is present (the fast path); otherwise the local
(pure Megatron-Core) spec. Both hold identical weights under different key names (see ``convert``).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from megatron_dil.models.attention import SlidingWindowDotProductAttention, attention_window
from megatron_dil.models.config import ModelConfig


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


# The compiled kernels Megatron-Core's FusedScaleMaskSoftmax imports (built by apex / Megatron-LM, not shipped in the
# megatron-core wheel); without them its fused path raises ModuleNotFoundError on the first fp16/bf16 forward.
FUSED_SOFTMAX_KERNELS = ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda", "scaled_softmax_cuda")


def fused_softmax_available() -> bool:
    """The local spec's fused masked softmax can run: CUDA is present and every kernel module it imports is found."""
    return torch.cuda.is_available() and all(importlib.util.find_spec(m) is not None for m in FUSED_SOFTMAX_KERNELS)


def moe_settings(model: ModelConfig, dispatcher: str = "alltoall") -> dict:
    """TransformerConfig MoE fields reproducing Hugging Face routing (empty for a dense model).

    HF Qwen3-MoE/Mixtral: p = softmax(logits) in fp32, top-k of p, renormalised when ``norm_topk_prob``. Megatron's
    default (score after top-k: softmax over the k selected logits) equals the renormalised form exactly; without
    renormalisation ``moe_router_pre_softmax`` takes the softmax over all experts first. Grouped GEMM needs Transformer
    Engine (GPU); on CPU the experts run one after another (``SequentialMLP``).
    """
    if not model.is_moe:
        return {}
    return dict(
        num_moe_experts=model.num_moe_experts, moe_ffn_hidden_size=model.expert_ffn_hidden_size,
        moe_router_topk=model.moe_router_topk, moe_router_score_function="softmax",
        moe_router_pre_softmax=not model.moe_norm_topk_prob, moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff, moe_z_loss_coeff=model.moe_z_loss_coeff,
        moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=transformer_engine_available(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size())


def transformer_config(model: ModelConfig, *, params_dtype: torch.dtype = torch.float32,
                       sequence_parallel: bool = False, recompute: bool = False,
                       moe_dispatcher: str = "alltoall") -> TransformerConfig:
    """The ``TransformerConfig`` for this model under the current parallel state (TP/PP/CP/EP sizes read from it)."""
    bf16, fp16 = params_dtype == torch.bfloat16, params_dtype == torch.float16
    on_cpu = not torch.cuda.is_available()
    extra = {}
    if model.sliding_window is not None:
        extra["window_size"] = attention_window(model.sliding_window)
    if recompute:
        extra.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    extra.update(moe_settings(model, moe_dispatcher))
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.head_dim,
        layernorm_epsilon=model.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        qk_layernorm=model.qk_layernorm,  # also makes finalize_model_grads sum the QK-norm grads over TP ranks
        attention_dropout=model.attention_dropout,
        hidden_dropout=model.hidden_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        fp16=fp16,
        use_cpu_initialization=on_cpu,
        perform_initialization=True,
        bias_activation_fusion=not on_cpu,
        masked_softmax_fusion=fused_softmax_available(),
        bias_dropout_fusion=not on_cpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # gloo matches point-to-point messages per (peer, tag) in posting order; Megatron's batched isend/irecv posts
        # them in an order that can swap a forward activation and a backward gradient between the same two ranks
        # (PP=2 interleaved). Unbatched p2p keeps a fixed send/recv order on both sides.
        batch_p2p_comm=not on_cpu,
        **extra,
    )


def build_model(model: ModelConfig, *, params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                recompute: bool = False, max_sequence_length: int | None = None,
                moe_dispatcher: str = "alltoall", local_spec: bool = False, head_seed: int = 0,
                head_std: float | None = None) -> list[GPTModel]:
    """This rank's model chunks: one ``GPTModel`` per virtual pipeline stage (one without interleaving).
    ``local_spec`` forces Megatron's own linears even where Transformer Engine is available (LoRA: TE fuses the norm
    into linear_qkv/linear_fc1, so an adapter there would see the pre-norm input).

    The output layer returns logits sharded on the vocabulary (``parallel_output=True``): [b, s, Vp/TP]. With
    ``model.head == "reward"`` it is a ``reward.RewardHead`` instead (output [b, s, 1]; drawn with ``head_seed`` and
    ``head_std``), never tied to the embedding.
    """
    max_len = max_sequence_length or model.max_position_embeddings
    if recompute and not torch.cuda.is_available():
        raise ValueError("recompute_activations is a GPU option: on CPU the re-forward runs in the autograd engine, "
                         "outside the CPU bridge")
    use_te = transformer_engine_available() and not local_spec
    reward = model.head == "reward"
    if reward and sequence_parallel:
        raise ValueError("a reward model does not support sequence_parallel (its head reads the full sequence)")
    if sequence_parallel and not use_te:
        raise ValueError("sequence_parallel needs Transformer Engine (GPU): the local layer spec's torch norms do not "
                         "support it")
    config = transformer_config(model, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                                recompute=recompute, moe_dispatcher=moe_dispatcher)
    experts = dict(num_experts=model.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm)
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer_spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm, **experts)
    else:
        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=model.qk_layernorm,
                                              **experts)
        if model.sliding_window is not None:
            layer_spec.submodules.self_attention.submodules.core_attention = SlidingWindowDotProductAttention
    vocab = model.padded_vocab_size(parallel_state.get_tensor_model_parallel_world_size())
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec,
            vocab_size=vocab,
            max_sequence_length=max_len,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=model.tie_embeddings and not reward,
            position_embedding_type="rope",
            rotary_base=model.rotary_base,  # float: a non-integer rope_theta is kept exactly
            rope_scaling=model.rope_scaling_factor is not None,
            rope_scaling_factor=model.rope_scaling_factor or 8.0,
            vp_stage=stage,
        )
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    if reward:
        from megatron_dil.reward.head import attach_reward_heads

        attach_reward_heads(chunks, model.hidden_size, params_dtype, head_std, head_seed)
    return chunks
