"""``python -m loom_kernel``: the ``loom`` command."""

from loom_kernel.cli import main

raise SystemExit(main())
