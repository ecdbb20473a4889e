"""Per-arch specs of the transformers MoE classes the hf adapter captures.

A spec says where a class keeps its parts (decoder layers, attention, norms, the MoE block, its
router, stacked experts and shared experts) and which of a few known behaviours it has (how the
router's outputs become chosen experts and scores, how the shared expert is weighted, how its
rotary embedding is computed). The adapter (:mod:`edgemoe.frontends.hf`) only reads specs, so a
new arch with the same building blocks is one more entry in :data:`ARCHS`.

The torch functions here run inside exported graphs; they call the library's own modules so the
numerics are the library's, except where a library op cannot be exported (noted where it occurs).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Where an arch keeps its parts, and which known behaviours it has.

    Paths are dotted attribute paths; integer parts index a ``ModuleList`` (``layer.-1``).

    Attributes:
        model_type: transformers ``config.model_type``.
        model_class: The transformers class the adapter captures.
        trunk: ``decoder`` (pre-norm decoder-only LM: embed, layers of attention + MLP, final norm,
            LM head) or ``t5_encoder`` (T5-style encoder stack with a shared relative position bias).
        task: The one task's name (``lm``: logits; ``encoder``: last hidden state).
        backbone: Path from the model to the module holding embeddings, layers and final norm.
        embed: Token embedding, under the backbone.
        layers: Decoder layers / blocks, under the backbone.
        final_norm: Final norm, under the backbone.
        rotary: Rotary embedding module, under the backbone (None: no rotary embedding).
        lm_head: LM head, under the model (None: the task is the last hidden state).
        attn: Attention under a layer (for ``t5_encoder``: the self-attention sub-layer, residual included).
        attn_norm: Norm before attention under a layer (None: inside ``attn``).
        mlp: The MLP slot under a layer: a dense MLP or the MoE block.
        mlp_norm: Norm before the MLP slot under a layer.
        moe_block: Class name of the MoE block (a layer whose MLP slot holds one is an MoE layer).
        router: Router module under the MoE block.
        experts: Experts under the MoE block.
        expert_layout: ``stacked_swiglu`` (``gate_up_proj`` (E, 2I, D) and ``down_proj`` (E, D, I),
            ``act(x W_g) * (x W_u)`` then down), ``dense_act_dense`` (one ``wi``/``wo`` module per
            expert, ``act(x W_i) W_o``), ``glu_rows`` (DBRX: ``mlp.w1``, ``mlp.v1``, ``mlp.w2`` each
            (E * I, D), gate, up and down of expert e in rows ``e*I..(e+1)*I``) or ``clamped_swiglu``
            (GPT-OSS: ``gate_up_proj`` (E, D, 2I) with gate and up columns interleaved, biases,
            clamped inputs, ``(up + 1) * g * sigmoid(a g)``; see :class:`ClampedSwiGLUKernel`).
        activation: Config attribute naming the experts' activation (``glu_rows``: read from the
            experts' module).
        pick: How the router's outputs become (experts, scores): ``topk`` (the router returns
            logits, top-k weights, top-k indices), ``block_topk`` (the router returns logits and the
            MoE block's ``route_tokens_to_experts`` picks, as DBRX) or ``switch_top1`` (one-hot dispatch mask with
            capacity overflow zeroed, top-1 probability, logits).
        score: Score function, for the manifest.
        normalize: Whether the top-k scores are renormalised: a bool, or the config attribute that says.
        shared: Shared-expert MLP under a layer (None: no shared experts; a layer where the path
            leads to None, or to an MLP of width 0, has none).
        shared_layout: ``gate_up_down`` (``gate_proj``, ``up_proj``, ``down_proj``) or ``concat_in_out``
            (``input_linear`` (2I, D), gate rows then up rows, and ``output_linear``).
        shared_gate: Linear gate of the shared expert under a layer; its sigmoid weighs the shared
            expert per token (None: weight 1).
        rope: ``library`` (the rotary module returns ``(cos, sin)``, attention is the library's),
            ``complex`` (DeepSeek-V2: complex rotary, rewritten in real arithmetic, see
            :func:`mla_attention_real_rope`) or ``interleaved`` (ERNIE-4.5: rotary on interleaved
            pairs, rewritten without ``repeat_interleave``, see :func:`interleaved_rope_attention`).
        window: Sliding-window attention: ``none``, ``all`` (``config.sliding_window`` on every
            layer) or ``layer_types`` (on layers whose ``config.layer_types`` entry is sliding).
        embed_scale: Config attribute multiplying the token embeddings (None: 1).
        residual_scale: Config attribute multiplying attention and MLP outputs before each joins the
            residual stream (None: 1).
        logits_scale: Config attribute dividing the logits (None: 1).
        group_routing: Config attribute that says the router picks experts within groups (``n_group``,
            ``topk_group``), or ``always``; None: no group routing.
    """

    model_type: str
    model_class: str
    moe_block: str
    router: str
    trunk: str = "decoder"
    task: str = "lm"
    backbone: str = "model"
    embed: str = "embed_tokens"
    layers: str = "layers"
    final_norm: str = "norm"
    rotary: str | None = "rotary_emb"
    lm_head: str | None = "lm_head"
    attn: str = "self_attn"
    attn_norm: str | None = "input_layernorm"
    mlp: str = "mlp"
    mlp_norm: str = "post_attention_layernorm"
    experts: str = "experts"
    expert_layout: str = "stacked_swiglu"
    activation: str = "hidden_act"
    pick: str = "topk"
    score: str = "softmax"
    normalize: bool | str = False
    shared: str | None = None
    shared_layout: str = "gate_up_down"
    shared_gate: str | None = None
    rope: str = "library"
    window: str = "none"
    embed_scale: str | None = None
    residual_scale: str | None = None
    logits_scale: str | None = None
    group_routing: str | None = None


ARCHS: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec(
            "mixtral",
            "MixtralForCausalLM",
            moe_block="MixtralSparseMoeBlock",
            router="gate",
            normalize=True,
            window="all",
        ),
        ArchSpec(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            moe_block="Qwen2MoeSparseMoeBlock",
            router="gate",
            normalize="norm_topk_prob",
            shared="mlp.shared_expert",
            shared_gate="mlp.shared_expert_gate",
            window="layer_types",
        ),
        ArchSpec(
            "olmoe",
            "OlmoeForCausalLM",
            moe_block="OlmoeSparseMoeBlock",
            router="gate",
            normalize="norm_topk_prob",
        ),
        ArchSpec(
            "deepseek_v2",
            "DeepseekV2ForCausalLM",
            moe_block="DeepseekV2Moe",
            router="gate",
            shared="mlp.shared_experts",
            rope="complex",
            group_routing="topk_method",
        ),
        ArchSpec(
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            moe_block="DeepseekV3MoE",
            router="gate",
            score="sigmoid",
            normalize="norm_topk_prob",
            shared="mlp.shared_experts",
            group_routing="always",
        ),
        ArchSpec(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            moe_block="Qwen3MoeSparseMoeBlock",
            router="gate",
            normalize="norm_topk_prob",
            window="all",
        ),
        ArchSpec(
            "glm4_moe",
            "Glm4MoeForCausalLM",
            moe_block="Glm4MoeMoE",
            router="gate",
            score="sigmoid",
            normalize="norm_topk_prob",
            shared="mlp.shared_experts",
            group_routing="always",
        ),
        ArchSpec(
            "ernie4_5_moe",
            "Ernie4_5_MoeForCausalLM",
            moe_block="Ernie4_5_MoeSparseMoeBlock",
            router="gate",
            normalize=True,
            shared="mlp.shared_experts",
            rope="interleaved",
        ),
        ArchSpec(
            "phimoe",
            "PhimoeForCausalLM",
            moe_block="PhimoeSparseMoeBlock",
            router="router",
            score="sparsemixer",
            window="all",
        ),
        ArchSpec(
            "granitemoe",
            "GraniteMoeForCausalLM",
            moe_block="GraniteMoeMoE",
            router="router",
            mlp="block_sparse_moe",
            score="softmax_of_topk",
            embed_scale="embedding_multiplier",
            residual_scale="residual_multiplier",
            logits_scale="logits_scaling",
        ),
        ArchSpec(
            "granitemoeshared",
            "GraniteMoeSharedForCausalLM",
            moe_block="GraniteMoeSharedMoE",
            router="router",
            mlp="block_sparse_moe",
            score="softmax_of_topk",
            shared="shared_mlp",
            shared_layout="concat_in_out",
            embed_scale="embedding_multiplier",
            residual_scale="residual_multiplier",
            logits_scale="logits_scaling",
        ),
        ArchSpec(
            "dbrx",
            "DbrxForCausalLM",
            moe_block="DbrxFFN",
            router="router",
            backbone="transformer",
            embed="wte",
            layers="blocks",
            final_norm="norm_f",
            attn="norm_attn_norm.attn",
            attn_norm="norm_attn_norm.norm_1",
            mlp="ffn",
            mlp_norm="norm_attn_norm.norm_2",
            expert_layout="glu_rows",
            pick="block_topk",
            normalize=True,
        ),
        ArchSpec(
            "gpt_oss",
            "GptOssForCausalLM",
            moe_block="GptOssMLP",
            router="router",
            expert_layout="clamped_swiglu",
            score="softmax_of_topk",
            window="layer_types",
        ),
        ArchSpec(
            "switch_transformers",
            "SwitchTransformersEncoderModel",
            moe_block="SwitchTransformersSparseMLP",
            router="router",
            trunk="t5_encoder",
            task="encoder",
            backbone="encoder",
            layers="block",
            final_norm="final_layer_norm",
            rotary=None,
            lm_head=None,
            attn="layer.0",
            attn_norm=None,
            mlp="layer.-1.mlp",
            mlp_norm="layer.-1.layer_norm",
            expert_layout="dense_act_dense",
            activation="dense_act_fn",
            pick="switch_top1",
        ),
    )
}

# Why known MoE archs without a spec are refused (what their MoE layer does that a bundle's does not).
UNSUPPORTED_ARCH_REASON = {
    "llama4_text": (
        "Llama-4 multiplies each expert's input by its sigmoid router score (the expert then runs on the "
        "scaled tokens), while a bundle's MoE layer weighs expert outputs; its chunked attention and "
        "no-rope layers are not captured either"
    ),
    "jetmoe": "JetMoE routes attention heads to experts too (mixture of attention heads), not only the MLP",
    "jamba": "Jamba interleaves Mamba (state-space) layers, which have no captured segment",
}

# Why a class of a supported model_type other than the spec's class is refused.
UNSUPPORTED_CLASS_REASON = {
    "switch_transformers": (
        "the encoder-decoder needs two token inputs (encoder and decoder ids) and cross-attention to the "
        "encoder output in every decoder block, while a bundle runs one input through one chain of segments"
    ),
}


def attr(obj, path: str):
    """Follow a dotted attribute path; integer parts index sequences (``layer.-1``)."""
    for part in path.split("."):
        obj = obj[int(part)] if part.lstrip("-").isdigit() else getattr(obj, part)
    return obj


# -- routers ------------------------------------------------------------------------------------
def pick_experts(kind: str, out: tuple, block: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a router's outputs into chosen experts and their scores, both (tokens, k).

    Args:
        kind: The spec's ``pick``.
        out: What the router module returned.
        block: The MoE block (``block_topk``: its ``route_tokens_to_experts`` picks from the logits).
    """
    if kind == "block_topk":
        weights, indices = block.route_tokens_to_experts(out)
        return indices.reshape(-1, indices.shape[-1]), weights.reshape(-1, weights.shape[-1])
    if kind == "topk":
        _logits, weights, indices = out
        return indices.reshape(-1, indices.shape[-1]), weights.reshape(-1, weights.shape[-1])
    if kind == "switch_top1":
        dispatch, probs, logits = out
        # The router's choice is the argmax of its softmax (recomputed here as the router does, since
        # only the max is returned). A token over its expert's capacity has an all-zero dispatch row
        # and skips the MoE: its score becomes 0, so the expert's output is added with weight 0.
        full = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(probs.dtype)
        idx = torch.argmax(full, dim=-1, keepdim=True)
        scores = probs * dispatch.sum(dim=-1, keepdim=True).to(probs.dtype)
        return idx.reshape(-1, 1), scores.reshape(-1, 1)
    raise ValueError(f"unknown router kind {kind!r}")


# -- expert kernels -----------------------------------------------------------------------------
class ClampedSwiGLUKernel(nn.Module):
    """GPT-OSS's expert on weights that are graph inputs (its gate and up columns already split).

    ``GptOssExperts._apply_gate``: the gate is clamped from above and the up projection on both sides
    at ``limit``, then ``(up + 1) * gate * sigmoid(alpha * gate)``; every projection has a bias.
    """

    def __init__(self, alpha: float, limit: float):
        super().__init__()
        self.alpha, self.limit = alpha, limit

    def forward(self, x, w_gate, b_gate, w_up, b_up, w_down, b_down):
        gate = (x @ w_gate + b_gate).clamp(max=self.limit)
        up = (x @ w_up + b_up).clamp(min=-self.limit, max=self.limit)
        return ((up + 1) * (gate * torch.sigmoid(gate * self.alpha))) @ w_down + b_down


# -- rotary embedding ---------------------------------------------------------------------------
def complex_rope_cos_sin(rotary: nn.Module, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of DeepSeek-V2's ``freqs_cis`` (its rotary module returns complex numbers).

    The TorchScript ONNX exporter has no complex tensors, so ``polar(1, freqs) * scaling`` is computed
    as ``cos(freqs) * scaling`` and ``sin(freqs) * scaling`` from the module's own ``inv_freq``.
    """
    freqs = position_ids[..., None].float() * rotary.inv_freq.float()
    return freqs.cos() * rotary.attention_scaling, freqs.sin() * rotary.attention_scaling


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2's ``view_as_complex(x) * freqs_cis`` in real arithmetic (pairs ``(x0, x1), (x2, x3), ...``)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (1, seq, dim/2) -> broadcast over heads
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(3).type_as(x)


def mla_attention_real_rope(
    attn: nn.Module, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, cache=None
) -> torch.Tensor:
    """DeepSeek-V2 multi-head latent attention with the complex rotary step done in real arithmetic.

    Step for step ``DeepseekV2Attention.forward`` (``cache``: a key/value cache's ``update``), on the
    module's own projections, norms, ``expand_kv`` and its module's eager attention; only
    ``apply_rotary_emb`` (complex) is replaced by :func:`_rotate_pairs`, which computes the same products.
    """
    b, s = x.shape[0], x.shape[1]
    q = attn.q_proj(x) if attn.q_lora_rank is None else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    q = q.view(b, s, -1, attn.qk_head_dim).transpose(1, 2)
    q_nope, q_pe = torch.split(q, [attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    compressed = attn.kv_a_proj_with_mqa(x)
    kv_nope, k_pe = torch.split(compressed, [attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    k_nope = attn.kv_a_layernorm(kv_nope).view(b, 1, s, attn.kv_lora_rank)
    k_pe = k_pe.view(b, 1, s, attn.qk_rope_head_dim)
    cos, sin = cos_sin
    q_pe, k_pe = _rotate_pairs(q_pe, cos, sin), _rotate_pairs(k_pe, cos, sin)
    if cache is not None:  # as the library: the compressed latents are cached
        k_nope, k_pe = cache.update(k_nope, k_pe, attn.layer_idx)
    query = torch.cat((q_nope, q_pe), dim=-1)
    key, value = attn.expand_kv(k_nope, k_pe)
    eager = inspect.getmodule(type(attn)).eager_attention_forward
    out, _ = eager(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling)
    return attn.o_proj(out.reshape(b, s, -1).contiguous())


def _repeat_pairs(t: torch.Tensor) -> torch.Tensor:
    """``t[..., :d/2].repeat_interleave(2, dim=-1)`` as stack + flatten.

    The TorchScript ONNX exporter's ``repeat_interleave`` overwrites a constant it shares with a
    ``view`` elsewhere in the graph (the exported k/v reshape asked for 3 heads instead of 2), so
    the pairs are built from ops it exports correctly; the values are the same.
    """
    half = t[..., : t.shape[-1] // 2]
    return torch.stack((half, half), dim=-1).flatten(-2)


def interleaved_rope_attention(
    attn: nn.Module, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, cache=None
) -> torch.Tensor:
    """ERNIE-4.5 attention, step for step ``Ernie4_5_MoeAttention.forward`` (``cache``: as the library's).

    Runs on the module's own projections, its module's ``rotate_half`` and eager attention; only
    the cos/sin repetition of its ``apply_rotary_pos_emb`` is built by :func:`_repeat_pairs`.
    """
    library = inspect.getmodule(type(attn))
    b, s = x.shape[0], x.shape[1]
    shape = (b, s, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    cos, sin = (_repeat_pairs(t.unsqueeze(1)) for t in cos_sin)
    q_rot = (q.float() * cos + library.rotate_half(q).float() * sin).to(q.dtype)
    k_rot = (k.float() * cos + library.rotate_half(k).float() * sin).to(k.dtype)
    if cache is not None:
        k_rot, v = cache.update(k_rot, v, attn.layer_idx)
    out, _ = library.eager_attention_forward(attn, q_rot, k_rot, v, mask, dropout=0.0, scaling=attn.scaling)
    return attn.o_proj(out.reshape(b, s, -1).contiguous())


# -- config checks ------------------------------------------------------------------------------
def _grouped_routing(cfg) -> bool:
    """Whether the router picks experts within groups (DeepSeek's and GLM-4's group-limited routing)."""
    spec = ARCHS.get(getattr(cfg, "model_type", None))
    if spec is None or spec.group_routing is None:
        return False
    if spec.group_routing == "always":
        return True
    return getattr(cfg, spec.group_routing, None) == "group_limited_greedy"


def config_problems(cfg) -> list[str]:
    """What in a transformers config the library accepts but cannot build or run, one line each.

    transformers checks few of a config's relations: a bad one surfaces later as an assertion in
    ``nn.Embedding`` or a shape error deep inside a forward. These are the relations the supported
    archs rely on; each line names the fields and the rule.

    Args:
        cfg: A transformers ``PretrainedConfig``.
    """
    problems = []
    vocab = getattr(cfg, "vocab_size", None)
    pad = getattr(cfg, "pad_token_id", None)
    if isinstance(vocab, int) and isinstance(pad, int) and not 0 <= pad < vocab:
        problems.append(
            f"pad_token_id {pad} lies outside the vocabulary (vocab_size {vocab}): the embedding's padding row "
            f"must be one of its rows; set pad_token_id to an id below {vocab}, or null"
        )
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv, int) and (kv < 1 or heads % kv):
        problems.append(
            f"num_key_value_heads {kv} must divide num_attention_heads {heads} "
            "(grouped-query attention shares each key/value head among a whole number of query heads)"
        )
    hidden = getattr(cfg, "hidden_size", None)
    if (
        getattr(cfg, "head_dim", None) is None
        and getattr(cfg, "qk_nope_head_dim", None) is None  # MLA sets its head widths explicitly
        and isinstance(hidden, int)
        and isinstance(heads, int)
        and heads > 0
        and hidden % heads
    ):
        problems.append(
            f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}, and head_dim is not set"
        )
    spec = ARCHS.get(getattr(cfg, "model_type", None))
    rotary_width = getattr(cfg, "qk_rope_head_dim", None) or getattr(cfg, "head_dim", None)
    if rotary_width is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        rotary_width = hidden // heads
    if spec is not None and spec.rotary and isinstance(rotary_width, int) and rotary_width % 2:
        field = "qk_rope_head_dim" if getattr(cfg, "qk_rope_head_dim", None) else "head_dim"
        problems.append(f"{field} {rotary_width} is odd: rotary embeddings turn pairs of channels")
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if spec is not None and spec.rotary and any(k in rope for k in ("dynamic", "longrope")):
        problems.append(
            f"rope_type '{rope}' changes the rotary frequencies with the sequence length at run time, "
            "which the exported segments do not reproduce; use a static rope type (default, linear, yarn)"
        )
    if spec is not None:
        from transformers.activations import ACT2FN

        act = getattr(cfg, spec.activation, None)
        if isinstance(act, str) and act not in ACT2FN:
            problems.append(f"{spec.activation} '{act}' is not an activation transformers knows ({', '.join(ACT2FN)})")
    if _grouped_routing(cfg):
        experts = getattr(cfg, "n_routed_experts", None)
        groups, top_groups, k = cfg.n_group, cfg.topk_group, getattr(cfg, "num_experts_per_tok", None)
        if not (isinstance(groups, int) and isinstance(top_groups, int)) or groups < 1:
            problems.append(
                f"group-limited routing needs n_group and topk_group as integers >= 1, got {groups} and {top_groups}"
            )
        elif isinstance(experts, int) and experts % groups:
            problems.append(f"n_group {groups} must divide n_routed_experts {experts} (experts are split into groups)")
        elif not 1 <= top_groups <= groups:
            problems.append(f"topk_group {top_groups} must be between 1 and n_group {groups}")
        elif isinstance(experts, int) and isinstance(k, int) and k > top_groups * (experts // groups):
            problems.append(
                f"num_experts_per_tok {k} exceeds the {top_groups * (experts // groups)} experts in the "
                f"topk_group {top_groups} chosen groups of {experts // groups}"
            )
        elif ARCHS[cfg.model_type].score == "sigmoid" and isinstance(experts, int) and experts // groups < 2:
            problems.append(
                f"{cfg.model_type} scores a group by its best two experts: n_routed_experts {experts} / "
                f"n_group {groups} leaves fewer than 2 per group"
            )
    return problems
