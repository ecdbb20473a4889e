"""A BERT encoder whose feed-forward layers are Mixtures of Experts (a MoEfied dense BERT).

Made by :func:`edgemoe.tools.moefy_dense.moefy_dense` from a dense BERT: each FFN
(``Linear(D, I) → GELU → Linear(I, D)``) is split into ``num_experts`` groups of hidden
neurons. Expert ``e`` computes ``gelu(x @ w1[e] + b1[e]) @ w2[e]``; the FFN's output bias
``b2`` is added once, outside the experts, so summing every expert's output gives back the
dense FFN exactly. A linear router per layer picks the ``top_k`` experts of each token and
their outputs are summed unweighted (every score is 1), as in MoEfication.

The embedding is the sentence-transformers one for all-MiniLM-L6-v2: mean pooling over
tokens, then L2 normalisation. Post-LayerNorm blocks as in BERT; token type 0 everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ...errors import ConfigError

INITS = ("random", "moefy-random-bert")
ROUTERS = ("centroid", "trained")


@dataclass(frozen=True)
class BertMoEConfig:
    """Hyper-parameters of a MoEfied BERT encoder.

    Attributes:
        name: Registry name of the configuration.
        vocab_size: Token ids lie in ``[0, vocab_size)``.
        hidden_size: Token width ``D``.
        num_layers: Transformer blocks; every block's FFN is an MoE layer.
        num_heads: Attention heads.
        intermediate_size: Hidden width ``I`` of the dense FFN the experts were cut from.
        max_position: Longest sequence (position embeddings).
        type_vocab_size: Token-type embeddings (only type 0 is used).
        layer_norm_eps: LayerNorm epsilon.
        num_experts: Experts per layer ``N``; their hidden widths add up to ``I``.
        top_k: Experts each token runs.
        seed: Seed of the random initialisation (``init="random"``) or of the random dense
            BERT and the clustering (``init="moefy-random-bert"``).
        init: ``random``: seeded random parameters (a checkpoint normally replaces them);
            ``moefy-random-bert``: convert a seeded random dense BERT of these sizes (test
            models that need no checkpoint).
        router: How the routers were made (``centroid`` or ``trained``); provenance, and the
            router ``moefy-random-bert`` builds.
        source: The dense model the checkpoint was converted from (provenance only).
    """

    name: str
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    num_experts: int = 16
    top_k: int = 8
    seed: int = 0
    init: str = "random"
    router: str = "centroid"
    source: str = ""

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{self.name}: hidden size {self.hidden_size} is not a multiple of {self.num_heads} heads"
            )
        if not 1 <= self.num_experts <= self.intermediate_size:
            raise ConfigError(
                f"{self.name}: {self.num_experts} experts cannot split {self.intermediate_size} hidden neurons"
            )
        if self.init not in INITS:
            raise ConfigError(f"{self.name}: unknown init '{self.init}' (known: {', '.join(INITS)})")
        if self.router not in ROUTERS:
            raise ConfigError(f"{self.name}: unknown router '{self.router}' (known: {', '.join(ROUTERS)})")

    @property
    def expert_hidden(self) -> int:
        """Hidden width of every expert: the largest cluster (smaller ones are zero-padded)."""
        return math.ceil(self.intermediate_size / self.num_experts)


class Embeddings(nn.Module):
    """Word + position + token-type-0 embeddings, then LayerNorm (BERT's embedding layer)."""

    def __init__(self, cfg: BertMoEConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Slicing by the traced length keeps the sequence axis dynamic in exported graphs.
        positions = self.position.weight[: input_ids.shape[1]]
        return self.norm(self.word(input_ids) + positions + self.token_type.weight[0])


class Attention(nn.Module):
    """Multi-head self-attention with its residual and post-LayerNorm."""

    def __init__(self, cfg: BertMoEConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        self.head_dim = d // cfg.num_heads
        self.scale = float(self.head_dim) ** -0.5
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

        scores = (split(self.query(x)) @ split(self.key(x)).transpose(-2, -1)) * self.scale
        if mask_bias is not None:
            scores = scores + mask_bias
        ctx = (torch.softmax(scores, dim=-1) @ split(self.value(x))).transpose(1, 2).reshape(b, n, d)
        return self.norm(x + self.out(ctx))


class MoEFFN(nn.Module):
    """The MoE feed-forward layer: linear router, top-k, unweighted sum of GELU-MLP experts.

    Attributes:
        router: ``Linear(D, N)``: one score per expert and token.
        w1, b1, w2: Stacked expert weights, shapes (N, D, H), (N, H), (N, H, D).
        b2: The dense FFN's output bias (D,), added once after the experts.
        norm: The block's output LayerNorm.
    """

    def __init__(self, cfg: BertMoEConfig):
        super().__init__()
        n, d, h = cfg.num_experts, cfg.hidden_size, cfg.expert_hidden
        self.num_experts, self.top_k = n, cfg.top_k
        self.router = nn.Linear(d, n)
        self.w1 = nn.Parameter(torch.randn(n, d, h) * d**-0.5)
        self.b1 = nn.Parameter(torch.zeros(n, h))
        self.w2 = nn.Parameter(torch.randn(n, h, d) * h**-0.5)
        self.b2 = nn.Parameter(torch.zeros(d))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def route(
        self, h: torch.Tensor, keep: torch.Tensor | None = None, top_k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick each token's experts.

        Args:
            h: Router input (..., D).
            keep: Boolean mask over experts that may be chosen, or None for all.
            top_k: Experts per token (default: the layer's ``top_k``).

        Returns:
            Expert indices (..., k) int64 and their scores (..., k): all ones (unweighted sum).
        """
        logits = self.router(h)
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        _, idx = torch.topk(logits, self.top_k if top_k is None else top_k, dim=-1)
        return idx, torch.ones(idx.shape, dtype=h.dtype, device=h.device)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on tokens ``x`` (T, D)."""
        return F.gelu(x @ self.w1[e] + self.b1[e]) @ self.w2[e]

    def mix(self, h: torch.Tensor, keep: torch.Tensor | None = None, top_k: int | None = None) -> torch.Tensor:
        """Sum of the chosen experts' outputs, without ``b2`` (what the runtime computes)."""
        shape = h.shape
        flat = h.reshape(-1, shape[-1])
        idx, scores = self.route(flat, keep, top_k)
        out = torch.zeros_like(flat)
        for e in range(self.num_experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                out.index_add_(0, tok, self.expert(e, flat[tok]) * scores[tok, slot].unsqueeze(-1))
        return out.reshape(shape)

    def finish(self, h: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """Residual, output bias and LayerNorm after the experts."""
        return self.norm(h + mixed + self.b2)

    def forward(self, h: torch.Tensor, keep: torch.Tensor | None = None, top_k: int | None = None) -> torch.Tensor:
        return self.finish(h, self.mix(h, keep, top_k))


class Layer(nn.Module):
    """One post-LN BERT block with an MoE feed-forward."""

    def __init__(self, cfg: BertMoEConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.moe = MoEFFN(cfg)


def mean_pool(x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens (over unmasked ones with a mask), then L2 normalisation."""
    if attention_mask is None:
        pooled = x.mean(dim=1)
    else:
        m = attention_mask.to(x.dtype).unsqueeze(-1)
        pooled = (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
    return F.normalize(pooled, p=2.0, dim=-1)


class BertMoE(nn.Module):
    """A BERT sentence encoder with MoE feed-forward layers (see the module docstring)."""

    def __init__(self, cfg: BertMoEConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        keep: dict[int, torch.Tensor] | None = None,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Last-layer token states (B, T, D).

        Args:
            input_ids: Token ids (B, T) int64.
            attention_mask: Optional (B, T) 1/0 mask for padded batches (the exported graphs
                assume none: one sentence, or sentences of equal length).
            keep: Optional per-layer boolean expert masks the routers are restricted to.
            top_k: Experts per token in every layer (default: the config's).
        """
        mask_bias = None
        if attention_mask is not None:
            mask_bias = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        x = self.embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer.attention(x, mask_bias)
            x = layer.moe(x, None if keep is None else keep.get(i), top_k)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        keep: dict[int, torch.Tensor] | None = None,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Sentence embeddings (B, D), L2-normalised (arguments as :meth:`hidden_states`)."""
        return mean_pool(self.hidden_states(input_ids, attention_mask, keep, top_k), attention_mask)


def build_bert_moe(cfg: BertMoEConfig) -> BertMoE:
    """Build a model with seeded random parameters (deterministic across runs)."""
    from .. import seeded_build

    return seeded_build(BertMoE, cfg)
