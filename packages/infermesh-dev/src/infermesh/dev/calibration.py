"""Run a profile's published benchmarks through the engine model, in virtual time.

`run_point(profile, point)` replays one `CalibrationPoint` as `vllm bench serve
--max-concurrency C --request-rate inf --ignore-eos` does: C clients start together, each sends
a fixed-length request and the next one as soon as it finishes. The result holds the same
figures the benchmark prints (aggregate output tokens/s, mean TTFT, mean TPOT), so a profile's
claim and its check come from the same data. Deterministic: no clock, no randomness.
"""

from __future__ import annotations

import attrs

from infermesh.dev.engine import Engine, EngineConfig, EngineRequest
from infermesh.dev.profiles import CalibrationPoint, GpuProfile

__all__ = ["Measured", "run_point"]


@attrs.frozen
class Measured:
    """What the engine model gives for one calibration point."""

    output_tokens_per_s: float
    ttft_s: float
    itl_s: float
    num_requests: int


def run_point(
    profile: GpuProfile,
    point: CalibrationPoint,
    *,
    requests_per_client: int = 4,
    speed_factor: float = 1.0,
) -> Measured:
    """Closed-loop benchmark of `profile` at `point`'s concurrency and token lengths.

    Every prompt is distinct (no prefix-cache hits, like the benchmark's random prompts).
    """
    engine = Engine(
        EngineConfig.from_profile(profile, enable_prefix_caching=False),
        speed_factor=speed_factor,
    )
    total = point.concurrency * requests_per_client
    sent = 0
    arrival: dict[str, float] = {}
    first_token: dict[str, float] = {}
    ttfts: list[float] = []
    tpots: list[float] = []

    def send(now: float) -> None:
        nonlocal sent
        request_id = f"r{sent}"
        base = sent * point.input_tokens
        engine.submit(
            EngineRequest(
                request_id=request_id,
                prompt_token_ids=range(base, base + point.input_tokens),
                max_tokens=point.output_tokens,
            ),
            now,
        )
        arrival[request_id] = now
        sent += 1

    now = 0.0
    for _ in range(min(point.concurrency, total)):
        send(now)
    while engine.has_unfinished():
        result = engine.step(now)
        if result.end_s <= now and not result.outputs:
            raise RuntimeError(f"profile {profile.name!r} cannot schedule {point}")
        now = result.end_s
        for output in result.outputs:
            request_id = output.request_id
            if request_id not in first_token:
                first_token[request_id] = now
                ttfts.append(now - arrival[request_id])
            if output.finished:
                if output.num_output_tokens > 1:
                    tpots.append((now - first_token[request_id]) / (output.num_output_tokens - 1))
                if sent < total:
                    send(now)
    return Measured(
        output_tokens_per_s=total * point.output_tokens / now,
        ttft_s=sum(ttfts) / len(ttfts),
        itl_s=sum(tpots) / len(tpots) if tpots else 0.0,
        num_requests=total,
    )


def _figure(measured: float, published: float | None, scale: float, unit: str) -> str:
    if published is None:
        return f"{measured * scale:.4g} {unit} (-)"
    error = (measured / published - 1) * 100
    return f"{measured * scale:.4g} vs {published * scale:.4g} {unit} ({error:+.0f}%)"


def calibration_table() -> list[str]:
    """One line per calibration point: the model's figures next to the published ones."""
    from infermesh.dev.profiles import PROFILES

    lines = ["profile | C | in/out | output tok/s | TTFT | TPOT"]
    for profile in PROFILES.values():
        for point in profile.calibration:
            got = run_point(profile, point)
            lines.append(
                " | ".join(
                    (
                        profile.name,
                        str(point.concurrency),
                        f"{point.input_tokens}/{point.output_tokens}",
                        _figure(got.output_tokens_per_s, point.output_tokens_per_s, 1, "tok/s"),
                        _figure(got.ttft_s, point.ttft_s, 1000, "ms"),
                        _figure(got.itl_s, point.itl_s, 1000, "ms"),
                    )
                )
            )
    return lines


if __name__ == "__main__":
    print("\n".join(calibration_table()))
