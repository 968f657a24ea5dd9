"""When to hedge a request: the hedge delay learnt from observed TTFTs, and the hedge budget.

A hedge is a second attempt on the next-ranked target, sent when the first has produced no first
byte (streams: no first token) after the hedge delay. The delay is a quantile (default p95) of
the time to first byte seen per model and prompt-length bucket, over the newest `window`
samples, clamped to [min_delay_s, max_delay_s]; before `min_samples` are seen it is
`default_delay_s`. A token bucket in the style of gRFC A6 caps the extra load: every request
earns `budget_ratio` tokens, a hedge spends one, and the bucket holds at most `budget_burst`, so
hedges stay within `budget_ratio` * requests (+ the burst). Pure: no clock, no I/O; the
forwarder feeds it.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

import attrs

from infermesh.core.config import HedgingConfig
from infermesh.core.model import SloClass
from infermesh.core.policy import PolicySet

__all__ = [
    "IDEMPOTENT_HEADER",
    "HedgeBudget",
    "HedgePlan",
    "HedgePlanner",
    "TtftWindow",
    "never_saturated",
]

IDEMPOTENT_HEADER = "x-infermesh-idempotent"
"""A request sent with `x-infermesh-idempotent: false` is never hedged."""
MAX_KEYS = 1024
"""Model * bucket windows kept; the least recently used goes first beyond it."""
_RECOMPUTE_EVERY = 8
"""A window's quantile is recomputed after this many new samples (sorting is the cost)."""


def never_saturated(model: str) -> bool:
    """The default saturation signal: the fleet is never saturated."""
    return False


class TtftWindow:
    """The newest `size` TTFTs of one model and prompt-length bucket, and a cached quantile."""

    __slots__ = ("_dirty", "_quantile", "_samples", "q")

    def __init__(self, size: int, q: float) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self.q = q
        self._quantile = math.nan
        self._dirty = 0

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._dirty += 1

    def quantile(self) -> float:
        """The `q` quantile (nearest rank) of the samples; NaN when there are none."""
        dirty = self._dirty
        if dirty and (
            dirty >= _RECOMPUTE_EVERY or len(self._samples) < 64 or math.isnan(self._quantile)
        ):
            ordered = sorted(self._samples)
            self._quantile = ordered[max(0, math.ceil(self.q * len(ordered)) - 1)]
            self._dirty = 0
        return self._quantile


class HedgeBudget:
    """A token bucket: each request deposits `ratio`, each hedge withdraws 1 (gRFC A6 style).

    Starts full (`burst` tokens): over any run of N requests at most `ratio` * N + `burst`
    hedges are sent.
    """

    __slots__ = ("burst", "ratio", "tokens")

    def __init__(self, ratio: float, burst: float) -> None:
        if ratio < 0 or burst < 1:
            raise ValueError(f"hedge budget needs ratio >= 0 and burst >= 1, got {ratio}, {burst}")
        self.ratio = ratio
        self.burst = burst
        self.tokens = burst

    def on_request(self) -> None:
        self.tokens = min(self.burst, self.tokens + self.ratio)

    def try_spend(self) -> bool:
        """Take one token for a hedge; False (and nothing taken) when the bucket is short."""
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@attrs.frozen
class HedgePlan:
    """Whether and when one request may be hedged."""

    delay_s: float
    """Send a hedge when no first byte arrived after this long (inf: never)."""
    max_hedges: int
    reason: str = ""
    """Why the request is not hedged (empty when it may be)."""

    @property
    def enabled(self) -> bool:
        return self.max_hedges > 0 and math.isfinite(self.delay_s)


_NO_HEDGE = HedgePlan(math.inf, 0, "hedging disabled")


class HedgePlanner:
    """Per-router hedging state: TTFT windows per model and prompt bucket, and the budget."""

    def __init__(
        self,
        config: HedgingConfig,
        saturated: Callable[[str], bool] = never_saturated,
    ) -> None:
        self.config = config
        self.saturated = saturated
        self.budget = HedgeBudget(config.budget_ratio, config.budget_burst)
        self._buckets: Sequence[int] = tuple(config.prompt_buckets)
        self._windows: OrderedDict[tuple[str, int], TtftWindow] = OrderedDict()
        self._never = frozenset(config.non_idempotent_models)

    def bucket(self, prompt_tokens: int) -> int:
        """The prompt-length bucket index of a prompt (longer than the last bound: the last)."""
        return min(bisect.bisect_left(self._buckets, prompt_tokens), max(len(self._buckets), 0))

    def _window(self, model: str, prompt_tokens: int, create: bool) -> TtftWindow | None:
        key = (model, self.bucket(prompt_tokens))
        window = self._windows.get(key)
        if window is not None:
            self._windows.move_to_end(key)
            return window
        if not create:
            return None
        if len(self._windows) >= MAX_KEYS:
            self._windows.popitem(last=False)
        window = self._windows[key] = TtftWindow(self.config.window, self.config.quantile)
        return window

    def observe_ttft(self, model: str, prompt_tokens: int, seconds: float) -> None:
        """A first byte arrived `seconds` after its attempt was sent."""
        window = self._window(model, prompt_tokens, create=True)
        assert window is not None
        window.add(seconds)

    def delay_s(self, model: str, prompt_tokens: int) -> float:
        """The learnt hedge delay for a model and prompt length (default until enough samples)."""
        config = self.config
        window = self._window(model, prompt_tokens, create=False)
        if window is None or len(window) < config.min_samples:
            return config.default_delay_s
        return min(config.max_delay_s, max(config.min_delay_s, window.quantile()))

    def plan(
        self,
        model: str,
        slo_class: SloClass,
        prompt_tokens: int,
        idempotent: bool,
        policy: PolicySet,
    ) -> HedgePlan:
        """Whether this request may be hedged and after how long; counts it for the budget.

        A policy for the model and SLO class (`infermesh policy`) overrides the config: disabled
        means no hedge, its `delay_s` and `max_hedges` replace the learnt delay and the config's.
        """
        self.budget.on_request()
        config = self.config
        if not config.enabled:
            return _NO_HEDGE
        if not idempotent:
            return HedgePlan(math.inf, 0, "request marked non-idempotent")
        if model in self._never:
            return HedgePlan(math.inf, 0, "model marked non-idempotent")
        rule = policy.hedging_for(model, slo_class)
        if rule is not None:
            if not rule.enabled:
                return HedgePlan(math.inf, 0, "hedging disabled by policy")
            delay, max_hedges = rule.delay_s, rule.max_hedges
        else:
            delay, max_hedges = self.delay_s(model, prompt_tokens), config.max_hedges
        if max_hedges <= 0:
            return HedgePlan(math.inf, 0, "max_hedges is 0")
        return HedgePlan(delay, max_hedges)

    def may_fire(self, model: str) -> str:
        """At the hedge delay: "" when a hedge may go, else why not ("saturated", "budget")."""
        if self.saturated(model):
            return "saturated"
        if not self.budget.try_spend():
            return "budget"
        return ""
