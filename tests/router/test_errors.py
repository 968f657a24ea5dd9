"""OpenAI error JSON: the shape every router error has, and the headers some of them carry."""

from __future__ import annotations

import orjson

from infermesh.router.errors import ApiError, bad_request, error_body


def test_error_body_has_openai_shape_with_all_four_keys() -> None:
    assert orjson.loads(error_body("boom", "server_error")) == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": None}
    }


def test_bad_request_is_a_400_invalid_request_error_with_param() -> None:
    error = bad_request("'model' is required", param="model")
    assert error.status == 400
    assert orjson.loads(error.body())["error"] == {
        "message": "'model' is required",
        "type": "invalid_request_error",
        "param": "model",
        "code": None,
    }
    assert error.headers() == []


def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one() -> None:
    assert ApiError(503, "x", retry_after_s=2.2).headers() == [(b"retry-after", b"3")]
    assert ApiError(503, "x", retry_after_s=0.0).headers() == [(b"retry-after", b"1")]


def test_method_not_allowed_names_the_allowed_method() -> None:
    assert ApiError(405, "x", allow="POST").headers() == [(b"allow", b"POST")]
