"""The deployment files agree with the code: compose.yaml, the Dockerfile, observability/
(Prometheus, Grafana) and deploy/ (Kubernetes + KEDA).

No Docker engine or Kubernetes cluster runs here, so the files are read and checked against
the real CLI (each command is parsed by the `pipeline` command itself), the stage names, the
key names, the settings and the metric names. Where a tool validates offline (`docker compose
config`, `promtool`, `kubectl kustomize`) it is used when present. The last tests run the
compose services' own commands as local processes, scrape the workers as Prometheus would and,
where a `prometheus` binary is on PATH, ask a real Prometheus every dashboard query.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import kubernetes_validate
import promql_parser
import pytest
import redis
import typer.main
import yaml
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

import stages
from observability import metric_names
from pipeline.claude.config import load_settings
from pipeline.claude.settings import Settings
from pipeline.cli import deploy_plan
from pipeline.cli.deploy_plan import Workload
from pipeline.cli.main import app as cli_app
from pipeline.runtime.keys import Keys
from pipeline.runtime.settings import CLUSTER_PARTITIONS
from pipeline.runtime.stage import Stage
from stages import claude_call
from tests.helpers.workers import wait_until

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"  # the manifests; deploy/kustomization.yaml is `resources: [base]`
CLUSTER = DEPLOY / "cluster"  # the overlay for a Redis Cluster
PROMETHEUS = ROOT / "observability/prometheus/prometheus.yml"
GRAFANA = ROOT / "observability/grafana"
DASHBOARD = GRAFANA / "dashboards/pipeline.json"
DEFAULTS = load_settings(env={})
STAGES: tuple[Stage, ...] = stages.app(DEFAULTS).stages
STAGE_NAMES = [s.name for s in STAGES]
STAGE_BY_NAME = {s.name: s for s in STAGES}


def _deployed_stages() -> tuple[Stage, ...]:
    """The stages as the Kubernetes pods build them, from the ConfigMap's pipeline.toml: its
    `[claude.models]` decides claude-call's lanes, so a family added there needs its own
    `claude-call-<family>` Deployment (docs/DEPLOY.md "Adding a model family")."""
    for doc in yaml.safe_load_all((BASE / "config.yaml").read_text()):
        if doc and doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "pipeline-config":
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "pipeline.toml"
                path.write_text(doc["data"]["pipeline.toml"])
                return stages.app(load_settings(path, env={})).stages
    raise AssertionError("deploy/base/config.yaml holds no pipeline-config ConfigMap")


DEPLOYED_STAGES = _deployed_stages()
TARGET_LABELS = set(metric_names.TARGET_LABELS)


# ---- reading the files -----------------------------------------------------------------------


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@cache
def _compose() -> dict[str, Any]:
    return _yaml(ROOT / "compose.yaml")  # type: ignore[no-any-return]


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]  # type: ignore[no-any-return]


class MissingVariable(ValueError):
    """A `${X:?message}` (or `${X?message}`) whose variable is not set: compose stops."""


#: `$$`, `${NAME}`, `${NAME<op>arg}` (op: `:-` `-` `:?` `?` `:+` `+`) and a bare `$NAME`.
_VARIABLE = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)"
)


def _interpolate(value: object, variables: Mapping[str, str]) -> str:
    """A compose value as compose resolves it with `variables` set in the shell. A variable
    with no default that is not set is an error here (compose would warn and use "")."""

    def resolve(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        if op is None:
            assert name in variables, f"compose value without a default: {value}"
            return variables[name]
        given = bool(variables.get(name)) if op.startswith(":") else name in variables
        if op.endswith("-"):
            return variables[name] if given else arg
        if op.endswith("?"):
            if not given:
                raise MissingVariable(f"{name}: {arg}")
            return variables[name]
        return arg if given else ""  # `+`

    return _VARIABLE.sub(resolve, str(value))


def _default(value: str) -> str:
    """A compose value as it runs with no variables set: `${X:-d}` -> `d`, `$$` -> `$`."""
    return _interpolate(value, {})


def _env_file(path: Path, variables: Mapping[str, str]) -> dict[str, str]:
    """An `env_file` as compose reads it: KEY=VALUE lines, values interpolated."""
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and not value.startswith(("'", '"')), f"{path.name}: {line}"
            env[key] = _interpolate(value, variables)
    return env


def _env(service: dict[str, Any], variables: Mapping[str, str] | None = None) -> dict[str, str]:
    """A service's environment as compose builds it with `variables` in the shell (none: as
    the stack runs by default): its env_files, then `environment` over them."""
    variables = variables or {}
    env: dict[str, str] = {}
    for name in service.get("env_file") or []:
        path = ROOT / _interpolate(name, variables)
        if not path.exists():
            raise FileNotFoundError(f"env file {path.relative_to(ROOT)} not found")
        env |= _env_file(path, variables)
    environment = service.get("environment") or {}
    # The list form (`- NAME`) or a key without value would copy NAME from the shell.
    assert isinstance(environment, dict), service
    assert all(v is not None for v in environment.values()), environment
    return env | {k: _interpolate(v, variables) for k, v in environment.items()}


_PORT = re.compile(
    r"^\$\{PIPELINE_BIND_ADDRESS:-127\.0\.0\.1\}:\$\{(PIPELINE_[A-Z_]+_PORT):-(\d+)\}:(\d+)$"
)


def _published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(variable, default host port, container port) of each port a service publishes; each
    host port must be a variable with a default, on PIPELINE_BIND_ADDRESS (127.0.0.1)."""
    found = []
    for spec in service.get("ports", []):
        m = _PORT.match(str(spec))
        assert m, f"a host port that is no PIPELINE_*_PORT variable on 127.0.0.1: {spec}"
        found.append((m.group(1), int(m.group(2)), int(m.group(3))))
    return found


def _parse_cli(argv: list[str], app: Sequence[Stage] = STAGES) -> dict[str, Any]:
    """Parse a `pipeline ...` command line with the real CLI (types, ranges, unknown options);
    a worker's stages and lanes must be `app`'s."""
    assert argv[0] == "pipeline", argv
    command = typer.main.get_command(cli_app).commands[argv[1]]  # type: ignore[attr-defined]
    with command.make_context(argv[1], list(argv[2:])) as ctx:
        # A repeated option is a tuple before click 8.2 (typer's minimum pairs with 8.1).
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in ctx.params.items()}
    if argv[1] == "worker":  # the CLI checks stages and lanes once it has loaded the app
        assert params["app_spec"] == "stages:app", argv
        by_name = {stage.name: stage for stage in app}
        assert set(params["stage"]) <= set(by_name), argv
        selected = app if params["all_stages"] else [by_name[n] for n in params["stage"]]
        lanes = {lane for stage in selected for lane in stage.lanes}
        assert set(params["lane"]) <= lanes, f"{argv}: lanes are {sorted(lanes)}"
    return params


def _is_worker(argv: list[str]) -> bool:
    return argv[:2] == ["pipeline", "worker"]


def _workers() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in _services().items() if _is_worker(s.get("command") or [])}


def _manifests() -> list[dict[str, Any]]:
    kustomization = _yaml(BASE / "kustomization.yaml")
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((BASE / name).read_text()) if d]
    return docs


def _of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == kind}


def _expected_deployments() -> dict[str, Workload]:
    """Deployment name -> the stage and lane it runs: one per stage, and one per lane of a
    laned stage (claude-call per model family: rate limits are per family). The mapping is
    pipeline.cli.deploy_plan's, which `pipeline keda-triggers` writes the Cluster's from."""
    return deploy_plan.workloads(DEPLOYED_STAGES)


def _worker_params(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return _parse_cli(container["command"], DEPLOYED_STAGES)


def _secret_example() -> dict[str, Any]:
    return _yaml(DEPLOY / "secret.example.yaml")  # type: ignore[no-any-return]


def _configmap_toml(tmp_path: Path) -> Settings:
    path = tmp_path / "pipeline.toml"
    path.write_text(_of_kind("ConfigMap")["pipeline-config"]["data"]["pipeline.toml"])
    return load_settings(path, env={})


def _metrics_port() -> int:
    (job,) = [j for j in _yaml(PROMETHEUS)["scrape_configs"] if "dns_sd_configs" in j]
    (sd,) = job["dns_sd_configs"]
    return int(sd["port"])


# ---- compose.yaml ----------------------------------------------------------------------------


def test_every_stage_is_a_scalable_compose_service_running_that_stage() -> None:
    services = _services()
    grace_s = DEFAULTS.runtime.grace_s
    for name in STAGE_NAMES:
        service = services[name]
        params = _parse_cli(service["command"])
        assert params["stage"] == [name] and not params["all_stages"]
        assert params["metrics_port"] == _metrics_port()
        assert str(_metrics_port()) in service["expose"]
        # `docker compose up --scale NAME=4` needs no fixed name and no host port.
        assert "container_name" not in service and "ports" not in service
        assert service["build"] == "." and service["image"] == services["producer"]["image"]
        assert float(service["stop_grace_period"].rstrip("s")) > grace_s
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert sorted(_workers()) == sorted(STAGE_NAMES)


def test_every_service_has_an_image_and_a_command_the_cli_accepts() -> None:
    for name, service in _services().items():
        assert service.get("image"), name
        if "build" not in service:  # third-party images are pinned
            assert ":" in service["image"] and not service["image"].endswith(":latest"), name
        command = [_default(a) for a in service.get("command") or []]
        if command[:1] == ["pipeline"]:
            _parse_cli(command)
        elif command[:2] == ["sh", "-c"]:
            _check_script(command[2])


def _check_script(script: str) -> None:
    """Each `pipeline` line parses with the CLI; each `python -c` snippet compiles."""
    lines = [line.strip() for line in script.splitlines()]
    pipeline_lines = [line for line in lines if line.startswith("pipeline ")]
    assert pipeline_lines
    for line in pipeline_lines:
        _parse_cli(shlex.split(re.sub(r"\$\w+", "1", line)))
    for line in lines:
        if line.startswith("python -c "):
            compile(shlex.split(line)[2], "<compose python -c>", "exec")


def test_pipeline_services_point_at_redis_the_fake_api_and_jaeger() -> None:
    services = _services()
    fake = _parse_cli(services["fake-claude"]["command"])
    assert fake["host"] == "0.0.0.0"
    jaeger = services["jaeger"]
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {4317, 16686} <= {container for _var, _host, container in _published(jaeger)}
    redis_service = services["redis"]
    assert redis_service["command"][-2:] == ["--appendonly", "yes"]
    assert "redis-cli" in redis_service["healthcheck"]["test"]
    service_names = set()
    for name in [*STAGE_NAMES, "producer"]:
        env = _env(services[name])
        redis_url = urlsplit(env["REDIS_URL"])
        assert (redis_url.hostname, redis_url.port) == ("redis", 6379), name
        claude = urlsplit(env["ANTHROPIC_BASE_URL"])
        assert (claude.hostname, claude.port) == ("fake-claude", fake["port"]), name
        assert urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"]).netloc == "jaeger:4317", name
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
        service_names.add(env["OTEL_SERVICE_NAME"])
        settings = load_settings(env=env)  # the environment is a valid configuration
        assert settings.prefix == "pipeline"
    assert len(service_names) == len(STAGE_NAMES) + 1  # one per stage in Jaeger


#: What a shell may hold that must not reach the stack without REAL_CLAUDE=1.
SHELL_CLAUDE = {
    "ANTHROPIC_API_KEY": "sk-ant-from-the-shell",
    "ANTHROPIC_BASE_URL": "https://from-the-shell.example",
    "ANTHROPIC_AUTH_TOKEN": "token-from-the-shell",
}
PIPELINE_SERVICES = [*STAGE_NAMES, "producer"]


def test_compose_host_ports_are_variables_off_the_usual_ports_on_loopback() -> None:
    """Each published port is `${PIPELINE_BIND_ADDRESS:-127.0.0.1}:${PIPELINE_X_PORT:-n}:c`
    with n = c + 10000 (docs/DEPLOY.md's rule): a local Redis (6379), OTel collector (4317,
    4318), Jaeger, Prometheus or Grafana keeps its port, and nothing listens beyond loopback
    unless asked. Every variable is documented."""
    published = [p for service in _services().values() for p in _published(service)]
    variables = [v for v, _host, _container in published]
    defaults = [host for _v, host, _container in published]
    containers = {container for _v, _host, container in published}
    assert len(set(variables)) == len(variables) and len(set(defaults)) == len(defaults)
    assert not set(defaults) & (containers | {6379, 4317, 4318, 3000, 9090, 16686})
    for variable, host, container in published:
        assert host == container + 10_000, variable
    assert {container for _v, _h, container in _published(_services()["redis"])} == {6379}
    deploy_md = (ROOT / "docs/DEPLOY.md").read_text()
    for variable, host, _container in published:
        assert re.search(rf"`{variable}`.*\b{host}\b", deploy_md), f"{variable} undocumented"
    assert "`PIPELINE_BIND_ADDRESS`" in deploy_md


def test_compose_uses_the_fake_claude_api_whatever_the_shell_holds() -> None:
    """Without REAL_CLAUDE=1 every pipeline service calls the fake-claude service with a fake
    key, whatever ANTHROPIC_* the shell holds: none of it is read by compose.yaml."""
    text = (ROOT / "compose.yaml").read_text()
    assert "ANTHROPIC" not in re.sub(r"#.*", "", text)  # only the env files name them
    fake_port = _parse_cli(_services()["fake-claude"]["command"])["port"]
    for real_claude in (None, "", "0"):
        shell = SHELL_CLAUDE | ({} if real_claude is None else {"REAL_CLAUDE": real_claude})
        for name, service in _services().items():
            env = _env(service, shell)
            assert not [v for v in env.values() if "from-the-shell" in v], name
            if name in PIPELINE_SERVICES:
                claude = urlsplit(env["ANTHROPIC_BASE_URL"])
                assert (claude.hostname, claude.port) == ("fake-claude", fake_port), name
                assert env["ANTHROPIC_API_KEY"] == "compose-fake-key"
                assert env["REAL_CLAUDE"] == "0"


def test_real_claude_needs_real_claude_1_and_the_key() -> None:
    services = _services()
    shell = {"REAL_CLAUDE": "1", "ANTHROPIC_API_KEY": "sk-ant-mine"}
    for name in PIPELINE_SERVICES:
        env = _env(services[name], shell)
        assert env["ANTHROPIC_BASE_URL"] == "https://api.anthropic.com", name
        assert env["ANTHROPIC_API_KEY"] == "sk-ant-mine" and env["REAL_CLAUDE"] == "1"
        # With the opt-in, a gateway in ANTHROPIC_BASE_URL is honoured.
        gateway = _env(services[name], shell | {"ANTHROPIC_BASE_URL": "https://gw.example"})
        assert gateway["ANTHROPIC_BASE_URL"] == "https://gw.example"
        # No key: compose stops rather than call the real API with the fake one.
        with pytest.raises(MissingVariable, match="ANTHROPIC_API_KEY"):
            _env(services[name], {"REAL_CLAUDE": "1", "ANTHROPIC_API_KEY": ""})
        # Anything but 0 or 1 names no env file: compose stops too.
        with pytest.raises(FileNotFoundError):
            _env(services[name], SHELL_CLAUDE | {"REAL_CLAUDE": "yes"})
    # Only the pipeline's own services get a Claude API at all.
    for name, service in services.items():
        if name not in PIPELINE_SERVICES:
            assert "ANTHROPIC_API_KEY" not in _env(service, shell), name


def test_real_claude_producer_sends_five_short_haiku_tasks_and_exits(
    redis_url: str, prefix: str
) -> None:
    """The producer's own script with REAL_CLAUDE=1, against a local Redis: one batch of 5
    Haiku tasks of at most 16 output tokens, however large DEMO_ROUNDS/DEMO_BATCH are."""
    producer = _services()["producer"]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PIPELINE_"))},
        **_env(producer, {"REAL_CLAUDE": "1", "ANTHROPIC_API_KEY": "sk-ant-unused"}),
        "DEMO_ROUNDS": "3", "DEMO_BATCH": "50", "DEMO_INTERVAL_S": "0",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",  # submitting calls no API; never the real one
        "REDIS_URL": redis_url, "PIPELINE_PREFIX": prefix, "OTEL_TRACES_EXPORTER": "none",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
    }  # fmt: skip
    script = _default(producer["command"][2])
    done = subprocess.run(["sh", "-c", script], cwd=ROOT, env=env, capture_output=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        entries = client.xrange(Keys(prefix).ingress)
    finally:
        client.close()
    tasks = [fields for _id, fields in entries]
    assert len(tasks) == 5
    assert {t["model"] for t in tasks} == {"haiku"}
    assert all(int(t["max_tokens"]) <= 16 and len(t["prompt"]) < 200 for t in tasks)


def test_compose_bind_mounts_exist() -> None:
    for name, service in _services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source}"


def _compose_cli() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return cmd
    return None


def _compose_config(cmd: list[str], shell: Mapping[str, str], tmp_path: Path) -> Any:
    """`docker compose config` as a shell holding only `shell` would run it (no .env file)."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    return subprocess.run(
        [*cmd, "-f", str(ROOT / "compose.yaml"), "--env-file", str(empty), "config",
         "--format", "json"],
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **shell},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_docker_compose_config_agrees_on_ports_and_the_claude_switch(tmp_path: Path) -> None:
    """The real compose parser resolves the ports and the Claude API as the tests above read
    them, keeps the shell's ANTHROPIC_* out without REAL_CLAUDE=1, and stops with REAL_CLAUDE=1
    and no key."""
    cmd = _compose_cli()
    if cmd is None:
        pytest.skip("no docker compose client here (the docker CLI has no compose plugin)")
    cases = [SHELL_CLAUDE, {"PIPELINE_REDIS_PORT": "7000", "PIPELINE_BIND_ADDRESS": "0.0.0.0"},
             {"REAL_CLAUDE": "1", "ANTHROPIC_API_KEY": "sk-ant-mine"}]  # fmt: skip
    for shell in cases:
        done = _compose_config(cmd, shell, tmp_path)
        assert done.returncode == 0, done.stderr
        assert "from-the-shell" not in done.stdout
        config = json.loads(done.stdout)["services"]
        for name, service in _services().items():
            environment = config[name].get("environment") or {}
            assert environment == _env(service, shell), name
            ports = [(p.get("host_ip"), int(p["published"]), p["target"])
                     for p in config[name].get("ports", [])]  # fmt: skip
            expected = [(shell.get("PIPELINE_BIND_ADDRESS", "127.0.0.1"),
                         int(shell.get(var, host)), container)
                        for var, host, container in _published(service)]  # fmt: skip
            assert ports == expected, name
    for shell in ({"REAL_CLAUDE": "1"}, {"REAL_CLAUDE": "yes", **SHELL_CLAUDE}):
        done = _compose_config(cmd, shell, tmp_path)
        assert done.returncode != 0 and done.stdout == "", shell
        assert "ANTHROPIC_API_KEY" in done.stderr or "real-claude-yes.env" in done.stderr


def test_dockerfile_copies_what_the_distribution_installs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    copied = {p for line in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M) for p in line.split()}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    needed |= {p.rstrip("*") for p in packages}
    assert needed <= copied
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not needed & ignored
    (extras,) = re.findall(r'pip install "\.\[(.+)\]"', dockerfile)
    assert set(extras.split(",")) <= set(pyproject["project"]["optional-dependencies"])
    # The same non-root user as the Kubernetes pods run as.
    (uid,) = re.findall(r"^USER (\d+)$", dockerfile, re.M)
    for deployment in _of_kind("Deployment").values():
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


# ---- Prometheus and Grafana ------------------------------------------------------------------


def test_prometheus_discovers_every_worker_service_on_its_metrics_port() -> None:
    config = _yaml(PROMETHEUS)
    (job,) = [j for j in config["scrape_configs"] if "dns_sd_configs" in j]
    (sd,) = job["dns_sd_configs"]
    assert sd["type"] == "A" and sorted(sd["names"]) == sorted(_workers())
    # A target label named like a metric label would rename the metric's (to exported_stage).
    assert not {r.get("target_label") for r in job.get("relabel_configs", [])} - TARGET_LABELS
    if promtool := shutil.which("promtool"):
        subprocess.run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS)], check=True)


def test_grafana_provisioning_matches_compose() -> None:
    grafana = _services()["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    datasources = _yaml(_provisioning_file(mounts, "provisioning/datasources/datasources.yaml"))
    by_uid = {d["uid"]: d for d in datasources["datasources"]}
    prometheus = urlsplit(by_uid["prometheus"]["url"])
    assert prometheus.hostname == "prometheus"
    assert prometheus.port in [c for _v, _h, c in _published(_services()["prometheus"])]
    assert urlsplit(by_uid["jaeger"]["url"]).netloc == "jaeger:16686"
    providers = _yaml(_provisioning_file(mounts, "provisioning/dashboards/dashboards.yaml"))
    (provider,) = providers["providers"]
    assert mounts["./observability/grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def _provisioning_file(mounts: dict[str, str], relative: str) -> Path:
    """A provisioning file, checking that compose mounts the folder that holds it."""
    assert mounts["./observability/grafana/provisioning"] == "/etc/grafana/provisioning"
    return GRAFANA / relative


def _queries() -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) for every query of the dashboard, Grafana variables filled in."""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "prometheus", panel["title"]
            expr = re.sub(r"\$__(rate_interval|interval|range)", "5m", target["expr"])
            yield panel["title"], expr


def _selectors(expr: str | Any) -> list[promql_parser.VectorSelector]:
    """The vector selectors of a query (or of a parsed node)."""
    found: list[promql_parser.VectorSelector] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    node = promql_parser.parse(expr) if isinstance(expr, str) else expr
    promql_parser.walk(node, visit)
    return found


def _label_uses(expr: str) -> dict[str, set[str]]:
    """Series name -> the labels the query needs it to have (matchers, `by (...)`)."""
    uses: dict[str, set[str]] = {}

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = {m.name for m in node.matchers.matchers if not m.name.startswith("__")}
            uses.setdefault(node.name, set()).update(matchers)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            for selector in _selectors(node.expr):
                uses.setdefault(selector.name, set()).update(node.modifier.labels)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return uses


def test_dashboard_queries_only_the_exported_metrics_and_shows_every_one() -> None:
    series = metric_names.series()
    used: set[str] = set()
    for title, expr in _queries():
        uses = _label_uses(expr)
        assert uses and set(uses) <= set(series), f"{title}: {set(uses) - set(series)}"
        for name, labels in uses.items():
            assert labels <= series[name], f"{title}: {name} has no {labels - series[name]}"
        used |= set(uses)
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    exported = {m.name for m in metric_names.METRICS}
    assert exported <= shown, f"not on the dashboard: {exported - shown}"


def test_dashboard_layout() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}  # fmt: skip
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


# ---- Kubernetes and KEDA ---------------------------------------------------------------------


def test_builtin_manifests_validate_against_the_kubernetes_schema() -> None:
    docs = [*_manifests(), _secret_example()]
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked field by field below
        kubernetes_validate.validate(doc, "1.30", strict=True)
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "Secret", "Deployment"}


def test_configmap_holds_valid_settings_where_the_workers_read_them(tmp_path: Path) -> None:
    settings = _configmap_toml(tmp_path)
    env = _of_kind("ConfigMap")["pipeline-env"]["data"]
    assert load_settings(env={**env, "PIPELINE_CONFIG": ""}).prefix == "pipeline"
    for name, deployment in _of_kind("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        (mount,) = container["volumeMounts"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mount["name"]]["configMap"]["name"] == "pipeline-config"
        assert env["PIPELINE_CONFIG"] == f"{mount['mountPath']}/pipeline.toml"
        assert pod["terminationGracePeriodSeconds"] > settings.runtime.grace_s, name


def test_one_deployment_per_stage_and_per_lane_running_exactly_that() -> None:
    deployments = _of_kind("Deployment")
    expected = _expected_deployments()
    assert sorted(deployments) == sorted(expected)
    configmaps = _of_kind("ConfigMap")
    secret = _secret_example()
    image = _yaml(BASE / "kustomization.yaml")["images"][0]["name"]
    for name, deployment in deployments.items():
        template = deployment["spec"]["template"]
        selector = deployment["spec"]["selector"]["matchLabels"].items()
        assert selector <= template["metadata"]["labels"].items()
        for other, pods in deployments.items():  # no Deployment adopts another's pods
            if other != name:
                assert not selector <= pods["spec"]["template"]["metadata"]["labels"].items()
        # The ScaledObject's HPA owns the count: a `replicas` here would undo it on each apply.
        assert "replicas" not in deployment["spec"], name
        (container,) = template["spec"]["containers"]
        assert container["image"] == image
        stage, lane = expected[name].stage, expected[name].lane
        params = _worker_params(deployment)
        assert params["stage"] == [stage.name] and not params["all_stages"], name
        assert params["lane"] == ([] if lane is None else [lane]), name
        port = params["metrics_port"]
        assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        assert {"name": "metrics", "containerPort": port} in container["ports"]
        for source in container["envFrom"]:
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in configmaps
            else:
                assert source["secretRef"]["name"] == secret["metadata"]["name"]


def test_one_scaledobject_per_deployment_with_lag_and_pending_triggers_per_stream_read(
    tmp_path: Path,
) -> None:
    settings = _configmap_toml(tmp_path)
    scaled = _of_kind("ScaledObject")
    deployments = _of_kind("Deployment")
    assert sorted(scaled) == sorted(deployments)
    secret_keys = set(_secret_example()["stringData"])
    plan = _expected_deployments()
    for name, scaled_object in scaled.items():
        spec = scaled_object["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        params = _worker_params(deployments[name])
        (stage,) = [STAGE_BY_NAME[n] for n in params["stage"]]
        # The very triggers deploy_plan makes on one node: names, streams and the thresholds
        # `pipeline keda-triggers` gives every partition stream on a Cluster.
        assert spec["triggers"] == plan[name].triggers(Keys("pipeline")), name
        # One live worker at least: it promotes delayed retries and reclaims dead pods' entries.
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        lag: dict[str, dict[str, str]] = {}
        pending: dict[str, dict[str, str]] = {}
        for trigger in spec["triggers"]:
            assert trigger["type"] == "redis-streams"
            meta = trigger["metadata"]
            assert meta["consumerGroup"] == stage.name
            assert meta["addressFromEnv"] in secret_keys
            # KEDA reads one count per trigger: lagCount wins over pendingEntriesCount.
            if "lagCount" in meta:
                assert "pendingEntriesCount" not in meta and int(meta["activationLagCount"]) >= 0
                lag[meta["stream"]] = meta
            else:
                # Below what one pod can hold, or the trigger could never fire.
                per_pod = _per_pod_concurrency(settings, stage)
                assert 0 < int(meta["pendingEntriesCount"]) < per_pod, (name, per_pod)
                pending[meta["stream"]] = meta
        # Exactly the streams this Deployment's workers read (claude-call-haiku:
        # pipeline:call:haiku only), so each family scales on its own backlog.
        keys = Keys("pipeline")
        streams = sorted(keys.stream(stage.stream, ln) for ln in params["lane"] or [None])
        assert sorted(lag) == streams and sorted(pending) == streams, name
        assert len(spec["triggers"]) == 2 * len(streams)


#: What KEDA's TriggerAuthentication reads from the Secret: parameter -> Secret key.
REDIS_AUTH = {"tls": "REDIS_TLS", "username": "REDIS_USERNAME", "password": "REDIS_PASSWORD"}
#: The only trigger metadata used: TLS, user and password come from the TriggerAuthentication
#: alone (KEDA refuses `enableTLS: "true"` next to its `tls`), so REDIS_TLS is the one switch.
TRIGGER_METADATA = {"addressFromEnv", "stream", "consumerGroup", "lagCount", "activationLagCount",
                    "pendingEntriesCount"}  # fmt: skip


def test_every_keda_trigger_logs_in_through_one_trigger_authentication() -> None:
    """TLS, user and password of every redis-streams trigger come from one
    TriggerAuthentication over the Secret, so REDIS_TLS switches TLS for all of them. Checked
    field by field (KEDA's CRDs are not in the Kubernetes schemas)."""
    secret = _secret_example()
    auths = _of_kind("TriggerAuthentication")
    assert list(auths) == ["pipeline-redis"]
    auth = auths["pipeline-redis"]
    assert auth["apiVersion"] == "keda.sh/v1alpha1" and list(auth["spec"]) == ["secretTargetRef"]
    refs = auth["spec"]["secretTargetRef"]
    assert all(set(ref) == {"parameter", "name", "key"} for ref in refs)
    assert {ref["parameter"]: ref["key"] for ref in refs} == REDIS_AUTH and len(refs) == 3
    assert {ref["name"] for ref in refs} == {secret["metadata"]["name"]}
    assert set(REDIS_AUTH.values()) <= set(secret["stringData"])
    triggers = [t for so in _of_kind("ScaledObject").values() for t in so["spec"]["triggers"]]
    assert triggers
    for trigger in triggers:
        assert set(trigger) == {"type", "name", "authenticationRef", "metadata"}, trigger["name"]
        assert trigger["authenticationRef"] == {"name": "pipeline-redis"}, trigger["name"]
        assert set(trigger["metadata"]) <= TRIGGER_METADATA, trigger["name"]
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger["name"]


def _check_redis_parts(literals: Mapping[str, str], where: str) -> None:
    """REDIS_URL is what the workers use; KEDA gets the same server in parts: TLS exactly when
    the URL is rediss://, the URL's host:port, ACL user and password, and database 0."""
    url = urlsplit(literals["REDIS_URL"])
    assert url.scheme in ("redis", "rediss"), where
    assert literals["REDIS_TLS"] == ("enable" if url.scheme == "rediss" else "disable"), where
    assert literals["REDIS_ADDRESS"] == f"{url.hostname}:{url.port or 6379}", where
    # The URL percent-encodes what the parts hold as is (a `@` or `:` in a password).
    assert literals["REDIS_USERNAME"] == unquote(url.username or ""), where
    assert literals["REDIS_PASSWORD"] == unquote(url.password or ""), where
    assert url.path in ("", "/", "/0"), f"{where}: KEDA's triggers read database 0"
    assert load_settings(env={"REDIS_URL": literals["REDIS_URL"]}).redis.url == url.geturl()


def _secret_commands(path: Path) -> list[dict[str, str]]:
    """The --from-literal values of each `kubectl create secret generic pipeline-secrets`
    in a file (in a code block or a YAML comment; `\\` continues a line)."""
    found: list[dict[str, str]] = []
    command: list[str] | None = None
    for line in path.read_text().splitlines():
        line = re.sub(r"^\s*#\s?", "", line).strip()
        if command is None and "create secret generic pipeline-secrets" in line:
            command = []
        if command is not None:
            command.append(line.rstrip("\\"))
            if not line.endswith("\\"):
                args = shlex.split(" ".join(command))
                found.append(dict(a.removeprefix("--from-literal=").split("=", 1)
                                  for a in args if a.startswith("--from-literal=")))  # fmt: skip
                command = None
    return found


def test_secret_examples_give_keda_tls_user_and_password_as_the_redis_url_says() -> None:
    """deploy/secret.example.yaml and every `kubectl create secret` in the docs: each has every
    key, and REDIS_TLS/REDIS_ADDRESS/REDIS_USERNAME/REDIS_PASSWORD agree with REDIS_URL."""
    data = _secret_example()["stringData"]
    _check_redis_parts(data, "secret.example.yaml")
    schemes = {urlsplit(data["REDIS_URL"]).scheme}
    for path in (DEPLOY / "secret.example.yaml", ROOT / "docs/DEPLOY.md", CLUSTER_KUSTOMIZATION):
        commands = _secret_commands(path)
        assert commands, path
        for literals in commands:
            # On a Cluster, KEDA's redis-cluster-streams also wants every node: REDIS_ADDRESSES.
            extra = {deploy_plan.ADDRESSES_ENV} if path == CLUSTER_KUSTOMIZATION else set()
            assert set(literals) == set(data) | extra, f"{path}: {set(data) ^ set(literals)}"
            _check_redis_parts(literals, path.name)
            if extra:
                _check_cluster_addresses(literals, path.name)
            schemes.add(urlsplit(literals["REDIS_URL"]).scheme)
    assert schemes == {"redis", "rediss"}  # both kinds are shown


def _per_pod_concurrency(settings: Settings, stage: Stage) -> int:
    """Entries one pod holds at most per stream: claude-call's per lane, else the runtime's."""
    if stage.name == claude_call.NAME:
        return claude_call.lane_concurrency(settings)
    return settings.runtime_for(stage.name).concurrency


def test_kustomize_builds_the_manifests_offline() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("no kubectl here")
    built = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(built) if d]
    assert len(docs) == len(_manifests())
    namespace = _yaml(BASE / "kustomization.yaml")["namespace"]
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert all(d["metadata"].get("namespace") == namespace for d in namespaced)


# ---- deploy/cluster: the KEDA triggers on a Redis Cluster ------------------------------------

CLUSTER_KUSTOMIZATION = CLUSTER / "kustomization.yaml"
CLUSTER_PATCH = CLUSTER / "keda-triggers.yaml"
#: How the committed patch was made (its header says so too).
CLUSTER_COMMAND = ["keda-triggers", "--partitions", str(CLUSTER_PARTITIONS)]
#: The metadata of a redis-cluster-streams trigger: the nodes from the Secret's
#: REDIS_ADDRESSES, and otherwise what the one-node triggers use.
CLUSTER_TRIGGER_METADATA = TRIGGER_METADATA - {"addressFromEnv"} | {"addressesFromEnv"}


def _keda_triggers(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    """`pipeline keda-triggers ARGS` in this process, with no PIPELINE_* or REDIS_URL of the
    shell's: (exit code, stdout, stderr)."""
    for name in list(os.environ):
        if name.startswith("PIPELINE_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    run = CliRunner().invoke(cli_app, list(args))
    return run.exit_code, run.stdout, run.stderr


def _cluster_overlay() -> dict[str, Any]:
    """deploy/cluster's kustomization, checked to be the base plus the generated patch."""
    kustomization = _yaml(CLUSTER_KUSTOMIZATION)
    assert kustomization["resources"] == ["../base"]
    assert kustomization["patches"] == [{"path": CLUSTER_PATCH.name}]
    assert _yaml(DEPLOY / "kustomization.yaml")["resources"] == ["base"]
    return kustomization  # type: ignore[no-any-return]


def _cluster_scaled_objects() -> dict[str, dict[str, Any]]:
    """The overlay's ScaledObjects as kustomize builds them: each base ScaledObject with the
    patch's `spec.triggers` in place of its own (a custom resource's list is replaced whole;
    test_kustomize_builds_the_cluster_overlay_offline checks this against kustomize itself)."""
    _cluster_overlay()
    patches = [d for d in yaml.safe_load_all(CLUSTER_PATCH.read_text()) if d]
    scaled = {name: json.loads(json.dumps(so)) for name, so in _of_kind("ScaledObject").items()}
    for patch in patches:
        assert patch["apiVersion"] == "keda.sh/v1alpha1" and patch["kind"] == "ScaledObject"
        assert set(patch) == {"apiVersion", "kind", "metadata", "spec"}
        assert patch["metadata"] == {"name": patch["metadata"]["name"]}
        assert list(patch["spec"]) == ["triggers"]
        scaled[patch["metadata"]["name"]]["spec"]["triggers"] = patch["spec"]["triggers"]
    assert sorted(p["metadata"]["name"] for p in patches) == sorted(scaled)  # each one, once
    return scaled


def test_deploy_plan_has_thresholds_for_exactly_the_stages() -> None:
    assert sorted(deploy_plan.THRESHOLDS) == sorted(STAGE_NAMES)
    assert sorted(deploy_plan.workloads(DEPLOYED_STAGES)) == sorted(_of_kind("Deployment"))


def test_cluster_patch_is_the_output_of_pipeline_keda_triggers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """deploy/cluster/keda-triggers.yaml is exactly what `pipeline keda-triggers --partitions
    16` prints (so it cannot be edited by hand out of step), and the ConfigMap's settings,
    which decide the lanes in the pods, give the same."""
    committed = CLUSTER_PATCH.read_text()
    assert committed.startswith(f"# Generated by `pipeline {' '.join(CLUSTER_COMMAND)}`")
    code, out, err = _keda_triggers(monkeypatch, *CLUSTER_COMMAND)
    assert code == 0, err
    assert out == committed, "regenerate: pipeline keda-triggers --partitions 16 > " + str(
        CLUSTER_PATCH.relative_to(ROOT)
    )
    configmap = tmp_path / "pipeline.toml"
    configmap.write_text(_of_kind("ConfigMap")["pipeline-config"]["data"]["pipeline.toml"])
    code, out, err = _keda_triggers(monkeypatch, *CLUSTER_COMMAND, "--config", str(configmap))
    assert (code, out) == (0, committed), err
    # Without --partitions: the config's, else 16 as on a Cluster.
    assert _keda_triggers(monkeypatch, "keda-triggers")[1] == committed
    env = _of_kind("ConfigMap")["pipeline-env"]["data"]
    assert env["PIPELINE_PREFIX"] == deploy_plan.DEFAULT_PREFIX


def test_every_cluster_scaledobject_has_lag_and_pending_triggers_per_partition_stream() -> None:
    """On a Cluster each ScaledObject has two redis-cluster-streams triggers per partition
    stream its Deployment reads, named as the workers name them (Keys(prefix, partitions=16)),
    with the one-node manifests' consumer group, thresholds and login."""
    base = _of_kind("ScaledObject")
    deployments = _of_kind("Deployment")
    secret_keys = set(_secret_example()["stringData"]) | {deploy_plan.ADDRESSES_ENV}
    partitions = Keys("pipeline", partitions=CLUSTER_PARTITIONS).each_partition()
    assert len(partitions) == CLUSTER_PARTITIONS
    for name, scaled_object in _cluster_scaled_objects().items():
        spec, base_spec = scaled_object["spec"], base[name]["spec"]
        # Only the triggers change.
        assert {k: v for k, v in spec.items() if k != "triggers"} == {
            k: v for k, v in base_spec.items() if k != "triggers"
        }
        params = _worker_params(deployments[name])
        (stage,) = [STAGE_BY_NAME[n] for n in params["stage"]]
        lanes = params["lane"] or [None]
        streams = sorted(k.stream(stage.stream, lane) for k in partitions for lane in lanes)
        assert all(re.fullmatch(r"pipeline:\{p\d+\}:.+", s) for s in streams), streams
        base_lag = {t["metadata"]["lagCount"] for t in base_spec["triggers"]
                    if "lagCount" in t["metadata"]}  # fmt: skip
        base_pending = {t["metadata"]["pendingEntriesCount"] for t in base_spec["triggers"]
                        if "pendingEntriesCount" in t["metadata"]}  # fmt: skip
        lag: dict[str, dict[str, str]] = {}
        pending: dict[str, dict[str, str]] = {}
        for trigger in spec["triggers"]:
            assert set(trigger) == {"type", "name", "authenticationRef", "metadata"}
            assert trigger["type"] == "redis-cluster-streams"
            assert trigger["authenticationRef"] == {"name": "pipeline-redis"}
            meta = trigger["metadata"]
            assert set(meta) <= CLUSTER_TRIGGER_METADATA, trigger["name"]
            assert all(isinstance(v, str) for v in meta.values()), trigger["name"]
            assert meta["addressesFromEnv"] in secret_keys
            assert meta["consumerGroup"] == stage.name
            if "lagCount" in meta:
                # Each partition's stream aims at its share of the one-node backlog target.
                (one_node,) = base_lag
                share = -(-int(one_node) // CLUSTER_PARTITIONS)
                assert meta["lagCount"] == str(share) and meta["activationLagCount"] == "1"
                assert "pendingEntriesCount" not in meta
                lag[meta["stream"]] = meta
            else:
                assert {meta["pendingEntriesCount"]} == base_pending
                pending[meta["stream"]] = meta
        assert sorted(lag) == streams and sorted(pending) == streams, name
        assert len(spec["triggers"]) == 2 * len(streams) == 2 * CLUSTER_PARTITIONS * len(lanes)
        assert len({t["name"] for t in spec["triggers"]}) == len(spec["triggers"]), name


def _check_cluster_addresses(literals: Mapping[str, str], where: str) -> None:
    """REDIS_ADDRESSES: comma-separated host:port of Cluster nodes, REDIS_URL's among them."""
    nodes = literals[deploy_plan.ADDRESSES_ENV].split(",")
    assert len(nodes) >= 2 and all(re.fullmatch(r"[\w.-]+:\d+", n) for n in nodes), where
    assert literals["REDIS_ADDRESS"] in nodes, where


def test_kustomize_builds_the_cluster_overlay_offline() -> None:
    """kustomize itself applies the patch as _cluster_scaled_objects does: every resource of
    the base, and each ScaledObject's triggers replaced whole by the partition streams'."""
    if shutil.which("kubectl") is None:
        pytest.skip("no kubectl here")
    _cluster_overlay()
    built = subprocess.run(
        ["kubectl", "kustomize", str(CLUSTER)], capture_output=True, text=True, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(built) if d]
    base = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, check=True
    ).stdout
    base_docs = [d for d in yaml.safe_load_all(base) if d]
    assert [d for d in docs if d["kind"] != "ScaledObject"] == [
        d for d in base_docs if d["kind"] != "ScaledObject"
    ]
    expected = _cluster_scaled_objects()
    namespace = _yaml(BASE / "kustomization.yaml")["namespace"]
    scaled = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    assert sorted(scaled) == sorted(expected)
    for name, doc in scaled.items():
        assert doc["metadata"].pop("namespace") == namespace
        assert doc == expected[name], name


def test_keda_triggers_refuses_what_no_cluster_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Usage errors exit 2 with one line: no partitions (asked for, or in the config), a
    prefix the settings refuse."""
    code, out, err = _keda_triggers(monkeypatch, "keda-triggers", "--partitions", "0")
    assert code == 2 and out == "" and "--partitions" in err
    code, out, err = _keda_triggers(monkeypatch, "keda-triggers", "--prefix", "a b")
    assert code == 2 and out == "" and err.startswith("error: --prefix:")
    one_node = tmp_path / "one-node.toml"
    one_node.write_text("[redis]\npartitions = 0\n")
    code, out, err = _keda_triggers(monkeypatch, "keda-triggers", "--config", str(one_node))
    assert code == 2 and out == "" and "--partitions N" in err
    code, out, err = _keda_triggers(monkeypatch, "keda-triggers", "--config", str(one_node),
                                    "--partitions", "2")  # fmt: skip
    assert code == 0 and out.count("pipeline:{p1}:route") == 2, err
    # Another prefix and partition count: the streams follow, and the header says how.
    code, out, err = _keda_triggers(monkeypatch, "keda-triggers", "--partitions", "3",
                                    "--prefix", "acme")  # fmt: skip
    assert code == 0, err
    assert out.startswith("# Generated by `pipeline keda-triggers --partitions 3 --prefix acme`")
    streams = {d["metadata"]["name"]: {t["metadata"]["stream"] for t in d["spec"]["triggers"]}
               for d in yaml.safe_load_all(out) if d}  # fmt: skip
    assert streams["router"] == {"acme:{p0}:route", "acme:{p1}:route", "acme:{p2}:route"}
    assert streams["claude-call-haiku"] == {f"acme:{{p{p}}}:call:haiku" for p in range(3)}


# ---- the compose commands, run here ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _replace_option(argv: list[str], option: str, value: str) -> list[str]:
    i = argv.index(option)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def _scrape(port: int) -> dict[str, set[str]]:
    """Series name -> label names, from one worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


@pytest.fixture
def compose_stack(
    redis_url: str, prefix: str, tmp_path: Path
) -> Iterator[tuple[dict[str, int], Callable[..., subprocess.Popen[bytes]]]]:
    """Every service's command as compose runs it, with local addresses instead of compose's
    (no Jaeger: tracing off), until the producer's tasks all have results. Yields each stage
    worker's metrics port, and the function that started the processes."""
    services = _services()
    fake_port = _free_port()
    local = {
        "REDIS_URL": redis_url,
        "PIPELINE_PREFIX": prefix,
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{fake_port}",
        "OTEL_TRACES_EXPORTER": "none",
        "PIPELINE_RUNTIME__GRACE_S": "2",
        "PIPELINE_RETRY__BASE_MS": "100",
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PIPELINE_"))}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    base["PYTHONPATH"] = str(ROOT)
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, argv: list[str], env: Mapping[str, str] = {}) -> subprocess.Popen[bytes]:
        if argv[0] == "pipeline":
            argv = [sys.executable, "-m", "pipeline.cli", *argv[1:]]
        with open(tmp_path / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, env={**base, **env, **local}, stdout=log,
                                    stderr=subprocess.STDOUT)  # fmt: skip
        started.append(proc)
        return proc

    try:
        fake = _replace_option(services["fake-claude"]["command"], "--port", str(fake_port))
        fake = _replace_option(fake, "--latency-ms", "20")  # seconds of latency: a slow test
        # Some 529s, so that the panels about trouble have something to show.
        fake = _replace_option(fake, "--overloaded-rate", "0.2")
        start("fake-claude", _replace_option(fake, "--host", "127.0.0.1"))
        wait_until(lambda: _answers(f"{local['ANTHROPIC_BASE_URL']}/_fake/health"), 30, 0.1,
                   "the fake Claude API")  # fmt: skip
        ports = {}
        for name in STAGE_NAMES:
            ports[name] = _free_port()
            argv = _replace_option(services[name]["command"], "--metrics-port", str(ports[name]))
            start(name, argv, _env(services[name]))
        producer = services["producer"]
        batch = 20
        env = {**_env(producer), "DEMO_ROUNDS": "1", "DEMO_BATCH": str(batch),
               "DEMO_INTERVAL_S": "0"}  # fmt: skip
        script = _default(producer["command"][2])
        client = redis.Redis.from_url(redis_url)
        done = Keys(prefix).done
        try:
            # The same round twice: the second is answered from the cache.
            for expected in (batch, 2 * batch):
                assert start("producer", ["sh", "-c", script], env).wait(60) == 0
                wait_until(lambda n=expected: client.xlen(done) >= n, 60, 0.1, "results")
        finally:
            client.close()
        yield ports, start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in started:
            proc.wait(10)


def _dashboard_series() -> dict[str, set[str]]:
    """Series name -> labels, over every dashboard query."""
    wanted: dict[str, set[str]] = {}
    for _title, expr in _queries():
        for name, labels in _label_uses(expr).items():
            wanted.setdefault(name, set()).update(labels)
    return wanted


def test_compose_commands_run_the_pipeline_and_export_what_the_dashboard_queries(
    compose_stack: tuple[dict[str, int], Callable[..., subprocess.Popen[bytes]]],
) -> None:
    """Each worker's /metrics has every series and label the dashboard asks for."""
    ports, _start = compose_stack
    wanted = _dashboard_series()

    def exported() -> dict[str, set[str]]:
        merged: dict[str, set[str]] = {}
        for port in ports.values():
            for series, labels in _scrape(port).items():
                merged.setdefault(series, set()).update(labels)
        return merged

    wait_until(lambda: set(wanted) <= set(exported()), 30, 0.5, "the dashboard's series")
    have = exported()
    for name, labels in wanted.items():
        assert labels - TARGET_LABELS <= have[name], f"{name}: {labels - have[name]}"


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary on PATH (e.g. Debian's `prometheus` package)")
    return binary


def test_prometheus_answers_every_dashboard_query(
    prometheus_binary: str,
    compose_stack: tuple[dict[str, int], Callable[..., subprocess.Popen[bytes]]],
    tmp_path: Path,
) -> None:
    """A real Prometheus scrapes the workers and evaluates every dashboard query: each must
    return a series (a query over a series that only exists in trouble shows "no data")."""
    binary = prometheus_binary
    ports, start = compose_stack
    config = tmp_path / "prometheus.yml"
    targets = [f"127.0.0.1:{port}" for port in ports.values()]
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "workers", "static_configs": [{"targets": targets}]}],
    }))  # fmt: skip
    web = f"127.0.0.1:{_free_port()}"
    start("prometheus", [binary, f"--config.file={config}", f"--web.listen-address={web}",
                         f"--storage.tsdb.path={tmp_path / 'tsdb'}"])  # fmt: skip
    queries = [(title, expr.replace("5m", "15s")) for title, expr in _queries()]

    def empty() -> list[str]:
        missing = []
        for title, expr in queries:
            url = f"http://{web}/api/v1/query?" + urlencode({"query": expr})
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if not json.load(response)["data"]["result"]:
                        missing.append(title)
            except OSError:
                missing.append(title)
        return missing

    try:
        wait_until(lambda: not empty(), 60, 1, "every dashboard query to return data")
    except AssertionError:
        raise AssertionError(f"no data: {empty()}") from None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False
