"""Memory budgets for expert weights: parsing, the bundle's expert sizes, the check a session runs at start.

The compiler (``compile --memory-budget``, ``edgemoe plan``) and the runtime (``Session``, ``edgemoe
run --memory-budget``) run the very same check.
"""

from __future__ import annotations

import re
import warnings

from ..errors import ConfigError
from .book import Key


def parse_bytes(text: str) -> int:
    """``"6MB"`` → 6_000_000, ``"6MiB"`` → 6_291_456, ``"1500000"`` → 1_500_000.

    Raises:
        ConfigError: Not a size.
    """
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("kmgib")
    unit = t[len(num) :]
    try:
        value = float(num)
    except ValueError:
        raise ConfigError(f"not a byte size: '{text}' (e.g. 6MB, 6MiB, 1500000)") from None
    if unit not in units or value <= 0:
        raise ConfigError(f"not a byte size: '{text}' (e.g. 6MB, 6MiB, 1500000)")
    return int(value * units[unit])


class ThrashWarning(UserWarning):
    """The budget holds less than one layer's top-k working set: the cache will thrash."""


def expert_sizes(manifest: dict, task: str | None = None) -> dict[Key, int]:
    """Bytes of each routed expert in the bundle (of ``task``'s kept sets when given)."""
    kept = None if task is None else [set(s) for s in manifest["tasks"][task]["experts"]]
    return {
        (li, int(e["index"])): int(e["bytes"])
        for li, layer in enumerate(manifest["moe_layers"])
        for e in layer["experts"]
        if kept is None or e["index"] in kept[li]
    }


def shared_bytes(manifest: dict) -> int:
    """Bytes of the always-resident shared experts."""
    return sum(int(e["bytes"]) for layer in manifest["moe_layers"] for e in layer.get("shared", []))


def parse_budget(text: str | int, manifest: dict) -> int:
    """A budget in bytes from ``25%`` (of the bundle's routed expert bytes, shared experts on top) or a size.

    Sizes are bytes (``100000``) or take a unit (``6MB``, ``6MiB``, as ``--weight-budget``).

    Raises:
        ConfigError: Not a percentage in (0, 100] or a positive size.
    """
    s = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", s)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise ConfigError(f"budget percentage must be in (0, 100], got {s}")
        return int(sum(expert_sizes(manifest).values()) * pct / 100) + shared_bytes(manifest)
    if re.fullmatch(r"\d+(?:\.\d+)?\s*(?:[kmg]i?)?b?", s.lower()):
        try:
            return parse_bytes(s)
        except ConfigError:
            pass
    raise ConfigError(
        f"budget must be a percentage of expert bytes (e.g. 25%) or a size (e.g. 100000, 6MB, 6MiB), got '{s}'"
    )


def check_budget(manifest: dict, budget: int, task: str | None = None, resident: int = 0) -> int:
    """Check a memory budget for routed + shared experts; returns the routed-expert cache capacity.

    Raises:
        ConfigError: The budget cannot hold the shared experts, the resident set and the largest expert.

    Warns:
        ThrashWarning: The cache is smaller than a layer's top-k working set.
    """
    sizes = expert_sizes(manifest, task)
    shared = shared_bytes(manifest)
    largest = max(sizes.values(), default=0)
    if budget < shared + resident + largest:
        raise ConfigError(
            f"memory budget of {budget} bytes is below shared experts ({shared} B) + resident set ({resident} B) "
            f"+ largest expert ({largest} B) = {shared + resident + largest} bytes"
        )
    capacity = budget - shared
    for li, layer in enumerate(manifest["moe_layers"]):
        layer_sizes = sorted((b for (lj, _), b in sizes.items() if lj == li), reverse=True)
        working = sum(layer_sizes[: int(layer["top_k"])])
        if capacity - resident < working:
            warnings.warn(
                f"memory budget leaves {capacity - resident} bytes for the expert cache, below layer {li}'s top-"
                f"{layer['top_k']} working set of {working} bytes: every token will reload experts (thrashing)",
                ThrashWarning,
                stacklevel=2,
            )
            break
    return capacity
