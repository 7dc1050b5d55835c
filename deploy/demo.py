"""`split-demo`: the whole story on the bundled digits, through real processes on loopback.

Starts a `cloud-server`, runs one `edge-client` process per row (codec x defense),
prints a table and writes `report.json` into the output folder, then stops the server.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.processes import start_server
from splitnet.cli_util import setup_logging

log = logging.getLogger("deploy.demo")


@dataclass(frozen=True)
class Row:
    defense: str
    codec: str
    flags: tuple[str, ...] = ()


ROWS = (Row("none", "fp32"), Row("none", "int8"))
TABLE = (("defense", "{}"), ("codec", "{}"), ("test_accuracy", "{:.3f}"), ("bytes_up_per_sample", "{:.0f}"),
         ("samples_per_second", "{:.0f}"), ("rtt_ms_p50", "{:.2f}"))


def run_edge(server: str, row: Row, out: Path, epochs: int, seed: int) -> dict:
    """One edge-client process; returns its JSON report."""
    name = f"{row.defense}-{row.codec}"
    report = out / f"edge-{name}.json"
    cmd = [sys.executable, "-m", "edge_client", "--server", server, "--epochs", str(epochs), "--codec", row.codec,
           "--job", f"demo-{name}", "--seed", str(seed), "--report", str(report), "--no-progress", *row.flags]
    log.info("edge-client %s", " ".join(cmd[3:]))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"edge-client for {name} failed:\n{done.stderr[-2000:]}")
    return json.loads(report.read_text())


def format_table(rows: list[dict]) -> str:
    header = [k for k, _ in TABLE]
    cells = [[fmt.format(r[k]) if r.get(k) is not None else "-" for k, fmt in TABLE] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="split-demo", description=__doc__)
    p.add_argument("--out", default="out/demo", help="output folder (default %(default)s)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    server = start_server("--checkpoint-dir", str(out / "checkpoints"))
    log.info("cloud-server at %s", server.address)
    try:
        rows = []
        for row in ROWS:
            report = run_edge(server.address, row, out, args.epochs, args.seed)
            rows.append({**report, "defense": row.defense, "defense_settings": report["defense"]})
    finally:
        server.stop()
    (out / "server.log").write_text(server.output())
    summary = {"rows": [{k: r.get(k) for k, _ in TABLE} for r in rows],
               "wall_seconds": time.monotonic() - start}
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(rows))
    print(f"\nreport: {out / 'report.json'} ({summary['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
