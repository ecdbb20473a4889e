"""``edgemoe generate``: tokens from a causal LM bundle, streamed as they are chosen."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .run import cache_report
from .session import BUNDLE, Session
from .tokenizer import load_tokenizer


def generate_bundle(
    bundle: str | Path,
    prompt: str | list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: int | None = None,
    threads: int = 0,
    memory_budget: int | str | None = BUNDLE,
    policy: str = BUNDLE,
    prefetch: str | None = BUNDLE,
    storage_gbs: float = 0.0,
    on_token: Callable[[int, str], None] = lambda _token, _text: None,
) -> dict:
    """Generate tokens after ``prompt`` on a bundle compiled with ``--max-seq``.

    Args:
        bundle: Bundle folder.
        prompt: Prompt text (encoded by the bundle's tokenizer), or token ids.
        max_new_tokens: Tokens to generate (fewer when ``stop`` comes first).
        temperature: 0: greedy; else sampling at this temperature.
        top_p: Nucleus sampling threshold.
        seed: Seed of the sampling.
        stop: A token id that ends the generation.
        threads: Executor intra-op threads (0: default).
        memory_budget: Expert memory (bytes, ``25%``, ``6MB`` or ``none``); default: the bundle's schedule's.
        policy: Eviction policy; default: the schedule's (else ``lru``).
        prefetch: Prefetch predictor (``none``: off); default: the schedule's plan.
        storage_gbs: Throttle expert loads to this bandwidth (GB/s; 0: unthrottled).
        on_token: Called with each token id and the text it completes ("" without a tokenizer)
            as soon as it is chosen (streaming).

    Returns:
        The ``edgemoe generate --json`` object: ``tokens``, ``text`` (None without a tokenizer),
        ``prompt_tokens``, ``ttft_ms``, ``prefill_tok_s``, ``decode_tok_s``, ``kv_cache_bytes``,
        ``sampling`` and ``cache`` (the expert cache, as ``edgemoe run`` reports it).
    """
    if prefetch in ("none", "off"):
        prefetch = None
    session = Session(
        bundle,
        threads=threads,
        memory_budget=memory_budget,
        policy=policy,
        prefetch=prefetch,
        storage_gbs=storage_gbs,
    )
    tokenizer = None
    if isinstance(prompt, str):
        tokenizer = load_tokenizer(session.root, session.manifest)
        prompt = tokenizer.encode(prompt)
    elif "tokenizer" in session.manifest:
        tokenizer = load_tokenizer(session.root, session.manifest)
    tokens = []
    for token in session.generate(prompt, max_new_tokens, temperature, top_p, seed, stop):
        tokens.append(token)
        on_token(token, "" if tokenizer is None else tokenizer.push(token))
    gen = session.last_generation
    return {
        "tokens": tokens,
        "text": None if tokenizer is None else tokenizer.decode(tokens),
        "prompt_tokens": gen.prompt_tokens,
        "ttft_ms": gen.ttft_ms,
        "prefill_tok_s": gen.prefill_tok_s,
        "decode_tok_s": gen.decode_tok_s,
        "kv_cache_bytes": gen.cache_bytes,
        "sampling": {"temperature": temperature, "top_p": top_p, "seed": seed, "stop": stop},
        "cache": cache_report(session),
    }
