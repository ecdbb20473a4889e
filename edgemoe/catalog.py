"""``edgemoe models``: every registered reference model with its sizes (builds each model)."""

from __future__ import annotations


def model_catalog() -> list[dict]:
    """Describe every registered model (``edgemoe models --json`` → ``{"models": [...]}``)."""
    from .errors import DependencyError
    from .frontends import adapter_class
    from .models import model_entries

    out = []
    for entry in model_entries().values():
        try:
            ir = adapter_class(entry.family)(entry.build()).ir
        except DependencyError as exc:  # e.g. the hf family without transformers: list the rest
            out.append(
                {"name": entry.name, "family": entry.family, "description": entry.description, "unavailable": str(exc)}
            )
            continue
        layers = ir.moe_layers
        out.append(
            {
                "name": entry.name,
                "family": entry.family,
                "granularity": ir.granularity,
                "description": entry.description,
                "params": ir.params,
                "moe_layers": len(layers),
                "experts": ir.num_experts,
                "experts_per_layer": layers[0].num_experts if layers else 0,
                "top_k": layers[0].top_k if layers else 0,
                "expert_bytes": layers[0].expert.param_count * 4 if layers else 0,
                "tasks": list(ir.task_names),
            }
        )
    return out
