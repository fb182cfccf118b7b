"""The Pareto front of a sweep: the points no other point beats on both quality and cost.

Written here because it is a dozen lines on plain lists; a library would add a dependency for a sort.
"""

from __future__ import annotations

from collections.abc import Sequence


def pareto_front(costs: Sequence[float], qualities: Sequence[float], higher_is_better: bool = True) -> list[int]:
    """Indices of the non-dominated points, cheapest first.

    A point is dominated when another costs no more and is at least as good, and is strictly better on one
    of the two. Equal points are all kept. NaN costs or qualities (failed points) are never on the front.
    """
    if len(costs) != len(qualities):
        raise ValueError("costs and qualities must have the same length")
    sign = 1.0 if higher_is_better else -1.0
    valid = [i for i in range(len(costs)) if costs[i] == costs[i] and qualities[i] == qualities[i]]
    # cheapest first; among equal costs the best first, so a point is on the front iff it beats every
    # quality seen so far (or ties the best at the same cost)
    order = sorted(valid, key=lambda i: (costs[i], -sign * qualities[i]))
    front: list[int] = []
    best = float("-inf")
    best_cost = None
    for i in order:
        quality = sign * qualities[i]
        if quality > best:
            front.append(i)
            best, best_cost = quality, costs[i]
        elif quality == best and costs[i] == best_cost:
            front.append(i)
    return front
