"""Pareto fronts: the points no other point beats in every coordinate. The planner's front of
(time, attack SSIM, accuracy) and the report's plots of accuracy against leakage."""

from __future__ import annotations


def nondominated(points: list[tuple[float, ...]]) -> list[int]:
    """Indices of the points no other point dominates, every coordinate minimised."""
    def dominates(a, b) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when leakage (x) is minimised and accuracy (y) maximised."""
    return sorted(nondominated([(x, -y) for x, y in points]), key=lambda i: points[i][0])
