"""Plain-text rendering of the CLI's results (the ``--json`` forms are the dicts themselves)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def ranges(items) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``0-2,5,7-8``."""
    items = sorted(items)
    out, start = [], None
    for i, v in enumerate(items):
        if start is None:
            start = v
        if i + 1 == len(items) or items[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out) or "-"


def table(headers: list[str], rows: list[list], align: str = "") -> str:
    """A fixed-width text table; ``align`` holds 'l' or 'r' per column (default: right for numbers)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if not align:
        align = "".join("r" if rows and isinstance(rows[0][i], (int, float)) else "l" for i in range(len(headers)))
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align, strict=True))
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def render_verify(rep: dict) -> str:
    """``edgemoe verify`` table."""
    rows = []
    for name, t in rep["tasks"].items():
        rows.append(
            [
                name,
                "x".join(str(d) for d in t["output_shape"]),
                f"{t['max_abs_error']:.2e}",
                f"{t['max_abs_error_unpruned']:.2e}",
                f"{t['experts_loaded']}/{t['experts_total']}",
                f"{human_bytes(t['expert_bytes_loaded'])} / {human_bytes(t['expert_bytes_total'])}",
                f"{t['latency_ms']:.2f}",
                f"{t['metric_name']} {t['metric']:.4g} (fp32 {t['metric_fp32']:.4g})",
                "ok" if t["passed"] else "FAIL",
            ]
        )
    head = f"{rep['model']} bundle {rep['bundle']}: {rep['samples']} sample inputs (seed {rep['seed']}), " + (
        f"tolerance {rep['tolerance']:g}"
        if rep["tolerance"] is not None
        else f"{rep['quantization']} bundle: error reported, metric vs fp32 is the check"
    )
    body = table(
        ["task", "output", "max|err|", "vs unpruned", "experts", "expert bytes loaded/total", "ms (b=1)", "metric", ""],
        rows,
        "llrrrrrll",
    )
    notes = []
    for name, t in rep["tasks"].items():
        x = t.get("extra") or {}
        if "mse" in x:
            same = "yes" if x.get("csim_equals_emulator") else f"NO ({x.get('values_differing')} values differ)"
            notes.append(
                f"{name}: output MSE vs PyTorch {x['mse']:.2e} on this batch (C simulation), "
                f"{x['mse_heldout']:.2e} on the held-out inputs (pass at <= {x['mse_tolerance']:g}); "
                f"C simulation equals the emulator bit for bit: {same}; ms = {x.get('latency_source', '')}"
            )
    return "\n".join([head, body, *notes])


def render_run(res: dict) -> str:
    """``edgemoe run`` summary."""
    lines = [
        f"task {res['task']}: output {'x'.join(str(d) for d in res['output_shape'])} from {res['input']} input",
        f"latency      {res['latency_ms']:.2f} ms (median of {res['runs']}; first run {res['first_run_ms']:.2f} ms)",
        f"experts      {res['experts_loaded']} loaded / {res['experts_task']} kept for the task / "
        f"{res['experts_total']} in the model",
        f"expert bytes {human_bytes(res['expert_bytes_loaded'])} loaded / {human_bytes(res['expert_bytes_total'])} "
        "in the model",
        f"graph bytes  {human_bytes(res['graph_bytes'])}",
    ]
    if res.get("driver") == "csim":
        lines.insert(2, "             (the accelerator in C simulation; `edgemoe inspect` shows its board estimate)")
    prov = res.get("providers") or {}
    if prov.get("used"):
        lines.append(f"providers    {', '.join(prov['used'])}")
    c = res.get("cache")
    if c:
        budget = "unbounded" if c["budget_bytes"] is None else human_bytes(c["budget_bytes"])
        source = " (bundle schedule)" if c["from_schedule"] else ""
        lines.append(
            f"cache        budget {budget}{source}, {c['policy']}, prefetch {c['prefetch'] or 'off'}: "
            f"peak {human_bytes(c['peak_expert_bytes'])}, {c['hits']} hits, {c['misses']} misses, "
            f"{c['evictions']} evictions, {c['prefetched']} prefetched ({c['prefetch_hits']} used), "
            f"stall {c['stall_ms']:.1f} ms, {human_bytes(c['bytes_read'])} read"
        )
    if res.get("output_file"):
        lines.append(f"output saved to {res['output_file']}")
    if res.get("png_files"):
        lines.append(f"pictures     {', '.join(res['png_files'])}")
    return "\n".join(lines)


def render_bundle(d: dict) -> str:
    """``edgemoe inspect BUNDLE``."""
    m, tot = d["model"], d["totals"]
    out = [
        f"bundle {d['bundle']}: {m['name']} ({m['family']}, {m['granularity']}-level MoE, {m['params']:,} params)",
        f"target {d['target']['name']} (executor {d['target']['executor']}), device {d['device']}, "
        f"pruned: {'yes' if d['pruned'] else 'no'}, {human_bytes(d['bundle_bytes'])} on disk"
        + (", all files verified" if d["checked"] else ""),
        f"experts: {tot['experts_bundle']} of {tot['experts_model']} shipped "
        f"({human_bytes(tot['expert_bytes_bundle'])} of {human_bytes(tot['expert_bytes_model'])})",
        "",
        table(
            ["graph", "kind", "task", "bytes"],
            [[g["name"], g["kind"], g["task"] or "-", human_bytes(g["bytes"])] for g in d["graphs"]],
            "lllr",
        ),
        "",
        table(
            ["MoE layer", "block", "experts", "top-k", "expert shape", "shipped", "bytes", "bits per shipped expert"],
            [
                [
                    layer["index"],
                    layer["block"],
                    layer["num_experts"],
                    layer["top_k"],
                    "x".join(map(str, layer["expert_shape"])),
                    len(layer["experts_in_bundle"]),
                    human_bytes(layer["expert_bytes_in_bundle"]),
                    " ".join(str(e["bits"]) for e in layer["experts"]),
                ]
                for layer in d["moe_layers"]
            ],
            "rrrrrrrl",
        ),
        "",
    ]
    rows = []
    for name, t in d["tasks"].items():
        sets = " | ".join(ranges(s) for s in t["experts"])
        rows.append([name, t["experts_kept"], human_bytes(t["expert_bytes"]), human_bytes(t["graph_bytes"]), sets])
    out.append(
        table(
            ["task", "kept", "expert bytes", "graph bytes", "experts per layer (layer 0 | layer 1 | ...)"],
            rows,
            "lrrrl",
        )
    )
    return "\n".join(out + _quant_lines(d) + _hls_lines(d))


def _hls_lines(d: dict) -> list[str]:
    """The accelerator part of ``inspect BUNDLE`` (HLS bundles)."""
    h = d.get("hls")
    if not h:
        return []
    e, t = h["estimate"], h["tiles"]
    out = [
        "",
        f"accelerator for {e['part']} at {e['clock_mhz']:.0f} MHz (estimate, not synthesised): "
        f"{e['dsp']:,} DSP, {e['bram_18k']:,} BRAM18K, {e['uram']:,} URAM, {e['lut']:,} LUT, {e['ff']:,} FF; "
        f"{e['latency_ms']:.2f} ms per image",
        f"tiles: linear unit {t['tile_in']}x{t['tile_out']}, {t['attn_par']} attention lanes, "
        f"expert chunks of {t['expert_chunk']}",
        "types: " + ", ".join(f"{c} {ty}" for c, ty in h["types"].items()),
    ]
    acc = h.get("accuracy")
    if acc:
        rows = [
            [task, a["metric_name"], f"{a['metric']:.4f}", f"{a['metric_fp32']:.4f}", f"{a['mse_vs_fp32']:.2e}"]
            for task, a in acc["tasks"].items()
        ]
        out += ["", f"accuracy on {acc['samples']} held-out inputs ({acc.get('by', 'emulator')})"]
        out.append(table(["task", "metric", "fixed point", "fp32", "MSE vs fp32"], rows, "llrrr"))
    if h.get("range_report"):
        out.append(f"{len(h['range_report'])} tensors exceed their type's range (saturate): --json hls.range_report")
    return out


def _quant_lines(d: dict) -> list[str]:
    """The quantization and accuracy part of ``inspect BUNDLE``."""
    out: list[str] = []
    q = d.get("quantization") or {}
    if q.get("scheme", "fp32") != "fp32" or q.get("mixed_precision"):
        mp = q.get("mixed_precision")
        line = f"quantization: {q['scheme']} (dense partitions {q['dense_scheme']}, gates fp32), "
        line += f"{q['avg_expert_bits']:.2f} bits per expert weight on average"
        if mp:
            line += f"; mixed precision solved in {mp['solve_seconds']:.2f} s"
        out += ["", line]
    acc = d.get("accuracy")
    if acc:
        ratio = ""
        if acc["size_ratio"]:
            ratio = f" = {acc['size_ratio']:.3f}x fp32 ({human_bytes(acc['bundle_bytes_fp32'])})"
        rows = [
            [t, a["metric_name"], f"{a['metric']:.4f}", f"{a['metric_fp32']:.4f}", f"{a['max_abs_error_vs_fp32']:.3g}"]
            for t, a in acc["tasks"].items()
        ]
        out += [
            "",
            f"accuracy on {acc['samples']} held-out inputs; bundle {human_bytes(acc['bundle_bytes'])}{ratio}",
            table(["task", "metric", "quantized", "fp32", "max|err| vs fp32"], rows, "llrrr"),
        ]
    return out


def render_model(d: dict) -> str:
    """``edgemoe inspect MODEL``."""
    out = [
        f"model {d['name']}: {d['family']} family, {d['granularity']}-level MoE, {d['params']:,} params",
        f"input {d['input']['name']} {d['input']['shape']} {d['input']['dtype']}; tasks: "
        + ", ".join(f"{t['name']} -> {t['output']['shape']}" for t in d["tasks"]),
        f"{d['experts']} experts in {len(d['moe_layers'])} MoE layers, {human_bytes(d['expert_bytes_fp32'])} of "
        "expert weights (fp32)",
        "",
        table(["segment", "contents"], [[s["index"], s["description"]] for s in d["segments"]], "rl"),
        "",
    ]
    rows = []
    for layer in d["moe_layers"]:
        e = layer["expert"]
        windows = "; ".join(
            f"{r['task'] or 'all'}: {r['window'][0]}..{r['window'][-1]}" if r["window"] else "all"
            for r in layer["routers"]
        )
        rows.append(
            [
                layer["index"],
                layer["block"],
                layer["num_experts"],
                layer["top_k"],
                f"{e['d_model']}x{e['hidden']} {e['activation']}",
                human_bytes(e["bytes_fp32"]),
                windows,
            ]
        )
    out.append(
        table(["MoE layer", "block", "experts", "top-k", "expert", "bytes/expert", "router windows"], rows, "rrrrlrl")
    )
    return "\n".join(out)


def render_models(models: list[dict]) -> str:
    """``edgemoe models``."""
    rows = [
        [
            m["name"],
            m["family"],
            f"{m['params']:,}",
            m["experts"],
            f"{m['experts_per_layer']} x {m['moe_layers']}",
            m["top_k"],
            human_bytes(m["expert_bytes"]),
            ",".join(m["tasks"]),
            m["description"],
        ]
        for m in models
    ]
    return table(
        ["model", "family", "params", "experts", "per layer x layers", "top-k", "bytes/expert", "tasks", "description"],
        rows,
        "llrrrrrll",
    )


def render_devices(devices: list[dict]) -> str:
    """``edgemoe devices``."""
    rows = [
        [
            d["name"],
            d["cpu_arch"],
            d["cpu"],
            d["accelerator"],
            d["cuda_arch"] or "-",
            human_bytes(d["memory_bytes"]),
            f"{d['memory_bandwidth_gbs']:g}" if d["memory_bandwidth_gbs"] else "-",
        ]
        for d in devices
    ]
    return table(["device", "arch", "cpu", "accelerator", "cuda", "memory", "GB/s"], rows, "llllrrr")


def render_bench(res: dict) -> str:
    """``edgemoe bench`` table: one line per graph, one per task."""
    where = f"remote {res['remote']} ({res['device']})" if res["remote"] else f"this host ({res['device']})"
    lines = [
        f"bundle {res['bundle']} ({res['target']}) on {where}; batch {res['batch']}, "
        f"median of {res['repeat']} (graphs: {res['graph_timer']})"
    ]
    for task, t in res["tasks"].items():
        lines.append("")
        lines.append(f"task {task}: {t['task_ms']['median_ms']:.3f} ms per run (mean {t['task_ms']['mean_ms']:.3f})")
        lines.append(f"  {'graph':<28} {'calls':>5} {'median ms':>10} {'mean ms':>10}")
        for name, g in t["graphs"].items():
            lines.append(f"  {name:<28} {g['calls']:>5} {g['median_ms']:>10.4f} {g['mean_ms']:>10.4f}")
        lines.append(f"  {'sum over calls':<28} {'':>5} {t['graph_sum_ms']:>10.4f}")
    return "\n".join(lines)


def render_plan(result: dict) -> str:
    """Human summary of a :func:`~edgemoe.schedule.planner.plan_bundle` result (``edgemoe plan``)."""
    lines = [
        f"{result['bundle']} on {result['device']}: budget {result['budget_bytes']} B "
        f"(cache {result['cache_bytes']} B for {result['expert_bytes']} B of routed experts, "
        f"{result['shared_bytes']} B shared), peak {result['peak_bytes']} B",
        "held-out hit rate (plans from calibration traces only):",
    ]
    belady = result["policies"]["belady"]["hit_rate"]
    for name, r in result["policies"].items():
        rel = f"  ({r['hit_rate'] / belady:.2f} x Belady)" if belady and name != "belady" else ""
        lines.append(
            f"  {name:8s} {r['hit_rate']:.3f}  misses {r['misses']:5d}  moved {r['bytes_moved']:>11d} B  "
            f"stall {r['stall_s'] * 1e3:.2f} ms{rel}"
        )
    lines.append(
        f"prefetch with the '{result['policy']}' policy (accuracy: needed experts loaded or loading; stall on "
        f"{result['device']}, loads overlapping compute):"
    )
    for name, r in result["prefetch"].items():
        recall = "-" if r["recall"] is None else f"{r['recall']:.3f}"
        stall = r["stall_s"] * 1e3
        lines.append(f"  {name:8s} accuracy {r['accuracy']:.3f}  predictor recall {recall}  stall {stall:.2f} ms")
    if result["predictor"] is None:
        lines.append(
            f"plan: policy {result['policy']}, no prefetch (on calibration traces no predictor stalls less than "
            "loading on demand)"
        )
    else:
        lines.append(f"plan: policy {result['policy']}, prefetch {result['predictor']}")
    demand = result["policies"].get(result["policy"], {}).get("stall_s")
    chosen = result["prefetch"].get(result["predictor"], {}).get("stall_s")
    if demand is not None and chosen is not None and chosen > demand:
        lines.append(
            f"note: on {result['device']} prefetch is expected to add stall ({chosen * 1e3:.2f} ms vs "
            f"{demand * 1e3:.2f} ms loading on demand): loads outweigh the compute they could hide, and wrong "
            f"guesses cost loads; consider running without prefetch. This rests on the profile's compute figure "
            f"({result['compute_gflops']:g} GFLOP/s, often a peak): with a measured sustained figure in a user profile "
            "(--device FILE) compute takes longer and prefetch may pay"
        )
    for name, entry in result["schedule"]["task_switch"].items():
        cost = entry.get("cost")
        if cost:
            lines.append(
                f"task switch {name}: unload {cost['unload_bytes']} B, load {cost['load_bytes']} B "
                f"({cost['load_s'] * 1e3:.3f} ms)"
            )
    return "\n".join(lines)


def render_moefy(report: dict) -> str:
    """Human-readable form of :func:`~edgemoe.tools.moefy_dense.moefy_source`'s report."""
    lines = [
        f"moefy {report['source']} -> {report['model']}",
        f"  {report['num_experts']} experts per layer ({report['expert_hidden']} hidden neurons each), "
        f"top-{report['top_k']}, {report['router']} router",
        f"  calibration: {report['calib_sentences']} sentences, {report['calib_tokens']} tokens; "
        f"chance recall {report['chance_recall']:.3f}",
        "  layer  cluster sizes (min-max)  k-means iters  router recall  output kept",
    ]
    for layer in report["layers"]:
        sizes = layer["cluster_sizes"]
        recall = "-" if layer["router_recall"] is None else f"{layer['router_recall']:.3f}"
        kept = "-" if layer["output_kept"] is None else f"{layer['output_kept']:.3f}"
        span = f"{min(sizes)}-{max(sizes)}"
        lines.append(f"  {layer['layer']:>5}  {span:>23}  {layer['kmeans_iters']:>13}  {recall:>13}  {kept:>11}")
    ev = report.get("evaluation") or {}
    if ev:
        c, full = ev["cosine"], ev["cosine_all_experts"]
        lines.append(
            f"  embedding cosine vs dense on {ev['heldout_sentences']} held-out sentences: mean {c['mean']:.4f}, "
            f"p5 {c['p5']:.4f}, min {c['min']:.4f} (all experts: min {full['min']:.6f})"
        )
    lines.append(f"  wrote {report['model_json']} (edgemoe compile {report['model_json']} -o BUNDLE)")
    return "\n".join(lines)


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def render_package(d: dict) -> str:
    """Plain-text form of a package summary (``edgemoe package`` without --json)."""
    b, s = d["bundle"], d["sizes"]
    lines = [
        f"package {d['package']} for {d['device']} ({d['cpu_arch']}): {human_bytes(s['total'])}",
        f"  bundle     {human_bytes(s['bundle']):>10}  {b['dir']}/ {b['model']} for {b['device']}, "
        f"{b['files']} files (sha256 checked)",
        f"  binary     {human_bytes(s['binary']):>10}  {d['binary']['file']}",
        f"  libraries  {human_bytes(s['libraries']):>10}  "
        + " ".join(r["file"].rsplit("/", 1)[-1] for r in d["libraries"]),
        f"  scripts    {human_bytes(s['scripts']):>10}  run.sh (+ package.json)",
        f"the board must have: {d['assumed']['summary']}",
        "no Python, no libtvm_compiler, no torch in it",
        f"run on the board: {d['run']}",
    ]
    if b["unlisted_skipped"]:
        lines.append(f"not in the manifest, not copied: {', '.join(b['unlisted_skipped'])}")
    return "\n".join(lines)


def render_tune(d: dict) -> str:
    """``edgemoe tune``: one line per tuned operator."""
    lines = [f"tuned {len(d['tasks'])} operators of {', '.join(d['partitions'])} into {d['database']}"]
    for t in d["tasks"]:
        best = "no working schedule" if t["best_ms"] is None else f"{t['best_ms']:.4f} ms"
        lines.append(f"  {t['task']:60s} {best}")
    return "\n".join(lines)


def render_generate(res: dict) -> str:
    """``edgemoe generate``'s summary line (after the streamed tokens)."""
    cache = res["cache"]
    return (
        f"{len(res['tokens'])} tokens after a {res['prompt_tokens']}-token prompt: "
        f"first token {res['ttft_ms']:.1f} ms, prefill {res['prefill_tok_s']:.1f} tok/s, "
        f"decode {res['decode_tok_s']:.1f} tok/s; experts: "
        f"{cache['hits']} hits, {cache['misses']} misses, {cache['evictions']} evictions, "
        f"peak {cache['peak_expert_bytes']} B"
    )
