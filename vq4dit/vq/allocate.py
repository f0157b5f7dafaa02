"""Per-layer bit allocation: which codebook setting each quantized layer gets under an average bit budget.

Each layer l has a few options s (a codebook size k and sub-vector length d that fit its shape), each costing
c_ls = N_l * ceil(log2 k) / d index bits (N_l weights) and giving an estimated output error e_ls (HIGGS-style:
a_l t_ls^2, a_l the output's sensitivity to a relative weight error of layer l, t_ls the layer's relative
weight-quantization error at s). `solve` picks one option per layer minimising sum e_ls under sum c_ls <= budget,
by a dynamic program over the layers on an integer cost grid (a multiple-choice knapsack). Pure functions of
arrays; knows no model.
"""
import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

from vq4dit.vq.packing import index_bits

MAX_CELLS = 1 << 16  # cost-grid cells of the dynamic program (its choice table holds layers x cells bytes)
DEFAULT_SETTINGS = "256x16,256x8,256x16x2,256x8x2,256x6,64x4,256x4,64x2"  # 0.5 to 3 index bits; two residual stages


@dataclass(frozen=True)
class Setting:
    """A layer's codebook setting: k codewords of d weights, in `stages` residual stages whose codewords add
    (vq.residual); stages x ceil(log2 k) / d index bits per weight as stored."""

    k: int
    d: int
    stages: int = 1

    @property
    def bits(self):
        return self.stages * index_bits(self.k) / self.d

    def __str__(self):
        return f"k{self.k} d{self.d}" + (f" x{self.stages}" if self.stages > 1 else "")


def parse_settings(text):
    """Settings from "KxD,KxDxS,..." (e.g. "256x8,256x4,256x8x2": S residual stages, 1 when not given), sorted by
    bits, then k, d and stages; a ValueError names a bad entry."""
    out = set()
    for part in text.split(","):
        fields = part.strip().split("x")
        if not (2 <= len(fields) <= 3 and all(f.isdigit() for f in fields)) or not 2 <= int(fields[0]) <= 65536 \
                or int(fields[1]) < 1 or (len(fields) == 3 and not 1 <= int(fields[2]) <= 8):
            raise ValueError(f"{part.strip()!r} is not KxD or KxDxS with k in 2..65536, d >= 1 and S in 1..8 "
                             "(e.g. 256x4, 256x8x2)")
        out.add(Setting(*map(int, fields)))
    return tuple(sorted(out, key=lambda s: (s.bits, s.k, s.d, s.stages)))


@dataclass(frozen=True)
class Option:
    """One choice for one layer: its index bits in total and its estimated output error."""

    cost: int
    error: float


def _grid(costs, budget):
    """(unit, integer costs, integer budget): exact when the gcd of the costs leaves at most MAX_CELLS cells, else
    costs rounded up and the budget down to a coarser unit (a choice never exceeds the true budget)."""
    unit = reduce(math.gcd, costs, 0) or 1
    if budget // unit > MAX_CELLS:
        unit = -(-budget // MAX_CELLS)
    return unit, [-(-c // unit) for c in costs], budget // unit


def solve(options, budget):
    """The index of one option per layer minimising the summed error with summed cost <= `budget`, or None when
    even the cheapest options exceed it.

    options: per layer a list of Option. Dynamic program over the layers: best[c] is the least error of the layers
    so far at grid cost exactly c; choice[l, c] the option layer l took there. With a coarse grid (see _grid) the
    result may be slightly worse than the optimum, never over budget.
    """
    if sum(min(o.cost for o in layer) for layer in options) > budget:
        return None
    unit, grid_costs, cells = _grid([o.cost for layer in options for o in layer], budget)
    it = iter(grid_costs)
    costs = [[next(it) for _ in layer] for layer in options]
    best = np.full(cells + 1, np.inf)  # (cells + 1,)
    best[0] = 0.0
    choice = np.full((len(options), cells + 1), -1, dtype=np.int16)  # (L, cells + 1)
    for i, layer in enumerate(options):
        new = np.full(cells + 1, np.inf)
        for j, (o, c) in enumerate(zip(layer, costs[i], strict=True)):
            if c > cells:
                continue
            cand = np.full(cells + 1, np.inf)
            cand[c:] = best[:cells + 1 - c] + o.error
            better = cand < new
            new[better], choice[i, better] = cand[better], j
        best = new
    if not np.isfinite(best).any():  # the cheapest options fit the budget but not its rounded grid
        return None
    cell = int(np.argmin(best))
    picks = []
    for i in range(len(options) - 1, -1, -1):
        j = int(choice[i, cell])
        picks.append(j)
        cell -= costs[i][j]
    return picks[::-1]

