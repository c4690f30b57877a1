"""The kernel's version (pyproject.toml reads it here, without importing the package)."""

__version__ = "0.1.0"
