"""Sweeps: many compression settings of one model, each compressed, saved and measured, with Pareto fronts.

`load_grid` reads the settings, `run_sweep` runs them (resumable, in worker processes or on Ray) and
`write_report` draws the trade-off. `lmcompress sweep` is these three calls.
"""

from lmcompress.sweep.grid import GridPoint, load_grid
from lmcompress.sweep.pareto import pareto_front
from lmcompress.sweep.point import BASELINES, SweepSettings
from lmcompress.sweep.report import write_report
from lmcompress.sweep.runner import EXECUTORS, SweepError, read_results, run_sweep

__all__ = ["BASELINES", "EXECUTORS", "GridPoint", "SweepError", "SweepSettings", "load_grid", "pareto_front",
           "read_results", "run_sweep", "write_report"]
