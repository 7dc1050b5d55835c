"""Deprecated alias, for one release: `python -m deploy.plan` runs `split-plan`, which is now
`deploy.experiments.plan` (docs/ARCHITECTURE.md §7). Use `split-plan` or `python -m deploy.experiments.plan`.

For `python -m` only: importing this module gives nothing.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from deploy.experiments.plan import main

    print("split-plan: note: `python -m deploy.plan` is deprecated and goes in the next release: "
          "use split-plan or `python -m deploy.experiments.plan`", file=sys.stderr)
    sys.exit(main())
