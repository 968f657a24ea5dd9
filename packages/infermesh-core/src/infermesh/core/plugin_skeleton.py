"""`infermesh plugins new`: a new plugin package that passes its own tests, from a name and kind.

`skeleton_files` is pure (name and kind in, relative paths and texts out); `write_skeleton`
writes them into a directory that must not exist yet, so nothing is ever overwritten.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from string import Template

from infermesh.core.plugin_templates import COMMON, IMPLEMENTATION_MODULE, KINDS

__all__ = ["PLUGIN_KINDS", "SkeletonError", "skeleton_files", "validate_name", "write_skeleton"]

PLUGIN_KINDS = tuple(KINDS)
"""What `--kind` accepts: runtime, gpu, scorer, transport."""

_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
MAX_NAME = 64


class SkeletonError(ValueError):
    """A name, kind or directory `infermesh plugins new` cannot use; the message says why."""


def validate_name(name: str) -> str:
    """`name` if it can be a distribution, entry-point and registered name; SkeletonError if not.

    Lower-case letters, digits and single hyphens, starting with a letter (`acme-llm`). The
    Python package is the name with `_` for `-`.
    """
    if not _NAME.fullmatch(name) or len(name) > MAX_NAME:
        raise SkeletonError(
            f"invalid plugin name {name!r}: use lower-case letters, digits and single hyphens, "
            f"starting with a letter and at most {MAX_NAME} characters (e.g. 'acme-llm')"
        )
    package = package_of(name)
    if keyword.iskeyword(package) or package == "infermesh":
        raise SkeletonError(f"invalid plugin name {name!r}: {package!r} cannot be a package name")
    return name


def package_of(name: str) -> str:
    """The Python package a plugin named `name` lives in."""
    return name.replace("-", "_")


def skeleton_files(name: str, kind: str) -> dict[str, str]:
    """Relative path -> text of every file of a new `kind` plugin called `name`."""
    validate_name(name)
    template = KINDS.get(kind)
    if template is None:
        raise SkeletonError(f"unknown plugin kind {kind!r}; expected one of {', '.join(KINDS)}")
    package = package_of(name)
    values = {
        "name": name,
        "package": package,
        "kind": kind,
        "hook": template.hook,
        "summary": template.summary,
        "dependencies": ", ".join(f'"{dep}"' for dep in template.dependencies),
        "test_extra": " and pytest, plus anyio" if kind == "transport" else " and pytest",
    }
    values["usage"] = Template(template.usage).substitute(values)
    module = IMPLEMENTATION_MODULE[kind]
    texts = {
        **COMMON,
        "src/$package/plugin.py": template.plugin,
        f"src/$package/{module}.py": template.implementation,
        "tests/test_plugin.py": template.tests,
    }
    return {
        Template(path).substitute(values): Template(text).substitute(values)
        for path, text in texts.items()
    }


def write_skeleton(name: str, kind: str, parent: Path) -> Path:
    """Write the plugin into `parent/name` (created); SkeletonError if that path exists."""
    files = skeleton_files(name, kind)
    root = parent / name
    if root.exists():
        raise SkeletonError(f"{root} already exists; choose another name or --dir")
    if parent.exists() and not parent.is_dir():
        raise SkeletonError(f"--dir {parent} is not a directory")
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root
