"""Deprecated alias, for one release: `python -m deploy.ray_cli` runs `split-ray`, which is now
`deploy.sim.cli` (docs/ARCHITECTURE.md §7). Use `split-ray` or `python -m deploy.sim.cli`.

Importing it gives `deploy.sim.cli`'s public names, for this release too.
"""

from __future__ import annotations

import sys

from deploy.sim.cli import *  # noqa: F401,F403
from deploy.sim.cli import main

if __name__ == "__main__":
    print("split-ray: note: `python -m deploy.ray_cli` is deprecated and goes in the next release: "
          "use split-ray or `python -m deploy.sim.cli`", file=sys.stderr)
    sys.exit(main())
