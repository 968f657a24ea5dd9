"""Token counts read from the tail of a relayed response."""

from __future__ import annotations

from infermesh.router.usage import UsageScanner

USAGE = (
    b'{"usage":{"prompt_tokens":12,"total_tokens":19,"completion_tokens":7,'
    b'"prompt_tokens_details":null}}'
)


def test_usage_of_a_json_response_split_over_chunks() -> None:
    scanner = UsageScanner(stream=False)
    for chunk in (b'{"id":"x","choices":[]', b"," + USAGE[1:40], USAGE[40:]):
        scanner.feed(chunk)
    assert scanner.counts() == (12, 7)


def test_usage_event_of_a_stream_wins_over_the_event_count() -> None:
    scanner = UsageScanner(stream=True)
    for chunk in (
        b'data: {"a":1}\n\n',
        b'data: {"a":2}\n\n',
        b"data: " + USAGE + b"\n\n",
        b"data: [DONE]\n\n",
    ):
        scanner.feed(chunk)
    assert scanner.counts() == (12, 7)


def test_stream_without_usage_counts_one_token_per_event_less_done() -> None:
    scanner = UsageScanner(stream=True)
    scanner.feed(b'data: {"a":1}\n\ndata: {"a":2}\n\n')
    scanner.feed(b'data: {"a":3}\n\ndata: [DONE]\n\n')
    assert scanner.counts() == (None, 3)


def test_non_stream_without_usage_reports_nothing() -> None:
    scanner = UsageScanner(stream=False)
    scanner.feed(b'{"choices":[]}')
    assert scanner.counts() == (None, 0)
