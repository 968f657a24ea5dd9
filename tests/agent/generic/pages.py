"""Recorded-format pages of each mapped runtime (tests/agent/generic/data) and how to read them."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parent / "data"

MODELS_FILE = {
    "tgi": "tgi-models.json",
    "sglang": "sglang-models.json",
    "torchserve": "torchserve-models.json",
    "ovms": "ovms-config.json",
}
"""The model-list answer of each runtime that has one (TF Serving's models come from config)."""


def page(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def body(name: str) -> bytes:
    return (DATA / name).read_bytes()
