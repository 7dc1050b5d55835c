"""Deprecated alias, for one release: `python -m deploy.ray_cli` runs `split-ray`, which is now
`deploy.sim.cli` (docs/ARCHITECTURE.md §7). Use `split-ray` or `python -m deploy.sim.cli`.

For `python -m` only: importing this module gives nothing.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from deploy.sim.cli import main

    print("split-ray: note: `python -m deploy.ray_cli` is deprecated and goes in the next release: "
          "use split-ray or `python -m deploy.sim.cli`", file=sys.stderr)
    sys.exit(main())
