"""Trade-off plots and the `report.md` a person reads top to bottom."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from deploy.experiments.gains import MATCHED_POINTS, markdown  # noqa: E402
from deploy.experiments.pareto import pareto_front  # noqa: E402

MARKERS = "osD^vP*Xh<>p"
LABEL_ALL_UP_TO = 8  # more points than this: only the Pareto front is labelled, the rest read from the legends


def _label(row: dict) -> str:
    return f"{row['defense']} / {_variant(row)}"


def _variant(row: dict) -> str:
    """What tells apart points of one defense: codec, cut and the values of any other [grid] axes. Not
    the link: a setting leaks and scores the same on every link (`time_vs_leakage` shows what moves)."""
    return " / ".join([row["codec"], *(row[k] for k in ("cut", "axes") if row.get(k))])


def _styles(rows: list[dict]) -> tuple[dict[str, tuple], dict[str, str]]:
    """A colour per defense and a marker per (codec, cut), the same in both plots: a full sweep
    has dozens of points, and dozens of overlapping labels cannot be read."""
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    variants = list(dict.fromkeys(_variant(r) for r in rows))
    cmap = plt.get_cmap("tab10" if len(defenses) <= 10 else "tab20")
    return ({d: cmap(i % cmap.N) for i, d in enumerate(defenses)},
            {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(variants)})


def _legends(ax, colors: dict[str, tuple], markers: dict[str, str], extra: list | None = None) -> None:
    def handle(color, marker) -> Line2D:
        return Line2D([], [], color=color, marker=marker, linestyle="")

    first = ax.legend([handle(c, "o") for c in colors.values()], list(colors), title="defense", fontsize=8,
                      loc="upper left", bbox_to_anchor=(1.02, 1.0))
    ax.add_artist(first)
    handles = [handle("gray", m) for m in markers.values()] + [h for h, _ in extra or []]
    ax.legend(handles, list(markers) + [label for _, label in extra or []], title="codec / cut / axes",
              fontsize=8, loc="lower left", bbox_to_anchor=(1.02, 0.0))


def _points(ax, rows: list[dict], xs: list[float], ys: list[float], xkey: str | None, ykey: str | None,
            labelled: set[int], colors: dict[str, tuple], markers: dict[str, str]) -> list[tuple[str, float, float]]:
    """One point per row with its spread over seeds as error bars, styled by `_styles`; returns
    the labels to place once the axes are final (`_place_labels`)."""
    for r, x, y in zip(rows, xs, ys):
        ax.errorbar(x, y, xerr=r.get(f"{xkey}_std", 0) if xkey else None, yerr=r.get(f"{ykey}_std", 0) if ykey else None,
                    fmt=markers[_variant(r)], color=colors[r["defense"]], capsize=3, alpha=0.85)
    labels = [(_label(rows[i]), xs[i], ys[i], colors[rows[i]["defense"]]) for i in sorted(labelled)]
    return list(dict.fromkeys(labels))  # one setting under several links: one point, one label


def _place_labels(ax, labels: list[tuple], gap_px: float = 2.0) -> list:
    """Annotate each point (text, x, y[, colour]) so that no two labels overlap and none leaves the
    axes (where the legends sit): a label goes up-right of its point, or up-left, down-right,
    down-left if that stays inside; one that would cover an earlier label moves away from its
    point past it, with a thin leader line back (close points of a sweep otherwise print on top
    of each other). A label takes its point's colour, so one that ends up nearer another point
    still says whose it is (the demo's bytes plot had a label beside the wrong point). Lowest
    points first. Returns the annotations."""
    fig = ax.figure
    fig.canvas.draw()  # final limits and scales: the boxes below are measured in pixels
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    step = 72.0 / fig.dpi  # pixels -> points
    placed, boxes = [], []

    def fits(box) -> bool:
        return (box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1
                and not any(box.overlaps(other) for other in boxes))

    for text, x, y, *style in sorted(labels, key=lambda t: ax.transData.transform((t[1], t[2]))[1]):
        color = style[0] if style else "black"
        best = None
        for dx, dy in ((1, 1), (-1, 1), (1, -1), (-1, -1)):
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(5 * dx, 5 * dy), fontsize=8,
                               color=color, ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top")
            box, shift = note.get_window_extent(renderer), 0.0
            while not fits(box) and box.y0 >= frame.y0 and box.y1 <= frame.y1 and shift < frame.height:
                shift += (box.height + gap_px) * step
                note.set_position((5 * dx, (5 + shift) * dy))
                box = note.get_window_extent(renderer)
            if fits(box) and (best is None or shift < best[1]):
                if best is not None:
                    best[0].remove()
                best = (note, shift, dx, dy)
            else:
                note.remove()
            if best is not None and best[1] == 0:
                break
        if best is None:  # nowhere inside: up-right of the point, as before
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8, color=color)
        elif best[1] > 0:  # moved off its point: a leader line says whose label it is
            note, shift, dx, dy = best
            note.remove()
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(5 * dx, (5 + shift) * dy),
                               fontsize=8, color=color, ha="left" if dx > 0 else "right",
                               va="bottom" if dy > 0 else "top",
                               arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.4", "shrinkA": 0, "shrinkB": 2})
        else:
            note = best[0]
        placed.append(note)
        note.update_positions(renderer)
        boxes.append(Text.get_window_extent(note, renderer))  # the text alone, not its leader line
    return placed


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legends sit outside the axes
    plt.close(fig)


def accuracy_vs_leakage(rows: list[dict], method: str, path: Path) -> None:
    key = f"{method}_ssim"
    usable = [r for r in rows if r.get(key) is not None]
    pts = [(r[key], r["test_accuracy"]) for r in usable]
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(7, 5))
    labelled = set(range(len(usable))) if len(usable) <= LABEL_ALL_UP_TO else set(front)
    styles = _styles(usable)
    labels = _points(ax, usable, [x for x, _ in pts], [y for _, y in pts], key, "test_accuracy", labelled, *styles)
    extra = []
    if front:
        (line,) = ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1)
        extra.append((line, "Pareto front (labelled)"))
    _legends(ax, *styles, extra)
    ax.set_xlabel(f"{method} attack SSIM (lower leaks less)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs leakage")
    ax.grid(alpha=0.3)
    _place_labels(ax, labels)
    _save(fig, path)


def bytes_vs_leakage(rows: list[dict], method: str, path: Path) -> None:
    key = f"{method}_ssim"
    usable = [r for r in rows if r.get(key) is not None]
    fig, ax = plt.subplots(figsize=(7, 5))
    labelled = set(range(len(usable))) if len(usable) <= LABEL_ALL_UP_TO else set()
    styles = _styles(usable)
    labels = _points(ax, usable, [r["bytes_up_per_sample"] for r in usable], [r[key] for r in usable], None, key,
                     labelled, *styles)
    _legends(ax, *styles)
    ax.set_xscale("log")
    ax.set_xlabel("bytes up per training sample (log)")
    ax.set_ylabel(f"{method} attack SSIM")
    ax.set_title("Communication vs leakage")
    ax.grid(alpha=0.3, which="both")
    _place_labels(ax, labels)
    _save(fig, path)


def time_vs_leakage(rows: list[dict], method: str, path: Path) -> None:
    """Seconds per training epoch against attack SSIM, one panel per link: what a cut or codec
    costs in time on each link, beside what it leaks (the same settings leak the same on every
    link; only their time moves)."""
    key = f"{method}_ssim"
    usable = [r for r in rows if r.get(key) is not None and r.get("seconds_per_epoch")]
    links = list(dict.fromkeys(r.get("link", "none") for r in usable))
    fig, axes = plt.subplots(1, max(len(links), 1), figsize=(5 * max(len(links), 1) + 2, 5), sharey=True,
                             squeeze=False)
    colors, markers = _styles(usable)  # one setting, one style, on every link
    for ax, link in zip(axes[0], links):
        mine = [r for r in usable if r.get("link", "none") == link]
        labelled = set(range(len(mine))) if len(mine) <= LABEL_ALL_UP_TO else set()
        labels = _points(ax, mine, [r["seconds_per_epoch"] for r in mine], [r[key] for r in mine],
                         "seconds_per_epoch", key, labelled, colors, markers)
        ax.set_xlim(left=0)
        ax.set_xlabel("seconds per training epoch")
        ax.set_title(f"link: {link}")
        ax.grid(alpha=0.3)
        _place_labels(ax, labels)
    axes[0][0].set_ylabel(f"{method} attack SSIM (lower leaks less)")
    _legends(axes[0][-1], colors, markers)
    fig.suptitle("Time per epoch vs leakage, per link")
    _save(fig, path)


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
            if std is not None and value is not None and r.get("seeds", 1) > 1:  # a spread of 0 over seeds is shown
                text += " ± " + fmt.format(std)
            cells.append(text)
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


def write_report(config, rows: list[dict], out: Path, title: str = "Sweep: accuracy vs leakage vs communication",
                 preface: str = "", gains: list[dict] | None = None) -> None:
    """report.md and the plots; `gains`: `deploy.experiments.gains.defense_gains` of the sweep's points."""
    method = config.attacks[0] if config.attacks else None
    columns = [("defense", "{}"), ("codec", "{}"), ("cut", "{}"), ("bottleneck", "{}"), ("test_accuracy", "{:.3f}"),
               ("bytes_up_per_sample", "{:.0f}"), ("rtt_ms_p50", "{:.1f}"), ("intra_mse", "{:.4f}")]
    linked = any(r.get("link", "none") != "none" for r in rows)
    if linked:
        columns[4:4] = [("link", "{}")]
        columns += [("seconds_per_epoch", "{:.2f}"), ("time_to_accuracy_s", "{:.1f}")]
    if any(r.get("latency_ms_p50") is not None for r in rows):
        columns += [("latency_ms_p50", "{:.1f}"), ("latency_ms_p99", "{:.1f}")]
    if any(r.get("axes") for r in rows):
        columns.insert(4, ("axes", "{}"))
    for m in config.scored:
        columns += [(f"{m}_ssim", "{:.3f}"), (f"{m}_psnr", "{:.1f}"), (f"{m}_mse", "{:.4f}")]
    if any(r.get("hijack", "none") != "none" for r in rows):  # the hijacker's own reconstructions (runner)
        columns += [("hijack", "{}"), ("hijack_ssim", "{:.3f}"), ("hijack_ssim_max", "{:.3f}"),
                    ("hijack_ssim_at_detection", "{:.3f}")]
    if any("detected" in r for r in rows):  # averaged over seeds: the share of runs the detector stopped
        columns += [("detected", "{:.2f}"), ("detected_at_step", "{:.0f}")]
    lines = [f"# {title}", ""]
    if preface:
        lines += [preface, ""]
    lines += [f"{len(rows)} settings, {max((r.get('seeds', 1) for r in rows), default=1)} seed(s) each "
              "(mean ± std over seeds). Attacks ran on features captured by the proxy from real traffic; "
              "scores are per image on [0, 1] images, then averaged (see `attack.json` for the SSIM convention).",
              "", markdown_table(rows, columns), ""]
    if gains:
        lines += ["## What a defense adds over noise alone", "", "Each point with a defense trained with the "
                  "encoder (CEM, attacker-aware training, pruning) against the point that differs from it only by "
                  "that defense, at the same seed; the mean over seeds, then each seed in brackets. The CEM paper "
                  "states robustness this way: attack-MSE gain at matched accuracy (within "
                  f"{MATCHED_POINTS:g} point).", "", markdown(gains, config.scored), ""]
    if method:
        accuracy_vs_leakage(rows, method, out / "accuracy_vs_ssim.png")
        bytes_vs_leakage(rows, method, out / "bytes_vs_ssim.png")
        lines += ["## Accuracy vs leakage", "", "Top left is best: accurate and hard to invert. The dashed line "
                  "joins the settings no other setting beats on both.", "", "![](accuracy_vs_ssim.png)", "",
                  "## Communication vs leakage", "", "![](bytes_vs_ssim.png)", ""]
        if linked:
            time_vs_leakage(rows, method, out / "time_vs_ssim.png")
            lines += ["## Time vs leakage, per link", "", f"Seconds per training epoch through each link; "
                      f"`time_to_accuracy_s`: training seconds until an epoch's training accuracy reached "
                      f"{config.target_accuracy:g}. Bottom left is best: fast and hard to invert.", "",
                      "![](time_vs_ssim.png)", ""]
        lines += ["## Reconstructions", "", "In each grid the rows alternate: a row of private images "
                  "(labelled \"private\") directly above the attack's reconstructions of them (\"recon\").", ""]
        for r in rows:
            if r.get("grid"):
                lines += [f"### {_label(r)}", "", f"SSIM {r.get(f'{method}_ssim', float('nan')):.3f}, accuracy "
                          f"{r['test_accuracy']:.3f}", "", f"![]({r['grid']})", ""]
    (out / "report.md").write_text("\n".join(lines))
