"""M³ViT-style multi-task Mixture-of-Experts vision transformer in plain PyTorch.

Every odd-index block replaces its MLP with an MoE layer whose experts are
``Linear → GELU → Linear``. Each task owns one gate (softmax over experts, then
top-k, scores not renormalised, as in M³ViT's VMoE gate). Optionally a task
embedding (one-hot → small MLP) is concatenated to each token's gate input, and
each task may be confined to its own window of experts (``num_experts_pertask``).
A task with 0 output channels is a *backbone* task: its output is the last block's tokens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from edgemoe.errors import ModelError

WINDOW_LAYOUTS = ("even", "m3vit")
# Edge-MoE's input: raw pixels as ap_ufixed<8,0>, i.e. byte k -> k/256 in [0, 1), no mean/std. Images
# enter as k/255 (PNG reading, procedural scenes), so dividing by 256/255 gives k/256.
RAW_PIXELS_MEAN = (0.0, 0.0, 0.0)
RAW_PIXELS_STD = (256 / 255, 256 / 255, 256 / 255)


# Pixels a model input may have: what ``edgemoe run`` reads an image of at most (runtime.inputs).
MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class M3ViTConfig:
    """Hyper-parameters of an M³ViT model.

    Attributes:
        name: Registry name of the configuration.
        img_size: Input height and width in pixels.
        patch: Patch edge in pixels.
        stem: ``"patch"``: one strided ``patch × patch`` convolution (plain ViT); ``"conv"``: a stack of
            3×3 stride-2 convolutions with BatchNorm and ReLU down to the patch grid, then a 1×1
            projection (Xiao et al., 2021, "Early convolutions help transformers see better": same
            tokens, far faster to train from scratch). ``"conv"`` needs ``patch`` a power of two.
        in_chans: Input channels.
        dim: Token width.
        heads: Attention heads.
        depth: Transformer blocks; every odd-index block is an MoE block.
        mlp_hidden: Hidden width of the dense MLPs.
        expert_hidden: Hidden width of each expert.
        num_experts: Experts per MoE layer.
        top_k: Experts chosen per token.
        tasks: ``(task name, output channels)`` pairs, one gate per task. A task with channels > 0
            has a dense head (output (B, channels, H, W)); with 0 channels it is a *backbone* task
            without head parameters, whose output is the last block's tokens (B, num_tokens, dim),
            after the final norm where ``final_norm`` is set (M³ViT's backbone, Edge-MoE's output).
        task_cond_dim: Width of the task embedding concatenated to the gate input (0: off).
        experts_per_task: Size of each task's expert window (None: every task sees all experts).
        seed: Seed of the random initialisation.
        mean: Per-channel input normalisation mean, applied to images in [0, 1] (a byte k is k/255).
        std: Per-channel input normalisation std. The model input is ``(image - mean) / std``; the
            same mean/std go into the bundle's ``input.preprocess``, which ``edgemoe run`` applies to
            PNG/JPEG inputs. Raw pixels as Edge-MoE feeds them (k/256, its ``ap_ufixed<8,0>`` pixel
            type, no mean/std) are mean ``(0, 0, 0)``, std ``(256/255,) * 3`` (see ``RAW_PIXELS_*``);
            std ``(1, 1, 1)`` would be k/255. M³ViT's training code normalises k/255 with the
            ImageNet mean/std (the defaults here).
        ln_eps: Epsilon of every LayerNorm in the trunk and the heads (M³ViT and Edge-MoE: 1e-6).
        final_norm: LayerNorm after the last block. M³ViT's backbone has none (its decoders follow).
        cls_token: A learned class-token parameter. Without it token 0 is ``pos_embed[0]`` alone (a
            zero class token, as in Edge-MoE); the token count stays grid + 1 either way.
        window_layout: Where each task's expert window starts (with ``experts_per_task``):
            ``"even"`` spreads the windows evenly over the experts; ``"m3vit"`` reproduces the start
            ids of M³ViT's ``regu_experts_fromtask`` gates (see :meth:`expert_window`).
    """

    name: str
    img_size: tuple[int, int] = (128, 256)
    patch: int = 16
    stem: str = "patch"
    in_chans: int = 3
    dim: int = 192
    heads: int = 3
    depth: int = 12
    mlp_hidden: int = 768
    expert_hidden: int = 384
    num_experts: int = 16
    top_k: int = 2
    tasks: tuple[tuple[str, int], ...] = (("semseg", 7), ("depth", 1))
    task_cond_dim: int = 0
    experts_per_task: int | None = None
    seed: int = 0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    ln_eps: float = 1e-5
    final_norm: bool = True
    cls_token: bool = True
    window_layout: str = "even"

    def __post_init__(self):
        # A config may come from an untrusted file (a .json model config, a bundle's manifest): sizes are
        # checked here, so a wrong type or shape is one ModelError instead of a failure deep in torch.
        sizes = ("patch", "in_chans", "dim", "heads", "depth", "mlp_hidden", "expert_hidden", "num_experts", "top_k")
        for key in (*sizes, "task_cond_dim", "seed"):
            value = getattr(self, key)
            low = 1 if key in sizes else 0 if key == "task_cond_dim" else None
            if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
                raise ValueError(f"{key} must be an integer{'' if low is None else f' >= {low}'}, got {value!r}")
        size = self.img_size
        if not (
            isinstance(size, tuple) and len(size) == 2 and all(isinstance(v, int) and v >= self.patch for v in size)
        ):
            raise ValueError(f"img_size must be (height, width), each at least patch ({self.patch}), got {size!r}")
        if size[0] * size[1] > MAX_PIXELS:
            raise ValueError(f"img_size {size[0]}x{size[1]} is more than {MAX_PIXELS:,} pixels")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not a multiple of heads {self.heads}")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {self.stem!r}")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if not (
                isinstance(values, tuple)
                and len(values) == self.in_chans
                and all(
                    (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v))
                    for v in values
                )
                and (key == "mean" or all(v > 0 for v in values))
            ):
                raise ValueError(f"{key} must be {self.in_chans} finite numbers (in_chans), std > 0, got {values!r}")
        if not (
            isinstance(self.tasks, tuple)
            and self.tasks
            and all(isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], str) for t in self.tasks)
        ):
            raise ValueError(f"tasks must be (name, output channels) pairs, got {self.tasks!r}")
        # Task names become module keys and graph file names (gate_<task>_<layer>.onnx).
        names = [t[0] for t in self.tasks]
        bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}", n)]
        if bad or len(set(names)) != len(names):
            shown = repr(bad[0][:40]) if bad else "a name twice"
            raise ValueError(f"task names must be distinct words of letters, digits, _ and - (got {shown})")
        if self.window_layout not in WINDOW_LAYOUTS:
            raise ValueError(f"window_layout '{self.window_layout}' is not one of {', '.join(WINDOW_LAYOUTS)}")
        if not self.ln_eps > 0:
            raise ValueError(f"ln_eps must be > 0, got {self.ln_eps}")
        bad = [f"{name}: {ch}" for name, ch in self.tasks if not isinstance(ch, int) or ch < 0]
        if bad:
            raise ValueError(f"task output channels must be integers >= 0 (0: backbone task), got {', '.join(bad)}")
        if self.experts_per_task is not None and not 1 <= self.experts_per_task <= self.num_experts:
            raise ValueError(f"experts_per_task {self.experts_per_task} is not in 1..num_experts ({self.num_experts})")

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols)."""
        return self.img_size[0] // self.patch, self.img_size[1] // self.patch

    @property
    def num_tokens(self) -> int:
        """Patch tokens plus the class token."""
        gh, gw = self.grid
        return gh * gw + 1

    @property
    def backbone_tasks(self) -> tuple[str, ...]:
        """Tasks without a head (0 channels): their output is the last block's tokens."""
        return tuple(t for t, ch in self.tasks if ch == 0)

    @property
    def task_names(self) -> tuple[str, ...]:
        """Task names in head order."""
        return tuple(t for t, _ in self.tasks)

    @property
    def moe_blocks(self) -> tuple[int, ...]:
        """Indices of the blocks whose MLP is an MoE layer."""
        return tuple(i for i in range(self.depth) if i % 2 == 1)

    def expert_window(self, task_index: int) -> tuple[int, ...]:
        """Experts the task's gate may choose from.

        ``window_layout="even"``: contiguous windows spread evenly over the experts, so with more
        tasks than ``num_experts / experts_per_task`` they overlap. ``"m3vit"``: M³ViT's start ids
        (:meth:`m3vit_window_starts`), each window cut at the last expert as M³ViT's slice is.

        Raises:
            ModelError: ``"m3vit"`` windows that M³ViT's own gate could not run (see
                :meth:`m3vit_window_starts`).
        """
        if self.experts_per_task is None:
            return tuple(range(self.num_experts))
        if self.window_layout == "m3vit":
            start = self.m3vit_window_starts()[task_index]
            return tuple(range(start, min(start + self.experts_per_task, self.num_experts)))
        n_tasks = len(self.tasks)
        span = self.num_experts - self.experts_per_task
        start = 0 if n_tasks == 1 else round(task_index * span / (n_tasks - 1))
        return tuple(range(start, start + self.experts_per_task))

    def m3vit_window_starts(self) -> tuple[int, ...]:
        """First expert of each task's window as M³ViT's ``regu_experts_fromtask`` gates compute it.

        Read from VITA-Group/M3ViT (commit d448b6f): ``NoisyGate_VMoE.__init__`` and
        ``FMoETransformerMLP.__init__`` (models/gate_funs/noisy_gate_vmoe.py,
        models/custom_moe_layer.py) both run ``start_id = start_id + int(i * (E - P) / (T - 1))`` for
        task ``i`` in ``range(T)`` (E experts, P = ``num_experts_pertask``, T tasks): the increments
        *accumulate*, so 16 experts, 8 per task, 3 tasks give starts 0, 4, 12 (2 tasks: 0, 8). The
        gate's logits are ``inp @ w_gate[:, start:start + P]``: a Python slice, which stops at the
        last expert, so the third window above is experts 12..15 (4 wide), softmax over those; the
        layer then adds ``start`` to the chosen indices. Their gate takes ``topk(min(top_k + 1, E))``
        of the window's probabilities, so a window cut below that many experts (or empty) makes
        their code fail; such configs are refused here. Their gate computes the starts from all
        experts (``tot_expert``), their layer from one rank's (``num_expert``): the two agree only
        without expert parallelism, which is what this reproduces. The windows apply where their
        layer calls the shared gate with the task id; with ``multi_gate`` (a gate per task) their
        gate is called without it and softmaxes over all experts.

        Raises:
            ModelError: No ``experts_per_task``, a single task (their formula divides by T - 1), or
                a window M³ViT's gate could not run.
        """
        n_tasks, e, per = len(self.tasks), self.num_experts, self.experts_per_task
        if per is None:
            raise ModelError(f"{self.name}: window_layout 'm3vit' needs experts_per_task")
        if n_tasks < 2:
            raise ModelError(
                f"{self.name}: window_layout 'm3vit' needs 2 or more tasks (M³ViT divides by num_tasks - 1)"
            )
        starts, start = [], 0
        for i in range(n_tasks):
            start = start + int(i * (e - per) / (n_tasks - 1))  # their float division, truncated
            starts.append(start)
        need = min(self.top_k + 1, e)
        for (task, _), s in zip(self.tasks, starts, strict=True):
            width = max(0, min(s + per, e) - s)
            if width < need:
                raise ModelError(
                    f"{self.name}: M³ViT's window of task '{task}' would be experts {s}..{s + per - 1}, "
                    f"of which {width} exist (of {e}); its gate takes the top {need} (top-k + 1) of the window "
                    f"and would fail (window starts {starts}). Use window_layout 'even', fewer tasks or a "
                    "smaller experts_per_task"
                )
        return tuple(starts)


class ConvStem(nn.Module):
    """3×3 stride-2 Conv-BN-ReLU stages (channels doubling up to ``dim``), then a 1×1 projection to ``dim``."""

    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        stages = patch.bit_length() - 1
        if patch != 1 << stages or stages < 1:
            raise ValueError(f"a conv stem needs a power-of-two patch, got {patch}")
        layers: list[nn.Module] = []
        c_in = in_chans
        for s in range(stages):
            c_out = max(dim >> (stages - 1 - s), 8)
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, dim, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Attention(nn.Module):
    """Multi-head self-attention with a constant scale (keeps exported graphs shape-free)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = float(self.head_dim) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Expert(nn.Module):
    """One FFN expert: Linear → GELU → Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TaskGate(nn.Module):
    """A task's router: softmax over its window of experts, then top-k (not renormalised).

    ``keep`` restricts the top-k choice to a subset of experts *after* the softmax, so the
    scores of the experts that remain are exactly those of the unpruned model.
    """

    def __init__(self, dim_in: int, num_experts: int, top_k: int, window: tuple[int, ...]):
        super().__init__()
        self.top_k = top_k
        self.num_experts = num_experts
        self.w_gate = nn.Linear(dim_in, num_experts, bias=False)
        # Training only: when ``record`` is set, forward keeps ``(probs, idx)`` in ``recorded`` for the
        # load-balancing loss. A plain attribute (no state, no graph change), off for inference/export.
        self.record = False
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None
        allowed = torch.zeros(num_experts, dtype=torch.bool)
        allowed[list(window)] = True
        # Additive mask: -inf outside the window removes those experts from the softmax.
        self.register_buffer("window_bias", torch.where(allowed, 0.0, float("-inf")), persistent=False)

    def forward(
        self, h: torch.Tensor, cond: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route tokens.

        Args:
            h: Gate input, shape (..., dim).
            cond: Task embedding, shape (task_cond_dim,), or None.
            keep: Boolean mask over experts that may be chosen, or None for all.

        Returns:
            Expert indices (..., top_k) int64 and their softmax scores (..., top_k).
        """
        if cond is not None:
            h = torch.cat([h, cond.expand(*h.shape[:-1], cond.shape[-1])], dim=-1)
        probs = torch.softmax(self.w_gate(h) + self.window_bias, dim=-1)
        choose = probs if keep is None else probs.masked_fill(~keep, -1.0)
        _, idx = torch.topk(choose, self.top_k, dim=-1)
        if self.record:
            self.recorded = (probs, idx)
        return idx, torch.gather(probs, -1, idx)


class MoE(nn.Module):
    """Task-routed MoE layer with one gate per task and sparse token dispatch."""

    def __init__(self, cfg: M3ViTConfig):
        super().__init__()
        gate_in = cfg.dim + cfg.task_cond_dim
        self.experts = nn.ModuleList(Expert(cfg.dim, cfg.expert_hidden) for _ in range(cfg.num_experts))
        self.gates = nn.ModuleList(
            TaskGate(gate_in, cfg.num_experts, cfg.top_k, cfg.expert_window(t)) for t in range(len(cfg.tasks))
        )

    def forward(
        self, h: torch.Tensor, task: int, cond: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        shape = h.shape
        flat = h.reshape(-1, shape[-1])
        idx, scores = self.gates[task](flat, cond, keep)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            out = out.index_add(0, tok, expert(flat[tok]) * scores[tok, slot].unsqueeze(-1))
        return out.reshape(shape)


class Block(nn.Module):
    """Pre-norm transformer block with a dense MLP or an MoE layer."""

    def __init__(self, cfg: M3ViTConfig, moe: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.is_moe = moe
        if moe:
            self.moe = MoE(cfg)
        else:
            self.mlp = Expert(cfg.dim, cfg.mlp_hidden)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Residual attention half of the block."""
        return x + self.attn(self.norm1(x))

    def forward(
        self, x: torch.Tensor, task: int = 0, cond: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.attend(x)
        if self.is_moe:
            return x + self.moe(self.norm2(x), task, cond, keep)
        return x + self.mlp(self.norm2(x))


class DenseHead(nn.Module):
    """Per-task dense prediction head: linear patch decoder back to full resolution."""

    def __init__(self, cfg: M3ViTConfig, channels: int):
        super().__init__()
        self.cfg = cfg
        self.channels = channels
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.proj = nn.Linear(cfg.dim, channels * cfg.patch * cfg.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gh, gw = self.cfg.grid
        p = self.cfg.patch
        y = self.proj(self.norm(x[:, 1:]))  # drop the class token
        y = y.reshape(-1, gh, gw, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return y.reshape(-1, self.channels, gh * p, gw * p)


class TaskEmbedding(nn.Module):
    """One-hot task → small MLP; its output is concatenated to every token's gate input."""

    def __init__(self, n_tasks: int, width: int):
        super().__init__()
        self.n_tasks = n_tasks
        self.fc1 = nn.Linear(n_tasks, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, task: int) -> torch.Tensor:
        onehot = torch.zeros(self.n_tasks, dtype=self.fc1.weight.dtype, device=self.fc1.weight.device)
        onehot[task] = 1.0
        return self.fc2(torch.relu(self.fc1(onehot)))


class M3ViT(nn.Module):
    """Multi-task MoE ViT: shared trunk, per-task gates, per-task dense heads (none for backbone tasks)."""

    def __init__(self, cfg: M3ViTConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.stem == "conv":
            self.patch_embed = ConvStem(cfg.in_chans, cfg.dim, cfg.patch)
        elif cfg.stem == "patch":
            self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch, cfg.patch)
        else:
            raise ValueError(f"unknown stem '{cfg.stem}' (known: patch, conv)")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.cls_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg, i in cfg.moe_blocks) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps) if cfg.final_norm else nn.Identity()
        self.task_embed = TaskEmbedding(len(cfg.tasks), cfg.task_cond_dim) if cfg.task_cond_dim else None
        # Backbone tasks (0 channels) have no head: they output the (normed) tokens.
        self.heads = nn.ModuleDict({name: DenseHead(cfg, ch) for name, ch in cfg.tasks if ch > 0})

    def task_index(self, task: str) -> int:
        """Index of a task name."""
        return self.cfg.task_names.index(task)

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """Patch embedding, class token and position embedding."""
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        if self.cls_token is None:
            # A zero token 0 (token 0 is then pos_embed[0] alone); padding keeps the batch axis dynamic.
            return F.pad(x, (0, 0, 1, 0)) + self.pos_embed
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def task_cond(self, task: int) -> torch.Tensor | None:
        """The task embedding fed to the gates, or None without task conditioning."""
        return None if self.task_embed is None else self.task_embed(task)

    def forward(self, img: torch.Tensor, task: str, keep: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Run one task.

        Args:
            img: Normalised images, shape (B, C, H, W).
            task: Task name.
            keep: Optional per-MoE-block boolean expert masks (pruned deployment).

        Returns:
            The task head's output, shape (B, channels, H, W); for a backbone task the last block's
            tokens (after the final norm, if any), shape (B, num_tokens, dim).
        """
        t = self.task_index(task)
        cond = self.task_cond(t)
        x = self.embed(img)
        for i, block in enumerate(self.blocks):
            x = block(x, t, cond, None if keep is None else keep.get(i))
        x = self.norm(x)
        return self.heads[task](x) if task in self.heads else x


def build_m3vit(cfg: M3ViTConfig) -> M3ViT:
    """Build a model with seeded random weights (deterministic across runs)."""
    from .. import seeded_build

    return seeded_build(M3ViT, cfg)
