"""The shipped trained byte-level LMs (mixtral-lm-bytes, mixtral-lm-bytes-local): checkpoints, held-out text,
data splits, routing locality, swap plans."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from edgemoe.bundle.format import read_manifest, sha256_file
from edgemoe.frontends.moe_lm import MoELMAdapter
from edgemoe.models import resolve_model
from edgemoe.models.moe_lm import text
from edgemoe.models.moe_lm.train import balance_loss, expert_usage, heldout_bits, locality_loss, train
from edgemoe.runtime import Session
from edgemoe.schedule import plan_bundle, record_trace
from edgemoe.schedule.planner import recency_table
from edgemoe.schedule.simulate import simulate
from edgemoe.schedule.traces import Step, Trace
from edgemoe.swap import ThrashWarning, expert_sizes, make_policy

HERE = Path(__file__).resolve().parents[1] / "models" / "moe_lm"
TRAINED = ("mixtral-lm-bytes", "mixtral-lm-bytes-local")


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def metrics_of(name: str) -> dict:
    return json.loads((HERE / f"{name}.metrics.json").read_text())


@pytest.fixture(scope="module")
def trained():
    return resolve_model("mixtral-lm-bytes").build()


@pytest.mark.parametrize("name", TRAINED)
def test_checkpoint_is_the_recorded_one(name):
    metrics, ckpt = metrics_of(name), HERE / f"{name}.safetensors"
    assert metrics["checkpoint_sha256"] == sha256_file(ckpt)
    assert metrics["checkpoint_bytes"] == ckpt.stat().st_size <= 5 * 2**20
    assert resolve_model(name).weights == str(ckpt)
    assert resolve_model("mixtral-lm-micro").weights is None  # the random-weight configs stay as they were


@pytest.mark.parametrize("name", TRAINED)
def test_heldout_bits_per_byte_beat_the_unigram_baseline(name):
    metrics = metrics_of(name)
    held = text.split("heldout")
    bits = heldout_bits(resolve_model(name).build(), held, limit=8)  # 1024 held-out bytes
    unigram = text.unigram_bits(text.split("train"), held[: 8 * 128 + 1])
    assert bits < unigram - 2.0, (bits, unigram)
    if text.corpus_sha256() == metrics["corpus"]["sha256"]:  # same Python docs as at training time
        assert metrics["heldout"]["bits_per_byte"] < metrics["heldout"]["unigram_bits_per_byte"] - 2.0
        assert abs(bits - metrics["heldout"]["bits_per_byte"]) < 0.5


def test_locality_training_keeps_experts_from_byte_to_byte():
    """The locality loss makes consecutive bytes share experts, at a small cost in held-out bits."""
    held = text.split("heldout")
    kept, bits = {}, {}
    for name in TRAINED:
        model = resolve_model(name).build()
        kept[name] = np.mean(expert_usage(model, held, windows=32)["kept_from_previous_token"])
        bits[name] = heldout_bits(model, held, limit=8)
    # Only the local model was trained with the locality loss.
    assert metrics_of("mixtral-lm-bytes-local")["training"]["locality"] > 0
    assert metrics_of("mixtral-lm-bytes")["training"].get("locality", 0) == 0
    assert kept["mixtral-lm-bytes"] < 0.6 < 0.8 < kept["mixtral-lm-bytes-local"], kept
    assert bits["mixtral-lm-bytes-local"] < bits["mixtral-lm-bytes"] + 0.3, bits


def test_splits_are_disjoint_and_the_adapter_draws_from_them(trained):
    parts = {name: bytes(text.split(name)) for name in text.SPLITS}
    assert sum(len(p) for p in parts.values()) == len(text.corpus())
    assert b"".join(parts[n] for n in ("train", "calibration", "heldout")) == text.corpus()
    adapter = MoELMAdapter(trained)
    calib = adapter.calibration_inputs(3, 1234)
    held, targets = adapter.evaluation_data(3, 1234)
    assert calib.dtype == held.dtype == np.int64 and calib.shape[1] == held.shape[1] > 32
    for row in calib:
        assert bytes(row.astype(np.uint8)) in parts["calibration"]
    for row, nxt in zip(held, targets["lm"], strict=True):
        assert bytes(row.astype(np.uint8)) in parts["heldout"]
        np.testing.assert_array_equal(row[1:], nxt[:-1])
    name, value, higher = adapter.task_metric("lm", adapter.reference(held, "lm"), targets["lm"], None)
    assert name == "bits_per_token" and not higher and 0 < value < 4
    # A random-weight LM keeps random calibration ids.
    micro = MoELMAdapter(resolve_model("switch-lm-micro").build())
    assert micro.calibration_inputs(2, 0).shape == (2, 32) and micro.evaluation_data(2, 0)[1] is None


def test_training_is_seeded_and_balances_experts():
    a, hist = train(steps=2, batch=2, seq=16, log=lambda _: None, log_every=1)
    b, _ = train(steps=2, batch=2, seq=16, log=lambda _: None, log_every=1)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert len(hist) == 2 and all(h["bits_per_byte"] > 0 and h["balance"] >= 1.0 - 1e-4 for h in hist)
    # Uniform routing gives exactly 1; everything on one expert gives E.
    uniform = [(torch.zeros(4, 8), torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]]))]
    assert balance_loss(uniform, 8).item() == pytest.approx(1.0)
    skewed = [(torch.tensor([[9.0] + [0.0] * 7] * 4), torch.zeros(4, 1, dtype=torch.long))]
    assert balance_loss(skewed, 8).item() > 7.9


def test_locality_loss_counts_router_mass_off_the_previous_tokens_experts():
    # One window of 6 tokens, 8 experts, top-2, router mass all on the chosen pair.
    def records(pairs):
        idx = torch.tensor(pairs)
        logits = torch.full((len(pairs), 8), -30.0).scatter(1, idx, 30.0)
        return [(logits, idx)]

    sticky = records([[0, 1]] * 6)
    assert locality_loss(sticky, 1, 8).item() == pytest.approx(0.0, abs=1e-6)
    flip = records([[0, 1], [2, 3]] * 3)  # every token leaves both of its predecessor's experts
    assert locality_loss(flip, 1, 8).item() == pytest.approx(1.0, abs=1e-6)
    half = records([[0, 1], [1, 2]] * 3)  # one expert kept: half the mass stays
    assert locality_loss(half, 1, 8).item() == pytest.approx(0.5, abs=1e-6)
    # Two windows of 3: the step from one window's last token to the next window's first is not counted.
    assert locality_loss(records([[0, 1]] * 3 + [[2, 3]] * 3), 2, 8).item() == pytest.approx(0.0, abs=1e-6)
    # The loss trains: its gradient moves router mass toward the previous token's experts.
    logits = torch.zeros(4, 8, requires_grad=True)
    locality_loss([(logits, torch.tensor([[0, 1]] * 4))], 1, 8).backward()
    assert (logits.grad[1:, :2] < 0).all() and (logits.grad[1:, 2:] > 0).all()


def test_recency_table_counts_visits_since_last_use():
    # One layer, two experts: expert 0 every other visit, expert 1 every visit.
    steps = tuple(Step(u, 0, (0, 1) if u % 2 == 0 else (1,), (1, 1) if u % 2 == 0 else (1,), None) for u in range(400))
    trace = Trace("lm", "token", 1, (2,), steps, "calibration")
    (table,) = recency_table(trace, visits=3, prior=0.0)
    # Last used 1 visit ago: expert 1 (~400 cases) always comes back next visit, expert 0 (~200) never: h[1] = 2/3.
    # Last used 2 visits ago: only expert 0, always back: E[2] = 1. So E[1] = 1 + 1/3 * 1.
    assert table[:2] == pytest.approx([4 / 3, 1.0], abs=2e-3)


def test_planned_policy_on_the_trained_lm(bundle_factory):
    """The plan's recency-aware planned policy: runtime and simulator agree, and it beats LRU on held-out text."""
    bundle = bundle_factory("mixtral-lm-bytes")
    m = read_manifest(bundle)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ThrashWarning)
        r = plan_bundle(bundle, "jetson-orin-nano-8gb", "25%", "planned", heldout=2, write=True)
    plan = read_manifest(bundle)["schedule"]["tasks"]["lm"]
    assert len(plan["recency"]) == len(m["moe_layers"]) and all(e >= 1 for row in plan["recency"] for e in row)
    p = r["policies"]
    assert p["lru"]["hit_rate"] < p["planned"]["hit_rate"] <= p["belady"]["hit_rate"]
    # Runtime: one run per held-out window (the whole sequence per layer); the simulator replays the same runs.
    held, _ = MoELMAdapter(resolve_model("mixtral-lm-bytes").build()).evaluation_data(3, 99)
    sizes = expert_sizes(m, "lm")
    budget = 3 * max(sizes.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ThrashWarning)
        session = Session(bundle, "lm", memory_budget=budget, policy="planned", prefetch=None)
    assert session._cache.policy.recency == plan["recency"]
    for i in range(len(held)):
        session.run(held[i : i + 1, :24])
    trace = record_trace(bundle, "lm", held[:, :24], "run")
    sim = simulate(trace, sizes, budget, make_policy("planned", plan["probability"], plan["recency"]))
    st = session.stats
    assert st.cache_misses == sim.misses > 0 and st.cache_hits == sim.hits and st.evictions == sim.evictions


@pytest.mark.parametrize("budget", ["25%", "50%"])
def test_planned_policy_near_belady_on_the_locality_lm(bundle_factory, budget):
    """Per-token decode traces of held-out text: the plan (calibration only) reaches 0.95 x Belady's MIN."""
    bundle = bundle_factory("mixtral-lm-bytes-local")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ThrashWarning)
        r = plan_bundle(bundle, "jetson-orin-nano-8gb", budget, "planned", heldout=16, write=False)
    p = r["policies"]
    assert r["schedule"]["granularity"] == "token"
    assert p["planned"]["hit_rate"] >= 0.95 * p["belady"]["hit_rate"], {k: v["hit_rate"] for k, v in p.items()}
    if budget == "50%":  # at 25 % the cache holds one byte's experts: a wrong guess evicts a needed one
        assert max(q["accuracy"] for q in r["prefetch"].values()) >= 0.8
