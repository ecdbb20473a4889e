"""Decoder-only Mixture-of-Experts language model in plain PyTorch (token-routed reference model).

A pre-norm transformer: token embedding, blocks of causal multi-head self-attention with
rotary position embeddings (RoPE) and a SwiGLU feed-forward, final RMSNorm and an LM head.
Some blocks replace their feed-forward with an MoE layer of SwiGLU experts behind one
token-level router (softmax over experts, top-k). The router covers three published styles:

* Switch Transformer: top-1, the chosen score is not renormalised;
* Mixtral: top-2, the chosen scores are renormalised to sum to one;
* DeepSeekMoE: many fine-grained experts with a larger k, plus always-on shared experts
  whose outputs are added with weight one.

Every shape that depends on the sequence length is computed from the input at run time, so
exported graphs take any batch size and sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class MoELMConfig:
    """Hyper-parameters of an MoE language model.

    Attributes:
        name: Registry name of the configuration.
        vocab_size: Token ids lie in ``[0, vocab_size)``.
        dim: Model width.
        heads: Attention heads (``dim / heads`` must be even for RoPE).
        depth: Transformer blocks.
        mlp_hidden: Hidden width of the dense (non-MoE) SwiGLU feed-forwards.
        expert_hidden: Hidden width of each routed expert.
        num_experts: Routed experts per MoE layer.
        top_k: Experts chosen per token.
        normalize: Renormalise the chosen top-k scores to sum to one (Mixtral) or not (Switch, DeepSeekMoE).
        shared_experts: Always-on shared experts per MoE layer (DeepSeekMoE), added with weight one.
        shared_hidden: Hidden width of each shared expert (None: ``expert_hidden``).
        first_dense: The first ``first_dense`` blocks are dense.
        moe_every: After those, every ``moe_every``-th block is an MoE block (1: all; 2: every other).
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        seed: Seed of the random initialisation.
    """

    name: str
    vocab_size: int = 512
    dim: int = 64
    heads: int = 4
    depth: int = 4
    mlp_hidden: int = 128
    expert_hidden: int = 64
    num_experts: int = 8
    top_k: int = 2
    normalize: bool = True
    shared_experts: int = 0
    shared_hidden: int | None = None
    first_dense: int = 0
    moe_every: int = 1
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    seed: int = 0

    def __post_init__(self):
        positive = ("vocab_size", "dim", "heads", "depth", "mlp_hidden", "expert_hidden", "num_experts", "top_k")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.heads} heads of even width (RoPE)")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if self.shared_experts < 0 or self.first_dense < 0 or self.moe_every < 1:
            raise ValueError("shared_experts and first_dense must be >= 0 and moe_every >= 1")
        if self.shared_hidden is not None and self.shared_hidden < 1:
            raise ValueError(f"shared_hidden must be positive, got {self.shared_hidden}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.heads

    @property
    def shared_width(self) -> int:
        """Hidden width of each shared expert."""
        return self.expert_hidden if self.shared_hidden is None else self.shared_hidden

    @property
    def moe_blocks(self) -> tuple[int, ...]:
        """Indices of the blocks whose feed-forward is an MoE layer."""
        return tuple(i for i in range(self.first_dense, self.depth) if (i - self.first_dense + 1) % self.moe_every == 0)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (written out: it exports to plain ONNX ops at opset 17)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last axis (the NeoX/Llama RoPE layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with RoPE.

    Positions, rotary angles and the causal mask are built from the input's sequence length
    at run time; the softmax scale is a constant, so exported graphs stay shape-free.
    """

    def __init__(self, cfg: MoELMConfig):
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.head_dim
        self.scale = float(cfg.head_dim) ** -0.5
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
        # Derived from the config, not a weight: kept out of the state dict and its digest.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, ...] | None = None):
        """Attend over ``x``'s tokens, or over a key/value cache (generation).

        Args:
            x: (B, S, dim).
            cache: None, or ``(keys, values, positions)``: this layer's cache buffers
                (B, heads, max_seq, head_dim) and the positions of ``x``'s tokens in it.

        Returns:
            The attention output; with ``cache``, ``(output, keys, values)``: the buffers with
            ``x``'s keys and values written at their positions (out of place). Slots after a
            query's position are masked, so unwritten slots never count.
        """
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        pos = torch.arange(n, device=x.device) if cache is None else cache[2]
        angles = pos.to(x.dtype)[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos(), angles.sin()
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys = pos
        if cache is not None:
            slots = pos.view(1, 1, n, 1).expand(b, self.heads, n, self.head_dim)
            k, v = cache[0].scatter(2, slots, k), cache[1].scatter(2, slots, v)
            keys = torch.arange(k.shape[2], device=x.device)
        future = keys[None, :] > pos[:, None]
        logits = (q @ k.transpose(-2, -1)) * self.scale
        attn = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        return out if cache is None else (out, k, v)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward / expert: ``w_down(silu(w_gate x) * w_up x)``, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Router(nn.Module):
    """Token-level router: softmax over every expert, top-k, optionally renormalised.

    ``keep`` restricts the top-k choice to a subset of experts *after* the softmax, so the
    kept experts' scores are exactly those of the unrestricted model.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, normalize: bool):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize = normalize
        self.w_gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, h: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Route tokens.

        Args:
            h: Router input, shape (..., dim).
            keep: Boolean mask over experts that may be chosen, or None for all.

        Returns:
            Expert indices (..., top_k) int64 and their scores (..., top_k).
        """
        probs = torch.softmax(self.w_gate(h), dim=-1)
        choose = probs if keep is None else probs.masked_fill(~keep, -1.0)
        _, idx = torch.topk(choose, self.top_k, dim=-1)
        scores = torch.gather(probs, -1, idx)
        if self.normalize:
            scores = scores / scores.sum(dim=-1, keepdim=True)
        return idx, scores


class MoE(nn.Module):
    """Routed SwiGLU experts with sparse token dispatch, plus optional always-on shared experts."""

    def __init__(self, cfg: MoELMConfig):
        super().__init__()
        self.router = Router(cfg.dim, cfg.num_experts, cfg.top_k, cfg.normalize)
        self.experts = nn.ModuleList(SwiGLU(cfg.dim, cfg.expert_hidden) for _ in range(cfg.num_experts))
        self.shared = nn.ModuleList(SwiGLU(cfg.dim, cfg.shared_width) for _ in range(cfg.shared_experts))

    def forward(self, h: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        shape = h.shape
        flat = h.reshape(-1, shape[-1])
        idx, scores = self.router(flat, keep)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            out = out.index_add(0, tok, expert(flat[tok]) * scores[tok, slot].unsqueeze(-1))
        for expert in self.shared:
            out = out + expert(flat)
        return out.reshape(shape)


class Block(nn.Module):
    """Pre-norm decoder block: causal attention, then a dense SwiGLU or an MoE layer."""

    def __init__(self, cfg: MoELMConfig, moe: bool):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = moe
        if moe:
            self.moe = MoE(cfg)
        else:
            self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Residual attention half of the block."""
        return x + self.attn(self.norm1(x))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attend(x)
        if self.is_moe:
            return x + self.moe(self.norm2(x), keep)
        return x + self.mlp(self.norm2(x))


class MoELM(nn.Module):
    """Decoder-only MoE language model: ids (B, S) -> next-token logits (B, S, vocab)."""

    def __init__(self, cfg: MoELMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        moe = set(cfg.moe_blocks)
        self.blocks = nn.ModuleList(Block(cfg, i in moe) for i in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embedding (positions enter through RoPE in every attention layer)."""
        return self.tok_embed(ids)

    def forward(self, ids: torch.Tensor, keep: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Compute logits for every position.

        Args:
            ids: Token ids, shape (B, S), int64 in ``[0, vocab_size)``.
            keep: Optional per-MoE-block boolean expert masks (restricted deployment).

        Returns:
            Logits, shape (B, S, vocab_size).
        """
        x = self.embed(ids)
        for i, block in enumerate(self.blocks):
            x = block(x, None if keep is None else keep.get(i))
        return self.lm_head(self.norm(x))


def build_moe_lm(cfg: MoELMConfig) -> MoELM:
    """Build a model with seeded random weights (deterministic across runs)."""
    from .. import seeded_build

    return seeded_build(MoELM, cfg)
