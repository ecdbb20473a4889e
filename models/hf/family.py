"""The hf family as the model registry sees it: transformers MoE classes from small configs in code.

A config is ``{"arch": <transformers model_type>, "name": ..., **config kwargs}`` plus three family
keys: ``seed`` (torch seed before construction, default 0), ``router_bias_std`` (standard
deviation of random values put into routers' ``e_score_correction_bias``, default 0: the
library's zeros) and ``bias_std`` (the same for every other bias parameter the library
initialises to zeros, so a micro model exercises its biases). Models are built with random
weights, float32, eager attention and eager experts. Causal LMs are built as
``<Arch>ForCausalLM``; ``switch_transformers`` as ``SwitchTransformersEncoderModel`` (see
:mod:`edgemoe.frontends.hf`). Whether the adapter can capture the class is decided there, so a
config for any transformers arch builds here and unsupported ones fail at capture with a message
naming what is missing.
"""

from __future__ import annotations

import dataclasses

from ...errors import DependencyError, ModelError

NAME = "hf"

DESCRIPTIONS = {
    "hf-mixtral-micro": "transformers Mixtral, dim 32, 3 layers, 4 experts top-2, sliding window 8 (random weights)",
    "hf-qwen2-moe-micro": "transformers Qwen2-MoE, dim 32, 8 experts top-4 + gated shared expert, 1 dense layer",
    "hf-olmoe-micro": "transformers OLMoE, dim 32, 3 layers, 8 experts top-2 (random weights)",
    "hf-switch-micro": "transformers SwitchTransformers encoder, dim 32, 4 blocks (2 sparse), 4 experts top-1",
    "hf-deepseek-v2-micro": "transformers DeepSeek-V2, MLA, 8 experts top-2 group-limited, 2 shared, 1 dense layer",
    "hf-deepseek-v3-micro": "transformers DeepSeek-V3, MLA, sigmoid + bias routing, group-limited, 2 shared experts",
    "hf-qwen3-moe-micro": "transformers Qwen3-MoE, dim 32, 8 experts top-2, query/key norm, 1 dense layer",
    "hf-glm4-moe-micro": "transformers GLM-4-MoE, sigmoid + bias routing, group-limited, 1 shared expert, half rotary",
    "hf-ernie4-5-moe-micro": "transformers ERNIE-4.5-MoE, 8 experts top-2 with statistics bias, 1 shared expert",
    "hf-phimoe-micro": "transformers PhiMoE, sparsemixer top-2 of 4, LayerNorm, biases, sliding window 8",
    "hf-granitemoe-micro": "transformers GraniteMoe, 4 experts top-2, embedding/residual/logits multipliers",
    "hf-granitemoeshared-micro": "transformers GraniteMoeShared, GraniteMoe + an ungated shared expert per layer",
    "hf-dbrx-micro": "transformers DBRX, 4 experts top-2 renormalised, clipped fused QKV, LayerNorm",
    "hf-gpt-oss-micro": "transformers GPT-OSS, 4 experts top-2, clamped SwiGLU with biases, attention sinks, YaRN",
}

# Shipped checkpoints (none: the configs are built with seeded random weights).
WEIGHTS: dict[str, str] = {}

# Keys of a config that belong to the family, not to the transformers config class.
_FAMILY_KEYS = {"arch": None, "name": None, "seed": 0, "router_bias_std": 0.0, "bias_std": 0.0}

# Archs built as something other than <Arch>ForCausalLM (model_type -> transformers class name).
_MODEL_CLASS = {"switch_transformers": "SwitchTransformersEncoderModel"}


def configs() -> dict[str, dict]:
    """Every named config, with the family's defaults filled in (validated when built)."""
    from .configs import CONFIGS

    # No normalize() here: it imports transformers, and listing models should stay cheap.
    return {name: {**_FAMILY_KEYS, **cfg} for name, cfg in CONFIGS.items()}


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise DependencyError(
            f"the {NAME} model family needs transformers (not installed): pip install 'edgemoe[hf]'"
        ) from None


def _config_class(arch: str):
    _require_transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    if arch not in CONFIG_MAPPING_NAMES:
        raise ModelError(f"transformers has no model type '{arch}' (config field 'arch' of an {NAME} model)")
    return CONFIG_MAPPING[arch]


def _model_class(arch: str):
    _require_transformers()
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = _MODEL_CLASS.get(arch) or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(arch)
    if name is None:
        raise ModelError(
            f"transformers arch '{arch}' has no causal-LM class to build "
            f"(the {NAME} family builds <Arch>ForCausalLM, or {', '.join(_MODEL_CLASS.values())})"
        )
    return getattr(transformers, name)


def config_fields(arch: str) -> set[str]:
    """The fields (and aliases, both ways) the transformers config class of ``arch`` takes.

    ``save_pretrained`` writes an aliased field under the alias's target (Qwen3-MoE's ``num_experts``
    is saved as ``num_local_experts``), so both names are fields.
    """
    cls = _config_class(arch)
    aliases = getattr(cls, "attribute_map", {})
    return {f.name for f in dataclasses.fields(cls)} | set(aliases) | set(aliases.values())


def normalize(config: dict) -> dict:
    """Validate a config dict and return it with the family's defaults filled in.

    The transformers config class supplies the defaults of every other field.

    Raises:
        ModelError: Missing or unknown arch, unknown fields, or values the config class rejects.
    """
    arch = config.get("arch")
    if not isinstance(arch, str):
        raise ModelError(f"an {NAME} model config needs 'arch', a transformers model type such as 'mixtral'")
    cls = _config_class(arch)
    hf = {k: v for k, v in config.items() if k not in _FAMILY_KEYS}
    fields = config_fields(arch)
    unknown = sorted(set(hf) - fields)
    if unknown:
        raise ModelError(
            f"unknown {cls.__name__} field(s) {', '.join(unknown)} for {NAME} arch '{arch}' "
            f"(family keys: {', '.join(_FAMILY_KEYS)})"
        )
    out = {k: config.get(k, default) for k, default in _FAMILY_KEYS.items()}
    out["name"] = out["name"] or f"{NAME}-{arch}-custom"
    if not isinstance(out["seed"], int) or isinstance(out["seed"], bool):
        raise ModelError(f"{NAME} config 'seed' must be an integer, got {out['seed']!r}")
    for key in ("router_bias_std", "bias_std"):
        if not isinstance(out[key], int | float) or isinstance(out[key], bool) or out[key] < 0:
            raise ModelError(f"{NAME} config '{key}' must be a number >= 0, got {out[key]!r}")
    _hf_config(arch, hf)  # fail here, not at build, on values the config class rejects
    return {**out, **hf}


def _hf_config(arch: str, kwargs: dict):
    import logging

    from huggingface_hub.errors import StrictDataclassError  # what transformers' strict config classes raise
    from transformers.utils import logging as hf_logging

    from ...frontends.hf_archs import config_problems

    # transformers logs some config problems and goes on; hold its messages until ours are known, so a
    # problem is reported once, as an error that says what to change.
    held: list[logging.LogRecord] = []
    holder = logging.Handler()
    holder.emit = held.append
    root = hf_logging.get_logger()
    hf_logging.disable_default_handler()
    root.addHandler(holder)
    try:
        cfg = _config_class(arch)(**kwargs, attn_implementation="eager", experts_implementation="eager")
    except (TypeError, ValueError, KeyError, StrictDataclassError) as exc:
        first = str(exc).strip().splitlines()
        raise ModelError(f"bad {NAME} config for arch '{arch}': {' '.join(s.strip() for s in first[:2])}") from None
    finally:
        root.removeHandler(holder)
        hf_logging.enable_default_handler()
    problems = config_problems(cfg)
    if problems:
        raise ModelError(f"bad {NAME} config for arch '{arch}': {'; '.join(problems)}")
    for record in held:
        root.handle(record)
    return cfg


def param_count(config: dict) -> int:
    """Parameters of the transformers model a config builds, counted on the meta device (nothing allocated)."""
    import torch

    full = normalize(config)
    arch = full["arch"]
    cfg = _hf_config(arch, {k: v for k, v in full.items() if k not in _FAMILY_KEYS})
    with torch.device("meta"):
        model = _model_class(arch)(cfg)
    return sum(p.numel() for p in model.parameters())


def build(config: dict, folder: str | None = None, stream: bool = False):
    """Build the transformers module (float32, eval mode) from a config dict.

    Args:
        config: The family config.
        folder: A checkpoint folder (:mod:`.checkpoint`) whose weights the library loads; None:
            seeded random weights.
        stream: With ``folder``: leave the weights in the folder, read per partition
            (:func:`.checkpoint.stream_folder`).
    """
    import torch

    from .checkpoint import load_folder, stream_folder

    full = normalize(config)
    arch = full["arch"]
    hf = {k: v for k, v in full.items() if k not in _FAMILY_KEYS}
    cls = _model_class(arch)
    cfg = _hf_config(arch, hf)
    torch.manual_seed(full["seed"])
    try:
        if folder is not None:
            model = (stream_folder if stream else load_folder)(cls, cfg, folder)
        else:
            with torch.device("cpu"):
                model = cls(cfg).to(torch.float32).eval()
    except (AttributeError, TypeError, ValueError, RuntimeError, IndexError, KeyError, ArithmeticError, OSError) as exc:
        # The library's own message, with its exception type: a bare KeyError reads as just "'x'".
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        what = f"load {cls.__name__} from {folder}" if folder else f"build {cls.__name__} from this {NAME} config"
        raise ModelError(
            f"transformers cannot {what} ({type(exc).__name__}: {first}); "
            "a config field has a value the library accepts but cannot use"
            if folder is None
            else f"transformers cannot {what} ({type(exc).__name__}: {first})"
        ) from None
    model.config.name_or_path = full["name"]  # the adapter names the captured model after it
    if full["router_bias_std"] and folder is None:
        # The library initialises the score-correction bias to zeros; random values exercise the path
        # where the bias changes which experts are chosen (but not their weights).
        gen = torch.Generator().manual_seed(full["seed"] + 1)
        biased = [m for m in model.modules() if isinstance(getattr(m, "e_score_correction_bias", None), torch.Tensor)]
        if not biased:
            raise ModelError(f"{NAME} config sets router_bias_std, but arch '{arch}' has no e_score_correction_bias")
        with torch.no_grad():
            for m in biased:
                b = m.e_score_correction_bias
                b.copy_(torch.randn(b.shape, generator=gen) * full["router_bias_std"])
    if full["bias_std"] and folder is None:
        gen = torch.Generator().manual_seed(full["seed"] + 2)
        biases = [
            p for name, p in model.named_parameters() if name.endswith("bias") and "e_score_correction" not in name
        ]
        if not biases:
            raise ModelError(f"{NAME} config sets bias_std, but arch '{arch}' built without bias parameters")
        with torch.no_grad():
            for b in biases:
                b.copy_(torch.randn(b.shape, generator=gen) * full["bias_std"])
    return model
