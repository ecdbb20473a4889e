"""The ``edgemoe`` command line: a thin click shell over the compiler and runtime APIs.

Installed as ``edgemoe.cli``. Compiler modules are imported inside the commands that need
them, so ``edgemoe run`` and ``edgemoe inspect BUNDLE`` work where only the runtime extra
(numpy + onnxruntime, no torch) is installed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
import warnings
from pathlib import Path

import click

from edgemoe import __version__, targets
from edgemoe.errors import EXIT_CODES, ConfigError, DependencyError, EdgeMoEError, InputError

EXIT_CODE_HELP = (
    "Exit codes: "
    + ", ".join(f"{code} {name}" for name, code in EXIT_CODES.items())
    + ", 2 usage error, 130 interrupted."
)


def _one_line(text: str, limit: int = 2000) -> str:
    """A message as one printable line of at most ``limit`` characters.

    Messages quote names from untrusted files (tasks, tensors, keys), which may hold a newline or
    run for megabytes: control characters are escaped, and the end is cut.
    """
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _handle_errors(fn):
    """Turn library errors into one-line messages and their exit codes (tracebacks with EDGEMOE_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            try:
                # Every command prints edgemoe's warnings as one "warning: ..." line (commands that
                # report them in --json collect them again inside).
                with _json_only_stdout(bool(kwargs.get("as_json"))), _budget_warnings([]):
                    return fn(*args, **kwargs)
            except ModuleNotFoundError as exc:
                if (exc.name or "").split(".")[0] not in DependencyError.EXTRAS:
                    raise
                raise DependencyError.from_import(exc) from None
        except EdgeMoEError as exc:
            if os.environ.get("EDGEMOE_DEBUG"):
                raise
            click.echo(f"error: {_one_line(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:
            if os.environ.get("EDGEMOE_DEBUG"):
                raise
            click.echo(f"internal error: {type(exc).__name__}: {exc} (EDGEMOE_DEBUG=1 shows the traceback)", err=True)
            sys.exit(1)

    return wrapper


_PENDING_JSON: list[dict] = []


@contextlib.contextmanager
def _json_only_stdout(active: bool):
    """With --json, stdout holds exactly the command's one JSON object.

    Everything else a command or a library prints on the way (TVM's MetaSchedule logs, a
    library's print) goes to stderr, at the Python level and at the file-descriptor level (native
    code writes to fd 1 directly); :func:`_emit` queues the object, written here once the command
    succeeded and stdout is back.
    """
    if not active:
        yield
        return
    real = sys.stdout
    real.flush()
    try:
        fd = real.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stdout (click's test runner)
        fd = None
    saved = None
    if fd is not None:
        saved = os.dup(fd)
        os.dup2(sys.stderr.fileno(), fd)
    _PENDING_JSON.clear()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except BaseException:
        _PENDING_JSON.clear()
        raise
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, fd)
            os.close(saved)
    for obj in _PENDING_JSON:
        real.write(json.dumps(obj, indent=1) + "\n")
    real.flush()
    _PENDING_JSON.clear()


class _Progress:
    """Step messages on stderr with elapsed time; silent with --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            click.echo(f"[{time.perf_counter() - self.start:6.1f}s] {msg}", err=True)


@contextlib.contextmanager
def _budget_warnings(notes: list[str]):
    """Print edgemoe's warnings (budget, unused hardware) as ``warning: ...`` on stderr; collect them for --json."""
    from edgemoe.errors import EdgeMoEWarning
    from edgemoe.swap.budget import ThrashWarning

    show = warnings.showwarning

    def echo(message, category, *args, **kwargs):
        if issubclass(category, ThrashWarning | EdgeMoEWarning):
            notes.append(str(message))
            click.echo(f"warning: {message}", err=True)
        else:
            show(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("always", ThrashWarning)
        warnings.simplefilter("always", EdgeMoEWarning)
        warnings.showwarning = echo
        yield


def _comma_list(text: str) -> tuple[str, ...]:
    """The non-empty items of a comma-separated option value, stripped."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _expert_cache_options(command):
    """The expert-cache options `run` and `generate` share (defaults: the bundle's schedule)."""
    options = (
        click.option(
            "--memory-budget",
            default=None,
            metavar="BUDGET",
            help="Memory for expert weights: 25% (of routed expert bytes), 6MB, 6MiB, bytes, or none (unbounded). "
            "[default: the bundle's schedule, else none]",
        ),
        click.option(
            "--policy",
            type=click.Choice(["lru", "lfu", "planned"]),
            default=None,
            help="Eviction policy. [default: the bundle's schedule, else lru]",
        ),
        click.option(
            "--prefetch",
            type=click.Choice(["none", "routed", "pregate", "affinity", "static", "plan"]),
            default=None,
            help="Prefetch: routed (a layer's misses load as soon as it is routed, while its cached experts "
            "run; every mode but none does this), or that plus a predictor of the next layers (plan: the one "
            "the schedule chose). [default: the schedule's plan, else none]",
        ),
        click.option(
            "--storage-gbs",
            default=0.0,
            show_default=True,
            type=float,
            help="Throttle expert loads to this bandwidth in GB/s (a device's storage, to see its stalls here); "
            "0: off.",
        ),
    )
    for option in reversed(options):
        command = option(command)
    return command


def _cache_settings(memory_budget, policy, prefetch) -> dict:
    """Session settings from those options: an option left out takes the bundle's schedule."""
    from edgemoe.runtime.session import BUNDLE

    return {
        "memory_budget": BUNDLE if memory_budget is None else memory_budget,
        "policy": policy or BUNDLE,
        "prefetch": BUNDLE if prefetch is None else prefetch,
    }


def _emit(obj: dict, as_json: bool, render) -> None:
    """Print ``render(obj)``, or with --json queue ``obj`` for :func:`_json_only_stdout` to write."""
    if as_json:
        _PENDING_JSON.append(obj)
    else:
        click.echo(render(obj))


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EXIT_CODE_HELP,
)
@click.version_option(__version__, prog_name="edgemoe")
def cli():
    """Compile Mixture-of-Experts models into deployment bundles for edge devices, and run them.

    \b
    Typical flow:
      edgemoe models                                   # reference models
      edgemoe devices                                  # device profiles
      edgemoe compile m3vit-tiny -o out/tiny           # model -> bundle (ONNX, host)
      edgemoe inspect out/tiny                         # partitions, sizes, expert sets
      edgemoe run out/tiny --task semseg               # run one task, only its experts
      edgemoe verify out/tiny                          # bundle vs PyTorch, per task

    Every command that prints results takes --json for one machine-readable object on stdout.
    """  # noqa: D301 (click keeps a paragraph after a real \b unwrapped)


@cli.command("compile")
@click.argument("model")
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(path_type=Path),
    help="Bundle folder to write (replaced atomically if it is already a bundle).",
)
@click.option(
    "--target",
    default="onnx",
    show_default=True,
    help=f"Backend: {', '.join(targets.target_names())} (one folder each under targets/).",
)
@click.option("--device", default="host", show_default=True, help="Device profile (see `edgemoe devices`).")
@click.option("--tasks", default="", help="Comma-separated tasks to build (default: all).")
@click.option(
    "--prune/--no-prune",
    default=True,
    show_default=True,
    help="Drop experts a task never selects on calibration data (task-level models).",
)
@click.option(
    "--prune-below",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, max_open=True),
    help="Also drop experts below this share of a task's routed tokens on calibration data (e.g. 0.01).",
)
@click.option("--calib-samples", default=8, show_default=True, type=int, help="Calibration inputs per task.")
@click.option("--calib-seed", default=1234, show_default=True, type=int, help="Seed of the calibration inputs.")
@click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="Checkpoint to load (.safetensors, or a torch file loaded with weights_only=True).",
)
@click.option(
    "--weights-format",
    "weights_format",
    default="edgemoe",
    show_default=True,
    type=click.Choice(["edgemoe", "m3vit"]),
    help="Layout of --weights: edgemoe's own, or a checkpoint saved by the public M³ViT training code.",
)
@click.option(
    "--quant",
    default="fp32",
    show_default=True,
    type=click.Choice(["fp32", "fp16", "int8", "int8-dynamic", "int4"]),
    help="Quantization of trunk, heads and experts (gates stay fp32).",
)
@click.option(
    "--group-size",
    default=32,
    show_default=True,
    type=click.Choice(["32", "64", "128"]),
    help="Group size of int4 / mixed-precision weights.",
)
@click.option(
    "--calibrator",
    default="minmax",
    show_default=True,
    type=click.Choice(["minmax", "percentile"]),
    help="Activation range calibrator of int8.",
)
@click.option(
    "--weight-budget",
    default=None,
    help="Mixed precision: byte budget of all expert weights (e.g. 6MB, 6MiB); the solver picks 2/4/8 bits per expert.",
)
@click.option("--avg-bits", default=None, type=float, help="Mixed precision: average bits per expert weight (e.g. 3).")
@click.option(
    "--memory-budget",
    default=None,
    help="Expert memory on the device: NN% of routed expert bytes or a size (6MB); checked, and a swap plan stored.",
)
@click.option(
    "--tuning-db",
    "tuning_db",
    default=None,
    type=click.Path(file_okay=False, exists=True),
    help="Target tvm: build with the MetaSchedule schedules of this database (`edgemoe tune`).",
)
@click.option(
    "--fixed",
    default=None,
    metavar="TYPES",
    help="--target hls: fixed-point types overriding the calibrated ones, per tensor class "
    "(input, act, weight, embed, attn_bias, bias, norm, score), e.g. "
    "'act=ap_fixed<32,10>,weight=ap_fixed<16,2>'; or the preset 'edge-moe' (Edge-MoE's types).",
)
@click.option(
    "--max-seq",
    "max_seq",
    default=None,
    type=click.IntRange(8, None),
    help="Causal LMs: also emit generation graphs on a key/value cache of this many positions "
    "(prompt + new tokens), for `edgemoe generate`.",
)
@click.option(
    "--allow-nonfinite",
    "allow_nonfinite",
    is_flag=True,
    help="Compile even if weights hold NaN or Inf (refused by default, naming the tensors).",
)
@click.option(
    "--stream/--no-stream",
    "stream",
    default=None,
    help="A checkpoint folder: read its weights tensor by tensor as each graph and expert blob is "
    "written (peak memory set by the largest partition, not the model; target onnx) / load the whole "
    "model first. Default: stream folders whose weights exceed 1 GiB.",
)
@click.option(
    "--dump-stages",
    "dump_stages",
    type=click.Path(file_okay=False),
    help="Write each compile stage's summary to DIR/NN-<stage>.json (what it produced, seconds, "
    "whether it ran): diff two folders to see where a number changed.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@_handle_errors
def compile_cmd(
    model,
    output,
    target,
    device,
    tasks,
    prune,
    prune_below,
    calib_samples,
    calib_seed,
    weights,
    weights_format,
    quant,
    group_size,
    calibrator,
    weight_budget,
    avg_bits,
    memory_budget,
    tuning_db,
    fixed,
    max_seq,
    allow_nonfinite,
    stream,
    dump_stages,
    as_json,
    quiet,
):
    """Compile MODEL into a bundle folder.

    MODEL is a name from `edgemoe models`, a .json model config, or a Hugging Face checkpoint
    folder as save_pretrained writes it (config.json + *.safetensors shards), e.g. an OLMoE or
    Mixtral folder; its files are checked (index, shards, sizes) before the weights are read.
    A folder above 1 GiB (or with --stream) compiles streamed: the model is built without
    weights and each graph's tensors and each expert's are read from the shards as it is written,
    so a checkpoint larger than memory compiles (bf16 / fp16 widen to fp32 one piece at a time).

    Captures the model, profiles routing per task on calibration inputs, drops experts a task
    never uses, exports the trunk, per-task gates and heads and one kernel per expert shape,
    and writes expert weights as checked blobs. Nothing is left at OUTPUT if it fails.

    With --quant / --weight-budget / --avg-bits the staged bundle is calibrated, quantized
    (experts one blob at a time) and its accuracy against fp32 on held-out data is written
    into the manifest (see `edgemoe inspect`).

    With --target hls --device zcu102 (or zcu104, or a profile file with an [fpga] table) the
    bundle is a Vitis HLS project of the whole model (hls/: kernels, generated header, testbench,
    run_hls.tcl), fixed-point weights (params.bin, experts/) with types calibrated per tensor class
    (or --fixed), a resource and latency estimate with tile sizes searched under the part's
    resources, and the design's accuracy measured by its bit-exact emulator. `edgemoe verify`
    checks its C simulation (g++) against PyTorch and the emulator; `edgemoe run` runs it.

    With --max-seq N (causal LMs) the bundle also holds generation graphs: each trunk segment on
    a key/value cache of N positions, for `edgemoe generate` (prefill, then one token per step).

    The compile is a list of stages (check, capture, check-weights, profile, prune, partition,
    open-bundle, emit, calibrate, quantize, measure-accuracy, plan, write-manifest); --dump-stages
    DIR writes what each one produced as JSON.

    With --memory-budget the budget is checked against the bundle's experts as at session start
    (an error below shared + resident + largest expert; a warning, also in --json, below a
    layer's top-k working set) and a swap schedule for --device is stored (as `edgemoe plan`).
    """
    from edgemoe.bundle.describe import describe_bundle
    from edgemoe.compiler import compile_model
    from edgemoe.config import CompileConfig
    from edgemoe.quantization import QuantConfig
    from edgemoe.report import render_bundle
    from edgemoe.swap.budget import parse_bytes

    qcfg = QuantConfig(
        scheme=quant,
        group_size=int(group_size),
        calibrator=calibrator,
        weight_budget=None if weight_budget is None else parse_bytes(weight_budget),
        avg_bits=avg_bits,
    )
    cfg = CompileConfig(
        model=model,
        target=target,
        device=device,
        tasks=_comma_list(tasks),
        prune=prune,
        prune_below=prune_below,
        calib_samples=calib_samples,
        calib_seed=calib_seed,
        weights=weights,
        weights_format=weights_format,
        quant=qcfg,
        memory_budget=memory_budget,
        tuning_db=tuning_db,
        fixed=fixed,
        max_seq=max_seq,
        allow_nonfinite=allow_nonfinite,
        stream=stream,
    )
    if tuning_db and target != "tvm":
        raise ConfigError(f"--tuning-db is for --target tvm, not {target}")
    progress = _Progress(quiet)
    notes: list[str] = []
    with _budget_warnings(notes):
        compile_model(cfg, output, progress, dump_stages=dump_stages)
    progress(f"bundle written to {output}")
    summary = describe_bundle(output)
    if memory_budget is not None or notes:
        summary["warnings"] = notes
    _emit(summary, as_json, render_bundle)


@cli.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--task", default=None, help="Task to run (optional if the bundle has one task).")
@click.option(
    "--input",
    "input_path",
    type=click.Path(path_type=Path),
    default=None,
    help=".npy array or image file (default: a deterministic sample input).",
)
@click.option(
    "-o",
    "--output",
    "output_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Save the output to this .npy file.",
)
@click.option("--repeat", default=1, show_default=True, type=int, help="Timed runs; latency is their median.")
@click.option("--threads", default=0, show_default=True, type=int, help="Executor threads (0: default).")
@click.option(
    "--png",
    "png_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Write input.png and <task>.png (class colours / greyscale) into this folder.",
)
@_expert_cache_options
@click.option(
    "--providers",
    default="",
    help="onnxruntime execution providers in order of preference, comma-separated "
    "(e.g. TensorrtExecutionProvider,CUDAExecutionProvider). [default: the bundle device's, CPU last]",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_handle_errors
def run_cmd(
    bundle, task, input_path, output_path, repeat, threads, png_dir, memory_budget, policy, prefetch, storage_gbs,
    providers, as_json,
):  # fmt: skip
    """Run one task of BUNDLE, loading only the experts its tokens are routed to.

    \b
    Expert memory follows the bundle's swap schedule when it has one (compile --memory-budget,
    edgemoe plan): its budget, policy and prefetch plan; --memory-budget, --policy and --prefetch
    override them. A budget the bundle cannot meet fails before any work (exit 4). The report's
    cache line (--json: "cache") gives the budget, peak expert bytes, hits, misses, evictions,
    prefetches, stall and bytes read.
    """  # noqa: D301 (click keeps a paragraph after a real \b unwrapped)
    from edgemoe.report import render_run
    from edgemoe.runtime.run import run_bundle

    res = run_bundle(
        bundle,
        task,
        input_path,
        output_path,
        repeat,
        threads,
        png_dir,
        **_cache_settings(memory_budget, policy, prefetch),
        storage_gbs=storage_gbs,
        providers=_comma_list(providers),
    )
    _emit(res, as_json, render_run)


@cli.command("generate")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Prompt text, encoded by the bundle's tokenizer.")
@click.option(
    "--prompt-ids",
    "prompt_ids",
    default=None,
    metavar="IDS",
    help="Prompt token ids, comma-separated (e.g. 12,7,301): for bundles without a tokenizer.",
)
@click.option(
    "--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, None), help="Tokens to generate."
)
@click.option(
    "--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0, None), help="0: greedy; else sampling."
)
@click.option(
    "--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True), help="Nucleus sampling."
)
@click.option("--seed", default=None, type=int, help="Seed of the sampling.")
@click.option("--stop", default=None, type=int, help="A token id that ends the generation (e.g. the EOS id).")
@click.option("--threads", default=0, show_default=True, type=int, help="Executor threads (0: default).")
@_expert_cache_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout (tokens not streamed).")
@_handle_errors
def generate_cmd(
    bundle, prompt, prompt_ids, max_new_tokens, temperature, top_p, seed, stop, threads, memory_budget, policy,
    prefetch, storage_gbs, as_json,
):  # fmt: skip
    """Generate tokens with a causal LM BUNDLE compiled with --max-seq.

    
    The prompt runs as one prefill step, then each token as one decode step on the bundle's
    key/value cache; every step routes its tokens through the expert cache like `edgemoe run`
    (budget, policy, prefetch from the bundle's schedule unless overridden). Text streams to
    stdout as tokens are chosen (token ids where the bundle has no tokenizer); a summary (time to
    first token, prefill and decode tokens/s, expert cache) goes to stderr, or everything as one
    object with --json.

    \b
    Examples:
      edgemoe compile mixtral-lm-bytes --max-seq 512 -o lm
      edgemoe generate lm --prompt "def main(" --max-new-tokens 80
      edgemoe generate lm --prompt "x = " --temperature 0.8 --top-p 0.9 --seed 1 --memory-budget 25%
    """  # noqa: D301 (click keeps a paragraph after a real \b unwrapped)
    from edgemoe.report import render_generate
    from edgemoe.runtime.generate import generate_bundle

    if (prompt is None) == (prompt_ids is None):
        raise InputError("give the prompt as --prompt TEXT or as --prompt-ids IDS (one of them)")
    if prompt_ids is not None:
        try:
            prompt = [int(t) for t in prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise InputError(f"--prompt-ids takes comma-separated integers, got {prompt_ids!r}") from None

    def stream(token: int, text: str) -> None:
        if not as_json:
            click.echo(text if isinstance(prompt, str) else f"{token} ", nl=False)
            sys.stdout.flush()  # a token shows when it is chosen

    res = generate_bundle(
        bundle,
        prompt,
        max_new_tokens,
        temperature,
        top_p,
        seed,
        stop,
        threads,
        **_cache_settings(memory_budget, policy, prefetch),
        storage_gbs=storage_gbs,
        on_token=stream,
    )
    if as_json:
        _emit(res, True, None)
        return
    click.echo()
    sys.stdout.flush()
    click.echo(render_generate(res), err=True)  # the tokens alone on stdout


@cli.command("inspect")
@click.argument("what")
@click.option("--check", is_flag=True, help="For a bundle: verify every file's size and sha256.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_handle_errors
def inspect_cmd(what, check, as_json):
    """Show a bundle or a model: partitions, sizes, per-task expert sets.

    WHAT is a bundle folder, or what compile takes as MODEL: a model name, a .json model config
    or a checkpoint folder written by save_pretrained.
    """
    from edgemoe.report import render_bundle, render_model

    path = Path(what)
    # A model config file or a checkpoint folder is a model, not a broken bundle.
    is_model = (path.is_file() and path.suffix == ".json") or (
        path.is_dir() and not (path / "manifest.json").exists() and (path / "config.json").exists()
    )
    if path.exists() and not is_model:
        from edgemoe.bundle.describe import describe_bundle

        _emit(describe_bundle(what, check=check), as_json, render_bundle)
        return
    from edgemoe.config import CompileConfig
    from edgemoe.ir import ir_to_json
    from edgemoe.passes.capture_model import capture_model

    _emit(ir_to_json(capture_model(CompileConfig(model=what)).ir), as_json, render_model)


@cli.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--samples", default=2, show_default=True, type=int, help="Inputs in the verification batch.")
@click.option("--seed", default=7, show_default=True, type=int, help="Seed of the inputs.")
@click.option(
    "--tolerance",
    default=None,
    type=float,
    help="Max abs error that passes [default: 1e-4 for fp32 bundles; quantized bundles report it].",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@_handle_errors
def verify_cmd(bundle, samples, seed, tolerance, as_json, quiet):
    """Run sample inputs through BUNDLE and the source PyTorch model, per task, and compare.

    Reports the error against the reference with the bundle's expert masks (must be within
    --tolerance) and, separately, against the unpruned model. Exits non-zero on failure.
    """
    from edgemoe.errors import VerificationError
    from edgemoe.report import render_verify
    from edgemoe.tools.verify_bundle import verify_bundle

    rep = verify_bundle(bundle, samples=samples, seed=seed, tolerance=tolerance, progress=_Progress(quiet))
    _emit(rep.to_json(), as_json, render_verify)
    if not rep.passed:
        bad = [t for t, r in rep.tasks.items() if not r.passed]
        limit = f"the tolerance {rep.tolerance:g}" if rep.tolerance is not None else "their checks (see above)"
        raise VerificationError(f"tasks {', '.join(bad)} exceed {limit}")


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_handle_errors
def models_cmd(as_json):
    """List the reference models with parameter and expert counts."""
    from edgemoe.catalog import model_catalog
    from edgemoe.report import render_models

    _emit({"models": model_catalog()}, as_json, lambda d: render_models(d["models"]))


@cli.command("devices")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_handle_errors
def devices_cmd(as_json):
    """List device profiles (memory, bandwidth, CUDA architecture; sources in the JSON)."""
    from edgemoe.devices import device_profiles
    from edgemoe.report import render_devices

    _emit(
        {"devices": [d.to_json() for d in device_profiles().values()]}, as_json, lambda d: render_devices(d["devices"])
    )


@cli.command("moefy")
@click.argument("source")
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for model.json (what `edgemoe compile` takes) and model.safetensors.",
)
@click.option("--experts", default=16, show_default=True, type=int, help="Experts per FFN.")
@click.option("--top-k", "top_k", default=8, show_default=True, type=int, help="Experts per token.")
@click.option(
    "--router",
    type=click.Choice(["centroid", "trained"]),
    default="trained",
    show_default=True,
    help="centroid: from the clusters' weights; trained: fitted on calibration text.",
)
@click.option(
    "--calib-texts",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Calibration sentences, one per line (default: English prose from Python's docs).",
)
@click.option("--heldout", default=300, show_default=True, type=int, help="Held-out sentences compared (0: none).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of clustering, router and text split.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@_handle_errors
def moefy_cmd(source, output, experts, top_k, router, calib_texts, heldout, seed, as_json, quiet):
    """Convert the dense BERT SOURCE (all-minilm-l6-v2, or bert-micro) into an MoE model.

    Splits every FFN into balanced experts (MoEfication), builds a router per layer and
    compares sentence embeddings with the dense model on held-out English sentences.
    """
    from edgemoe.report import render_moefy
    from edgemoe.tools.moefy_dense import MoefyConfig, default_texts, moefy_source, read_texts

    calib, held = default_texts(heldout, seed)
    texts = read_texts(calib_texts) if calib_texts else calib
    cfg = MoefyConfig(num_experts=experts, top_k=top_k, router=router, calib_texts=tuple(texts), seed=seed)
    report = moefy_source(source, output, cfg, held, progress=_Progress(quiet))
    _emit(report, as_json, render_moefy)


@cli.command("plan")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", default="host", show_default=True, help="Device profile name, or a .toml/.json file.")
@click.option(
    "--budget", default=None, help="Expert memory: NN% of routed expert bytes, or a size (6MB) [default: device]."
)
@click.option(
    "--policy", default="planned", show_default=True, type=click.Choice(["lru", "lfu", "planned"]), help="Eviction."
)
@click.option("--heldout", default=8, show_default=True, type=int, help="Held-out inputs to score the plan on.")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None, help="Write PNG plots here.")
@click.option("--no-write", is_flag=True, help="Do not store the schedule in the bundle's manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_handle_errors
def plan_cmd(bundle, device, budget, policy, heldout, plots_dir, no_write, as_json):
    """Plan expert swapping of BUNDLE for a device and memory budget; score it against Belady's MIN.

    Traces routing on the compile's calibration inputs (planning) and on held-out inputs (scoring),
    replays them under LRU, LFU, the planned policy and Belady's MIN, measures each prefetch
    predictor, and stores the schedule in the manifest.
    """
    from edgemoe.report import render_plan
    from edgemoe.schedule.planner import plan_bundle

    if plots_dir:  # before the manifest is rewritten: a missing plotting library must not leave half a job
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise DependencyError("--plots needs matplotlib: pip install 'edgemoe[compiler]'") from None
    keep = bool(plots_dir)
    notes: list[str] = []
    with _budget_warnings(notes):
        result = plan_bundle(bundle, device, budget, policy, heldout=heldout, write=not no_write, keep_timeline=keep)
    result["warnings"] = notes
    if plots_dir:
        from edgemoe.schedule.plots import write_plots

        result["plots"] = [str(p) for p in write_plots(result, plots_dir)]
    result = {k: v for k, v in result.items() if not k.startswith("_")}
    _emit(result, as_json, render_plan)


@cli.command("bench")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--task", default=None, help="Task to time (default: every task).")
@click.option(
    "--rpc",
    default=None,
    metavar="ADDRESS",
    help="Remote device over TVM RPC: HOST:PORT (a server), tracker:HOST:PORT:KEY or local "
    "[default: $EDGEMOE_RPC, else this host].",
)
@click.option("--repeat", default=10, show_default=True, type=int, help="Timed repeats; times are their median.")
@click.option("--batch", default=1, show_default=True, type=int, help="Batch size of the sample input.")
@click.option("--timeout", default=60.0, show_default=True, type=float, help="Seconds any one remote call may take.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_handle_errors
def bench_cmd(bundle, task, rpc, repeat, batch, timeout, as_json):
    """Time BUNDLE per graph and per whole task, on this host or on a remote device over TVM RPC.

    Graphs of a TVM bundle are timed with TVM's time_evaluator on the device that runs them (no
    transfers); whole tasks are wall-clock runs from this host (over RPC: with every transfer).
    A remote run needs a TVM bundle built for the board and `python -m tvm.exec.rpc_server` on it;
    an unreachable or failing remote exits with code 13 (RemoteError).

    \b
    Examples:
      edgemoe bench out/micro-tvm                                  # this host
      edgemoe bench out/orin-tvm --rpc 192.168.1.20:9090 --json    # a board's RPC server
      edgemoe bench out/orin-tvm --rpc tracker:10.0.0.5:9190:orin  # a board from a tracker
      EDGEMOE_RPC=192.168.1.20:9090 edgemoe bench out/orin-tvm --task semseg --repeat 50
    """  # noqa: D301 (click keeps a paragraph after a real \b unwrapped)
    from edgemoe.report import render_bench
    from edgemoe.runtime.bench import bench_bundle

    _emit(bench_bundle(bundle, task, rpc, repeat=repeat, batch=batch, timeout=timeout), as_json, render_bench)


@cli.command("tune")
@click.argument("model")
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(path_type=Path, file_okay=False), help="Database folder."
)
@click.option("--device", default="host", show_default=True, help="Device profile (measured on this CPU unless --rpc).")
@click.option("--trials", default=64, show_default=True, type=click.IntRange(1), help="Measured candidates in all.")
@click.option(
    "--token-buckets", default="16,64,256", show_default=True, help="Expert kernels: token counts of tuned copies."
)
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1), help="Batch segments are tuned for.")
@click.option("--seq", default=None, type=click.IntRange(1), help="Token models: sequence length of tuned segments.")
@click.option(
    "--kinds", default="expert_kernel,segment", show_default=True, help="Partition kinds to tune (also gate, head)."
)
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Checkpoint to load.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the search.")
@click.option(
    "--rpc",
    default=None,
    metavar="tracker:HOST:PORT:KEY",
    help="Measure candidates on the boards of a TVM RPC tracker (their RPC servers link and run them).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@_handle_errors
def tune_cmd(model, output, device, trials, token_buckets, batch, seq, kinds, weights, seed, rpc, as_json, quiet):
    """Tune MODEL's TVM libraries with MetaSchedule into a database folder for `compile --tuning-db`.

    MetaSchedule tunes static shapes: expert kernels get one tuned copy per token bucket (calls
    are padded up to the next bucket), segments one at --batch (and --seq); other shapes run
    the untuned generic code. Takes minutes: progress goes to stderr.

    \b
    Examples:
      edgemoe tune m3vit-tiny --trials 128 -o out/db      # measured on this CPU
      edgemoe tune m3vit-tiny --device raspberry-pi-5 --rpc tracker:10.0.0.5:9190:rpi5 -o out/db-rpi
    """  # noqa: D301 (click keeps a paragraph after a real \b unwrapped)
    from edgemoe.report import render_tune
    from edgemoe.targets.tvm.tune import TuningShapes, tune_model

    try:
        buckets = tuple(int(b) for b in _comma_list(token_buckets))
    except ValueError:
        raise ConfigError(f"--token-buckets takes comma-separated integers, got '{token_buckets}'") from None
    dims = {"batch": batch, **({"seq": seq} if seq else {})}
    shapes = TuningShapes(token_buckets=buckets, dims=dims)
    summary = tune_model(
        model,
        output,
        trials,
        device=device,
        shapes=shapes,
        kinds=_comma_list(kinds),
        weights=weights,
        seed=seed,
        rpc=rpc,
        progress=_Progress(quiet),
    )

    _emit(summary, as_json, render_tune)


@cli.command("package")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", required=True, help="Device profile of the board (`edgemoe devices`), e.g. raspberry-pi-5.")
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(path_type=Path),
    help="Package folder to write (replaced atomically if it is already a package).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@_handle_errors
def package_cmd(bundle, device, output, as_json, quiet):
    """Write one folder to copy to the board: a TVM BUNDLE, edgemoe-rt for its CPU, the TVM runtime, run.sh.

    Every bundle file is checked against its manifest sha256 on the copy; edgemoe-rt is built
    (make native / native-aarch64) if missing. Nothing of the compiler goes in. On the board:
    ./run.sh --task TASK --input x.npy --output y.npy
    """
    from edgemoe.report import render_package
    from edgemoe.targets.tvm.package import package_bundle

    notes: list[str] = []
    with _budget_warnings(notes):
        summary = package_bundle(bundle, device, output, progress=_Progress(quiet))
    _emit(summary, as_json, render_package)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="edgemoe")


if __name__ == "__main__":
    main()
