"""Deprecated alias, for one release: `python -m deploy.plan` runs `split-plan`, which is now
`deploy.experiments.plan` (docs/ARCHITECTURE.md §7). Use `split-plan` or `python -m deploy.experiments.plan`.

Importing it gives `deploy.experiments.plan`'s public names, for this release too.
"""

from __future__ import annotations

import sys

from deploy.experiments.plan import *  # noqa: F401,F403
from deploy.experiments.plan import main

if __name__ == "__main__":
    print("split-plan: note: `python -m deploy.plan` is deprecated and goes in the next release: "
          "use split-plan or `python -m deploy.experiments.plan`", file=sys.stderr)
    sys.exit(main())
