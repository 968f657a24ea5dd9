"""Which transport plugin reaches a target, and its KServe gRPC address, read from the target.

A runtime adapter labels its targets with how they are reached: the Triton adapter sets the
custom label `transport = "kserve-http"` and, when its `options.grpc_url` is set,
`kserve_grpc = "host:port"`. Labels travel with the target's state (gossip, the State service,
`RankedTarget.labels`), so a router or agent on another node learns a remote Triton's transport
without a `[[runtimes]]` table for it. The target's label wins; a local `[[runtimes]]` entry for
the same base URL is the fallback, then `openai-http`. Pure functions; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from infermesh.core.model import Labels

__all__ = [
    "DEFAULT_TRANSPORT",
    "KSERVE_GRPC_LABEL",
    "KSERVE_TRANSPORT",
    "TRANSPORT_LABEL",
    "label_map",
    "transport_of",
]

DEFAULT_TRANSPORT = "openai-http"
"""The transport of a target that names none and has no local `[[runtimes]]` entry."""
KSERVE_TRANSPORT = "kserve-http"
"""The transport of Triton targets: KServe v2 HTTP (and gRPC at `kserve_grpc`)."""
TRANSPORT_LABEL = "transport"
"""Custom label: the transport plugin name that reaches the target (e.g. `kserve-http`)."""
KSERVE_GRPC_LABEL = "kserve_grpc"
"""Custom label: the `host:port` of the Triton server's KServe v2 gRPC endpoint."""


def transport_of(labels: Labels, endpoint: str, configured: Mapping[str, str]) -> str:
    """The transport of the target at `endpoint` with `labels`: its `transport` label, else
    `configured` (base URL -> transport, from the local `[[runtimes]]`), else `openai-http`."""
    return (
        labels.get(TRANSPORT_LABEL)
        or configured.get(endpoint)
        or configured.get(endpoint.rstrip("/"))
        or DEFAULT_TRANSPORT
    )


def label_map(labels: Labels) -> dict[str, str]:
    """The labels as one flat mapping: the non-empty standard ones, then the custom ones."""
    flat = {
        field.name: str(getattr(labels, field.name))
        for field in attrs.fields(Labels)
        if field.name != "custom" and getattr(labels, field.name)
    }
    flat.update(labels.custom)
    return flat
