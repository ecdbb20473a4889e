"""Streamed compiles of checkpoint folders: weights read tensor by tensor, never the whole model.

A streamed bundle must hold what a compile of the loaded model holds (the same expert blobs byte
for byte, the same routing profile, the same outputs), for every way the library's checkpoints
store experts: per-expert tensors merged on load (OLMoE, Qwen2-MoE, DeepSeek-V3), renamed ones
(Mixtral), stacked tensors read in part (GPT-OSS, DBRX rows) and per-expert modules (Switch).
A multi-GB checkpoint with OLMoE-1B-7B's dimensions then compiles in a fraction of its size.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from edgemoe.bundle.format import read_manifest
from edgemoe.compiler import compile_model
from edgemoe.config import CompileConfig
from edgemoe.errors import ConfigError, ModelError
from edgemoe.models import resolve_model
from edgemoe.models.hf.stream import CheckpointReader
from edgemoe.runtime import Session
from tests.big_checkpoint import OLMOE_1B_7B, compile_peak_rss, olmoe_tensors, write_checkpoint

pytestmark = pytest.mark.slow

ARCHS = [
    "hf-olmoe-micro",
    "hf-mixtral-micro",
    "hf-qwen2-moe-micro",
    "hf-deepseek-v3-micro",
    "hf-gpt-oss-micro",
    "hf-dbrx-micro",
    "hf-switch-micro",
]


def _save(name: str, folder, dtype=torch.float32):
    resolve_model(name).build().to(dtype).save_pretrained(folder, max_shard_size="60KB")
    return folder


@pytest.mark.parametrize("name", ARCHS)
def test_a_streamed_bundle_holds_what_the_loaded_model_compiles_to(name, tmp_path):
    folder = _save(name, tmp_path / "ckpt", torch.bfloat16 if name == "hf-olmoe-micro" else torch.float32)
    causal = "switch" not in name
    opts = {"max_seq": 32} if causal else {}
    compile_model(CompileConfig(model=str(folder), stream=False, **opts), tmp_path / "loaded")
    compile_model(CompileConfig(model=str(folder), stream=True, **opts), tmp_path / "streamed")
    loaded, streamed = read_manifest(tmp_path / "loaded"), read_manifest(tmp_path / "streamed")
    assert streamed["model"]["source"]["stream"] is True and "stream" not in loaded["model"]["source"]
    for a, b in zip(loaded["moe_layers"], streamed["moe_layers"], strict=True):
        assert [e["sha256"] for e in a["experts"]] == [e["sha256"] for e in b["experts"]]
        assert [e["sha256"] for e in a["shared"]] == [e["sha256"] for e in b["shared"]]
    # The routing profile of the streamed run (partition by partition) is the library's.
    assert {t: v["expert_counts"] for t, v in loaded["tasks"].items()} == {
        t: v["expert_counts"] for t, v in streamed["tasks"].items()
    }
    task = next(iter(loaded["tasks"]))
    x = np.random.default_rng(0).integers(0, 64, size=(2, 12))
    ya, yb = Session(tmp_path / "loaded", task).run(x), Session(tmp_path / "streamed", task).run(x)
    assert np.abs(ya - yb).max() <= 1e-5
    if causal:
        prompt = [3, 1, 4, 1, 5]
        assert list(Session(tmp_path / "loaded", task).generate(prompt, 12)) == list(
            Session(tmp_path / "streamed", task).generate(prompt, 12)
        )


def test_verify_rebuilds_a_streamed_bundles_source_streamed(tmp_path, run_cli):
    folder = _save("hf-mixtral-micro", tmp_path / "ckpt")
    out = tmp_path / "b"
    r = run_cli("compile", str(folder), "--stream", "-o", str(out), "-q")
    assert r.exit_code == 0, r.output
    r = run_cli("verify", str(out), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["passed"] is True


def test_streaming_is_refused_where_it_cannot_apply(tmp_path):
    folder = _save("hf-olmoe-micro", tmp_path / "ckpt")
    with pytest.raises(ConfigError, match=r"streamed compile .* emits target onnx"):
        compile_model(CompileConfig(model=str(folder), stream=True, target="tvm"), tmp_path / "a")
    with pytest.raises(ConfigError, match="--stream reads a checkpoint folder"):
        compile_model(CompileConfig(model="hf-olmoe-micro", stream=True), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_checkpoint_missing_an_experts_tensor_is_refused_by_name(tmp_path):
    cfg = {**OLMOE_1B_7B, "hidden_size": 32, "intermediate_size": 16, "num_attention_heads": 4}
    cfg.update(num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, vocab_size=64, eos_token_id=2)
    cfg.update(pad_token_id=1, num_hidden_layers=2)
    dropped = "model.layers.1.mlp.experts.3.up_proj.weight"
    write_checkpoint(tmp_path / "ckpt", cfg, [t for t in olmoe_tensors(cfg) if t[0] != dropped])
    with pytest.raises(ModelError, match=r"expert 3 of model\.layers\.1\.mlp\.experts\.gate_up_proj is not in"):
        compile_model(CompileConfig(model=str(tmp_path / "ckpt"), stream=True), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # The whole set, the same writer: the folder compiles (the writer's key names are the hub's).
    write_checkpoint(tmp_path / "whole", cfg, olmoe_tensors(cfg))
    compile_model(CompileConfig(model=str(tmp_path / "whole"), stream=True), tmp_path / "out")
    assert read_manifest(tmp_path / "out")["totals"]["experts_bundle"] == 8


def test_the_checkpoint_writer_names_tensors_as_save_pretrained_does(tmp_path):
    from safetensors import safe_open
    from transformers import OlmoeConfig, OlmoeForCausalLM

    sizes = dict(hidden_size=16, intermediate_size=8, num_attention_heads=2, num_key_value_heads=2)
    sizes.update(num_experts=4, num_hidden_layers=2, vocab_size=32)
    OlmoeForCausalLM(OlmoeConfig(**sizes)).save_pretrained(tmp_path / "hf")
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert dict(olmoe_tensors(sizes)) == saved


def test_a_multi_gb_checkpoint_compiles_in_under_half_its_size(tmp_path):
    """OLMoE-1B-7B's widths, 64 experts and vocabulary, 3 layers: a 2.9 GB bf16 checkpoint.

    The largest partitions are the embedding and the LM head (50304 x 2048, 412 MB in fp32); the
    compile's peak is that plus the process itself (torch, transformers, onnx, onnxruntime: about
    0.45 GB), the same for 2 layers or 48.
    """
    cfg = {**OLMOE_1B_7B, "num_hidden_layers": 3}
    try:
        size = write_checkpoint(tmp_path / "ckpt", cfg, olmoe_tensors(cfg))
        assert size >= 2e9
        rss, err = compile_peak_rss(tmp_path / "ckpt", tmp_path / "bundle")
        assert "streamed: 2.73 GiB in 4 file(s) stay on disk" in err
        assert rss <= 0.5 * size, f"peak RSS {rss / 1e9:.2f} GB for a {size / 1e9:.2f} GB checkpoint"
        m = read_manifest(tmp_path / "bundle")
        assert [len(layer["experts"]) for layer in m["moe_layers"]] == [64, 64, 64]
        # An expert blob is its checkpoint tensors, widened exactly to fp32 and transposed to (in, out).
        from edgemoe.models.hf.stream import CheckpointReader

        reader = CheckpointReader(tmp_path / "ckpt")
        rec = m["moe_layers"][1]["experts"][5]
        blob = np.fromfile(tmp_path / "bundle" / rec["file"], dtype="<f4")
        want = reader.read("model.layers.1.mlp.experts.5.gate_proj.weight", dtype=torch.float32).T
        d, i = cfg["hidden_size"], cfg["intermediate_size"]
        assert np.array_equal(blob[: d * i].reshape(d, i), want.numpy())
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_non_finite_tensors_of_a_streamed_checkpoint_are_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _save("hf-olmoe-micro", tmp_path / "ckpt", torch.bfloat16)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    nan_key = "model.layers.1.mlp.experts.2.down_proj.weight"
    inf_key = next(k for k in index if k.endswith("self_attn.q_proj.weight"))
    for key, value in ((nan_key, float("nan")), (inf_key, float("-inf"))):
        shard = folder / index[key]
        tensors = load_file(shard)
        tensors[key].view(-1)[3] = value
        save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ModelError, match="non-finite weights in") as err:
        compile_model(CompileConfig(model=str(folder), stream=True, max_seq=32), tmp_path / "out")
    assert f"{nan_key} (NaN)" in str(err.value) and f"{inf_key} (Inf)" in str(err.value)
    assert not (tmp_path / "out").exists()
    # one read of the shards found both (the same pass gives the bundle's state_sha256)
    scan = CheckpointReader(folder).scan()
    assert scan.nonfinite == {nan_key: ("NaN",), inf_key: ("Inf",)} and len(scan.digest) == 64


def test_a_streamed_partition_hands_the_run_that_read_its_weights_to_the_target(tmp_path):
    from edgemoe.frontends.hf import HFAdapter

    folder = _save("hf-mixtral-micro", tmp_path / "ckpt")
    model, _ = resolve_model(str(folder)).build_with_notes(stream=True)
    part = HFAdapter(model).segment(0)
    with part.loaded() as ran, torch.no_grad():
        # the dry run that read the weights is the target's reference: no second forward needed
        again = part.module(*part.example_inputs)
        assert ran is not None and len(ran) == len(again)
        assert all(torch.equal(a, b) for a, b in zip(ran, again, strict=True))
