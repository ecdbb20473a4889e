"""Hugging Face checkpoint folders (save_pretrained output) compiled directly, and broken folders refused."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import read_manifest

from edgemoe.frontends.hf import HFAdapter
from edgemoe.models import resolve_model
from edgemoe.models.hf.configs import CONFIGS
from edgemoe.runtime import Session

ARCHS = sorted(CONFIGS)  # every named hf model: one per supported arch

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


def _save(name: str, folder, dtype=torch.float32, shard="60KB"):
    model = resolve_model(name).build().to(dtype)
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


@pytest.mark.parametrize("name", ARCHS)
def test_a_saved_folder_compiles_to_the_named_models_bundle(name, bundle_factory, tmp_path):
    folder = _save(name, tmp_path / name)
    assert (folder / "model.safetensors.index.json").is_file()  # sharded, read through the index
    causal = CONFIGS[name]["arch"] != "switch_transformers"  # the encoder has nothing to generate with
    bundle = bundle_factory(str(folder), **({"max_seq": 48} if causal else {}))
    source = read_manifest(bundle)["model"]["source"]
    named = read_manifest(bundle_factory(name))["model"]["source"]
    assert source["weights_format"] == "hf" and source["weights"] == str(folder.resolve())
    # The same weights as the model built in code (the library converts its saved expert layout back).
    assert source["state_sha256"] == named["state_sha256"]
    model = resolve_model(name).build()
    ad = HFAdapter(model)
    task = ad.ir.task_names[0]
    x = np.random.default_rng(0).integers(0, ad.ir.input.high, (2, 7))
    session = Session(bundle, task)
    assert np.abs(session.run(x) - ad.reference(x, task)).max() <= 1e-4
    if causal:  # greedy generation from the folder's bundle = transformers' generate, token for token
        prompt = np.random.default_rng(1).integers(3, ad.ir.input.high, 8)
        model.generation_config.eos_token_id = None
        with torch.no_grad():
            want = model.generate(torch.from_numpy(prompt)[None], max_new_tokens=32, do_sample=False, pad_token_id=0)
        assert list(session.generate(prompt, 32)) == want[0, 8:].tolist()


def test_a_folder_compiles_with_a_memory_budget_and_verifies(run_cli, tmp_path):
    """The planner and verify rebuild the source model from the folder the manifest names."""
    folder = _save("hf-qwen3-moe-micro", tmp_path / "qwen3")
    out = tmp_path / "out"
    result = run_cli("compile", folder, "--memory-budget", "25%", "--max-seq", "32", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["schedule"]["budget_bytes"] > 0
    result = run_cli("verify", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"]


def test_a_bf16_folder_loads_as_float32_and_verifies(run_cli, tmp_path):
    folder = _save("hf-olmoe-micro", tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    model = resolve_model(str(folder)).build()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ref = resolve_model("hf-olmoe-micro").build()
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b.to(torch.bfloat16).float()), k  # bf16 values exactly, widened
    out = tmp_path / "out"
    assert run_cli("compile", folder, "-o", out, "-q").exit_code == 0
    result = run_cli("verify", out, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["passed"]


def _broken(tmp_path, how: str):
    folder = _save("hf-mixtral-micro", tmp_path / how)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / sorted(set(index["weight_map"].values()))[1]
    if how == "no-config":
        (folder / "config.json").unlink()
    elif how == "missing-shard":
        shard.unlink()
    elif how == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "not-safetensors":
        shard.write_bytes(b"\x00" * 4)
    elif how == "unsupported-arch":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama4_text"}))
    elif how == "quantized":  # e.g. gpt-oss's MXFP4 experts: stored as *_blocks + *_scales, not floats
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "mxfp4"}}))
    elif how == "pickle-only":
        for f in folder.glob("*.safetensors*"):
            f.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"not read")
    return folder


BROKEN = {
    "no-config": r"is not a checkpoint folder: it has no config\.json",
    "missing-shard": r"1 shard\(s\) listed in model\.safetensors\.index\.json are missing: model-00002-of-",
    "truncated-shard": r"model-00002-of-\d+\.safetensors is truncated: .* the file has \d+ bytes",
    "not-safetensors": r"model-00002-of-\d+\.safetensors is not a safetensors file",
    "unsupported-arch": r"model_type 'llama4_text' is not supported: Llama-4 multiplies each expert's input",
    "quantized": r"quant_method 'mxfp4'\) is not supported for model_type 'mixtral'.* dequantizes mxfp4 \(gpt_oss\)",
    "pickle-only": r"no \*\.safetensors weights \(pytorch_model\.bin are pickle files",
}


@pytest.mark.parametrize("how", BROKEN)
def test_a_broken_folder_is_one_line_exit_3_and_nothing_written(run_cli, tmp_path, how):
    folder = _broken(tmp_path, how)
    out = tmp_path / "out"
    result = run_cli("compile", folder, "-o", out)
    assert result.exit_code == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "internal error" not in result.stderr, result.stderr
    import re

    assert re.search(BROKEN[how], errors[0]), errors[0]
    assert not out.exists()


def _mxfp4_folder(tmp_path) -> Path:
    """A GPT-OSS folder whose experts are stored as MXFP4, as the released gpt-oss checkpoints are.

    Each expert matrix is ``<proj>_blocks`` (uint8: two FP4 e2m1 values per byte, 32 values per
    block along the input) and ``<proj>_scales`` (uint8: the block's power of two, bias 127);
    config.json says ``quantization_config: {"quant_method": "mxfp4"}``. The values are random.
    """
    from safetensors.torch import load_file, save_file

    config = tmp_path / "gpt-oss-32.json"  # MXFP4 needs each expert input width a multiple of 32
    config.write_text(json.dumps({"base": "hf-gpt-oss-micro", "intermediate_size": 32}))
    model = resolve_model(str(config)).build()
    folder = tmp_path / "gpt-oss-mxfp4"
    model.save_pretrained(folder)
    cfg = model.config
    n, hidden, inter = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    state = load_file(folder / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts."
        for proj, (rows, cols) in {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}.items():
            del state[prefix + proj]
            shape = (n, rows, cols // 32)
            state[prefix + proj + "_blocks"] = torch.randint(0, 256, (*shape, 16), generator=gen, dtype=torch.uint8)
            state[prefix + proj + "_scales"] = torch.randint(122, 127, shape, generator=gen).to(torch.uint8)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


@torch.no_grad()
def test_an_mxfp4_gpt_oss_folder_compiles_from_its_dequantized_experts(run_cli, tmp_path):
    from transformers import GptOssForCausalLM

    folder = _mxfp4_folder(tmp_path)
    out = tmp_path / "out"
    result = run_cli("compile", folder, "--max-seq", "40", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    # transformers' own load of the folder dequantizes the MXFP4 blocks: the reference the bundle must match.
    lib = GptOssForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lib.generation_config.eos_token_id = None
    ids = np.random.default_rng(0).integers(3, 320, (2, 9))
    want = lib(torch.from_numpy(ids)).logits.numpy()
    session = Session(out)
    got = session.run(ids)
    assert np.abs(got - want).max() <= 1e-4 and np.abs(want).max() > 0.1
    # Not the float model the config builds with random experts: the MXFP4 values were read.
    floats = resolve_model(str(tmp_path / "gpt-oss-32.json")).build()
    assert np.abs(floats(torch.from_numpy(ids)).logits.numpy() - want).max() > 1e-2
    prompt = ids[0]
    seq = lib.generate(torch.from_numpy(prompt)[None], max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert list(session.generate(prompt, 24)) == seq[0, len(prompt) :].tolist()
    result = run_cli("verify", out, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["passed"]
