"""The agent's gRPC server: Scoring + State on a Unix domain socket (and TCP when configured),
with gRPC health checking and reflection.

Owns the socket file: creates its directory, refuses to start while another process answers on
it, replaces a stale one, and removes it on stop. Holds no scoring logic.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

import anyio
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from infermesh.agent.api.scoring import ScoringService
from infermesh.agent.api.state import StateService
from infermesh.core.config import parse_host_port
from infermesh.core.proto import scoring_pb2, scoring_pb2_grpc, state_pb2, state_pb2_grpc

__all__ = [
    "SCORING_SERVICE",
    "STATE_SERVICE",
    "GrpcServer",
    "SocketInUseError",
    "prepare_socket_path",
    "unix_target",
]

SCORING_SERVICE: str = scoring_pb2.DESCRIPTOR.services_by_name["Scoring"].full_name
STATE_SERVICE: str = state_pb2.DESCRIPTOR.services_by_name["State"].full_name
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


class SocketInUseError(Exception):
    """The socket path cannot be used: another process answers on it, or it is not a socket."""


def _check_socket_file(path: Path) -> bool:
    """Create the socket's directory; True when a socket file is already there."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise SocketInUseError(
            f"agent.socket {str(path)!r} is {len(os.fsencode(path))} bytes long; Unix sockets "
            f"allow at most {MAX_SOCKET_PATH_BYTES}: choose a shorter path"
        )
    # 0o700 for a directory we create: the socket accepts state pushes, so by default only
    # this user may reach it. Operators sharing it with a router user create the directory.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise SocketInUseError(
            f"agent.socket {str(path)!r} exists and is not a socket; refusing to replace it"
        )
    return True


async def prepare_socket_path(path: Path) -> None:
    """Make `path` ready to bind: its directory exists and no live server owns it.

    A socket file nobody answers on is left over from a crashed agent and is removed.
    """
    if not _check_socket_file(path):
        return
    try:
        with anyio.fail_after(2.0):
            stream = await anyio.connect_unix(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: left by an agent that did not shut down cleanly
        return
    except TimeoutError:
        pass  # a listener that does not accept in time is still a listener
    else:
        await stream.aclose()
    raise SocketInUseError(
        f"another process (probably an InferMesh agent) is serving on {str(path)!r}; stop it "
        "or set a different agent.socket / --socket"
    )


class GrpcServer:
    """grpc.aio server hosting Scoring, State, health and reflection."""

    def __init__(
        self,
        scoring: ScoringService,
        state: StateService,
        *,
        socket_path: str,
        listen: str = "",
    ) -> None:
        self.socket_path = Path(socket_path).absolute()
        self.listen = listen
        self.tcp_port: int | None = None
        self.health = health.aio.HealthServicer()
        self._scoring = scoring
        self._state = state
        self._server: Any = None
        self._socket_inode: int | None = None

    async def start(self) -> None:
        """Bind and start serving; health stays NOT_SERVING until `set_serving()`."""
        tcp: tuple[str, int] | None = None
        if self.listen:
            try:
                tcp = parse_host_port(self.listen)
            except ValueError as exc:
                raise SocketInUseError(f"agent.listen: {exc}") from None
        await prepare_socket_path(self.socket_path)
        # SO_REUSEPORT off: a second agent on the same TCP port must fail, not share it.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        scoring_pb2_grpc.add_ScoringServicer_to_server(self._scoring, server)
        state_pb2_grpc.add_StateServicer_to_server(self._state, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SCORING_SERVICE, STATE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        for service in ("", SCORING_SERVICE, STATE_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            server.add_insecure_port(f"unix:{self.socket_path}")
            if tcp is not None:
                self.tcp_port = server.add_insecure_port(self.listen)
        except RuntimeError as exc:
            await server.stop(None)
            where = f"agent.listen {self.listen!r}" if tcp else f"agent.socket {self.socket_path}"
            raise SocketInUseError(f"{where}: cannot bind ({exc})") from None
        await server.start()
        self._server = server
        with contextlib.suppress(FileNotFoundError):
            self._socket_inode = self.socket_path.lstat().st_ino

    async def set_serving(self) -> None:
        for service in ("", SCORING_SERVICE, STATE_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING, let running calls finish for up to `grace_s`, remove the socket."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        try:
            await self._server.stop(grace_s)
        finally:
            self._server = None
            self.remove_socket()

    def remove_socket(self) -> None:
        """Remove the socket file if it is still the one this server bound."""
        try:
            info = self.socket_path.lstat()
        except FileNotFoundError:
            return
        if stat.S_ISSOCK(info.st_mode) and info.st_ino == self._socket_inode:
            self.socket_path.unlink(missing_ok=True)


def unix_target(path: str | Path) -> str:
    """The gRPC target string for a Unix socket path."""
    return f"unix://{Path(path).absolute()}"
