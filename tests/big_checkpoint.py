"""A random checkpoint folder with a real model's dimensions, written tensor by tensor.

``save_pretrained`` needs the whole model in memory; this writes the same files (``config.json``,
safetensors shards under ``model.safetensors.index.json``, the hub's key names) one tensor at a
time, so a multi-GB checkpoint costs the writer one tensor of memory. Run as a script it writes the
folder, compiles it with ``edgemoe compile`` in a child process and prints the child's peak RSS.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

# OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924): its widths, expert count, top-k and vocabulary.
OLMOE_1B_7B = {
    "model_type": "olmoe",
    "architectures": ["OlmoeForCausalLM"],
    "hidden_size": 2048,
    "intermediate_size": 1024,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "norm_topk_prob": False,
    "vocab_size": 50304,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "pad_token_id": 1,
    "bos_token_id": None,
    "eos_token_id": 50279,
}


def olmoe_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The hub's tensor names and shapes of an OLMoE checkpoint with ``cfg``'s sizes."""
    d, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out = [("model.embed_tokens.weight", (v, d)), ("lm_head.weight", (v, d)), ("model.norm.weight", (d,))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        out += [(f"{p}.self_attn.{n}_proj.weight", (d, d)) for n in "qkvo"]
        out += [(f"{p}.self_attn.q_norm.weight", (d,)), (f"{p}.self_attn.k_norm.weight", (d,))]
        out += [(f"{p}.input_layernorm.weight", (d,)), (f"{p}.post_attention_layernorm.weight", (d,))]
        out.append((f"{p}.mlp.gate.weight", (cfg["num_experts"], d)))
        for e in range(cfg["num_experts"]):
            out += [
                (f"{p}.mlp.experts.{e}.gate_proj.weight", (i, d)),
                (f"{p}.mlp.experts.{e}.up_proj.weight", (i, d)),
                (f"{p}.mlp.experts.{e}.down_proj.weight", (d, i)),
            ]
    return out


def write_checkpoint(folder: Path, cfg: dict, tensors: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> int:
    """Write ``tensors`` as bf16 safetensors shards (one per layer, plus one for the rest); return their bytes.

    Weights are normal with std 0.02, norm weights ones (as the library initialises them).
    """
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}, indent=2))
    shards: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape in tensors:
        layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(layer, []).append((name, shape))
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, (_, group) in enumerate(sorted(shards.items())):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in group:
            n = 2 * int(torch.Size(shape).numel())
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with (folder / fname).open("wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in group:
                if name.endswith("norm.weight"):
                    t = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
                fh.write(t.view(torch.int16).numpy().tobytes())
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


# The child reports VmHWM, the peak RSS of its own address space: getrusage's ru_maxrss would also
# count the parent's pages the child shared between fork and exec (a test runner's whole heap).
_CHILD = """
import sys
from edgemoe.cli import cli
try:
    cli(sys.argv[2:], prog_name="edgemoe")
finally:
    with open("/proc/self/status") as status:
        hwm = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    print(f"hwm_kib={hwm}", file=open(sys.argv[1], "w"))
"""


def compile_peak_rss(folder: Path, out: Path, *args: str) -> tuple[int, str]:
    """``edgemoe compile FOLDER -o OUT ARGS`` in a child process: (its peak RSS in bytes, its stderr).

    Linux only (``/proc/self/status``).
    """
    import subprocess

    report = out.parent / f"{out.name}.rss"
    cmd = [sys.executable, "-c", _CHILD, str(report), "compile", str(folder), "-o", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(report.read_text().split("=")[1]) * 1024, proc.stderr


if __name__ == "__main__":
    import time

    root = Path(sys.argv[1])
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    cfg = {**OLMOE_1B_7B, "num_hidden_layers": layers}
    t = time.time()
    if not (root / "ckpt").is_dir():
        write_checkpoint(root / "ckpt", cfg, olmoe_tensors(cfg))
    size = sum(f.stat().st_size for f in (root / "ckpt").glob("*.safetensors"))
    print(f"checkpoint {size / 1e9:.2f} GB ({time.time() - t:.1f} s)")
    t = time.time()
    rss, err = compile_peak_rss(root / "ckpt", root / "bundle", *sys.argv[3:])
    print(err[-1500:])
    print(f"compile {time.time() - t:.1f} s, peak RSS {rss / 1e9:.3f} GB = {rss / size:.3f} x checkpoint")
