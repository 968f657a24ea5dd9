"""`infermesh demo`: a local mesh under shared-prefix load, then a table of where requests went.

Starts the mesh with the harness, drives load through the router with the load generator and a
rich progress bar, reads each emulator's /metrics for prefix-cache hit rates, prints the table
and stops everything. Presentation only: no routing, load or process logic of its own.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Sequence

import aiohttp
import attrs
from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from infermesh.dev.harness import LocalMesh, MeshSpec, MeshStartError, RunningReplica
from infermesh.dev.loadgen import (
    LoadReport,
    LoadSpec,
    PromptMix,
    RequestRecord,
    run_load,
    summarize,
)

__all__ = ["DemoFailed", "EngineCounters", "run_demo", "scrape_engine_counters"]


class DemoFailed(Exception):
    """The mesh started but the demo's load did not get through."""


@attrs.frozen
class EngineCounters:
    """What one emulator's /metrics says it did."""

    requests: float = 0.0
    prefix_queries_tokens: float = 0.0
    prefix_hits_tokens: float = 0.0
    preemptions: float = 0.0

    @property
    def prefix_hit_rate(self) -> float | None:
        if self.prefix_queries_tokens <= 0:
            return None
        return self.prefix_hits_tokens / self.prefix_queries_tokens


def parse_engine_counters(page: str) -> EngineCounters:
    """Sum the counters of a vLLM /metrics page over its engines."""
    totals: dict[str, float] = {}
    wanted = {
        "vllm:request_success_total": "requests",
        "vllm:prefix_cache_queries_total": "prefix_queries_tokens",
        "vllm:prefix_cache_hits_total": "prefix_hits_tokens",
        "vllm:num_preemptions_total": "preemptions",
    }
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            field = wanted.get(sample.name)
            if field is not None:
                totals[field] = totals.get(field, 0.0) + float(sample.value)
    return EngineCounters(**totals)


async def scrape_engine_counters(url: str) -> EngineCounters | None:
    """GET `url` (a /metrics page) and parse it; None when it cannot be read."""
    try:
        timeout = aiohttp.ClientTimeout(total=5.0)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
            if resp.status != 200:
                return None
            return parse_engine_counters(await resp.text())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _pair_ms(low: float | None, high: float | None) -> str:
    return f"{_ms(low)} / {_ms(high)}"


def result_table(
    node_id: str,
    replicas: Sequence[RunningReplica],
    report: LoadReport,
    counters: dict[str, EngineCounters | None],
) -> Table:
    """Requests per replica with client-side latency percentiles and engine-side cache hits."""
    table = Table(
        title=f"Where requests went (node {node_id}; client-side latencies in ms)",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("replica", no_wrap=True)
    table.add_column("profile", no_wrap=True)
    table.add_column("endpoint", no_wrap=True)
    for column in ("requests", "ok", "TTFT p50/p95", "e2e p50/p95", "prefix hits"):
        table.add_column(column, justify="right", no_wrap=True)
    by_replica = report.by_replica()
    total = len(report.records) or 1
    for replica in replicas:
        records = by_replica.get(replica.name, [])
        stats = summarize(records)
        engine = counters.get(replica.name)
        table.add_row(
            replica.name,
            replica.profile,
            replica.url.removeprefix("http://"),
            f"{len(records)} ({len(records) * 100 / total:.0f}%)",
            str(stats.ok),
            _pair_ms(stats.ttft_p50_s, stats.ttft_p95_s),
            _pair_ms(stats.e2e_p50_s, stats.e2e_p95_s),
            _pct(engine.prefix_hit_rate) if engine else "?",
        )
    unattributed = by_replica.get("", [])
    if unattributed:
        table.add_row("(failed)", "", "", str(len(unattributed)), "0", "-", "-", "")
    overall = report.summary
    table.add_section()
    table.add_row(
        "all",
        "",
        "",
        str(len(report.records)),
        str(overall.ok),
        _pair_ms(overall.ttft_p50_s, overall.ttft_p95_s),
        _pair_ms(overall.e2e_p50_s, overall.e2e_p95_s),
        "",
    )
    return table


def stickiness_table(report: LoadReport, num_prefixes: int) -> Table:
    """For each shared system prompt: which replica served most of its requests."""
    table = Table(
        title="Shared prefixes: where each system prompt's requests landed", box=box.SIMPLE_HEAD
    )
    table.add_column("system prompt")
    table.add_column("requests", justify="right")
    table.add_column("top replica")
    table.add_column("share", justify="right")
    for group in range(num_prefixes):
        served = Counter(
            tag
            for tag, records in report.by_replica().items()
            if tag
            for r in records
            if r.prefix_group == group
        )
        count = sum(served.values())
        top, top_count = served.most_common(1)[0] if served else ("-", 0)
        table.add_row(f"#{group}", str(count), top, _pct(top_count / count if count else None))
    return table


async def run_demo(
    spec: MeshSpec,
    *,
    duration_s: float = 20.0,
    concurrency: int = 12,
    seed: int = 7,
    console: Console | None = None,
) -> LoadReport:
    """Start the mesh, run the load, print the tables, stop the mesh. Returns the load report."""
    if console is None:
        # Piped output has no width; give the tables room instead of wrapping at 80 columns.
        console = Console() if sys.stdout.isatty() else Console(width=120)
    mix = PromptMix(num_prefixes=4, prefix_chars=2400)
    mesh = LocalMesh(spec)
    try:
        with console.status("starting the mesh (emulators, agent, router) ..."):
            await mesh.start()
        console.print(
            f"[bold]mesh up[/]: router {mesh.router_url}, "
            f"{len(mesh.replicas)} emulated vLLM replicas, logs in {mesh.workdir}"
        )
        load = LoadSpec(
            base_url=mesh.router_url,
            model=spec.model,
            concurrency=concurrency,
            duration_s=duration_s,
            stream_fraction=0.5,
            max_tokens=48,
            mix=mix,
            seed=seed,
        )
        report = await _load_with_progress(load, console)
        counters = dict(
            zip(
                [r.name for r in mesh.replicas],
                await asyncio.gather(
                    *(scrape_engine_counters(f"{r.url}/metrics") for r in mesh.replicas)
                ),
                strict=True,
            )
        )
        console.print(result_table(spec.node_id, mesh.replicas, report, counters))
        console.print(stickiness_table(report, mix.num_prefixes))
        ok = sum(1 for r in report.records if r.ok)
        preemptions = sum(c.preemptions for c in counters.values() if c is not None)
        console.print(
            f"{ok} of {len(report.records)} requests succeeded, {report.ok_per_s:.1f} req/s over "
            f"{report.wall_s:.1f} s; half were streamed (TTFT is measured on those); "
            f"{preemptions:.0f} preemptions"
        )
        if ok == 0:
            errors = Counter(r.error or f"HTTP {r.status}" for r in report.records if not r.ok)
            common = "; ".join(f"{n}x {e}" for e, n in errors.most_common(3))
            raise DemoFailed(
                f"no request succeeded through {mesh.router_url} ({common}); "
                f"see the logs in {mesh.workdir}"
            )
        return report
    except (MeshStartError, DemoFailed):
        mesh.keep_workdir = True  # the logs are what the user needs next
        raise
    finally:
        with console.status("stopping the mesh ..."):
            await mesh.stop()


async def _load_with_progress(load: LoadSpec, console: Console) -> LoadReport:
    counts = {"ok": 0, "failed": 0}

    def on_record(record: RequestRecord) -> None:
        counts["ok" if record.ok else "failed"] += 1

    duration_s = load.duration_s or 0.0
    with Progress(
        TextColumn("[bold]load[/]"),
        BarColumn(),
        TextColumn("{task.fields[done]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task_id = progress.add_task("load", total=duration_s, done="")
        load_task = asyncio.create_task(run_load(load, on_record))
        started = time.monotonic()
        while not load_task.done():
            elapsed = min(time.monotonic() - started, duration_s)
            progress.update(
                task_id, completed=elapsed, done=f"{counts['ok']} ok, {counts['failed']} failed"
            )
            await asyncio.wait({load_task}, timeout=0.25)
        progress.update(
            task_id, completed=duration_s, done=f"{counts['ok']} ok, {counts['failed']} failed"
        )
        return load_task.result()
