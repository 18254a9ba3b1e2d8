"""Measuring the ensemble: quality evaluation, speed benchmark, traces, plots.

Modules: ``datasets`` (offline data sets), ``answers`` (answer extraction),
``ifbench`` (instruction checks), ``stats`` (accuracy and Wilson intervals),
``evaluate`` (resumable eval runner), ``bench`` (speed benchmark), ``trace``
(round traces as JSONL) and ``plot`` (matplotlib figures). Import the modules
directly; this package imports nothing heavy.
"""

from specem_fast.measure.trace import write_trace

__all__ = ["write_trace"]
