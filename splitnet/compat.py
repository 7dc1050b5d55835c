"""Make ``import torchvision`` work against the CPU build of torch.

The registry's torchvision 0.28.0 wheel is compiled against CUDA torch; with the CPU
torch its C extension fails to load and the import dies with
``operator torchvision::nms does not exist`` (torchmetrics then fails too). Declaring
the two missing operator schemas before the import lets datasets, transforms, models
and utils work; ``torchvision.ops.nms`` and ``torchvision.io`` stay unavailable, which
this project does not use. Where the extension loads, this module does nothing.
"""

from __future__ import annotations

import importlib.util

import torch

_MISSING_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None


def ensure_torchvision() -> None:
    """Define the operator schemas torchvision's import needs, once, if absent."""
    global _library
    if _library is not None or importlib.util.find_spec("torchvision") is None:
        return
    missing = [n for n in _MISSING_SCHEMAS if not _has_op(n)]
    if not missing:
        return
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _library.define(_MISSING_SCHEMAS[name])


def _has_op(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


ensure_torchvision()
