"""The accelerator's description: model dimensions, fixed-point types, tiles and memory layout.

One :class:`Design` per HLS bundle, stored as the manifest's ``hls.design``. The compiler fills it
(:mod:`.target`), the C++ header is generated from it (:mod:`.project`), and the emulator and the
``fpga`` executor read it back from the manifest, so all three agree on every offset and type.
Numpy and the standard library only (the runtime imports it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...bundle.format import read_verified
from ...errors import BundleError
from .fixed import FixedType

# Tensor classes, each with one fixed-point type (``--fixed class=ap_fixed<W,I>,...``).
CLASSES = ("input", "act", "weight", "embed", "attn_bias", "bias", "norm", "score")
CLASS_HELP = {
    "input": "the model input (normalised image, or raw pixels)",
    "act": "activations: tokens, feature maps, every linear and norm output, position embedding",
    "weight": "linear weights: qkv, projection, MLP, expert, gate and head weights",
    "embed": "patch-embedding and conv-stem weights",
    "attn_bias": "qkv and attention-projection biases",
    "bias": "other biases: MLP, expert, stem, gate and head biases",
    "norm": "LayerNorm weight and bias",
    "score": "attention scores (q.k x scale) and gate logits",
}
# Fraction bits of the reciprocal standard deviation in LayerNorm.
RSTD_FRAC = 24
# Operation codes of the accelerator's top function (edgemoe_top.cpp).
OP_FORWARD, OP_START, OP_EXPERT, OP_NEXT, OP_PREGATE = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Tensor:
    """A tensor in the dense parameter image (or in an expert blob).

    Attributes:
        offset: Offset in 16-bit words.
        shape: Shape.
        cls: Tensor class (its type is the design's type of that class).
    """

    offset: int
    shape: tuple[int, ...]
    cls: str

    @property
    def count(self) -> int:
        """Elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Design:
    """Everything the accelerator is built from, but the weights.

    Attributes:
        name: Model name.
        in_chans: Input channels.
        img_size: Input (height, width).
        patch: Patch edge.
        stem: ``patch`` (one strided conv) or ``conv`` (3x3 stride-2 conv stages + 1x1 projection).
        stem_channels: Output channels of each 3x3 stage (``conv`` stem).
        dim: Token width.
        heads: Attention heads.
        depth: Blocks.
        mlp_hidden: Dense MLP hidden width.
        expert_hidden: Expert hidden width.
        num_experts: Experts per MoE layer.
        top_k: Experts per token.
        moe_blocks: Blocks whose MLP is an MoE layer.
        tasks: Task names (the task register selects gates and head).
        head_channels: Per task, its head's output channels (0: backbone task, output = tokens).
        cls_token: A learned class token (else token 0 starts as zero).
        final_norm: LayerNorm after the last block.
        scale_shift: Attention scale ``2**-scale_shift`` applied as a shift (-1: the scale is folded
            into the query weights).
        eps: LayerNorm epsilon by norm name.
        windows: Per task, per MoE layer, the experts its softmax covers.
        kept: Per task, per MoE layer, the experts its top-k may choose (the bundle's kept set).
        types: Fixed-point type of each tensor class (``CLASSES``).
        tiles: Tile sizes of the shared units (``tile_in``, ``tile_out``, ``attn_par``, ``expert_chunk``).
        params: The dense parameter image's tensors, by name.
        params_words: Size of the dense parameter image in 16-bit words.
        expert: An expert blob's tensors (``w1`` (hidden, dim), ``b1``, ``w2`` (hidden, dim): fc2
            transposed, ``b2``), by name.
        expert_words: Size of an expert blob in 16-bit words (one pool slot).
    """

    name: str
    in_chans: int
    img_size: tuple[int, int]
    patch: int
    stem: str
    stem_channels: tuple[int, ...]
    dim: int
    heads: int
    depth: int
    mlp_hidden: int
    expert_hidden: int
    num_experts: int
    top_k: int
    moe_blocks: tuple[int, ...]
    tasks: tuple[str, ...]
    head_channels: tuple[int, ...]
    cls_token: bool
    final_norm: bool
    scale_shift: int
    eps: dict
    windows: tuple[tuple[tuple[int, ...], ...], ...]
    kept: tuple[tuple[tuple[int, ...], ...], ...]
    types: dict
    tiles: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    params_words: int = 0
    expert: dict = field(default_factory=dict)
    expert_words: int = 0

    # -- derived ----------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols)."""
        return self.img_size[0] // self.patch, self.img_size[1] // self.patch

    @property
    def tokens(self) -> int:
        """Tokens per image (patches + class token)."""
        gh, gw = self.grid
        return gh * gw + 1

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.heads

    @property
    def moe_layers(self) -> int:
        """MoE layers."""
        return len(self.moe_blocks)

    def type(self, cls: str) -> FixedType:
        """The fixed-point type of a tensor class."""
        return self.types[cls]

    @property
    def qk_shift(self) -> int:
        """Bits dropped from q, k and v before the attention unit's 24-bit multipliers."""
        return max(0, self.types["act"].width - 24)

    @property
    def prob_frac(self) -> int:
        """Fraction bits of softmax probabilities: as many as keep the attention sums within 63 bits."""
        v_bits = self.types["act"].width - 1 - self.qk_shift
        return min(16, (62 - v_bits - max(1, math.ceil(math.log2(self.tokens + 1)))) // 2)

    @property
    def ln_shift(self) -> int:
        """Bits dropped from centred values before squaring in LayerNorm (squares stay within 63 bits)."""
        return max(0, self.types["act"].width - 25)

    @property
    def ln_guard(self) -> int:
        """Extra bits of the variance before its square root."""
        return (62 - 2 * (self.types["act"].width - self.ln_shift) - 1) // 2

    def eps_raw(self, name: str) -> int:
        """A norm's epsilon as a raw value of the variance (``2 * (act frac - ln_shift)`` fraction bits)."""
        frac = 2 * (self.types["act"].frac - self.ln_shift)
        return max(1, round(self.eps[name] * 2.0**frac))

    def output_shape(self, task: str) -> tuple[int, ...]:
        """One image's output of a task: (channels, H, W), or (tokens, dim) for a backbone task."""
        ch = self.head_channels[self.tasks.index(task)]
        return (ch, *self.img_size) if ch else (self.tokens, self.dim)

    @property
    def stem_stages(self) -> list[tuple[int, int, int, int, int, int]]:
        """The stem's convolutions: (in channels, out channels, kernel, stride, pad, in height), in order."""
        h = self.img_size[0]
        if self.stem == "patch":
            return [(self.in_chans, self.dim, self.patch, self.patch, 0, h)]
        out, c = [], self.in_chans
        for co in self.stem_channels:
            out.append((c, co, 3, 2, 1, h))
            c, h = co, h // 2
        out.append((c, self.dim, 1, 1, 0, h))
        return out

    @property
    def expert_data_words(self) -> int:
        """16-bit words of an expert's tensors (what the accelerator reads of a slot; the rest is padding)."""
        return self.expert_hidden * (2 * self.dim + 1) + self.dim

    @property
    def fmap_words(self) -> int:
        """Words of the largest stem feature map (two such buffers in ``state`` hold the stem's stages)."""
        out, h, w = 0, *self.img_size
        for _ci, co, k, s, p, _h in self.stem_stages:
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            out = max(out, co * h * w)
        return out

    def state_layout(self) -> dict[str, int]:
        """Offsets (32-bit words) of what ``state`` holds between stepped calls, and its size.

        ``X``/``H``: residual stream and MoE input (tokens x dim, activation raw); ``ACC``: MoE
        output sums (int64, low word first); ``RE``/``RP``: each MoE layer's routes (tokens x k
        expert ids, probabilities with ``prob_frac`` bits); ``PE``/``PP``: the last pre-gating
        routes; ``FMAP0``/``FMAP1``: stem feature maps.
        """
        n, k = self.tokens * self.dim, self.tokens * self.top_k
        out, off = {}, 0
        for name, words in (
            ("X", n),
            ("H", n),
            ("ACC", 2 * n),
            ("RE", self.moe_layers * k),
            ("RP", self.moe_layers * k),
            ("PE", k),
            ("PP", k),
            ("FMAP0", self.fmap_words),
            ("FMAP1", self.fmap_words),
        ):
            out[name] = off
            off += words
        out["WORDS"] = off
        return out

    # -- manifest form ----------------------------------------------------------------------
    def to_json(self) -> dict:
        """The manifest's ``hls.design``."""
        out = dataclasses.asdict(self)
        out["types"] = {k: str(v) for k, v in self.types.items()}
        out["params"] = {
            k: {"offset": t.offset, "shape": list(t.shape), "class": t.cls} for k, t in self.params.items()
        }
        out["expert"] = {
            k: {"offset": t.offset, "shape": list(t.shape), "class": t.cls} for k, t in self.expert.items()
        }
        return out

    @classmethod
    def from_json(cls, data: dict) -> Design:
        """Read the manifest's ``hls.design`` back.

        Raises:
            BundleError: A field is missing or malformed.
        """
        try:
            d = dict(data)
            d["types"] = {k: FixedType.parse(v) for k, v in d["types"].items()}
            d["params"] = {k: Tensor(int(t["offset"]), tuple(t["shape"]), t["class"]) for k, t in d["params"].items()}
            d["expert"] = {k: Tensor(int(t["offset"]), tuple(t["shape"]), t["class"]) for k, t in d["expert"].items()}
            for key in ("img_size", "stem_channels", "moe_blocks", "tasks", "head_channels"):
                d[key] = tuple(d[key])
            for key in ("windows", "kept"):
                d[key] = tuple(tuple(tuple(x) for x in per_task) for per_task in d[key])
            return cls(**d)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"garbled manifest: hls.design is not readable ({exc})") from None


def pack(tensors: dict[str, tuple[np.ndarray, str]], types: dict, align: int = 32) -> tuple[dict, np.ndarray]:
    """Lay raw tensors out in one image of 16-bit words.

    Tensors of 16 bits or less take one word per element, wider ones (activation-typed: position
    embedding, class token) two (low word first). Each tensor starts on an ``align``-word boundary
    (64 bytes: an AXI burst). Returns the layout and the image.
    """
    layout, words, offset = {}, [], 0
    for name, (raw, cls) in tensors.items():
        pad = (-offset) % align
        if pad:
            words.append(np.zeros(pad, dtype=np.uint16))
            offset += pad
        flat = np.asarray(raw, dtype=np.int64).ravel()
        if types[cls].width > 16:
            u = flat.astype(np.uint32)
            data = np.stack([(u & 0xFFFF).astype(np.uint16), (u >> 16).astype(np.uint16)], axis=1).ravel()
        else:
            data = (flat & 0xFFFF).astype(np.uint16)
        layout[name] = Tensor(offset, tuple(int(s) for s in np.shape(raw)), cls)
        words.append(data)
        offset += len(data)
    pad = (-offset) % align
    words.append(np.zeros(pad, dtype=np.uint16))
    image = np.concatenate(words) if words else np.zeros(0, dtype=np.uint16)
    return layout, image


def unpack(image: np.ndarray, tensor: Tensor, t: FixedType) -> np.ndarray:
    """One tensor's raw values (int64) out of a word image."""
    if t.width > 16:
        w = image[tensor.offset : tensor.offset + 2 * tensor.count].astype(np.uint32)
        raw = (w[0::2] | (w[1::2] << 16)).astype(np.uint32)
        raw = raw.astype(np.int64)
        if t.signed:
            raw = np.where(raw >= 1 << 31, raw - (1 << 32), raw)
    else:
        raw = image[tensor.offset : tensor.offset + tensor.count].astype(np.int64)
        if t.signed:
            raw = np.where(raw >= 1 << 15, raw - (1 << 16), raw)
    if t.width < 32 and t.signed:
        # Sign-extend from the type's width (the words hold the raw value's low bits).
        half = 1 << (t.width - 1)
        raw = ((raw + half) & ((1 << t.width) - 1)) - half
    return raw.reshape(tensor.shape)


def read_params(root: Path, manifest: dict) -> np.ndarray:
    """The bundle's dense parameter image (size and sha256 checked), as 16-bit words."""
    return np.frombuffer(read_verified(root, manifest["graphs"]["params"]), dtype="<u2")
