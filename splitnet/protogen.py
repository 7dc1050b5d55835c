"""Regenerate the gRPC modules in `splitnet/v1/` from `proto/`.

`python -m splitnet.protogen` rewrites them; `tests/test_proto_fresh.py` regenerates into
a temporary folder and fails if the committed files differ, so the wire contract and the
code cannot drift apart. The `-I proto` root makes protoc emit `from splitnet.v1 import
split_pb2`, which imports as part of this package.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
GENERATED = ("split_pb2.py", "split_pb2.pyi", "split_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *map(str, proto_files())]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


if __name__ == "__main__":
    generate(ROOT)
    sys.exit(0)
