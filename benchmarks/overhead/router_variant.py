"""Serve the InferMesh router app with a chosen ingress server and upstream client.

    python -m benchmarks.overhead.router_variant --config C --listen H:P --agent T \
        --server uvicorn|granian|hypercorn --upstream builtin|aiohttp|httpx|httpx2

The app, agent client and plugins are built exactly as `infermesh router run` builds them
(`infermesh.router.server.build_app`); only the server that runs it, and for aiohttp/httpx the
factory registered under the runtimes' transport name (`openai-http`), differ. Benchmark-only.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from benchmarks.overhead import aiohttp_transport, httpx_transport
from infermesh.core.config import Config, load_config, parse_host_port
from infermesh.core.contracts import TransportFactory
from infermesh.core.logging import configure_logging
from infermesh.core.plugins import PluginHost, plugin_selection_from_env
from infermesh.router.app import RouterApp
from infermesh.router.server import build_app, uvicorn_config

__all__ = ["create_app", "main"]

# What a runtime's `transport` is unless its config says otherwise; the variant replaces it.
DEFAULT_TRANSPORT = "openai-http"
MODULE = "benchmarks.overhead.router_variant"  # not __name__: that is "__main__" under -m
_ENV_PREFIX = "INFERMESH_BENCH_VARIANT_"


def _host() -> PluginHost:
    allow, block = plugin_selection_from_env()
    extra = [("bench-httpx", httpx_transport), ("bench-aiohttp", aiohttp_transport)]
    return PluginHost.load(allow=allow, block=block, extra=extra)


def transport_factories(host: PluginHost, upstream: str) -> dict[str, TransportFactory]:
    """The installed transports plus the benchmark's; `openai-http` served by `upstream`.

    The aiohttp and httpx transports are registered through the same hook as every transport
    plugin; the targets name `openai-http`, so for such a variant that name maps to their
    factory instead of the router's own client (`builtin`).
    """
    factories = dict(host.transports())
    if upstream == "aiohttp":
        factories[DEFAULT_TRANSPORT] = factories[aiohttp_transport.NAME]
    elif upstream != "builtin":
        factories[DEFAULT_TRANSPORT] = factories[httpx_transport.transport_name(upstream)]
    return factories


def _load(config_path: str, listen: str, agent: str) -> Config:
    config = load_config(
        config_path, overrides=[("router.listen", listen), ("router.agent", agent)]
    )
    configure_logging(
        config.logging.level, config.logging.format, node=config.node.id, component="router"
    )
    return config


def create_app() -> RouterApp:
    """granian's factory: it imports this module in its worker and calls this (no arguments)."""
    config = _load(
        os.environ[_ENV_PREFIX + "CONFIG"],
        os.environ[_ENV_PREFIX + "LISTEN"],
        os.environ[_ENV_PREFIX + "AGENT"],
    )
    plugins = _host()
    upstream = os.environ[_ENV_PREFIX + "UPSTREAM"]
    return build_app(config, transport_factories(plugins, upstream), plugins.scorers())


def serve_granian(config: Config) -> None:
    from granian import Granian
    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels

    host, port = parse_host_port(config.router.listen)
    Granian(
        target=f"{MODULE}:create_app",
        factory=True,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=1,
        loop=Loops.uvloop,
        log_level=LogLevels.warning,
        log_access=False,
        backlog=4096,
    ).serve()


def serve_uvicorn(config: Config, upstream: str) -> None:
    import uvicorn

    address, port = parse_host_port(config.router.listen)
    plugins = _host()
    app = build_app(config, transport_factories(plugins, upstream), plugins.scorers())
    uvicorn.Server(uvicorn_config(app, address, port, config.logging.level)).run()


def serve_hypercorn(config: Config, upstream: str) -> None:
    """`router.server = "hypercorn"` as `infermesh router run` serves it (HTTP/1.1 + HTTP/2)."""
    import uvloop

    from infermesh.router.server import hypercorn_config
    from infermesh.router.server import serve_hypercorn as serve

    address, port = parse_host_port(config.router.listen)
    plugins = _host()
    app = build_app(config, transport_factories(plugins, upstream), plugins.scorers())
    uvloop.run(serve(app, hypercorn_config(app, address, port, config.router.http)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--config", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--server", choices=("uvicorn", "granian", "hypercorn"), required=True)
    parser.add_argument(
        "--upstream", choices=("builtin", "aiohttp", "httpx", "httpx2"), required=True
    )
    args = parser.parse_args(argv)
    config = _load(args.config, args.listen, args.agent)
    if args.server == "uvicorn":
        serve_uvicorn(config, args.upstream)
        return 0
    if args.server == "hypercorn":
        serve_hypercorn(config, args.upstream)
        return 0
    # granian builds the app in its worker process from these.
    os.environ[_ENV_PREFIX + "CONFIG"] = args.config
    os.environ[_ENV_PREFIX + "LISTEN"] = args.listen
    os.environ[_ENV_PREFIX + "AGENT"] = args.agent
    os.environ[_ENV_PREFIX + "UPSTREAM"] = args.upstream
    serve_granian(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
