"""Tools built on the compiler, not stages of it: dense → MoE conversion and bundle verification."""
