"""Integer factorisations of layer sizes, for structured matrices (Kronecker sums, tensor trains) whose factor
shapes must multiply exactly to a layer's input and output widths."""

from __future__ import annotations

import math
from functools import cache

from lmcompress.errors import RecipeError


@cache
def divisors(n: int) -> tuple[int, ...]:
    """Every divisor of n, ascending."""
    if n < 1:
        raise ValueError(f"divisors of {n} are not defined")
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return tuple(sorted({*small, *(n // d for d in small)}))


def factorizations(n: int, parts: int) -> list[tuple[int, ...]]:
    """Every ordered way to write n as a product of `parts` integers (1s allowed)."""
    if parts == 1:
        return [(n,)]
    return [(d, *rest) for d in divisors(n) for rest in factorizations(n // d, parts - 1)]


def balanced_factors(n: int, parts: int, what: str = "size") -> tuple[int, ...]:
    """n as `parts` factors, each at least 2, as equal as possible (least spread of their logarithms), in
    ascending order. RecipeError when n has too few prime factors (a prime width cannot be split)."""
    options = [f for f in factorizations(n, parts) if min(f) >= 2 and list(f) == sorted(f)]
    if not options:
        raise RecipeError(f"{what} {n} does not factor into {parts} parts of at least 2")
    mean = math.log(n) / parts
    return min(options, key=lambda f: sum((math.log(x) - mean) ** 2 for x in f))
