"""The router's plugin: the `infermesh router` commands, the `openai-http` and `kserve-http`
transports.

Registration only; modules with heavy imports load when a command runs or a transport is built.
"""

from __future__ import annotations

from infermesh.core.contracts import Transport, TransportContext
from infermesh.core.hookspecs import RegisterCommand, RegisterTransport, hookimpl


def openai_http_transport(context: TransportContext) -> Transport:
    from infermesh.router.transport import OpenAIHttpTransport

    return OpenAIHttpTransport(context)


def kserve_http_transport(context: TransportContext) -> Transport:
    from infermesh.router.kserve_transport import KServeHttpTransport

    return KServeHttpTransport(context)


@hookimpl
def infermesh_register_transports(register: RegisterTransport) -> None:
    register("openai-http", openai_http_transport)
    register("kserve-http", kserve_http_transport)


@hookimpl
def infermesh_register_commands(register: RegisterCommand) -> None:
    from infermesh.router.cli import router_group

    register(router_group)
