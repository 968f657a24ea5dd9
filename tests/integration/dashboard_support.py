"""Reading the Grafana dashboard, the alert rules of docs/observability.md and Prometheus text
expositions: which metric names a PromQL expression selects, and which families are exported.
Shared by test_dashboard_metrics.py and test_prometheus.py."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "examples" / "grafana" / "infermesh-dashboard.json"
SCRAPE_CONFIG = ROOT / "examples" / "prometheus" / "prometheus.yml"
OBSERVABILITY = ROOT / "docs" / "observability.md"
PROMETHEUS_SERIES = frozenset({"up"})
"""Series Prometheus makes itself for each target; alerts may use them."""

# PromQL words that are never metric names: aggregation operators, binary operators and
# modifiers. Functions are recognised by the "(" that follows them.
AGGREGATIONS = frozenset(
    {
        *("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"),
        *("bottomk", "topk", "quantile", "limitk", "limit_ratio"),
    }
)
KEYWORDS = AGGREGATIONS | {"and", "or", "unless", "bool", "offset", "inf", "nan", "start", "end"}
LABEL_LIST_KEYWORDS = frozenset(["by", "without", "on", "ignoring", "group_left", "group_right"])
IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*")
GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[A-Za-z0-9_]+\]\]")
NAME_MATCHER = re.compile(r"""__name__\s*=\s*["']([^"']+)["']""")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", re.S)
CLOSING = {"{": "}", "[": "]", "(": ")"}


def _skip_string(expr: str, start: int) -> int:
    """The index after the string literal that opens at `start` (', " or `)."""
    quote = expr[start]
    i = start + 1
    while i < len(expr):
        if expr[i] == "\\" and quote != "`":
            i += 2
            continue
        if expr[i] == quote:
            return i + 1
        i += 1
    raise ValueError(f"unterminated string literal at offset {start} in {expr!r}")


def _blank_selectors(expr: str) -> tuple[str, list[str]]:
    """`expr` with string literals, label matchers `{...}` and ranges `[...]` blanked out, and
    the metric names of `{__name__="..."}` matchers; raises ValueError when they don't balance."""
    out: list[str] = []
    names: list[str] = []
    stack: list[tuple[str, int]] = []
    i = 0
    blank_from = -1  # where the outermost {...} or [...] being blanked started
    while i < len(expr):
        char = expr[i]
        if char in "'\"`":
            end = _skip_string(expr, i)
            if blank_from < 0:
                out.append(" " * (end - i))
            i = end
            continue
        if char in CLOSING:
            stack.append((char, i))
            if char in "{[" and blank_from < 0:
                blank_from = i
        elif char in CLOSING.values():
            if not stack or CLOSING[stack[-1][0]] != char:
                raise ValueError(f"unbalanced {char!r} at offset {i} in {expr!r}")
            opener, at = stack.pop()
            if at == blank_from:
                names += NAME_MATCHER.findall(expr[at : i + 1]) if opener == "{" else []
                out.append(" " * (i + 1 - at))
                blank_from = -1
                i += 1
                continue
        if blank_from < 0:
            out.append(char)
        i += 1
    if stack:
        opener, at = stack[-1]
        raise ValueError(f"unclosed {opener!r} at offset {at} in {expr!r}")
    return "".join(out), names


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (with Grafana variables) selects.

    Raises ValueError naming the offset when brackets, braces or quotes don't balance.
    """
    # A variable becomes a number of the same length, so offsets in errors stay true.
    plain = GRAFANA_VARIABLE.sub(lambda m: "0".ljust(len(m.group())), expr)
    text, names = _blank_selectors(plain)
    found = set(names)
    skip_until = -1
    for match in IDENTIFIER.finditer(text):
        if match.start() < skip_until:
            continue
        word = match.group()
        rest = text[match.end() :].lstrip()
        if word in LABEL_LIST_KEYWORDS:
            if rest.startswith("("):
                close = text.find(")", match.end())
                skip_until = close if close >= 0 else len(text)
            continue
        if word.lower() in KEYWORDS or rest.startswith("("):
            continue  # an operator, or a function call
        found.add(word)
    return found


def dashboard_expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target (rows' nested panels too) and query variable;
    a `label_values(selector, label)` variable yields its selector."""
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        selector = LABEL_VALUES.match(text)
        yield f"variable ${variable['name']}", selector.group(1) if selector else text

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield f"panel {panel.get('title')!r} ({target.get('refId')})", target["expr"]


def exported_families(exposition: str) -> dict[str, str]:
    """Family name -> type, from the `# TYPE` lines of a Prometheus text exposition."""
    families: dict[str, str] = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            families[name] = kind.strip()
    return families


def family_of(name: str, families: dict[str, str]) -> str | None:
    """The exported family a series name belongs to (`_bucket`, `_sum`, `_count` of a
    histogram or summary, `_total` of a counter), or None."""
    if name in families:
        return name
    for suffix, kinds in (
        ("_bucket", {"histogram"}),
        ("_sum", {"histogram", "summary"}),
        ("_count", {"histogram", "summary"}),
    ):
        base = name.removesuffix(suffix)
        if base != name and families.get(base) in kinds:
            return base
    if families.get(f"{name}_total") == "counter":
        return f"{name}_total"
    return None


def unexported(dashboard: dict[str, Any], families: dict[str, str]) -> list[str]:
    """'where: metric' for every metric the dashboard uses that no family exports."""
    missing = []
    for where, expr in dashboard_expressions(dashboard):
        for name in sorted(promql_metric_names(expr)):
            if family_of(name, families) is None:
                missing.append(f"{where}: {name}")
    return missing


def documented_metrics(markdown: str) -> dict[str, tuple[str, frozenset[str]]]:
    """Name -> (type, labels) of every `| `infermesh_...` | type | labels | meaning |` row."""
    rows: dict[str, tuple[str, frozenset[str]]] = {}
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not re.fullmatch(r"`infermesh_[a-z0-9_]+`", cells[0]):
            continue
        labels = frozenset(re.findall(r"`([a-z_]+)`", cells[2]))
        rows[cells[0].strip("`")] = (cells[1], labels)
    return rows


def sample_labels(exposition: str) -> dict[str, set[str]]:
    """Family name -> label names seen on its samples (histogram `le` left out)."""
    families = exported_families(exposition)
    seen: dict[str, set[str]] = {}
    for line in exposition.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        name, _, rest = line.partition("{")
        family = family_of(name, families)
        if family is not None:
            labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', rest.rpartition("}")[0]))
            seen.setdefault(family, set()).update(labels - {"le"})
    return seen


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def alert_rules(markdown: str) -> str:
    """The Prometheus rules file in a Markdown document: its ```yaml block that starts with
    `groups:`; ValueError when there is none."""
    for block in re.findall(r"^```yaml\n(.*?)^```", markdown, re.M | re.S):
        if block.startswith("groups:"):
            return str(block)
    raise ValueError("no ```yaml block starting with 'groups:' (the alert rules)")


def alert_expressions(rules: str) -> Iterator[tuple[str, str]]:
    """(alert name, expr) of a rules file: `expr: X` on one line or `expr: |` and the lines
    indented below it."""
    lines = rules.splitlines()
    alert = ""
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("- alert:"):
            alert = stripped.removeprefix("- alert:").strip()
        if not stripped.startswith("expr:"):
            continue
        value = stripped.removeprefix("expr:").strip()
        if value not in ("|", ">"):
            yield alert, value
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for following in lines[index + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following.strip())
        yield alert, " ".join(part for part in body if part)


SELECTOR = re.compile(r"(?<![A-Za-z0-9_:.])([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
TARGET_LABELS = frozenset({"job", "instance"})
"""Labels Prometheus adds to every series it scrapes."""


def unknown_labels(expr: str, labels_of: dict[str, frozenset[str]]) -> list[str]:
    """Label names an expression uses that its metrics don't carry: in a selector's matchers
    (checked against that metric), or in `by (...)`/`on (...)` lists (against all its metrics).

    `labels_of` maps a series name (`_bucket` series with `le`) to its labels; metrics it
    lacks are left to the metric-name check.
    """
    problems: list[str] = []
    known = [labels_of[name] for name in promql_metric_names(expr) if name in labels_of]
    everywhere = frozenset().union(*known) | TARGET_LABELS
    for name, matchers in SELECTOR.findall(GRAFANA_VARIABLE.sub("0", expr)):
        if name not in labels_of:
            continue
        for label in MATCHER_LABEL.findall(matchers):
            if label not in labels_of[name] | TARGET_LABELS | {"__name__"}:
                problems.append(f"{name} has no label {label!r}")
    for listed in LABEL_LIST.findall(expr):
        for label in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", listed):
            if label not in everywhere:
                problems.append(f"no metric in the expression has the label {label!r}")
    return problems


def series_labels(documented: dict[str, tuple[str, frozenset[str]]]) -> dict[str, frozenset[str]]:
    """Series name -> labels, from documented families (histograms: `_bucket` with `le`)."""
    out: dict[str, frozenset[str]] = {}
    for name, (kind, labels) in documented.items():
        out[name] = labels
        if kind == "counter":
            out[name.removesuffix("_total")] = labels
        if kind == "histogram":
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_sum"] = out[f"{name}_count"] = labels
    return out
