"""What a learned defense adds, in the CEM paper's terms: each defended point against its noise-alone twin.

The paper states robustness as the increase in attack MSE that CEM brings over the same
obfuscation noise without CEM, at matched accuracy. Between two runs of one setting the
attack MSE moves by 10-20% with the seed alone (docs/RESULTS.md), so a gain is only
meaningful paired: a CEM point is compared with the point whose settings are the same in
everything but CEM's (same cut, codec, noise, schedule, attack, link, hijack and seed), and the
pairs' gains are then averaged over seeds, their spread shown beside them.
"""

from __future__ import annotations

import statistics

# The edge-client settings of the defenses trained with the encoder (CEM, attacker-aware training,
# feature pruning): a point that sets one is compared with its twin, which differs from it only by these.
CEM_SETTINGS = frozenset({"cem", "lambda", "var_threshold", "cem_scale", "cem_warmup", "cem_gates", "freeze_gates"})
DEFENSE_SETTINGS = CEM_SETTINGS | {"adv_weight", "adv_blocks", "adv_width", "adv_every", "adv_lr", "prune_ratio",
                                   "prune_freeze"}
MATCHED_POINTS = 1.0  # accuracy within this many points counts as matched (the CEM paper's comparison)


def _twin_key(row: dict, drop: frozenset = DEFENSE_SETTINGS) -> tuple:
    settings = {k: v for k, v in row["settings"].items() if k not in drop}
    attack = tuple(sorted(row.get("attack_settings", {}).items()))
    # rows from before links and hijacks have neither key
    return (tuple(sorted((k, str(v)) for k, v in settings.items())), attack, row.get("link") or "none",
            row.get("hijack") or "none")


def _curve_key(row: dict) -> tuple:
    """What a point shares with the noise-alone points of its trade-off curve: all but its learned
    defense and the noise level."""
    return _twin_key(row, DEFENSE_SETTINGS | {"noise"})


def noise_curve_mse(accuracy: float, curve: list[tuple[float, float]]) -> float | None:
    """The attack MSE noise alone would leave at `accuracy`, read off its curve of (accuracy, MSE)
    points (one seed, several noise levels): linear between the two points whose accuracies
    bracket it, the nearest point if it lies within MATCHED_POINTS beyond the curve's end,
    None further out (noise alone was not measured near that accuracy)."""
    curve = sorted(curve)
    if not curve:
        return None
    for (a0, m0), (a1, m1) in zip(curve, curve[1:]):
        if a0 <= accuracy <= a1:
            return m0 if a1 == a0 else m0 + (m1 - m0) * (accuracy - a0) / (a1 - a0)
    end_acc, end_mse = min(curve, key=lambda point: abs(point[0] - accuracy))
    return end_mse if round(abs(accuracy - end_acc) * 100, 9) <= MATCHED_POINTS else None


def _is_defended(row: dict) -> bool:
    """Whether the point trains a defense with its encoder: CEM at lambda > 0, an attacker-aware
    weight, or pruned channels."""
    s = row["settings"]
    return ((s.get("cem", "none") != "none" and float(s.get("lambda", 0)) > 0)
            or float(s.get("adv_weight", 0)) > 0 or float(s.get("prune_ratio", 0)) > 0)


def pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(defended point, its twin without the learned defense) for every defended point whose twin ran
    to its end: a point its hijacking detector stopped has no accuracy to compare (null)."""
    whole = [r for r in rows if r.get("test_accuracy") is not None]
    twins = {_twin_key(r): r for r in whole if not _is_defended(r)}
    return [(r, twins[_twin_key(r)]) for r in whole if _is_defended(r) and _twin_key(r) in twins]


def defense_gains(rows: list[dict], methods: tuple[str, ...]) -> list[dict]:
    """Per group of defended points (CEM, attacker-aware, pruned) alike in all but the seed: the baseline's defense, the seeds paired,
    and for accuracy and each attack method the mean (and spread) of the paired differences.

    Keys: `defense`, `baseline`, `axes`, `seeds`, `accuracy_delta_points` (+ `_std`, and
    `_each`: per seed), `matched` (every pair within MATCHED_POINTS of accuracy), and per method
    `<method>_mse_gain_pct` (+ `_std`, `_each`) and `<method>_ssim_delta`. Where noise alone ran at
    more than one level, also `<method>_mse_gain_at_accuracy_pct` (+ `_std`, `_each`): the gain over
    what noise alone leaves at the defended point's own accuracy (`noise_curve_mse`, same seed), the
    comparison that still holds when the defense costs accuracy at the same noise."""
    curves: dict[tuple, list[dict]] = {}
    for row in rows:
        if not _is_defended(row):
            curves.setdefault(_curve_key(row), []).append(row)
    groups: dict[str, list[tuple[dict, dict]]] = {}
    for defended, base in pairs(rows):
        groups.setdefault(defended["group"], []).append((defended, base))
    out = []
    for members in groups.values():
        members.sort(key=lambda pair: pair[0]["seed"])
        first, base = members[0]
        acc = [(c["test_accuracy"] - b["test_accuracy"]) * 100 for c, b in members]
        row = {"defense": first["defense"], "baseline": base["defense"], "cut": first["cut"], "codec": first["codec"],
               "axes": " ".join(f"{k}={v}" for k, v in first.get("axes", {}).items()),
               "seeds": [c["seed"] for c, _ in members], **_summary("accuracy_delta_points", acc),
               "matched": all(round(abs(a), 9) <= MATCHED_POINTS for a in acc)}  # 1.0000000000009 is 1 point
        for method in methods:
            paired = [(c, b) for c, b in members if c.get(f"{method}_mse") and b.get(f"{method}_mse")]
            if paired:
                row.update(_summary(f"{method}_mse_gain_pct",
                                    [(c[f"{method}_mse"] / b[f"{method}_mse"] - 1) * 100 for c, b in paired]))
                row[f"{method}_ssim_delta"] = statistics.fmean(c[f"{method}_ssim"] - b[f"{method}_ssim"]
                                                               for c, b in paired)
            at_accuracy = [g for c, _ in members if (g := _gain_at_accuracy(c, curves[_curve_key(c)], method))
                           is not None]
            if at_accuracy:
                row.update(_summary(f"{method}_mse_gain_at_accuracy_pct", at_accuracy))
        out.append(row)
    return out


def _gain_at_accuracy(defended: dict, noise_alone: list[dict], method: str) -> float | None:
    """Percent more attack MSE than noise alone leaves at the defended point's accuracy; None where
    noise alone ran at one level only (no curve) or not near that accuracy."""
    curve = [(n["test_accuracy"], n[f"{method}_mse"]) for n in noise_alone if n.get(f"{method}_mse")]
    if len({n["settings"].get("noise") for n in noise_alone}) < 2 or not defended.get(f"{method}_mse"):
        return None
    mse = noise_curve_mse(defended["test_accuracy"], curve)
    return None if mse is None else (defended[f"{method}_mse"] / mse - 1) * 100


def _summary(key: str, values: list[float]) -> dict:
    return {key: statistics.fmean(values), f"{key}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            f"{key}_each": values}


def markdown(gains: list[dict], methods: tuple[str, ...]) -> str:
    """The table report.md shows; empty when the sweep has no defended point with a twin."""
    if not gains:
        return ""
    curve = {m for m in methods if any(f"{m}_mse_gain_at_accuracy_pct" in g for g in gains)}
    head = ["defense", "baseline", "seeds", "accuracy change (points)"]
    for m in methods:
        head += [f"{m}: attack MSE gain", f"{m}: SSIM change"]
        head += [f"{m}: attack MSE gain over noise alone at the same accuracy"] if m in curve else []
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for g in gains:
        name = g["defense"] + (f" ({g['axes']})" if g["axes"] else "")
        cells = [name, g["baseline"], ", ".join(str(s) for s in g["seeds"]),
                 _cell(g, "accuracy_delta_points", "{:+.1f}") + ("" if g["matched"] else " (not matched)")]
        for m in methods:
            cells += [_cell(g, f"{m}_mse_gain_pct", "{:+.0f}%"),
                      f"{g[f'{m}_ssim_delta']:+.3f}" if f"{m}_ssim_delta" in g else "-"]
            cells += [_cell(g, f"{m}_mse_gain_at_accuracy_pct", "{:+.0f}%")] if m in curve else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(g: dict, key: str, fmt: str) -> str:
    if key not in g:
        return "-"
    each = g[f"{key}_each"]
    text = fmt.format(g[key])
    return text + (f" ({', '.join(fmt.format(v) for v in each)})" if len(each) > 1 else "")
