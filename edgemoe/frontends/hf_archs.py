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
            ``act(x W_g) * (x W_u)`` then down) or ``dense_act_dense`` (one ``wi``/``wo`` module per
            expert, ``act(x W_i) W_o``).
        activation: Config attribute naming the experts' activation.
        pick: How the router's outputs become (experts, scores): ``topk`` (the router returns
            logits, top-k weights, top-k indices) or ``switch_top1`` (one-hot dispatch mask with
            capacity overflow zeroed, top-1 probability, logits).
        score: Score function, for the manifest.
        normalize: Whether the top-k scores are renormalised: a bool, or the config attribute that says.
        shared: Shared-expert MLP under the MoE block (None: no shared experts).
        shared_gate: Linear gate of the shared expert under the MoE block; its sigmoid weighs the
            shared expert per token (None: weight 1).
        rope: ``library`` (the rotary module returns ``(cos, sin)``, attention is the library's) or
            ``complex`` (DeepSeek-V2: complex rotary, rewritten in real arithmetic, see
            :func:`mla_attention_real_rope`).
        window: Sliding-window attention: ``none``, ``all`` (``config.sliding_window`` on every
            layer) or ``layer_types`` (on layers whose ``config.layer_types`` entry is sliding).
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
    shared_gate: str | None = None
    rope: str = "library"
    window: str = "none"


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
            shared="shared_expert",
            shared_gate="shared_expert_gate",
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
            shared="shared_experts",
            rope="complex",
        ),
        ArchSpec(
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            moe_block="DeepseekV3MoE",
            router="gate",
            score="sigmoid",
            normalize="norm_topk_prob",
            shared="shared_experts",
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
def pick_experts(kind: str, out: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a router's outputs into chosen experts and their scores, both (tokens, k).

    Args:
        kind: The spec's ``pick``.
        out: What the router module returned.
    """
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
    attn: nn.Module, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """DeepSeek-V2 multi-head latent attention with the complex rotary step done in real arithmetic.

    Step for step ``DeepseekV2Attention.forward`` (no cache), on the module's own projections, norms,
    ``expand_kv`` and its module's eager attention; only ``apply_rotary_emb`` (complex) is replaced by
    :func:`_rotate_pairs`, which computes the same products.
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
    query = torch.cat((q_nope, q_pe), dim=-1)
    key, value = attn.expand_kv(k_nope, k_pe)
    eager = inspect.getmodule(type(attn)).eager_attention_forward
    out, _ = eager(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling)
    return attn.o_proj(out.reshape(b, s, -1).contiguous())


# -- config checks ------------------------------------------------------------------------------
def _grouped_routing(cfg) -> bool:
    """Whether the router picks experts within groups (DeepSeek's group-limited routing)."""
    if cfg.model_type == "deepseek_v3":
        return True
    return cfg.model_type == "deepseek_v2" and getattr(cfg, "topk_method", "greedy") == "group_limited_greedy"


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
        elif cfg.model_type == "deepseek_v3" and isinstance(experts, int) and experts // groups < 2:
            problems.append(
                f"DeepSeek-V3 scores a group by its best two experts: n_routed_experts {experts} / n_group {groups} "
                "leaves fewer than 2 per group"
            )
    return problems
