"""Bundle format (numpy-only; shared by the compiler and the runtime)."""

from .format import (
    FORMAT_TAG,
    MANIFEST,
    SCHEMA_VERSION,
    decode_expert,
    encode_expert,
    file_record,
    is_bundle,
    read_manifest,
    read_verified,
    sample_input,
    sha256_file,
    verified_path,
)

__all__ = [
    "FORMAT_TAG",
    "MANIFEST",
    "SCHEMA_VERSION",
    "decode_expert",
    "encode_expert",
    "file_record",
    "is_bundle",
    "read_manifest",
    "read_verified",
    "sample_input",
    "sha256_file",
    "verified_path",
]
