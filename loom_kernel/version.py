"""The kernel's version (pyproject.toml reads it from ``loom_kernel.__version__``)."""

__version__ = "0.1.0"
