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
import tomllib
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import kubernetes_validate
import promql_parser
import pytest
import redis
import typer.main
import yaml
from prometheus_client.parser import text_string_to_metric_families

import stages
from observability import metric_names
from pipeline.claude.config import load_settings
from pipeline.claude.settings import Settings
from pipeline.cli.main import app as cli_app
from pipeline.runtime.keys import Keys
from pipeline.runtime.stage import Stage
from stages import claude_call
from tests.helpers.workers import wait_until

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS = ROOT / "observability/prometheus/prometheus.yml"
GRAFANA = ROOT / "observability/grafana"
DASHBOARD = GRAFANA / "dashboards/pipeline.json"
DEFAULTS = load_settings(env={})
STAGES: tuple[Stage, ...] = stages.app(DEFAULTS).stages
STAGE_NAMES = [s.name for s in STAGES]
STAGE_BY_NAME = {s.name: s for s in STAGES}
TARGET_LABELS = set(metric_names.TARGET_LABELS)


# ---- reading the files -----------------------------------------------------------------------


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@cache
def _compose() -> dict[str, Any]:
    return _yaml(ROOT / "compose.yaml")  # type: ignore[no-any-return]


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]  # type: ignore[no-any-return]


def _default(value: str) -> str:
    """A compose value as it runs with no variables set: `${X:-d}` -> `d`, `$$` -> `$`."""
    value = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", str(value))
    assert "${" not in value, f"compose value without a default: {value}"
    return value.replace("$$", "$")


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: _default(v) for k, v in (service.get("environment") or {}).items()}


def _parse_cli(argv: list[str]) -> dict[str, Any]:
    """Parse a `pipeline ...` command line with the real CLI (types, ranges, unknown options)."""
    assert argv[0] == "pipeline", argv
    command = typer.main.get_command(cli_app).commands[argv[1]]  # type: ignore[attr-defined]
    with command.make_context(argv[1], list(argv[2:])) as ctx:
        # A repeated option is a tuple before click 8.2 (typer's minimum pairs with 8.1).
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in ctx.params.items()}
    if argv[1] == "worker":  # the CLI checks stages and lanes once it has loaded the app
        assert params["app_spec"] == "stages:app", argv
        assert set(params["stage"]) <= set(STAGE_NAMES), argv
        selected = STAGES if params["all_stages"] else [STAGE_BY_NAME[n] for n in params["stage"]]
        lanes = {lane for stage in selected for lane in stage.lanes}
        assert set(params["lane"]) <= lanes, f"{argv}: lanes are {sorted(lanes)}"
    return params


def _is_worker(argv: list[str]) -> bool:
    return argv[:2] == ["pipeline", "worker"]


def _workers() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in _services().items() if _is_worker(s.get("command") or [])}


def _streams(stage: Stage, lanes: Sequence[str] = (), prefix: str = "pipeline") -> list[str]:
    """The streams a worker of `stage` reads, given its `--lane`s (none: every lane)."""
    keys = Keys(prefix)
    return [keys.stream(stage.stream, lane) for lane in lanes or stage.lanes or (None,)]


def _manifests() -> list[dict[str, Any]]:
    kustomization = _yaml(DEPLOY / "kustomization.yaml")
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    return docs


def _of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == kind}


def _expected_deployments() -> dict[str, tuple[Stage, str | None]]:
    """Deployment name -> the stage and lane it runs: one per stage, and one per lane of a
    laned stage (claude-call per model family: rate limits are per family)."""
    return {
        stage.name if lane is None else f"{stage.name}-{lane}": (stage, lane)
        for stage in STAGES
        for lane in stage.lanes or (None,)
    }


def _worker_params(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return _parse_cli(container["command"])


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
    host_ports: list[str] = []
    for name, service in _services().items():
        assert service.get("image"), name
        if "build" not in service:  # third-party images are pinned
            assert ":" in service["image"] and not service["image"].endswith(":latest"), name
        host_ports += [str(p).split(":")[0] for p in service.get("ports", [])]
        command = [_default(a) for a in service.get("command") or []]
        if command[:1] == ["pipeline"]:
            _parse_cli(command)
        elif command[:2] == ["sh", "-c"]:
            _check_script(command[2])
    assert len(host_ports) == len(set(host_ports)), host_ports


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
    assert "4317:4317" in jaeger["ports"] and "16686:16686" in jaeger["ports"]
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


def test_docker_compose_config_accepts_the_file() -> None:
    cmd = _compose_cli()
    if cmd is None:
        pytest.skip("no docker compose client here (the docker CLI has no compose plugin)")
    subprocess.run([*cmd, "-f", str(ROOT / "compose.yaml"), "config", "-q"], check=True)


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
    assert f"{prometheus.port}:{prometheus.port}" in _services()["prometheus"]["ports"]
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
    image = _yaml(DEPLOY / "kustomization.yaml")["images"][0]["name"]
    for name, deployment in deployments.items():
        template = deployment["spec"]["template"]
        selector = deployment["spec"]["selector"]["matchLabels"].items()
        assert selector <= template["metadata"]["labels"].items()
        for other, pods in deployments.items():  # no Deployment adopts another's pods
            if other != name:
                assert not selector <= pods["spec"]["template"]["metadata"]["labels"].items()
        (container,) = template["spec"]["containers"]
        assert container["image"] == image
        stage, lane = expected[name]
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
    for name, scaled_object in scaled.items():
        spec = scaled_object["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        params = _worker_params(deployments[name])
        (stage,) = [STAGE_BY_NAME[n] for n in params["stage"]]
        # One live worker at least: it promotes delayed retries and reclaims dead pods' entries.
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        lag: dict[str, dict[str, str]] = {}
        pending: dict[str, dict[str, str]] = {}
        for trigger in spec["triggers"]:
            assert trigger["type"] == "redis-streams"
            meta = trigger["metadata"]
            assert meta["consumerGroup"] == stage.name
            assert {meta["addressFromEnv"], meta["passwordFromEnv"]} <= secret_keys
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
        streams = sorted(_streams(stage, params["lane"]))
        assert sorted(lag) == streams and sorted(pending) == streams, name
        assert len(spec["triggers"]) == 2 * len(streams)


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
    namespace = _yaml(DEPLOY / "kustomization.yaml")["namespace"]
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert all(d["metadata"].get("namespace") == namespace for d in namespaced)


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
