"""The Loom's benchmarks: ``python -m bench`` runs the performance targets (see ``bench/__main__.py``);
``bench/embed.py`` and ``bench/generate.py`` compare with sentence-transformers and transformers in more detail."""
