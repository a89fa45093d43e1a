"""The library version, in a leaf module (the package, checkpoints and the amortizer read it)."""

__version__ = "0.6.1"
