"""The options every operator command takes (`--json`, `--endpoint`, TLS files, `--profile`,
`--timeout`) and the shell that runs a command body: settings resolved, a channel opened, output
written, and any `CtlError` printed as one line with its exit code. The only module here that
looks at the environment, the home directory and the terminal.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeVar

import attrs
import click

from infermesh.agent.ctl.errors import CtlError
from infermesh.agent.ctl.profile import ConnectionFlags, resolve_settings

if TYPE_CHECKING:
    from rich.console import RenderableType

    from infermesh.agent.ctl.client import ControlClient

__all__ = ["Invocation", "Output", "common_options", "fail", "run"]

F = TypeVar("F", bound=Callable[..., Any])

# Width of tables written to a pipe or file, where there is no terminal to measure; tables only
# take the room they need, so this just keeps long cells from folding.
_PIPE_WIDTH = 200
# Exit status after Ctrl-C, as a shell reports a process ended by SIGINT.
_INTERRUPTED = 130


@attrs.frozen
class Invocation:
    """What the common options said."""

    flags: ConnectionFlags
    json_output: bool


class Output:
    """Where a command writes: JSON documents or lines with `--json`, else rich renderables."""

    def __init__(self, json_output: bool, stream: TextIO | None = None) -> None:
        self.json_output = json_output
        self._stream = stream if stream is not None else sys.stdout
        from rich.console import Console  # only when a command runs: keeps `--help` quick

        width = None if self._stream.isatty() else _PIPE_WIDTH
        # Names, reasons and messages come from users: print them as they are, never as markup.
        self._console = Console(
            file=self._stream, width=width, highlight=False, markup=False, emoji=False
        )

    def document(self, value: Any) -> None:
        """One JSON document (the whole answer of a command)."""
        self._stream.write(json.dumps(value, indent=2, sort_keys=True) + "\n")

    def json_line(self, value: Any) -> None:
        """One compact JSON line (a streamed item), flushed at once."""
        self._stream.write(json.dumps(value, sort_keys=True) + "\n")
        self._stream.flush()

    def show(self, renderable: RenderableType | str) -> None:
        """A table or text, without the padding rich leaves at the end of each line."""
        with self._console.capture() as captured:
            self._console.print(renderable)
        lines = captured.get().splitlines()
        self._stream.write("".join(line.rstrip() + "\n" for line in lines))

    def line(self, text: str) -> None:
        """Plain text, unstyled and unwrapped, flushed at once (rows of a followed stream)."""
        self._stream.write(text + "\n")
        self._stream.flush()


def common_options(command: F) -> F:
    """Add the connection and output options; the command receives them as `invocation`."""

    @click.option("--json", "json_output", is_flag=True, help="Print JSON instead of tables.")
    @click.option(
        "--endpoint", metavar="HOST:PORT", help="An agent's Control API (its control.listen)."
    )
    @click.option("--ca", metavar="PATH", help="CA certificate that issued the agent's cert.")
    @click.option("--cert", metavar="PATH", help="Your client certificate.")
    @click.option("--key", metavar="PATH", help="The key of your client certificate.")
    @click.option("--profile", metavar="NAME", help="Profile of the CLI config file to use.")
    @click.option(
        "--timeout",
        "timeout_s",
        type=click.FloatRange(min=0, min_open=True),
        metavar="SECONDS",
        help="Deadline of each call, connecting included [default: 10].",
    )
    @functools.wraps(command)
    def wrapper(
        *args: Any,
        json_output: bool,
        endpoint: str | None,
        ca: str | None,
        cert: str | None,
        key: str | None,
        profile: str | None,
        timeout_s: float | None,
        **kwargs: Any,
    ) -> Any:
        flags = ConnectionFlags(
            endpoint=endpoint, ca=ca, cert=cert, key=key, profile=profile, timeout_s=timeout_s
        )
        return command(*args, invocation=Invocation(flags, json_output), **kwargs)

    return wrapper  # type: ignore[return-value]  # click's decorators erase the signature


def fail(error: CtlError) -> NoReturn:
    click.echo(f"infermesh: error: {error.message}", err=True)
    sys.exit(int(error.exit_code))


def _connect(invocation: Invocation) -> ControlClient:
    settings = resolve_settings(invocation.flags, os.environ, Path.home())
    # gRPC core logs TLS handshake failures on stderr; the CLI explains them itself, in one
    # line. The variable only counts when set before gRPC is first imported.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from infermesh.agent.ctl.client import ControlClient

    return ControlClient(settings)


def run(invocation: Invocation, body: Callable[[ControlClient, Output], None]) -> None:
    """Run `body` with a client and an output; a CtlError or Ctrl-C ends the process cleanly."""
    try:
        with _connect(invocation) as client:
            body(client, Output(invocation.json_output))
    except CtlError as error:
        fail(error)
    except KeyboardInterrupt:
        sys.exit(_INTERRUPTED)
