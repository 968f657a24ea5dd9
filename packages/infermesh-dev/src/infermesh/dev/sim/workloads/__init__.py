"""Workloads for the routing simulator: named synthetic mixes and JSONL trace replay.

`generate(name, rng, duration_s, rate)` yields `SimRequest`s in arrival order from a seeded
`random.Random`; `read_trace`/`write_trace` move requests to and from JSONL files.
"""

from __future__ import annotations

from infermesh.dev.sim.workloads.arrivals import mmpp_arrivals, poisson_arrivals
from infermesh.dev.sim.workloads.catalog import MAX_CONTEXT_TOKENS, WORKLOADS, Workload, generate
from infermesh.dev.sim.workloads.trace import (
    TRACE_FIELDS,
    TraceError,
    parse_trace,
    read_trace,
    write_trace,
)

__all__ = [
    "MAX_CONTEXT_TOKENS",
    "TRACE_FIELDS",
    "WORKLOADS",
    "TraceError",
    "Workload",
    "generate",
    "mmpp_arrivals",
    "parse_trace",
    "poisson_arrivals",
    "read_trace",
    "write_trace",
]
