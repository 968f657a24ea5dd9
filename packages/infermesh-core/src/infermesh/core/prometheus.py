"""Read only the wanted series from a Prometheus classic text page, and summarise histograms.

Lines of unwanted families are dropped by one prefix test before any parsing, so a big page costs
little more than splitting it into lines. Never does I/O and never returns mutable samples.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

import attrs

__all__ = [
    "Histogram",
    "LabelSet",
    "MetricsParseError",
    "Sample",
    "histogram_mean",
    "histogram_quantile",
    "histograms_by_labels",
    "parse_samples",
]

# Suffixes under which prometheus_client writes the samples of one family.
FAMILY_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_VALUE = r'"([^"\\\n]*(?:\\.[^"\\\n]*)*)"'
_LABEL = re.compile(r"[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*" + _LABEL_VALUE + r"[ \t]*")
_PAIR = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*" + _LABEL_VALUE)
# What follows the name on a well-formed sample line: labels, value, optional timestamp. Each
# whitespace run belongs to exactly one quantifier, so a malformed line fails in linear time.
_PAIR_NC = r'[a-zA-Z_][a-zA-Z0-9_]*[ \t]*=[ \t]*"[^"\\\n]*(?:\\.[^"\\\n]*)*"[ \t]*'
_REST = re.compile(
    r"(?:\{[ \t]*((?:" + _PAIR_NC + r",[ \t]*)*(?:" + _PAIR_NC + r")?)\}[ \t]*|[ \t]+)"
    r"([^ \t\r]+)(?:[ \t]+([^ \t\r]+))?[ \t]*\r?\Z"
)
_ESCAPE = re.compile(r"\\(.)")
_UNESCAPED = {"\\": "\\", '"': '"', "n": "\n"}


class MetricsParseError(ValueError):
    """A wanted series has a line that is not valid Prometheus text; says which line and why."""

    def __init__(self, line_no: int, reason: str, line: str) -> None:
        self.line_no = line_no
        self.reason = reason
        self.line = line
        excerpt = line if len(line) <= 120 else line[:117] + "..."
        super().__init__(f"line {line_no}: {reason}: {excerpt!r}")


class LabelSet(Mapping[str, str]):
    """An immutable, hashable label mapping (usable as a dict key when grouping series)."""

    __slots__ = ("_hash", "_items")

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._items: dict[str, str] = dict(items)
        self._hash: int | None = None

    def __getitem__(self, name: str) -> str:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._items.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LabelSet):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self._items == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"LabelSet({self._items!r})"

    def without(self, *names: str) -> LabelSet:
        """These labels minus `names` (e.g. `le` to group histogram buckets into series)."""
        return LabelSet((k, v) for k, v in self._items.items() if k not in names)


def _label_set(value: Mapping[str, str]) -> LabelSet:
    return value if isinstance(value, LabelSet) else LabelSet(value)


@attrs.frozen
class Sample:
    """One sample line. `name` uses the spelling of the family that was asked for."""

    name: str
    labels: LabelSet = attrs.field(converter=_label_set)
    value: float
    timestamp_s: float | None = None


def _canonical(name: str) -> str:
    # `ns:foo` and `ns_foo` are one series: prometheus_client >= 0.23 may escape colons.
    return name.replace(":", "_")


def _trie_pattern(words: Iterable[str]) -> str:
    """A regex alternation of `words` factored by common prefixes (fast to match in C)."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def emit(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + emit(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        ends_here = "" in node
        if len(branches) == 1 and not ends_here:
            return branches[0]
        group = "(?:" + "|".join(branches) + ")"
        return group + "?" if ends_here else group

    return emit(trie)


@attrs.frozen
class _Selector:
    """Precomputed lookups for one set of wanted families."""

    families: frozenset[str]
    family_of: Mapping[str, str]
    """Wire name (either spelling) -> the wanted family it belongs to."""
    wanted_line: re.Pattern[str]
    """Matches `\n` + a line of a wanted series; groups: wire name, rest of the line."""

    @classmethod
    def build(cls, families: frozenset[str]) -> _Selector:
        for family in families:
            if not _NAME.fullmatch(family):
                raise ValueError(f"not a Prometheus metric name: {family!r}")
        family_of: dict[str, str] = {}
        for family in sorted(families):
            for suffix in FAMILY_SUFFIXES:
                for spelling in (family + suffix, _canonical(family + suffix)):
                    family_of.setdefault(spelling, family)
        for family in families:  # an exact name wins over another family's suffixed name
            family_of[family] = family_of[_canonical(family)] = family
        # A literal `\n` first lets the regex engine skip from line to line in C.
        names = _trie_pattern(family_of) if family_of else "(?!)"
        wanted_line = re.compile(r"\n[ \t]*(" + names + r")(?=[{ \t\r\n]|\Z)([^\n]*)")
        return cls(families, family_of, wanted_line)


@functools.lru_cache(maxsize=64)
def _selector(families: frozenset[str]) -> _Selector:
    return _Selector.build(families)


def parse_samples(text: str, families: Collection[str]) -> dict[str, list[Sample]]:
    """Samples of the wanted `families` on a classic-text page, keyed by family as given.

    A family matches its own name and the `_total`, `_bucket`, `_sum`, `_count` and `_created`
    series. Ask with the colon spelling (`vllm:foo`): lines written `vllm_foo` (colons escaped
    by the exporter) match too. Unwanted lines (and comments) are never parsed. Raises
    :class:`MetricsParseError` for a malformed line of a wanted family.
    """
    selector = _selector(frozenset(families))
    found: dict[str, list[Sample]] = {family: [] for family in selector.families}
    family_of = selector.family_of
    scan = "\n" + text
    for match in selector.wanted_line.finditer(scan):
        wire_name, rest = match.groups()
        family = family_of[wire_name]
        name = family + wire_name[len(family) :]
        sample = _fast_sample(name, rest)
        if sample is None:  # not well-formed: find out exactly why
            line_no = scan.count("\n", 0, match.start() + 1)
            sample = _strict_sample(name, rest, line_no, (wire_name + rest).rstrip("\r"))
        found[family].append(sample)
    return found


def _fast_sample(name: str, rest: str) -> Sample | None:
    """The sample of a well-formed line (after its name), or None to defer to the strict path."""
    match = _REST.match(rest)
    if match is None:
        return None
    body, value_text, timestamp_text = match.groups()
    labels: dict[str, str] = {}
    if body:
        pairs = _PAIR.findall(body)
        for label, raw in pairs:
            unescaped = _unescape(raw)
            if unescaped is None or label in labels:
                return None
            labels[label] = unescaped
    value = _number_or_none(value_text)
    if value is None:
        return None
    timestamp_s = None
    if timestamp_text is not None:
        timestamp_ms = _number_or_none(timestamp_text)
        if timestamp_ms is None or not math.isfinite(timestamp_ms):
            return None
        timestamp_s = timestamp_ms / 1000.0
    return Sample(name, LabelSet(labels), value, timestamp_s)


def _number_or_none(token: str) -> float | None:
    # Python's float() also takes `1_000`; the exposition format does not.
    if "_" in token:
        return None
    try:
        return float(token)
    except ValueError:
        return None


def _strict_sample(name: str, rest: str, line_no: int, line: str) -> Sample:
    """Parse the line after its name step by step; raises MetricsParseError saying why."""
    rest = rest.rstrip("\r")
    pos = 0
    labels: dict[str, str] = {}
    if rest[:1] == "{":
        pos = _parse_labels(rest, 1, line_no, labels, line)
    tokens = rest[pos:].split()
    if not tokens:
        raise MetricsParseError(line_no, "missing sample value", line)
    if len(tokens) > 2:
        raise MetricsParseError(line_no, "unexpected text after value and timestamp", line)
    value = _parse_number(tokens[0], "value", line, line_no)
    timestamp_s = None
    if len(tokens) == 2:
        timestamp_s = _parse_number(tokens[1], "timestamp", line, line_no) / 1000.0
        if not math.isfinite(timestamp_s):
            raise MetricsParseError(line_no, "timestamp is not a finite number", line)
    return Sample(name, LabelSet(labels), value, timestamp_s)


def _parse_labels(rest: str, pos: int, line_no: int, labels: dict[str, str], line: str) -> int:
    """Parse `a="x",b="y"}` from `rest[pos:]` into `labels`; returns the index after `}`."""
    end = len(rest)
    while True:
        while pos < end and rest[pos] in " \t":
            pos += 1
        if pos < end and rest[pos] == "}":
            return pos + 1
        match = _LABEL.match(rest, pos)
        if match is None:
            raise MetricsParseError(line_no, "malformed label set", line)
        label, raw = match.groups()
        if label in labels:
            raise MetricsParseError(line_no, f"duplicate label {label!r}", line)
        value = _unescape(raw)
        if value is None:
            escape = _ESCAPE.search(raw)
            sequence = escape.group() if escape else "\\"
            raise MetricsParseError(
                line_no, f"invalid escape sequence {sequence!r} in label value", line
            )
        labels[label] = value
        pos = match.end()
        if pos < end and rest[pos] == ",":
            pos += 1
        elif pos < end and rest[pos] == "}":
            return pos + 1
        else:
            raise MetricsParseError(line_no, "expected ',' or '}' in label set", line)


def _unescape(raw: str) -> str | None:
    """A label value with `\\`, `\"` and `\n` resolved; None if it has another escape."""
    if "\\" not in raw:
        return raw
    try:
        return _ESCAPE.sub(lambda match: _UNESCAPED[match.group(1)], raw)
    except KeyError:
        return None


def _parse_number(token: str, what: str, line: str, line_no: int) -> float:
    number = _number_or_none(token)
    if number is None:
        raise MetricsParseError(line_no, f"{what} {token!r} is not a number", line)
    return number


# --------------------------------------------------------------------------- histograms


@attrs.frozen
class Histogram:
    """One histogram (or several merged): observation count, sum and cumulative buckets.

    `buckets` holds `(upper_bound, cumulative_count)` sorted by bound; it is empty when only
    `_sum`/`_count` were read, or after combining histograms whose bucket bounds differ.
    """

    count: float = 0.0
    sum: float = 0.0
    buckets: tuple[tuple[float, float], ...] = ()

    @classmethod
    def from_samples(cls, samples: Iterable[Sample]) -> Histogram:
        """All `_bucket`, `_sum` and `_count` samples given, merged into one histogram."""
        count = total = 0.0
        per_bound: dict[float, float] = {}
        for sample in samples:
            if sample.name.endswith("_bucket") and "le" in sample.labels:
                bound = _bound(sample.labels["le"])
                per_bound[bound] = per_bound.get(bound, 0.0) + sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
        return cls(count, total, tuple(sorted(per_bound.items())))

    def _combine(self, other: Histogram, sign: float) -> Histogram:
        buckets: tuple[tuple[float, float], ...] = ()
        if [b for b, _ in self.buckets] == [b for b, _ in other.buckets]:
            buckets = tuple(
                (bound, mine + sign * theirs)
                for (bound, mine), (_, theirs) in zip(self.buckets, other.buckets, strict=True)
            )
        return Histogram(self.count + sign * other.count, self.sum + sign * other.sum, buckets)

    def __add__(self, other: Histogram) -> Histogram:
        return self._combine(other, 1.0)

    def __sub__(self, other: Histogram) -> Histogram:
        """The observations made between `other` (earlier) and this (later) reading."""
        return self._combine(other, -1.0)

    @property
    def mean(self) -> float | None:
        """Mean observation, or None without observations."""
        if self.count <= 0 or not math.isfinite(self.sum):
            return None
        return self.sum / self.count

    def quantile(self, q: float) -> float | None:
        """The q-quantile estimated like PromQL's `histogram_quantile` (linear in a bucket)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} outside [0, 1]")
        buckets = self.buckets
        if len(buckets) < 2 or buckets[-1][0] != math.inf:
            return None
        counts: list[float] = []
        for _, count in buckets:  # counts must not decrease; scrape races can break that
            counts.append(max(count, counts[-1]) if counts else count)
        observations = counts[-1]
        if observations <= 0:
            return None
        rank = q * observations
        index = next(i for i, count in enumerate(counts) if count >= rank)
        if index == len(buckets) - 1:
            return buckets[-2][0]
        upper = buckets[index][0]
        if index == 0 and upper <= 0:
            return upper
        lower = 0.0 if index == 0 else buckets[index - 1][0]
        below = 0.0 if index == 0 else counts[index - 1]
        in_bucket = counts[index] - below
        if in_bucket <= 0:
            return upper
        return lower + (upper - lower) * (rank - below) / in_bucket


def _bound(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"histogram bucket bound le={text!r} is not a number") from None


def histograms_by_labels(samples: Iterable[Sample]) -> dict[LabelSet, Histogram]:
    """Histogram series keyed by their labels without `le`."""
    groups: dict[LabelSet, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.labels.without("le"), []).append(sample)
    return {labels: Histogram.from_samples(group) for labels, group in groups.items()}


def histogram_mean(samples: Iterable[Sample]) -> dict[LabelSet, float | None]:
    """Mean observation (`_sum / _count`) of each histogram series, keyed by labels without `le`."""
    return {labels: h.mean for labels, h in histograms_by_labels(samples).items()}


def histogram_quantile(q: float, buckets: Iterable[Sample]) -> dict[LabelSet, float | None]:
    """The q-quantile of each histogram series from its `_bucket` samples (PromQL semantics)."""
    only_buckets = [s for s in buckets if s.name.endswith("_bucket")]
    return {labels: h.quantile(q) for labels, h in histograms_by_labels(only_buckets).items()}
