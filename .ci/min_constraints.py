"""The lower bounds pyproject.toml declares, as a pip constraints file (`name==minimum`).

    python .ci/min_constraints.py otlp fast embedded > constraints.txt   # write them
    python .ci/min_constraints.py --check otlp fast embedded             # installed == minimum?

Reads `[project] dependencies` and the named extras. Every requirement must have a `>=` lower
bound (a requirement without one is an error: its minimum would be untested). A requirement
of this project itself (an extra naming others, e.g. `claude-pipeline[otlp]`) is followed.
Environment markers are kept, extras of other packages dropped (constraints cannot name them).
Run by `.ci/min-versions`; needs only the standard library (Python 3.11+).
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
_REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[(?P<extras>[^\]]*)\])?"
    r"\s*(?P<specs>[^;]*?)\s*(?:;\s*(?P<marker>.+?))?\s*$"
)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def minimums(extras: list[str]) -> dict[str, tuple[str, str | None]]:
    """{canonical name: (minimum version, marker or None)} for the dependencies and extras."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    self_name = _canonical(project["name"])
    found: dict[str, tuple[str, str | None]] = {}
    todo = [("dependencies", list(project["dependencies"]))]
    seen: set[str] = set()
    todo += [(f"[{extra}]", optional[extra]) for extra in extras]
    while todo:
        where, requirements = todo.pop(0)
        for text in requirements:
            match = _REQUIREMENT.match(text)
            if match is None:
                raise SystemExit(f"{where}: cannot read requirement {text!r}")
            name = _canonical(match["name"])
            if name == self_name:  # an extra pulling in other extras of this project
                for extra in (e.strip() for e in (match["extras"] or "").split(",")):
                    if extra and extra not in seen:
                        seen.add(extra)
                        todo.append((f"[{extra}]", optional[extra]))
                continue
            lower = [s.strip()[2:].strip() for s in match["specs"].split(",") if ">=" in s]
            if len(lower) != 1:
                raise SystemExit(f"{where}: {text!r} needs exactly one '>=' lower bound")
            minimum, marker = lower[0], match["marker"]
            if name in found and found[name][0] != minimum:
                raise SystemExit(
                    f"{where}: {name}>={minimum} disagrees with >={found[name][0]} elsewhere"
                )
            found[name] = (minimum, marker)
    return found


def _same(installed: str, declared: str) -> bool:
    """`1.27` is `1.27.0` (trailing zero components of the release do not count)."""

    def norm(version: str) -> str:
        return re.sub(r"(\.0+)+(?=$|[a-z])", "", version.lower())

    return norm(installed) == norm(declared)


def _applies(marker: str | None) -> bool:
    """Whether a marker holds here (only the `sys_platform` comparisons this file uses)."""
    if marker is None:
        return True
    match = re.fullmatch(r"sys_platform\s*(==|!=)\s*['\"]([^'\"]+)['\"]", marker.strip())
    if match is None:
        raise SystemExit(f"cannot evaluate marker {marker!r}: teach .ci/min_constraints.py")
    return (sys.platform == match[2]) == (match[1] == "==")


def main(argv: list[str]) -> int:
    check = "--check" in argv
    extras = [a for a in argv if a != "--check"]
    wanted = minimums(extras)
    if not check:
        for name, (minimum, marker) in sorted(wanted.items()):
            print(f"{name}=={minimum}" + (f"; {marker}" if marker else ""))
        return 0
    wrong = []
    for name, (minimum, marker) in sorted(wanted.items()):
        if not _applies(marker):
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        print(f"{name:40} declared >={minimum:12} installed {installed}")
        if not _same(installed, minimum):
            wrong.append(name)
    if wrong:
        print(f"not at the declared minimum: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
