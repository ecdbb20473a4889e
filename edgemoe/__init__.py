"""edgemoe: a deployment compiler for Mixture-of-Experts models on edge hardware.

Importing the package imports nothing heavy: the runtime (``edgemoe.runtime``) must stay
installable on a device without torch or the compiler.
"""

__version__ = "0.1.0"
