"""The router's plugin: the `infermesh router` commands and the `openai-http` transport.

Registration only; modules with heavy imports load when a command runs or a transport is built.
"""

from __future__ import annotations

from infermesh.core.contracts import Transport, TransportContext
from infermesh.core.hookspecs import RegisterCommand, RegisterTransport, hookimpl


def openai_http_transport(context: TransportContext) -> Transport:
    from infermesh.router.transport import OpenAIHttpTransport

    return OpenAIHttpTransport(context)


@hookimpl
def infermesh_register_transports(register: RegisterTransport) -> None:
    register("openai-http", openai_http_transport)


@hookimpl
def infermesh_register_commands(register: RegisterCommand) -> None:
    from infermesh.router.cli import router_group

    register(router_group)
