"""Overlap voting: windows of `tile` px every `stride` px, one output cell per stride step.

With --vote the output tiles are the cells of the stride grid: cell (i, j) is the square of
`stride` x `stride` px at (i * stride, j * stride). Every window that contains a cell
entirely (windows of rows i-k+1..i and columns j-k+1..j, k = tile / stride) votes with its
class probabilities; the cell takes their mean, and its class, confidence, second class
and entropy come from that mean. The stride must divide the tile, so each inner cell has
exactly k^2 windows: inference costs (tile / stride)^2 times a run without voting. Cells at
the grid's edge have fewer windows; a cell whose windows were all skipped (nodata) is
skipped. valid_fraction is the mean of the voting windows' valid fractions.

Windows arrive in row order, so only k rows of cells are held at a time (a rolling band):
memory stays flat whatever the raster size.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from ..errors import ConfigError
from .area import TilePlan
from .grid import Grid

Cells = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # rows, cols, mean probabilities, valid fraction


def check_vote_grid(grid: Grid) -> int:
    """Windows per axis covering a cell (tile / stride); ConfigError unless voting applies."""
    if grid.kind != "pixel" or grid.stride >= grid.tile:
        raise ConfigError(f"--vote needs overlapping windows, a stride smaller than the tile (tile {grid.tile} px, "
                          f"stride {grid.stride} px)", "add e.g. --stride "
                          f"{max(1, grid.tile // 2)} (half the tile), or drop --vote")
    if grid.tile % grid.stride:
        raise ConfigError(f"--vote needs a stride that divides the tile ({grid.tile} px is not a multiple of "
                          f"{grid.stride} px)", f"use e.g. --stride {max(1, grid.tile // 2)} or "
                          f"{max(1, grid.tile // 4)}")
    return grid.tile // grid.stride


def cell_grid(grid: Grid) -> Grid:
    """The grid of output cells: stride-sized tiles of the window grid's pixel grid."""
    k = check_vote_grid(grid)
    s = grid.stride
    rows, cols = grid.rows + k - 1, grid.cols + k - 1
    return dataclasses.replace(grid, tile=s, rows=rows, cols=cols, width=cols * s, height=rows * s)


class Voter:
    """Accumulates window probabilities into cells over a rolling band of k cell rows and
    hands out cells as soon as no later window can cover them."""

    def __init__(self, plan: TilePlan, num_classes: int):
        self.grid = plan.grid
        self.k = check_vote_grid(plan.grid)
        self.cells = cell_grid(plan.grid)
        self.planned = dict(zip(plan.rows, plan.cols, strict=True))  # window row -> its columns (None: all)
        width = self.cells.cols
        self.sum = np.zeros((self.k, width, num_classes), np.float64)
        self.valid = np.zeros((self.k, width), np.float64)
        self.count = np.zeros((self.k, width), np.int32)
        self.next_row = 0          # first cell row not handed out yet
        self.total = 0             # cells covered by planned windows
        self.classified = 0        # cells handed out (at least one window classified)

    @property
    def skipped(self) -> int:
        return self.total - self.classified

    def add(self, rows: np.ndarray, cols: np.ndarray, probs: np.ndarray, valid: np.ndarray) -> list[Cells]:
        """Add classified windows (in row order); return the cells that are complete."""
        done: list[Cells] = []
        rows = np.asarray(rows, np.int64)
        starts = np.flatnonzero(np.diff(rows, prepend=-1))
        for a, b in zip(starts.tolist(), [*starts[1:].tolist(), len(rows)], strict=True):
            r = int(rows[a])
            done.extend(self._release(r))  # cell rows above r get no more windows
            c = np.asarray(cols[a:b], np.int64)
            p = np.asarray(probs[a:b], np.float64)
            v = np.asarray(valid[a:b], np.float64)
            for dr in range(self.k):
                band = (r + dr) % self.k
                for dc in range(self.k):  # columns are unique within a row: plain fancy-index adds
                    self.sum[band, c + dc] += p
                    self.valid[band, c + dc] += v
                    self.count[band, c + dc] += 1
        return done

    def finish(self) -> list[Cells]:
        return list(self._release(self.cells.rows))

    def _release(self, upto: int) -> Iterator[Cells]:
        while self.next_row < upto:
            i = self.next_row
            band = i % self.k
            n = self.count[band]
            hit = np.flatnonzero(n)
            self.total += self._covered(i)
            self.classified += len(hit)
            if len(hit):
                yield (np.full(len(hit), i, np.int64), hit.astype(np.int64),
                       self.sum[band, hit] / n[hit, None], self.valid[band, hit] / n[hit])
            self.sum[band] = 0.0
            self.valid[band] = 0.0
            self.count[band] = 0
            self.next_row += 1

    def _covered(self, i: int) -> int:
        """Cells of cell row i inside at least one planned window (classified or not)."""
        covered = np.zeros(self.cells.cols, bool)
        for r in range(max(0, i - self.k + 1), min(i, self.grid.rows - 1) + 1):
            if r not in self.planned:
                continue
            c = self.planned[r]
            if c is None:
                return self.cells.cols
            for dc in range(self.k):
                covered[c + dc] = True
        return int(covered.sum())
