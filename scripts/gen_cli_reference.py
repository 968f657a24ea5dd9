"""Write docs/cli-reference.md by walking the real `infermesh` click group.

Usage: python scripts/gen_cli_reference.py [--stdout]
Loads the plugins of the InferMesh distributions (not third-party ones that happen to be
installed, so the page does not depend on the machine), then writes every command and subcommand
with its usage, help and options as click knows them. `--stdout` prints instead of writing (the
drift test compares that with the committed file). Never runs a command.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from infermesh.core.cli import build_cli
from infermesh.core.plugins import PluginHost

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "cli-reference.md"
SCRIPT = "scripts/gen_cli_reference.py"
# The entry-point names of the distributions in packages/ (their [project.entry-points.infermesh]).
FIRST_PARTY_PLUGINS = ("core", "agent", "router", "vllm", "triton", "dcgm", "dev")


def root_group() -> click.Group:
    """The `infermesh` group exactly as the console script builds it, first-party plugins only."""
    host = PluginHost.load(allow=list(FIRST_PARTY_PLUGINS), block=[], strict=True)
    return build_cli(host)


def walk(
    command: click.Command, path: list[str], parent: click.Context | None
) -> Iterator[tuple[list[str], click.Command, click.Context]]:
    """Every command under `command` (itself first), with its path and a context to render it."""
    # As `make_context` does: a command's context_settings (the root's `-h` for help, which
    # every subcommand inherits) apply. Without them the page would say `--help` only, and
    # click's per-command cache of the help option could make it differ between runs.
    ctx = click.Context(command, info_name=path[-1], parent=parent, **command.context_settings)
    yield path, command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from walk(sub, [*path, name], ctx)


def cell(text: str) -> str:
    """Text fit for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def help_markdown(text: str) -> str:
    """A command's help as Markdown: dedented; a paragraph click keeps unwrapped (it starts with
    a `\\b` line, e.g. examples) becomes a code block."""
    out: list[str] = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        lines = paragraph.strip("\n").splitlines()
        if lines and lines[0].strip() == "\b":
            out.append("\n".join(["```", *(line.strip() for line in lines[1:]), "```"]))
        else:
            out.append("\n".join(lines))
    return "\n\n".join(out).strip()


def anchor(path: list[str]) -> str:
    """The GitHub anchor of a command's heading: `infermesh agent run` -> infermesh-agent-run."""
    return "-".join(path)


def render_command(path: list[str], command: click.Command, ctx: click.Context) -> list[str]:
    lines = [f"## {' '.join(path)}", ""]
    usage = " ".join([*path, *command.collect_usage_pieces(ctx)])
    lines += ["```", usage, "```", ""]
    if command.help:
        lines += [help_markdown(command.help), ""]
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    if arguments:
        names = ", ".join(f"`{p.make_metavar(ctx)}`" for p in arguments)
        lines += [f"Arguments: {names}.", ""]
    rows: list[str] = []
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        rows.append(f"| `{cell(names)}` | {cell(help_text)} |")
    if command.add_help_option and ctx.help_option_names:
        # Built from the context, not `get_params`: click caches a command's help option the
        # first time it is asked for, so a command run earlier in the same process (a test
        # invoking it without the root group) would otherwise change this row.
        names = ", ".join(sorted(ctx.help_option_names, key=len))
        rows.append(f"| `{cell(names)}` | Show this message and exit. |")
    if rows:
        lines += ["| option | meaning |", "|---|---|", *rows, ""]
    if isinstance(command, click.Group):
        subcommands = [
            (name, sub)
            for name in command.list_commands(ctx)
            if (sub := command.get_command(ctx, name)) is not None and not sub.hidden
        ]
        lines += ["| subcommand | what it does |", "|---|---|"]
        for name, sub in subcommands:
            link = anchor([*path, name])
            lines.append(f"| [`{name}`](#{link}) | {cell(sub.get_short_help_str(limit=200))} |")
        lines.append("")
    return lines


def render() -> str:
    """The whole reference page."""
    lines = [
        "# CLI reference",
        "",
        f"<!-- Generated by {SCRIPT} from the click commands; do not edit by hand. -->",
        "",
        "Every `infermesh` command and subcommand registered by the InferMesh distributions, with "
        "its options, as `infermesh ... --help` prints them. Third-party plugins add their own "
        "commands (`infermesh plugins` lists what is installed). How to connect to an agent, "
        "profiles, output formats and exit codes: [cli.md](cli.md).",
        "",
        f"Regenerate after changing a command: `uv run python {SCRIPT}`.",
        "",
    ]
    for path, command, ctx in walk(root_group(), ["infermesh"], None):
        lines += render_command(path, command, ctx)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--stdout", action="store_true", help="print instead of writing")
    args = parser.parse_args()
    text = render()
    if args.stdout:
        sys.stdout.write(text)
    else:
        OUT.write_text(text, encoding="utf-8")
        print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
