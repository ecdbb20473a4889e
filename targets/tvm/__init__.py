"""Apache TVM target (Relax): partitions compiled to shared libraries run by a Relax VirtualMachine."""

from .target import TARGET, TvmTarget

__all__ = ["TARGET", "TvmTarget"]
