"""An analytical model of the generated accelerator: resources, cycles, latency; and the tile search.

Nothing here is synthesised: the figures are estimates from the structure of the kernels in
``cpp/`` (which units exist, how wide they are, which buffers they keep on chip, what streams from
DDR) and the device's data-sheet resources. The search picks the tile sizes of the shared linear
unit, the attention unit's parallelism and the expert chunk that minimise the estimated latency
of the slowest task within the part's resources (the idea UbiMoE applies to this class of
accelerator). A design that does not fit at any tiling is refused with the numbers.

Model, per unit:
- DSPs: a ``W1 x W2``-bit product takes ``ceil(W1/27) * ceil(W2/18)`` DSP48E2 slices; the linear
  unit has ``tile_in x tile_out`` multipliers (activation x weight), shared by the stem, every linear
  layer, the gates, the experts and the heads; the attention unit has ``2 x attn_par`` 24x24-bit
  multipliers (q.k and p.v); a few more serve LayerNorm, exp and GELU interpolation.
- Memory: every on-chip buffer of ``edgemoe_top.cpp`` with its width, depth and partitioning (a
  bank per parallel lane), mapped to BRAM18K in 512x36 / 1024x18 shapes (URAM for deep buffers
  where the part has it); tiles and accumulators that are partitioned completely go to registers.
- Cycles: a linear layer on ``n`` tokens takes ``ceil(out/tile_out) * ceil(in/tile_in)`` tiles, each
  ``max(n, tile load)`` cycles (ping-pong: the next tile loads during the current one's MACs);
  attention ``heads * n * n * ceil(head_dim/attn_par) * 2``; LayerNorm ``3 n dim / tile_in``; each
  routed expert ``max(compute, chunk loads)`` with the expected tokens per expert from calibration
  routing; the stem's convolutions on the linear unit; DDR words at the AXI ports' bandwidth.
- LUT / FF: per multiplier-accumulator and per lane, plus the AXI and control logic; rough.
"""

from __future__ import annotations

import itertools
import math

from ...errors import TargetError
from .design import Design

# Resource share a design may use: above it, placement and timing closure are unlikely.
UTILISATION = {"dsp": 0.9, "bram_18k": 0.9, "uram": 0.9, "lut": 0.8, "ff": 0.8}
LUT_PER_MAC, FF_PER_MAC = 70, 130  # a 64-bit accumulator adder and its pipeline registers
LUT_BASE, FF_BASE = 28_000, 40_000  # 5 AXI masters, AXI-Lite control, LayerNorm/exp/GELU datapaths
LUT_PER_ATTN_LANE, FF_PER_ATTN_LANE = 180, 260
SLACK = 1.05  # designs within this factor of the fastest count as equally fast


def dsp_per_mul(w1: int, w2: int) -> int:
    """DSP48E2 slices for one ``w1 x w2``-bit signed product (27x18 multipliers)."""
    return math.ceil(w1 / 27) * math.ceil(w2 / 18)


def _brams(width: int, depth: int, banks: int = 1) -> int:
    per = max(1, math.ceil(depth / banks))
    return banks * min(math.ceil(width / 36) * math.ceil(per / 512), math.ceil(width / 18) * math.ceil(per / 1024))


def _urams(width: int, depth: int, banks: int = 1) -> int:
    return banks * math.ceil(width / 72) * math.ceil(max(1, math.ceil(depth / banks)) / 4096)


def buffers(d: Design, tiles: dict) -> list[tuple[str, int, int, int]]:
    """On-chip buffers of the design: (name, width bits, depth, banks)."""
    wa, ww = d.types["act"].width, d.types["weight"].width
    n, dim, ti, to = d.tokens, d.dim, tiles["tile_in"], tiles["tile_out"]
    hc, pa = tiles["expert_chunk"], tiles["attn_par"]
    hid = max(d.mlp_hidden if len(d.moe_blocks) < d.depth else 0, hc, 64)
    acc_w = min(64, wa + ww + 2 + math.ceil(math.log2(max(d.mlp_hidden, d.expert_hidden, dim) + 1)))
    return [
        ("X", wa, n * dim, ti),
        ("HN", wa, n * dim, ti),
        ("QKV", wa, n * 3 * dim, ti),
        ("ATT", wa, n * dim, ti),
        ("Y", wa, n * dim, to),
        ("HID", wa, n * hid, ti),
        ("ACC (MoE sums)", 64, n * dim, 1),
        ("YACC (expert sums)", acc_w, n * dim, to),
        ("W1C/W2C (expert chunks, ping-pong)", ww, 4 * hc * dim, ti),
        ("linear accumulators", acc_w, n * to, to),
        ("K/V (attention)", 24, 2 * n * d.head_dim, pa),
        ("GELU table", wa, 1025, 1),
        ("exp table", 32, 257, 1),
        ("stem weight tile", d.types["embed"].width, to * max(ci * k * k for ci, _co, k, *_ in d.stem_stages), to),
        ("routes", 32, 2 * n * d.top_k, 1),
    ]


def resources(d: Design, tiles: dict, uram_available: bool) -> dict:
    """Estimated DSP, BRAM18K, URAM, LUT and FF of the design with ``tiles``."""
    wa, ww = d.types["act"].width, d.types["weight"].width
    macs = tiles["tile_in"] * tiles["tile_out"]
    pa = tiles["attn_par"]
    dsp = macs * dsp_per_mul(wa, ww) + 2 * pa * dsp_per_mul(24, 24) + 24
    bram = uram = 0
    for _name, width, depth, banks in buffers(d, tiles):
        if uram_available and depth // banks >= 8192:
            uram += _urams(width, depth, banks)
        else:
            bram += _brams(width, depth, banks)
    lut = LUT_BASE + macs * LUT_PER_MAC + 2 * pa * LUT_PER_ATTN_LANE
    ff = FF_BASE + macs * FF_PER_MAC + 2 * pa * FF_PER_ATTN_LANE
    return {"dsp": dsp, "bram_18k": bram, "uram": uram, "lut": lut, "ff": ff}


def cycles(d: Design, tiles: dict, tokens_per_expert: list[list[float]], words_per_cycle: float) -> dict:
    """Estimated cycles per image of one task, by part.

    Args:
        d: The design.
        tiles: Tile sizes.
        tokens_per_expert: Per MoE layer, the expected tokens routed to each expert per image.
        words_per_cycle: 16-bit words one AXI port moves per cycle.
    """
    ti, to, pa, hc = tiles["tile_in"], tiles["tile_out"], tiles["attn_par"], tiles["expert_chunk"]
    n, dim = d.tokens, d.dim

    def linear(rows: float, out: int, inp: int) -> float:
        tile_load = to * ti / words_per_cycle
        return math.ceil(out / to) * math.ceil(inp / ti) * max(rows, tile_load)

    part = {"stem": 0.0, "attention": 0.0, "linear": 0.0, "norm": 0.0, "gate": 0.0, "experts": 0.0, "head": 0.0}
    h, w = d.img_size
    for ci, co, k, s, p, _h in d.stem_stages:
        h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        part["stem"] += math.ceil(co / to) * (h * w * math.ceil(ci * k * k / ti) + ci * k * k * to / words_per_cycle)
    layer = 0
    for b in range(d.depth):
        part["norm"] += 2 * 3 * n * dim / ti
        part["linear"] += linear(n, 3 * dim, dim) + linear(n, dim, dim)
        part["attention"] += d.heads * n * n * math.ceil(d.head_dim / pa) * 2
        if b in d.moe_blocks:
            part["gate"] += linear(n, d.num_experts, dim) + n * d.num_experts * (d.top_k + 2)
            chunk_words = hc * (2 * dim + 1)
            for tok in tokens_per_expert[layer]:
                if tok <= 0:
                    continue
                chunks = math.ceil(d.expert_hidden / hc)
                compute = tok * (math.ceil(hc / to) * math.ceil(dim / ti) + math.ceil(dim / to) * math.ceil(hc / ti))
                part["experts"] += chunks * max(compute, chunk_words / words_per_cycle) + tok * dim / ti
            layer += 1
        else:
            part["linear"] += linear(n, d.mlp_hidden, dim) + linear(n, dim, d.mlp_hidden) + n * d.mlp_hidden / ti
    if d.final_norm:
        part["norm"] += 3 * n * dim / ti
    ch = max(d.head_channels)
    if ch:
        part["head"] = 3 * n * dim / ti + linear(n - 1, ch * d.patch**2, dim) + ch * h * w / words_per_cycle
    part["total"] = sum(part.values())
    return part


def estimate(d: Design, tiles: dict, fpga, tokens_per_expert: dict[str, list[list[float]]]) -> dict:
    """The ``hls.estimate`` record: resources, cycles and latency per task at the part's clock."""
    words = fpga.axi_port_gbs * 1e9 / (fpga.clock_mhz * 1e6) / 2
    res = resources(d, tiles, fpga.uram > 0)
    tasks = {}
    for task, tpe in tokens_per_expert.items():
        c = cycles(d, tiles, tpe, words)
        tasks[task] = {"cycles": round(c["total"]), "latency_ms": c["total"] / (fpga.clock_mhz * 1e3), "by_unit": {
            k: round(v) for k, v in c.items() if k != "total"}}  # fmt: skip
    worst = max(tasks.values(), key=lambda t: t["cycles"])
    avail = {"dsp": fpga.dsp, "bram_18k": fpga.bram_18k, "uram": fpga.uram, "lut": fpga.lut, "ff": fpga.ff}
    return {
        **res,
        "cycles": worst["cycles"],
        "latency_ms": worst["latency_ms"],
        "clock_mhz": fpga.clock_mhz,
        "part": fpga.part,
        "tiles": dict(tiles),
        "available": avail,
        "utilisation": {k: (res[k] / avail[k] if avail[k] else (0.0 if res[k] == 0 else math.inf)) for k in avail},
        "tasks": tasks,
        "note": "analytical estimate from the generated kernels' structure (not synthesised)",
    }


def fits(res: dict, fpga) -> bool:
    """Whether estimated resources stay within the part's usable share."""
    avail = {"dsp": fpga.dsp, "bram_18k": fpga.bram_18k, "uram": fpga.uram, "lut": fpga.lut, "ff": fpga.ff}
    return all(res[k] <= UTILISATION[k] * avail[k] for k in avail)


def candidates(d: Design):
    """Tile choices searched: linear unit 4..64 x 4..64, attention lanes up to the head width, expert chunks."""
    sizes = (4, 8, 16, 32, 64)
    pars = [p for p in (4, 8, 16, 32, 64) if p <= d.head_dim] or [d.head_dim]
    chunks = sorted(
        {c for c in (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768) if c <= d.expert_hidden}
        | {min(d.expert_hidden, 16)}
    )
    return [
        {"tile_in": ti, "tile_out": to, "attn_par": pa, "expert_chunk": hc}
        for ti, to, pa, hc in itertools.product(sizes, sizes, pars, chunks)
    ]


def search(d: Design, fpga, tokens_per_expert: dict[str, list[list[float]]]) -> dict:
    """The estimate of the fastest tiling that fits the part.

    Raises:
        TargetError: No tiling fits: the smallest design's estimate against the part's resources.
    """
    fitting = []
    smallest = None
    for tiles in candidates(d):
        res = resources(d, tiles, fpga.uram > 0)
        score = (res["dsp"] / fpga.dsp) + (res["bram_18k"] / max(1, fpga.bram_18k))
        if smallest is None or score < smallest[0]:
            smallest = (score, tiles, res)
        if fits(res, fpga):
            fitting.append(estimate(d, tiles, fpga, tokens_per_expert))
    if not fitting:
        _, tiles, res = smallest
        avail = {"dsp": fpga.dsp, "bram_18k": fpga.bram_18k, "uram": fpga.uram, "lut": fpga.lut, "ff": fpga.ff}
        need = ", ".join(f"{k} {res[k]:,}/{avail[k]:,}" for k in avail)
        over = ", ".join(k for k in avail if res[k] > UTILISATION[k] * avail[k])
        raise TargetError(
            f"target hls: {d.name} does not fit {fpga.part} at any tiling; the smallest design "
            f"(tiles {tiles['tile_in']}x{tiles['tile_out']}, expert chunk {tiles['expert_chunk']}) needs {need} "
            f"(estimate/part); over the usable share: {over}"
        )
    # Within 5 % of the fastest, the smallest design: more DSPs for a few percent are not worth them.
    fastest = min(e["cycles"] for e in fitting)
    near = [e for e in fitting if e["cycles"] <= SLACK * fastest]
    return min(near, key=lambda e: (e["dsp"], e["bram_18k"] + e["uram"], e["cycles"]))
