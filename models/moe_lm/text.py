"""Offline English text for the byte-level MoE language models: Python's bundled pydoc topics.

``pydoc_data.topics`` (the language reference sections ``help()`` shows, ~0.45 MB of English with
code samples) ships with CPython, so training and evaluation need no download. The topics, in name
order and joined by blank lines, are one UTF-8 byte stream, cut once into three disjoint parts:

* ``train`` (first 90 %): the only bytes training sees;
* ``calibration`` (next 5 %): the compile's calibration inputs (routing profiles, swap plans);
* ``heldout`` (last 5 %): evaluation and the traces swap plans are scored on, never trained on.

Tokens are bytes (vocab 256).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from ...errors import ModelError

SPLITS = {"train": (0.0, 0.90), "calibration": (0.90, 0.95), "heldout": (0.95, 1.0)}
VOCAB = 256

# Registry configs trained on this corpus: their adapter draws calibration and evaluation inputs from it.
TEXT_MODELS = ("mixtral-lm-bytes", "mixtral-lm-bytes-local")


_corpus_file: str | None = None


def use_corpus_file(path: str | None) -> None:
    """Read the corpus from a byte dump of it (:func:`corpus` written to a file) instead of ``pydoc_data``.

    The topics follow the Python version: a dump lets another Python train on exactly these bytes
    (and so on exactly these splits). None goes back to ``pydoc_data``.
    """
    global _corpus_file
    _corpus_file = path
    corpus.cache_clear()


@lru_cache(maxsize=1)
def corpus() -> bytes:
    """The whole corpus as bytes.

    Raises:
        ModelError: This Python was built without ``pydoc_data``, or the corpus file is unreadable.
    """
    if _corpus_file is not None:
        try:
            return Path(_corpus_file).read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read the corpus file {_corpus_file}: {exc}") from None
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ModelError("the byte-level LM corpus needs the stdlib module pydoc_data (not in this Python)") from None
    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def corpus_sha256() -> str:
    """Digest of the corpus (it follows the Python version's documentation)."""
    return hashlib.sha256(corpus()).hexdigest()


def split(name: str) -> np.ndarray:
    """One part of the corpus as uint8 token ids.

    Raises:
        ModelError: Unknown split name.
    """
    if name not in SPLITS:
        raise ModelError(f"unknown text split '{name}' (known: {', '.join(SPLITS)})")
    data = corpus()
    lo, hi = SPLITS[name]
    return np.frombuffer(data[int(len(data) * lo) : int(len(data) * hi)], dtype=np.uint8)


def windows(name: str, samples: int, length: int, seed: int) -> np.ndarray:
    """``samples`` windows of ``length`` consecutive bytes of a split, at seeded random offsets.

    Returns:
        int64 array (samples, length).

    Raises:
        ModelError: The split is shorter than one window.
    """
    data = split(name)
    if len(data) < length:
        raise ModelError(f"text split '{name}' has {len(data)} bytes, fewer than a window of {length}")
    starts = np.random.default_rng(seed).integers(0, len(data) - length + 1, size=samples)
    if not samples:
        return np.zeros((0, length), np.int64)
    return np.stack([data[s : s + length] for s in starts]).astype(np.int64)


def is_text_model(name: str) -> bool:
    """Whether a config name is (or derives, ``<name>-custom``, from) a model trained on this corpus."""
    return name in TEXT_MODELS or name.removesuffix("-custom") in TEXT_MODELS


def unigram_bits(train: np.ndarray, evaluate: np.ndarray) -> float:
    """Bits per byte of ``evaluate`` under the training split's byte frequencies (add-one smoothed)."""
    counts = np.bincount(train, minlength=VOCAB).astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    return float(-logp[evaluate].mean())
