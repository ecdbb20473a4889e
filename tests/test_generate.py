"""Generation on a bundle's key/value cache (compile --max-seq, Session.generate, edgemoe generate)."""

import json

import numpy as np
import pytest
import torch
from helpers import read_manifest

from edgemoe.errors import BundleError, ConfigError, InputError, ModelError
from edgemoe.models import resolve_model
from edgemoe.models.hf.configs import CONFIGS
from edgemoe.runtime import Session

MAX_SEQ = 80
NEW = 64
# Every named hf causal LM (the SwitchTransformers encoder has nothing to generate with).
LMS = sorted(name for name, cfg in CONFIGS.items() if cfg["arch"] != "switch_transformers")

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


def _prompt(seed: int = 0, n: int = 9) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 320, n)


@torch.no_grad()
def _library_greedy(name: str, prompt: np.ndarray, new: int, logits: bool = False):
    """transformers' own greedy ``generate`` (its KV cache), and the logits of each step if asked."""
    model = resolve_model(name).build()
    model.generation_config.eos_token_id = None  # the bundle's generate stops only where asked to
    out = model.generate(
        torch.from_numpy(prompt)[None],
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    return (tokens, np.stack([step[0].numpy() for step in out.logits])) if logits else tokens


@pytest.mark.parametrize("name", LMS)
def test_greedy_generation_is_token_identical_to_transformers(name, bundle_factory):
    bundle = bundle_factory(name, max_seq=MAX_SEQ)
    session = Session(bundle)
    prompt = _prompt()
    got, logits = [], []
    for token in session.generate(prompt, NEW):
        got.append(token)
        logits.append(session.last_logits)
    want, want_logits = _library_greedy(name, prompt, NEW, logits=True)
    assert got == want, name
    # Every step's logits, not only their argmax: random micro models often settle on repeating one
    # token, and equal argmaxes alone would hide a cache that is off by a little.
    assert np.abs(np.stack(logits) - want_logits).max() <= 1e-4, name
    assert np.abs(want_logits).max() > 0.5
    stats = session.last_generation
    assert stats.prompt_tokens == len(prompt) and stats.tokens == NEW
    assert stats.ttft_ms > 0 and stats.decode_tok_s > 0


def test_generation_graphs_carry_a_cache_per_attention_layer(bundle_factory):
    manifest = read_manifest(bundle_factory("hf-deepseek-v3-micro", max_seq=MAX_SEQ))
    gen = manifest["generate"]
    assert gen["max_seq"] == MAX_SEQ
    assert len(gen["segments"]) == len(manifest["segments"])
    caches = [c for s in gen["segments"] for c in s["cache"]]
    # 3 attention layers (one dense), each its compressed MLA latents: (1 head, positions, width).
    assert len(caches) == 6 and all(c["shape"][:2] == [1, MAX_SEQ] for c in caches)
    assert {manifest["graphs"][s["graph"]]["kind"] for s in gen["segments"]} <= {"step_segment", "segment"}


def test_sliding_window_and_prompts_longer_than_it(bundle_factory):
    """Mixtral's window is 8: a 20-token prompt and 40 new tokens run well past it."""
    session = Session(bundle_factory("hf-mixtral-micro", max_seq=MAX_SEQ))
    prompt = _prompt(seed=3, n=20)
    assert list(session.generate(prompt, 40)) == _library_greedy("hf-mixtral-micro", prompt, 40)


def test_generation_under_an_expert_budget_gives_the_same_tokens(bundle_factory):
    bundle = bundle_factory("hf-olmoe-micro", max_seq=MAX_SEQ)
    prompt = _prompt(seed=1)
    full = list(Session(bundle).generate(prompt, 32))
    session = Session(bundle, memory_budget="25%", policy="lru")
    assert list(session.generate(prompt, 32)) == full
    stats = session.stats
    assert stats.peak_expert_bytes <= stats.memory_budget
    assert stats.evictions > 0 and stats.cache_misses > 0  # experts swapped per decoded token
    assert stats.runs == 32  # one prefill step, then one step per further token
    # routed: each token's misses load while its cached experts run; same tokens, no guessed loads
    session = Session(bundle, memory_budget="25%", policy="lru", prefetch="routed")
    assert list(session.generate(prompt, 32)) == full
    assert session.stats.cache_misses > 0 and session.stats.prefetch_issued == 0


def test_a_generating_session_holds_one_copy_of_the_trunk(bundle_factory, tmp_path):
    import shutil

    from edgemoe.errors import IntegrityError

    bundle = bundle_factory("hf-mixtral-micro", max_seq=MAX_SEQ)
    m = read_manifest(bundle)
    plain, gen = set(m["segments"]), {s["graph"] for s in m["generate"]["segments"]}
    session = Session(bundle)
    list(session.generate(_prompt(), 4))
    loaded = set(session.program.loaded())
    # the plain segments hold the same dense weights again (the last one, without attention, serves both)
    assert gen <= loaded and not (plain - gen) & loaded and plain - gen
    before = session.stats.graph_bytes
    # a plain run loads them then, and gives a fresh session's outputs
    x = np.random.default_rng(3).integers(3, 320, (1, 12))
    np.testing.assert_array_equal(session.run(x), Session(bundle).run(x))
    assert plain <= set(session.program.loaded()) and session.stats.graph_bytes > before
    # still checked when a session opens: a changed segment file is refused before anything runs
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    path = copy / m["graphs"][m["segments"][0]]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        Session(copy)


def test_sampling_is_seeded_and_stops_at_the_stop_token(bundle_factory):
    session = Session(bundle_factory("hf-qwen3-moe-micro", max_seq=MAX_SEQ))
    prompt = _prompt(seed=2)
    a = list(session.generate(prompt, 24, temperature=1.0, top_p=0.9, seed=7))
    assert a == list(session.generate(prompt, 24, temperature=1.0, top_p=0.9, seed=7))
    assert a != list(session.generate(prompt, 24, temperature=1.0, top_p=0.9, seed=8))
    stop = a[5]
    cut = list(session.generate(prompt, 24, temperature=1.0, top_p=0.9, seed=7, stop=stop))
    assert cut == a[: a.index(stop) + 1]


def test_generation_errors(bundle_factory):
    with pytest.raises(BundleError, match="no generation graphs: compile the model with --max-seq"):
        Session(bundle_factory("hf-olmoe-micro")).generate(_prompt(), 4)
    session = Session(bundle_factory("hf-olmoe-micro", max_seq=MAX_SEQ))
    with pytest.raises(InputError, match=r"need 89 cache positions; the bundle has 80"):
        session.generate(_prompt(n=10), 80)
    with pytest.raises(InputError, match="non-empty 1-D"):
        session.generate(np.zeros((2, 3), dtype=np.int64), 4)
    with pytest.raises(InputError, match=r"ids must lie in \[0, 320\)"):
        session.generate(np.array([5, 320]), 4)
    with pytest.raises(ConfigError, match="temperature"):
        session.generate(_prompt(), 4, temperature=-1.0)
    with pytest.raises(ModelError, match="generation graphs are built for causal LMs"):
        bundle_factory("hf-switch-micro", max_seq=MAX_SEQ)


def test_generate_cli_streams_tokens_and_reports_json(run_cli, bundle_factory):
    bundle = bundle_factory("hf-granitemoe-micro", max_seq=MAX_SEQ)
    prompt = _prompt(seed=4)
    ids = ",".join(str(i) for i in prompt)
    result = run_cli("generate", bundle, "--prompt-ids", ids, "--max-new-tokens", "12", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tokens"] == _library_greedy("hf-granitemoe-micro", prompt, 12)
    assert report["prompt_tokens"] == len(prompt) and report["ttft_ms"] > 0
    assert {"prefill_tok_s", "decode_tok_s", "cache"} <= set(report)
    assert report["cache"]["misses"] > 0
    text = run_cli("generate", bundle, "--prompt-ids", ids, "--max-new-tokens", "12")
    assert text.exit_code == 0, text.output
    assert text.stdout.split() == [str(t) for t in report["tokens"]]
    bad = run_cli("generate", bundle, "--prompt-ids", "1,x", "--max-new-tokens", "2")
    assert bad.exit_code != 0 and "--prompt-ids" in bad.stderr


@torch.no_grad()
def _recompute_greedy(name: str, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step (no cache at all)."""
    model = resolve_model(name).build().eval()
    ids = torch.tensor([prompt])
    for _ in range(new):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt) :].tolist()


def test_byte_level_model_generates_text(run_cli, bundle_factory):
    bundle = bundle_factory("mixtral-lm-bytes", max_seq=128)
    assert read_manifest(bundle)["tokenizer"] == {"kind": "bytes"}
    prompt = "The for statement"
    result = run_cli("generate", bundle, "--prompt", prompt, "--max-new-tokens", "48", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tokens"] == _recompute_greedy("mixtral-lm-bytes", list(prompt.encode()), 48)
    assert report["text"] == bytes(report["tokens"]).decode("utf-8", errors="replace")
    assert sum(c.isalpha() for c in report["text"]) > 20  # the trained model writes words
    streamed = run_cli("generate", bundle, "--prompt", prompt, "--max-new-tokens", "48")
    assert streamed.stdout.strip() == report["text"].strip()


def _tokenizer_json(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["edge devices run mixture of experts models with an expert cache"] * 20, trainer)
    tok.save(str(path))
    return tok


def test_a_checkpoint_folders_tokenizer_comes_with_the_bundle(run_cli, tmp_path):
    folder = tmp_path / "olmoe"
    model = resolve_model("hf-olmoe-micro").build()
    model.save_pretrained(folder)
    tok = _tokenizer_json(folder / "tokenizer.json")
    out = tmp_path / "bundle"
    assert run_cli("compile", folder, "--max-seq", "64", "-o", out, "-q").exit_code == 0
    record = read_manifest(out)["tokenizer"]
    assert record["kind"] == "tokenizers" and record["file"] == "tokenizer.json"
    prompt = "edge devices run experts"
    result = run_cli("generate", out, "--prompt", prompt, "--max-new-tokens", "20", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    ids = np.array(tok.encode(prompt).ids)
    assert report["prompt_tokens"] == len(ids)
    assert report["tokens"] == _library_greedy("hf-olmoe-micro", ids, 20)
    assert report["text"] == tok.decode(report["tokens"])
    # The copy is a checked file: a changed byte stops the run before the tokenizer is parsed.
    data = bytearray((out / "tokenizer.json").read_bytes())
    data[10] ^= 1
    (out / "tokenizer.json").write_bytes(bytes(data))
    bad = run_cli("generate", out, "--prompt", prompt, "--max-new-tokens", "2")
    assert bad.exit_code == 6 and "tokenizer.json" in bad.stderr
    # Without a tokenizer, a text prompt is refused and ids are asked for.
    plain = run_cli("generate", tmp_path / "nope", "--prompt", prompt)
    assert plain.exit_code != 0


def test_tvm_bundles_generate_too(bundle_factory):
    bundle = bundle_factory("hf-mixtral-micro", max_seq=MAX_SEQ, target="tvm")
    prompt = _prompt(seed=5)
    assert list(Session(bundle).generate(prompt, 24)) == _library_greedy("hf-mixtral-micro", prompt, 24)
