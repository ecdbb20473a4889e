"""Adapter for Mixture-of-Experts classes from Hugging Face ``transformers`` (family ``hf``).

Captures Mixtral, Qwen2-MoE, OLMoE, DeepSeek-V2/V3, Qwen3-MoE, GLM-4-MoE, ERNIE-4.5-MoE, PhiMoE,
GraniteMoe(Shared), GPT-OSS and DBRX (causal LMs, task ``lm``: logits) and the SwitchTransformers
encoder (task ``encoder``: last hidden state); where each class keeps
its parts is in :mod:`edgemoe.frontends.hf_archs`. Routing is per token, so the model has one
router per MoE layer shared by its one task.

Partitions wrap the library's own modules, so their numerics are the library's:

* segments: embedding, the rotary embedding module, each layer's norms and attention, and whole
  dense (non-MoE) layers; the causal mask and position ids are built inside the segment from
  the run-time sequence length, so one graph serves every batch size and sequence length;
* gates: the MoE block's router module (its score function, normalisation, correction bias,
  group-limited choice and routed scaling), plus for shared experts their per-token weight;
* expert kernels: the expert's MLP on weights sliced from the stacked expert parameters.

SwitchTransformers is captured as ``SwitchTransformersEncoderModel``: the encoder-decoder needs
a second token input and cross-attention to the encoder output in every decoder block, which
the bundle's one-input chain of segments does not carry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DependencyError, ModelError
from ..ir import (
    ExpertSpec,
    ModelIR,
    MoELayerSpec,
    ParamSpec,
    RouterSpec,
    TaskSpec,
    TensorSpec,
    validate_ir,
)
from . import partitions
from .base import GraphPartition, ModelAdapter
from .hf_archs import (
    ARCHS,
    UNSUPPORTED_ARCH_REASON,
    UNSUPPORTED_CLASS_REASON,
    ArchSpec,
    ClampedSwiGLUKernel,
    attr,
    complex_rope_cos_sin,
    config_problems,
    interleaved_rope_attention,
    mla_attention_real_rope,
    pick_experts,
)
from .hf_stream import STREAM_ATTR, StreamedWeights, trim

SAMPLE_SEQ = 16  # sequence length of sample inputs (calibration, export examples)
TRACING = partitions.Tracing({0: "batch", 1: "seq"}, seq=SAMPLE_SEQ)


def _causal_mask(
    pos: torch.Tensor, window: int | None, dtype: torch.dtype, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """Additive mask (1, 1, queries, keys) as the library's eager mask: 0 where visible, dtype min elsewhere.

    Args:
        pos: Positions of the queries.
        window: Sliding window (None: full causal attention).
        dtype: Mask dtype.
        keys: Positions of the keys (None: the queries'); with a key/value cache, every slot of it,
            so slots not written yet (after the queries) are hidden like future tokens.
    """
    keys = pos if keys is None else keys
    hidden = keys[None, :] > pos[:, None]
    if window is not None:
        # The library's sliding window keeps key positions within `window - 1` behind the query.
        hidden = hidden | (pos[:, None] - keys[None, :] >= window)
    mask = torch.zeros_like(hidden, dtype=dtype).masked_fill(hidden, torch.finfo(dtype).min)
    return mask[None, None]


class _BufferCache:
    """Stands in for a transformers cache over preallocated key/value buffers (graph inputs).

    The library's attention modules call only ``update(key, value, layer_idx)``: the new tokens'
    keys and values are scattered into the layer's buffers at their positions, out of place (the
    updated buffers are graph outputs), and attention runs over every slot of the buffer, the mask
    hiding the slots not written yet.
    """

    def __init__(self, buffers: dict[int, list[torch.Tensor]], positions: torch.Tensor):
        self.buffers, self.positions = buffers, positions

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        out = []
        for buf, new in zip(self.buffers[layer_idx], (key, value), strict=True):
            b, h, s, d = new.shape
            out.append(buf.scatter(2, self.positions.view(1, 1, s, 1).expand(b, h, s, d), new))
        self.buffers[layer_idx] = out
        return out[0], out[1]


class _DecoderSegment(nn.Module):
    """Layers ``start..stop-1`` in full, then the attention half of MoE layer ``stop``.

    The first segment starts from token ids; later ones add the previous MoE output to the
    residual stream first. The last segment ends after the last layer (the head holds the final
    norm). Each layer is computed as the library's decoder layer computes it: residual +
    attention(norm(x)), then residual + mlp(norm(x)).
    """

    def __init__(self, adapter: HFAdapter, start: int, stop: int, first: bool, last: bool):
        super().__init__()
        spec = adapter.spec
        self.spec = spec
        self.backbone = adapter.backbone
        self.layers = nn.ModuleList(adapter.layers)
        self.windows = adapter.windows
        self.start, self.stop, self.first, self.last = start, stop, first, last
        cfg = adapter.config
        self.embed_scale = getattr(cfg, spec.embed_scale) if spec.embed_scale else None
        self.residual_scale = getattr(cfg, spec.residual_scale) if spec.residual_scale else None

    def _join(self, h: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """Residual + branch, the branch scaled first where the arch scales it (Granite)."""
        return h + (branch if self.residual_scale is None else branch * self.residual_scale)

    @property
    def attention_layers(self) -> range:
        """The layers whose attention this segment runs (the MoE layer it ends at included)."""
        return range(self.start, self.stop + (0 if self.last else 1))

    def _attend(self, layer: nn.Module, x: torch.Tensor, pos_emb, mask: torch.Tensor, cache) -> torch.Tensor:
        attn = attr(layer, self.spec.attn)
        if self.spec.rope == "complex":
            return mla_attention_real_rope(attn, x, pos_emb, mask, cache)
        if self.spec.rope == "interleaved":
            return interleaved_rope_attention(attn, x, pos_emb, mask, cache)
        return attn(hidden_states=x, position_embeddings=pos_emb, attention_mask=mask, past_key_values=cache)[0]

    def _enter(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The residual stream at the segment's start: embedded tokens, or residual + previous MoE output."""
        if self.first:
            h = attr(self.backbone, self.spec.embed)(args[0])
            return h if self.embed_scale is None else h * self.embed_scale
        return self._join(args[0], args[1])  # the previous MoE layer's output joins the residual

    def _layers(self, h: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor | None = None, cache=None):
        """Run the segment's layers on tokens at positions ``pos`` (attending to ``keys`` through ``cache``)."""
        spec = self.spec
        position_ids = pos[None]
        rotary = attr(self.backbone, spec.rotary)
        pos_emb = complex_rope_cos_sin(rotary, position_ids) if spec.rope == "complex" else rotary(h, position_ids)
        masks: dict[int | None, torch.Tensor] = {}
        for i in self.attention_layers:
            layer = self.layers[i]
            window = self.windows[i]
            if window not in masks:
                masks[window] = _causal_mask(pos, window, h.dtype, keys)
            h = self._join(h, self._attend(layer, attr(layer, spec.attn_norm)(h), pos_emb, masks[window], cache))
            if i == self.stop:  # the MoE layer: its MLP input leaves the segment
                return h, attr(layer, spec.mlp_norm)(h)
            h = self._join(h, attr(layer, spec.mlp)(attr(layer, spec.mlp_norm)(h)))
        return (h,)

    def forward(self, *args: torch.Tensor):
        h = self._enter(args)
        out = self._layers(h, torch.arange(h.shape[1], device=h.device))
        return out if len(out) > 1 else out[0]


class _WidthProbe:
    """A cache that only records the (heads, width) of the keys and values each layer caches."""

    def __init__(self):
        self.widths: dict[int, list[tuple[int, int]]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.widths[layer_idx] = [(key.shape[1], key.shape[3]), (value.shape[1], value.shape[3])]
        return key, value


class _DecoderStepSegment(_DecoderSegment):
    """A segment for generation: new tokens at positions ``past..past+s-1`` on a key/value cache.

    Inputs are the plain segment's, then ``past`` (int64 (1,): tokens already in the cache), then
    per attention layer its key and value buffers (batch, heads, max_seq, width); outputs are the
    plain segment's, then the updated buffers in the same order. One graph serves the prompt
    (prefill, s tokens) and each decoded token (s = 1).
    """

    def __init__(self, adapter: HFAdapter, start: int, stop: int, first: bool, last: bool, max_seq: int):
        super().__init__(adapter, start, stop, first, last)
        self.max_seq = max_seq

    def forward(self, *args: torch.Tensor):
        n = 1 if self.first else 2
        h = self._enter(args[:n])
        past, flat = args[n], args[n + 1 :]
        buffers = {layer: [flat[2 * i], flat[2 * i + 1]] for i, layer in enumerate(self.attention_layers)}
        pos = past + torch.arange(h.shape[1], device=h.device)
        cache = _BufferCache(buffers, pos)
        out = self._layers(h, pos, torch.arange(self.max_seq, device=h.device), cache)
        return (*out, *(t for layer in self.attention_layers for t in cache.buffers[layer]))


class _T5EncoderSegment(nn.Module):
    """Blocks ``start..stop-1`` in full, then the self-attention sub-layer of MoE block ``stop``.

    Block 0 computes the relative position bias that every block shares; each segment computes
    it again with block 0's module (cheaper than carrying a (1, heads, seq, seq) tensor).
    """

    def __init__(self, adapter: HFAdapter, start: int, stop: int, first: bool, last: bool):
        super().__init__()
        self.spec = adapter.spec
        self.backbone = adapter.backbone
        self.blocks = nn.ModuleList(adapter.layers)
        self.start, self.stop, self.first, self.last = start, stop, first, last

    def forward(self, *args: torch.Tensor):
        spec = self.spec
        h = attr(self.backbone, spec.embed)(args[0]) if self.first else args[0] + args[1]
        seq = h.shape[1]
        bias = attr(self.blocks[0], spec.attn).SelfAttention.compute_bias(seq, seq)
        # The encoder's attention mask for unpadded input is (1 - 1) * min = -0.0 everywhere, and adding
        # -0.0 changes no score, so no mask is passed (the library adds it; the result is bit-identical).
        for i in range(self.start, self.stop):
            h = self.blocks[i](h, None, bias)[0]
        if self.last:
            return h
        block = self.blocks[self.stop]
        h = attr(block, spec.attn)(h, attention_mask=None, position_bias=bias)[0]
        return h, attr(block, spec.mlp_norm)(h)


class _Head(nn.Module):
    """Final norm, then the LM head (or nothing: the task is the normalised hidden state).

    ``logits_scale`` divides the logits where the arch does (Granite's ``logits_scaling``).
    """

    def __init__(self, norm: nn.Module, lm_head: nn.Module | None, logits_scale: float | None = None):
        super().__init__()
        self.norm, self.lm_head, self.logits_scale = norm, lm_head, logits_scale

    def forward(self, h: torch.Tensor):
        h = self.norm(h)
        if self.lm_head is None:
            return h
        logits = self.lm_head(h)
        return logits if self.logits_scale is None else logits / self.logits_scale


class _Gate(nn.Module):
    """The library's router of one MoE block, as (experts, scores[, shared_scores]) per token.

    The k slots are put in expert order: the routers' ``topk(sorted=False)`` and ONNX TopK may
    list the same choice in different orders, and slot order does not change the MoE output.
    """

    def __init__(self, spec: ArchSpec, layer: nn.Module, shared: bool):
        super().__init__()
        self.spec = spec
        self.block = attr(layer, spec.mlp)
        self.router = attr(self.block, spec.router)
        # A width-0 shared expert (``shared_expert_intermediate_size: 0``) is no shared expert.
        self.shared = shared
        self.shared_gate = attr(layer, spec.shared_gate) if shared and spec.shared_gate else None

    def forward(self, h: torch.Tensor):
        b, s = h.shape[0], h.shape[1]
        # The library's MoE blocks hand their top-k routers (tokens, d): some normalise over dim 1
        # (ERNIE-4.5), which on (batch, seq, d) would be the sequence. Switch's router takes 3-D input.
        flat = h.reshape(-1, h.shape[-1])
        out = self.router(h if self.spec.pick == "switch_top1" else flat)
        experts, scores = pick_experts(self.spec.pick, out, self.block)
        experts, order = torch.sort(experts, dim=-1)
        scores = scores.gather(-1, order)
        out = (experts.reshape(b, s, -1), scores.reshape(b, s, -1))
        if not self.shared:
            return out
        weight = torch.ones_like(flat[:, :1]) if self.shared_gate is None else torch.sigmoid(self.shared_gate(flat))
        return (*out, weight.reshape(b, s, -1))


class _DenseActDenseKernel(nn.Module):
    """``act(x @ w_in) @ w_out`` with every weight a graph input (T5-style expert)."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x, w_in, w_out):
        return self.act(x @ w_in) @ w_out


def _spec_for(model) -> ArchSpec:
    """The arch spec of a transformers model, or a ModelError naming what is missing."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - the hf family cannot build a model without it
        raise DependencyError("the hf adapter needs transformers (not installed): pip install 'edgemoe[hf]'") from None
    cls = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise ModelError(f"the hf adapter captures transformers models, got {cls}")
    model_type = model.config.model_type
    supported = ", ".join(f"{s.model_type} ({s.model_class})" for s in ARCHS.values())
    spec = ARCHS.get(model_type)
    if spec is None:
        has_experts = any(name.endswith("experts") for name, _ in model.named_modules())
        if model_type in UNSUPPORTED_ARCH_REASON:
            what = f"not supported: {UNSUPPORTED_ARCH_REASON[model_type]}"
        elif has_experts:
            what = (
                "a mixture-of-experts arch the hf adapter has no spec for (where its layers, router and experts live)"
            )
        else:
            what = "not a mixture-of-experts model (no experts in any layer)"
        raise ModelError(f"transformers {cls} (model_type '{model_type}') is {what}; supported: {supported}")
    if cls != spec.model_class:
        reason = UNSUPPORTED_CLASS_REASON.get(model_type, "other heads are not supported")
        raise ModelError(
            f"transformers {cls} is not supported: for model_type '{model_type}' the hf adapter captures "
            f"{spec.model_class} ({reason})"
        )
    problems = config_problems(model.config)
    if problems:
        raise ModelError(f"{cls}: {'; '.join(problems)}")
    return spec


class HFAdapter(ModelAdapter):
    """Captures a transformers MoE model (see :data:`~edgemoe.frontends.hf_archs.ARCHS`) and cuts it into partitions.

    The model is switched to eval mode and to the library's eager attention and experts, which
    are what the partitions reproduce.

    Raises:
        ModelError: The class is not a supported transformers MoE class, or has no MoE layer.
    """

    family = "hf"

    def __init__(self, model):
        self.spec = spec = _spec_for(model)
        self.model = model.eval()
        # A streamed compile's model: parameters on the meta device, read from the checkpoint per partition.
        self.stream: StreamedWeights | None = getattr(model, STREAM_ATTR, None)
        if model.config._attn_implementation != "eager":
            model.set_attn_implementation("eager")
        if getattr(model.config, "_experts_implementation", "eager") not in (None, "eager"):
            model.set_experts_implementation("eager")
        self.config = model.config
        self.backbone = attr(model, spec.backbone)
        self.layers = list(attr(self.backbone, spec.layers))
        self.moe_blocks = [
            i for i, layer in enumerate(self.layers) if type(attr(layer, spec.mlp)).__name__ == spec.moe_block
        ]
        if not self.moe_blocks:
            raise ModelError(
                f"{type(model).__name__} '{getattr(model.config, 'name_or_path', '') or model.config.model_type}' "
                f"has no MoE layer (no {spec.moe_block} in any of its {len(self.layers)} layers)"
            )
        self.windows = [self._window(i) for i in range(len(self.layers))]
        if self.stream is None:
            self._probe()
        self._ir = validate_ir(self._capture())
        if self.stream is not None:  # a streamed run goes through the partitions, which need the IR
            self._probe()

    def _probe(self) -> None:
        """Run the library's forward once on two tokens, so a config it cannot run fails here, by name.

        transformers checks few relations between config fields (see
        :func:`~edgemoe.frontends.hf_archs.config_problems` for those checked up front); any other bad
        value would otherwise surface as a shape error in the middle of export.
        """
        ids = torch.zeros((1, 2), dtype=torch.long)
        try:
            with torch.no_grad():
                if self.stream is None:
                    self.model(input_ids=ids)
                else:
                    self._run_streamed(ids, self.spec.task)
        except Exception as exc:  # only library code runs here: whatever it raises is the config's fault
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ModelError(
                f"transformers' own {type(self.model).__name__}.forward fails on this config "
                f"({type(exc).__name__}: {first}): a config field has a value the library accepts but cannot run"
            ) from None

    # -- capture -------------------------------------------------------------------------
    def _window(self, layer: int) -> int | None:
        cfg = self.config
        if self.spec.window == "all":
            return getattr(cfg, "sliding_window", None)
        if self.spec.window == "layer_types" and getattr(cfg, "layer_types", None):
            return cfg.sliding_window if cfg.layer_types[layer] == "sliding_attention" else None
        return None

    def _block(self, li: int) -> nn.Module:
        return attr(self.layers[self.moe_blocks[li]], self.spec.mlp)

    def _expert_spec(self, li: int) -> ExpertSpec:
        spec, block = self.spec, self._block(li)
        experts = attr(block, spec.experts)
        act = str(getattr(self.config, spec.activation, None))  # glu_rows: read from its experts
        if spec.expert_layout == "stacked_swiglu":
            flags = {
                "is_transposed": False,
                "is_concatenated": True,
                "has_bias": False,
                "has_gate": True,
                "has_post_expert_norm": False,
            }
            odd = {k: getattr(experts, k) for k, v in flags.items() if getattr(experts, k, v) != v}
            e, two_i, d = experts.gate_up_proj.shape
            if odd or experts.down_proj.shape != (e, d, two_i // 2):
                raise ModelError(
                    f"{type(experts).__name__} of MoE layer {li}: expected stacked gate_up_proj (E, 2I, D) and "
                    f"down_proj (E, D, I) without bias, got {tuple(experts.gate_up_proj.shape)} / "
                    f"{tuple(experts.down_proj.shape)} {odd or ''}"
                )
            i = two_i // 2
            params = (ParamSpec("w_gate", (d, i)), ParamSpec("w_up", (d, i)), ParamSpec("w_down", (i, d)))
            return ExpertSpec(d_model=d, hidden=i, activation=act, params=params)
        if spec.expert_layout == "glu_rows":
            d, i = experts.hidden_size, experts.ffn_hidden_size
            params = (ParamSpec("w_gate", (d, i)), ParamSpec("w_up", (d, i)), ParamSpec("w_down", (i, d)))
            name = self.config.ffn_config.ffn_act_fn.get("name", "silu")
            return ExpertSpec(d_model=d, hidden=i, activation=str(name), params=params)
        if spec.expert_layout == "clamped_swiglu":
            e, d, two_i = experts.gate_up_proj.shape
            i = two_i // 2
            params = (
                ParamSpec("w_gate", (d, i)),
                ParamSpec("b_gate", (i,)),
                ParamSpec("w_up", (d, i)),
                ParamSpec("b_up", (i,)),
                ParamSpec("w_down", (i, d)),
                ParamSpec("b_down", (d,)),
            )
            return ExpertSpec(d_model=d, hidden=i, activation="clamped_swiglu", params=params)
        first = experts["expert_0"]
        if first.wi.bias is not None or first.wo.bias is not None:
            raise ModelError(f"{type(first).__name__} of MoE layer {li}: experts with biases are not supported")
        f, d = first.wi.weight.shape
        params = (ParamSpec("w_in", (d, f)), ParamSpec("w_out", (f, d)))
        return ExpertSpec(d_model=d, hidden=f, activation=act, params=params)

    def _shared_linears(self, mlp: nn.Module) -> tuple[nn.Linear, ...]:
        if self.spec.shared_layout == "concat_in_out":
            return mlp.input_linear, mlp.output_linear
        return mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def _shared_mlp(self, li: int) -> nn.Module | None:
        if self.spec.shared is None:
            return None
        mlp = attr(self.layers[self.moe_blocks[li]], self.spec.shared)
        if mlp is None or self._shared_linears(mlp)[0].out_features == 0:
            return None
        if any(p.bias is not None for p in self._shared_linears(mlp)):
            raise ModelError(f"shared expert of MoE layer {li}: biases are not supported")
        return mlp

    def _shared_spec(self, li: int) -> ExpertSpec | None:
        mlp = self._shared_mlp(li)
        if mlp is None:
            return None
        first = self._shared_linears(mlp)[0]
        d = first.in_features
        i = first.out_features // (2 if self.spec.shared_layout == "concat_in_out" else 1)
        params = (ParamSpec("w_gate", (d, i)), ParamSpec("w_up", (d, i)), ParamSpec("w_down", (i, d)))
        return ExpertSpec(d_model=d, hidden=i, activation=str(self.config.hidden_act), params=params)

    def _capture(self) -> ModelIR:
        spec, cfg = self.spec, self.config
        d = cfg.hidden_size
        ids = TensorSpec("input_ids", (None, None), "int64", high=cfg.vocab_size, sample_shape=(1, SAMPLE_SEQ))
        unit = "layers" if spec.trunk == "decoder" else "blocks"
        descriptions = partitions.span_descriptions(
            self.moe_blocks, len(self.layers), unit, embed="embedding + ", end=" (final norm in the head)"
        )
        segments = partitions.trunk_segments(ids, TensorSpec("hidden", (None, None, d)), (None, None, d), descriptions)
        normalize = spec.normalize if isinstance(spec.normalize, bool) else bool(getattr(cfg, spec.normalize))
        layers = []
        for li, block_index in enumerate(self.moe_blocks):
            block = self._block(li)
            router = attr(block, spec.router)
            # DBRX keeps the expert count on its experts and k on the block; the others on the router.
            top_k = getattr(router, "top_k", getattr(block, "top_k", 1))
            num_experts = getattr(router, "num_experts", None) or attr(block, spec.experts).num_experts
            shared = self._shared_spec(li)
            layers.append(
                MoELayerSpec(
                    index=li,
                    block=block_index,
                    num_experts=num_experts,
                    top_k=top_k,
                    expert=self._expert_spec(li),
                    routers=(RouterSpec(None, num_experts, top_k, score=spec.score, normalize=normalize),),
                    shared_experts=0 if shared is None else 1,
                    shared_expert=shared,
                )
            )
        width = cfg.vocab_size if spec.lm_head else d
        task = TaskSpec(
            spec.task, TensorSpec(spec.task, (None, None, width)), kind="logits" if spec.lm_head else "hidden"
        )
        config = json.loads(cfg.to_json_string(use_diff=True))
        config.update(arch=spec.model_type, model_class=type(self.model).__name__)
        return ModelIR(
            name=cfg.name_or_path or f"hf-{spec.model_type}",
            family=self.family,
            granularity="token",
            input=ids,
            tasks=(task,),
            segments=segments,
            moe_layers=tuple(layers),
            params=sum(p.numel() for p in self.model.parameters()),
            config=config,
        )

    @property
    def ir(self) -> ModelIR:
        return self._ir

    # -- reference execution -------------------------------------------------------------
    def _check_keep(self, keep: dict[int, tuple[int, ...]] | None) -> None:
        """Token-routed models keep every expert; a narrower set has no defined meaning for their routers."""
        for li, experts in (keep or {}).items():
            n = self._ir.moe_layers[li].num_experts
            if set(experts) != set(range(n)):
                raise ConfigError(
                    f"MoE layer {li}: the hf adapter routes over all {n} experts of a token-routed model, "
                    f"it cannot restrict the router to {sorted(experts)}"
                )

    def _ids(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))

    @torch.no_grad()
    def reference(self, x: np.ndarray, task: str, keep: dict[int, tuple[int, ...]] | None = None) -> np.ndarray:
        self.task_index(task)
        self._check_keep(keep)
        if self.stream is not None:
            return self._run_streamed(self._ids(x), task).float().numpy()
        out = self.model(input_ids=self._ids(x))
        y = out.logits if self.spec.lm_head else out.last_hidden_state
        return y.float().numpy()

    @torch.no_grad()
    def route(self, x: np.ndarray, task: str) -> list[tuple[np.ndarray, np.ndarray]]:
        self.task_index(task)
        if self.stream is not None:
            routes: list[tuple[np.ndarray, np.ndarray]] = []
            self._run_streamed(self._ids(x), task, routes)
            return routes
        routers = [attr(self._block(li), self.spec.router) for li in range(len(self.moe_blocks))]
        ids = self._ids(x)
        return partitions.record_routes(
            routers, lambda: self.model(input_ids=ids), lambda out: pick_experts(self.spec.pick, out, self._block(0))
        )

    def _run_streamed(self, ids: torch.Tensor, task: str, routes: list | None = None) -> torch.Tensor | None:
        """The model's output, run partition by partition with weights read as each one runs.

        Segments, routers and expert MLPs are the library's modules (as the partitions hold
        them); each MoE layer sums its experts' outputs weighted by the router's scores, one
        expert's weights in memory at a time. With ``routes``, each layer's (experts, scores) go
        there and the run ends after the last MoE layer (None returned).
        """
        stream = self.stream
        inputs: tuple[torch.Tensor, ...] = (ids,)
        for li in range(len(self.moe_blocks) + 1):
            module = self.segment(li).module
            with stream.loaded(module):
                out = module(*inputs)
            if li == len(self.moe_blocks):
                break
            hidden, moe_in = out
            gate = self.gate(li, task, tuple(range(self._ir.moe_layers[li].num_experts))).module
            with stream.loaded(gate):
                g = gate(moe_in)
            flat = moe_in.reshape(-1, moe_in.shape[-1])
            idx, scores = g[0].reshape(flat.shape[0], -1), g[1].reshape(flat.shape[0], -1)
            if routes is not None:
                routes.append((idx.numpy().copy(), scores.float().numpy().copy()))
            y = torch.zeros_like(flat)
            params = self._ir.moe_layers[li].expert.params
            kernel = self.expert_kernel(li).module
            for e in torch.unique(idx).tolist():
                tokens, slots = (idx == e).nonzero(as_tuple=True)
                w = self.expert_weights(li, e)
                y[tokens] += (
                    kernel(flat[tokens], *(torch.from_numpy(w[p.name]) for p in params)) * scores[tokens, slots, None]
                )
            shared = self.shared_kernel(li)
            if shared is not None:
                w = self.shared_expert_weights(li, 0)
                spec = self._ir.moe_layers[li].shared_expert
                y += (
                    shared.module(flat, *(torch.from_numpy(w[p.name]) for p in spec.params))
                    * g[2].reshape(flat.shape[0], -1)[:, :1]
                )
            inputs = (hidden, y.reshape(moe_in.shape))
            trim()  # the layer's expert weights, dropped, leave RSS
            if routes is not None and li == len(self.moe_blocks) - 1:
                return None  # every route is known: the rest of the trunk and the head change none
        head = self.head(task).module
        with stream.loaded(head):
            return head(out)

    def state_sha256(self) -> str:
        """The torch state's digest; in a streamed compile, the checkpoint's (tensor names and stored bytes)."""
        return super().state_sha256() if self.stream is None else self.stream.reader.digest()

    def nonfinite_weights(self) -> dict[str, tuple[str, ...]]:
        if self.stream is None:
            return super().nonfinite_weights()
        return self.stream.reader.scan().nonfinite  # the pass that computed the digest found them

    def _streamed(self, part: GraphPartition) -> GraphPartition:
        """``part``, reading its weights from the checkpoint while a target uses it (streamed compiles)."""
        if self.stream is None:
            return part
        return dataclasses.replace(part, weights=lambda: self.stream.loaded(part.module, part.example_inputs))

    # -- partitions ----------------------------------------------------------------------
    def segment(self, index: int) -> GraphPartition:
        start, stop, last = partitions.segment_bounds(index, self.moe_blocks, len(self.layers))
        cls = _DecoderSegment if self.spec.trunk == "decoder" else _T5EncoderSegment
        module = cls(self, start, stop, first=index == 0, last=last)
        return self._streamed(partitions.segment_partition(self._ir.segments[index], module, TRACING))

    def step_segment(self, index: int, max_seq: int) -> GraphPartition:
        """Trunk segment ``index`` for generation, on a key/value cache of ``max_seq`` positions.

        Raises:
            ModelError: The model is not a decoder LM (nothing to generate with).
            ConfigError: ``max_seq`` is too small to trace the graph with.
        """
        if self.spec.trunk != "decoder" or self.spec.lm_head is None:
            raise ModelError(
                f"{self.spec.model_class} has no next-token head: generation graphs are built for causal LMs"
            )
        partitions.check_max_seq(max_seq)
        start, stop, last = partitions.segment_bounds(index, self.moe_blocks, len(self.layers))
        module = _DecoderStepSegment(self, start, stop, index == 0, last, max_seq)
        if not module.attention_layers:  # no attention, nothing cached: the plain segment serves
            return self.segment(index)
        spec = self._ir.segments[index]
        # What each layer caches (MLA caches compressed latents): the attention's own update calls say.
        probe = _WidthProbe()
        examples = tuple(TRACING.example(s) for s in spec.inputs)
        loading = contextlib.nullcontext() if self.stream is None else self.stream.loaded(module)
        with torch.no_grad(), loading:
            module._layers(module._enter(examples), torch.arange(SAMPLE_SEQ), None, probe)
        widths = [(layer, *probe.widths[layer]) for layer in module.attention_layers]
        return self._streamed(partitions.step_partition(spec, module, widths, max_seq, TRACING.axes))

    def gate(self, layer: int, task: str, keep: tuple[int, ...]) -> GraphPartition:
        self.task_index(task)
        self._check_keep({layer: keep})
        module = _Gate(self.spec, self.layers[self.moe_blocks[layer]], self._shared_mlp(layer) is not None)
        shared = bool(self._ir.moe_layers[layer].shared_experts)
        return self._streamed(
            partitions.gate_partition(task, layer, module, self._ir.segments[layer].outputs[1], TRACING, shared=shared)
        )

    def head(self, task: str) -> GraphPartition:
        self.task_index(task)
        lm_head = attr(self.model, self.spec.lm_head) if self.spec.lm_head else None
        scale = getattr(self.config, self.spec.logits_scale) if self.spec.logits_scale else None
        module = _Head(attr(self.backbone, self.spec.final_norm), lm_head, scale)
        return self._streamed(partitions.head_partition(task, module, self._ir.segments[-1].outputs[0], TRACING))

    def expert_kernel(self, layer: int) -> GraphPartition:
        spec = self._ir.moe_layers[layer].expert
        experts = attr(self._block(layer), self.spec.experts)
        if self.spec.expert_layout == "stacked_swiglu":
            module: nn.Module = partitions.SwiGLUKernel(experts.act_fn)
        elif self.spec.expert_layout == "clamped_swiglu":
            module = ClampedSwiGLUKernel(experts.alpha, experts.limit)
        elif self.spec.expert_layout == "glu_rows":
            module = partitions.SwiGLUKernel(experts.mlp.activation_fn)
        else:
            module = _DenseActDenseKernel(experts["expert_0"].act)
        name = f"expert_kernel_{self.spec.expert_layout}_{spec.activation}_{spec.d_model}x{spec.hidden}"
        return partitions.kernel_partition(name, module, spec, layer)

    def _expert_param(self, layer: int):
        """``get(name, rows)``: rows of the experts' parameter ``name`` (dotted, under the experts module).

        From the module's own parameter, or in a streamed compile from the checkpoint (only those rows).
        """
        experts = attr(self._block(layer), self.spec.experts)
        if self.stream is None:
            return lambda name, rows=None: attr(experts, name) if rows is None else attr(experts, name)[rows]
        prefix = self.stream.path(experts)
        return lambda name, rows=None: self.stream.expert_slice(f"{prefix}.{name}", rows)

    def expert_weights(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        experts = attr(self._block(layer), self.spec.experts)
        get = self._expert_param(layer)
        f32 = partitions.float32_array
        if self.spec.expert_layout == "stacked_swiglu":
            hidden = self._ir.moe_layers[layer].expert.hidden
            gate_up = get("gate_up_proj", expert)  # (2I, D): gate rows, then up rows (chunk(2) of the output)
            return {
                "w_gate": f32(gate_up[:hidden].T),
                "w_up": f32(gate_up[hidden:].T),
                "w_down": f32(get("down_proj", expert).T),
            }
        if self.spec.expert_layout == "glu_rows":
            rows = slice(expert * experts.ffn_hidden_size, (expert + 1) * experts.ffn_hidden_size)
            return {
                "w_gate": f32(get("mlp.w1", rows).T),
                "w_up": f32(get("mlp.v1", rows).T),
                "w_down": f32(get("mlp.w2", rows)),
            }
        if self.spec.expert_layout == "clamped_swiglu":
            w, b = get("gate_up_proj", expert), get("gate_up_proj_bias", expert)  # (D, 2I), (2I,): interleaved
            return {
                "w_gate": f32(w[:, ::2]),
                "b_gate": f32(b[::2]),
                "w_up": f32(w[:, 1::2]),
                "b_up": f32(b[1::2]),
                "w_down": f32(get("down_proj", expert)),
                "b_down": f32(get("down_proj_bias", expert)),
            }
        return {"w_in": f32(get(f"expert_{expert}.wi.weight").T), "w_out": f32(get(f"expert_{expert}.wo.weight").T)}

    def shared_kernel(self, layer: int) -> GraphPartition | None:
        spec = self._ir.moe_layers[layer].shared_expert
        mlp = self._shared_mlp(layer)
        if spec is None or mlp is None:
            return None
        name = f"expert_kernel_stacked_swiglu_{spec.activation}_{spec.d_model}x{spec.hidden}"
        act = mlp.activation if self.spec.shared_layout == "concat_in_out" else mlp.act_fn
        return partitions.kernel_partition(name, partitions.SwiGLUKernel(act), spec, layer)

    def shared_expert_weights(self, layer: int, index: int) -> dict[str, np.ndarray]:
        mlp = self._shared_mlp(layer)
        if mlp is None or index != 0:
            raise ModelError(f"MoE layer {layer} has no shared expert {index}")
        if self.stream is not None:
            with self.stream.loaded(mlp, whole=True):
                return self._shared_arrays(layer, mlp)
        return self._shared_arrays(layer, mlp)

    def _shared_arrays(self, layer: int, mlp: nn.Module) -> dict[str, np.ndarray]:
        if self.spec.shared_layout == "concat_in_out":
            hidden = self._ir.moe_layers[layer].shared_expert.hidden
            w_in = mlp.input_linear.weight  # (2I, D): gate rows, then up rows (chunk(2) of the output)
            return {
                "w_gate": partitions.float32_array(w_in[:hidden].T),
                "w_up": partitions.float32_array(w_in[hidden:].T),
                "w_down": partitions.float32_array(mlp.output_linear.weight.T),
            }
        return {
            "w_gate": partitions.float32_array(mlp.gate_proj.weight.T),
            "w_up": partitions.float32_array(mlp.up_proj.weight.T),
            "w_down": partitions.float32_array(mlp.down_proj.weight.T),
        }
