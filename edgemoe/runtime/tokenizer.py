"""Text in and out of a causal LM bundle: its manifest's ``tokenizer`` section.

Two kinds: ``bytes`` (the shipped byte-level models: a token is a UTF-8 byte) and ``tokenizers``
(a checkpoint folder's ``tokenizer.json``, copied into the bundle and checked before use, read by
the Hugging Face ``tokenizers`` library). Decoding streams: :meth:`Tokenizer.push` returns the
text a new token completes, so multi-byte characters and merged pieces print once whole.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from ..bundle.format import read_verified
from ..errors import BundleError, DependencyError, InputError


class Tokenizer:
    """Encodes a prompt and decodes generated tokens as they come.

    Args:
        root: Bundle folder.
        record: The manifest's ``tokenizer`` section.
    """

    def __init__(self, root: Path, record: dict):
        self.kind = record.get("kind")
        self._ids: list[int] = []
        self._shown = ""
        if self.kind == "bytes":
            self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")
        elif self.kind == "tokenizers":
            try:
                from tokenizers import Tokenizer as HFTokenizer
            except ImportError:
                raise DependencyError(
                    "this bundle's tokenizer needs the tokenizers library: pip install 'edgemoe[runtime]'"
                ) from None
            data = read_verified(root, record)  # size and sha256 before the library parses it
            try:
                self._hf = HFTokenizer.from_str(data.decode("utf-8"))
            except Exception as exc:  # the library raises its own exception type for a bad file
                raise BundleError(f"the bundle's tokenizer.json does not load: {exc}") from None
        else:
            raise BundleError(f"garbled manifest: unknown tokenizer kind {self.kind!r}")

    def encode(self, text: str) -> list[int]:
        """The prompt's token ids."""
        if not text:
            raise InputError("the prompt is empty")
        if self.kind == "bytes":
            return list(text.encode("utf-8"))
        return list(self._hf.encode(text).ids)

    def push(self, token: int) -> str:
        """Add a generated token; return the text it completes (may be empty)."""
        if self.kind == "bytes":
            return self._bytes.decode(bytes([token]))
        # Pieces decode differently in context (merged spaces, byte fallback): decode everything so
        # far and print what is new once it no longer ends in a partial character.
        self._ids.append(int(token))
        text = self._hf.decode(self._ids)
        if text.endswith("\ufffd") or not text.startswith(self._shown):
            return ""
        new, self._shown = text[len(self._shown) :], text
        return new

    def decode(self, tokens: list[int]) -> str:
        """The text of ``tokens`` (not streamed)."""
        if self.kind == "bytes":
            return bytes(tokens).decode("utf-8", errors="replace")
        return self._hf.decode(list(tokens))


def load_tokenizer(root: str | Path, manifest: dict) -> Tokenizer:
    """The bundle's tokenizer.

    Raises:
        InputError: The bundle has none (pass token ids instead).
    """
    record = manifest.get("tokenizer")
    if record is None:
        raise InputError(
            "this bundle has no tokenizer (its model reads token ids: use --prompt-ids); bundles get one from "
            "the byte-level models or a checkpoint folder's tokenizer.json"
        )
    return Tokenizer(Path(root), record)
