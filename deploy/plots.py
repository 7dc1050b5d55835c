"""Trade-off plots and the `report.md` a person reads top to bottom."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when leakage (x) is minimised and accuracy (y) maximised."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _label(row: dict) -> str:
    return f"{row['defense']} / {row['codec']}" + (f" / {row['cut']}" if row.get("cut") else "")


def accuracy_vs_leakage(rows: list[dict], method: str, path: Path) -> None:
    key = f"{method}_ssim"
    usable = [r for r in rows if r.get(key) is not None]
    pts = [(r[key], r["test_accuracy"]) for r in usable]
    fig, ax = plt.subplots(figsize=(7, 5))
    for r, (x, y) in zip(usable, pts):
        ax.errorbar(x, y, xerr=r.get(f"{key}_std", 0), yerr=r.get("test_accuracy_std", 0), fmt="o", capsize=3)
        ax.annotate(_label(r), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = pareto_front(pts)
    if front:
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto front")
        ax.legend(loc="lower right")
    ax.set_xlabel(f"{method} attack SSIM (lower leaks less)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs leakage")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bytes_vs_leakage(rows: list[dict], method: str, path: Path) -> None:
    key = f"{method}_ssim"
    usable = [r for r in rows if r.get(key) is not None]
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in usable:
        ax.errorbar(r["bytes_up_per_sample"], r[key], yerr=r.get(f"{key}_std", 0), fmt="s", capsize=3)
        ax.annotate(_label(r), (r["bytes_up_per_sample"], r[key]), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes up per training sample (log)")
    ax.set_ylabel(f"{method} attack SSIM")
    ax.set_title("Communication vs leakage")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(c for c, _ in columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = []
    for r in rows:
        cells = []
        for key, fmt in columns:
            value = r.get(key)
            std = r.get(f"{key}_std")
            text = "-" if value is None else (fmt.format(value) if not isinstance(value, str) else value)
            if std:
                text += " ± " + fmt.format(std)
            cells.append(text)
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


def write_report(config, rows: list[dict], out: Path, title: str = "Sweep: accuracy vs leakage vs communication",
                 preface: str = "") -> None:
    method = config.attacks[0] if config.attacks else None
    columns = [("defense", "{}"), ("codec", "{}"), ("cut", "{}"), ("test_accuracy", "{:.3f}"),
               ("bytes_up_per_sample", "{:.0f}"), ("rtt_ms_p50", "{:.1f}"), ("intra_mse", "{:.4f}")]
    for m in config.attacks:
        columns += [(f"{m}_ssim", "{:.3f}"), (f"{m}_psnr", "{:.1f}"), (f"{m}_mse", "{:.4f}")]
    lines = [f"# {title}", ""]
    if preface:
        lines += [preface, ""]
    lines += [f"{len(rows)} settings, {max((r.get('seeds', 1) for r in rows), default=1)} seed(s) each "
              "(mean ± std over seeds). Attacks ran on features captured by the proxy from real traffic; "
              "scores are per image on [0, 1] images, then averaged (see `attack.json` for the SSIM convention).",
              "", markdown_table(rows, columns), ""]
    if method:
        accuracy_vs_leakage(rows, method, out / "accuracy_vs_ssim.png")
        bytes_vs_leakage(rows, method, out / "bytes_vs_ssim.png")
        lines += ["## Accuracy vs leakage", "", "Top left is best: accurate and hard to invert. The dashed line "
                  "joins the settings no other setting beats on both.", "", "![](accuracy_vs_ssim.png)", "",
                  "## Communication vs leakage", "", "![](bytes_vs_ssim.png)", "",
                  "## Reconstructions", "", "Each grid: private images (top rows) above the attack's "
                  "reconstruction (bottom rows).", ""]
        for r in rows:
            if r.get("grid"):
                lines += [f"### {_label(r)}", "", f"SSIM {r.get(f'{method}_ssim', float('nan')):.3f}, accuracy "
                          f"{r['test_accuracy']:.3f}", "", f"![]({r['grid']})", ""]
    (out / "report.md").write_text("\n".join(lines))
