"""Language-model prefill FLOPs: a closed formula, and a count on the real forward.

The formula (1 multiply-add = 2 FLOPs), for a decoder layer that sees n tokens, hidden size d,
H query heads and K key/value heads of size h, and a gated (SwiGLU) MLP of width m:

    projections  2 n d (2 H h + 2 K h)    q, k, v, o
    attention    4 n^2 H h                Q K^T and the weighted sum of V, dense
    MLP          6 n d m                  gate, up, down

summed over the layers (a method that prunes inside the language model gives layers different
n), times the batch size, plus 2 d V per prompt for the LM head on the last position only (the
one logit row that generation's prefill computes). Attention is counted dense: causal kernels
mask but do not skip the upper triangle. Norms, activations and rotary embeddings (O(n d)) are
left out; they are well under 1% of the total.

A mixture-of-experts layer (GLM-4.5V from ``first_k_dense_replace`` on; Qwen3.5-MoE) replaces
the MLP by a router over E experts, k experts of width m' per token and shared experts of
width s (Qwen3.5-MoE also gates the shared expert, a d -> 1 projection):

    router       2 n d E
    experts      6 n k d m'               only the k chosen experts run on a token
    shared       6 n d s   (+ 2 n d)

Gemma 4 gives its global (full-attention) layers their own head size and key/value heads
(``per_layer_config``), and with ``attention_k_eq_v`` no value projection there (the keys serve
as values): their projections cost 2 n d (2 H h' + K' h').

Qwen3.5's softmax layers also project an output gate (q_proj is 2 H h wide: + 2 n d H h). Its
linear-attention layers (gated delta rule; K key heads of size k, V value heads of size v, a
depthwise causal conv of width w over the C = 2 K k + V v projected channels) cost, as
transformers' reference implementation runs them (chunks of c = 64 tokens, the sequence padded
to L = c * ceil(n / c), and a conv that also computes the w - 1 outputs it then drops):

    projections  2 n d (2 K k + 3 V v + 2 V)       q, k, v, z, a, b and out
    conv         2 C (n + w - 1) w
    delta rule   V L (4 c k + 6 k v + 2 c v + (c - 1)(k + v))
                                          per chunk and value head: the two c x c products, two
                                          unit-triangular solves, and the scan's four products

The count runs the forward under :class:`torch.utils.flop_counter.FlopCounterMode`, which sees
every matrix product, and assigns FLOPs to the module that ran them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def llm_prefill_flops(
    text_config: "PretrainedConfig",
    layer_tokens: Sequence[int],
    batch_size: int = 1,
    gated_mlp: bool = True,
    logit_rows: int = 1,
) -> int:
    """FLOPs of one language-model prefill, by the formula of this module's docstring.

    Args:
        text_config: the language model's config (hidden, intermediate and vocabulary sizes,
            heads, key/value heads, head size).
        layer_tokens: tokens each decoder layer processes, one entry per layer.
        batch_size: prompts in the batch (all of the same length).
        gated_mlp: three MLP matrices (SwiGLU, as in Llama/Vicuna/Mistral/Qwen) or two.
        logit_rows: positions per prompt the LM head computes logits for.
    """
    d = text_config.hidden_size
    heads = text_config.num_attention_heads
    mlp_matrices = 3 if gated_mlp else 2
    total = 0
    query_width = 2 if text_config.model_type in _GATED_ATTENTION else 1
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * len(layer_tokens)
    for index, n in enumerate(layer_tokens):
        if layer_types[index] == "linear_attention":
            total += _linear_attention_flops(text_config, n)
        else:
            size, keys, values = _attention_shape(text_config, index)
            total += 2 * n * d * ((1 + query_width) * heads * size + (1 + values) * keys * size)
            total += 4 * n * n * heads * size
        mlp = _moe_flops(text_config, index, n)
        if mlp is None:
            mlp = 2 * mlp_matrices * n * d * text_config.intermediate_size
        total += mlp
    head = 2 * d * text_config.vocab_size * logit_rows
    return batch_size * (total + head)


#: Language models whose softmax attention also projects an output gate (q_proj twice as wide).
_GATED_ATTENTION = {"qwen3_5_text", "qwen3_5_moe_text"}
#: Tokens per chunk of transformers' reference gated-delta-rule implementation.
_DELTA_CHUNK = 64


def _attention_shape(config: "PretrainedConfig", index: int) -> tuple[int, int, int]:
    """(head size, key/value heads, value projections: 1 or 0) of softmax layer ``index``, read
    from the layer's own config where the config has per-layer ones (Gemma 4's global layers; its
    config refuses to give one value for all layers), see the module doc."""
    layers = getattr(config, "per_layer_config", None)
    layer = config if layers is None else layers[index]
    heads = config.num_attention_heads
    kv_heads = getattr(layer, "num_key_value_heads", None) or heads
    size = getattr(layer, "head_dim", None) or config.hidden_size // heads
    shared_values = getattr(config, "attention_k_eq_v", False) and config.layer_types[index] != "sliding_attention"
    return size, kv_heads, 0 if shared_values else 1


def _linear_attention_flops(config: "PretrainedConfig", n: int) -> int:
    """FLOPs of one gated-delta-rule layer on n tokens (see the module doc)."""
    d, c, w = config.hidden_size, _DELTA_CHUNK, config.linear_conv_kernel_dim
    keys, values = config.linear_num_key_heads, config.linear_num_value_heads
    k, v = config.linear_key_head_dim, config.linear_value_head_dim
    channels = 2 * keys * k + values * v
    padded = c * -(-n // c)
    projections = 2 * n * d * (2 * keys * k + 3 * values * v + 2 * values)
    conv = 2 * channels * (n + w - 1) * w
    delta = values * padded * (4 * c * k + 6 * k * v + 2 * c * v + (c - 1) * (k + v))
    return projections + conv + delta


def _moe_flops(config: "PretrainedConfig", index: int, n: int) -> int | None:
    """FLOPs of layer ``index``'s mixture of experts on n tokens (see the module doc), or None for
    a dense MLP. GLM-4.5V names its experts ``n_routed_experts`` (dense before
    ``first_k_dense_replace``), Qwen3.5-MoE ``num_experts`` (every layer)."""
    d = config.hidden_size
    if getattr(config, "n_routed_experts", None):
        if index < config.first_k_dense_replace:
            return None
        experts, shared, gate = config.n_routed_experts, config.moe_intermediate_size * config.n_shared_experts, 0
    elif getattr(config, "num_experts", None) and getattr(config, "shared_expert_intermediate_size", None):
        experts, shared, gate = config.num_experts, config.shared_expert_intermediate_size, 2 * n * d
    else:
        return None
    routed = 6 * n * config.num_experts_per_tok * d * config.moe_intermediate_size
    return 2 * n * d * experts + routed + 6 * n * d * shared + gate


def _sdpa_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    # FlopCounterMode has formulas for the CUDA attention kernels but not for the CPU one, which
    # would otherwise count as zero. Q K^T and the weighted sum of V, with the query's heads
    # (grouped-query attention broadcasts K and V over them).
    batch, heads, q_len, dim = query_shape
    k_len, v_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * q_len * k_len * dim + 2 * batch * heads * q_len * k_len * v_dim


def _grouped_mm_flops(input_shape, weight_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    # Mixture-of-experts layers multiply each (token, chosen expert) row of the (S, K) input by its
    # expert's (K, N) slice of the (E, K, N) weight: S rows, whatever the grouping.
    return 2 * input_shape[0] * input_shape[-1] * weight_shape[-1]


def _triangular_solve_flops(a_shape, b_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    # Substitution with a (..., m, m) triangular matrix: m (m - 1) / 2 multiply-adds per column of
    # the (..., m, r) right-hand side (the gated delta rule's solves are unit-triangular).
    batch = 1
    for size in out_shape[:-2]:
        batch *= size
    rows, columns = out_shape[-2], out_shape[-1]
    return batch * rows * (rows - 1) * columns


def flop_counter():
    """A :class:`FlopCounterMode` that also counts the CPU attention kernel, the grouped matrix
    products of mixture-of-experts layers and triangular solves (which it would otherwise count
    as zero)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

    mapping = {}
    kernels = {
        _sdpa_flops: [getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)],
        _grouped_mm_flops: [
            getattr(torch.ops.aten, "_grouped_mm", None),
            getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None),
        ],
        _triangular_solve_flops: [getattr(torch.ops.aten, "linalg_solve_triangular", None)],
    }
    for formula, ops in kernels.items():
        mapping.update((op, formula) for op in ops if op is not None)
    return FlopCounterMode(display=False, custom_mapping=mapping)


def split_counts(counter, model) -> tuple[int, int]:
    """(language-model FLOPs incl. the LM head, everything else) from a finished ``counter``.

    Everything else is the vision tower, the projector and whatever a pruning method adds
    outside the language model (its [CLS] attention row, its selection).
    """
    root = type(model).__name__
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    decoder = next(name for name, module in model.named_modules() if module is model.get_decoder())
    llm = counts.get(f"{root}.{decoder}", 0) + counts.get(f"{root}.lm_head", 0)
    return llm, counter.get_total_flops() - llm
