"""What deploy/ runs, in one place: one Kubernetes Deployment per stage and per lane of a laned
stage, the streams and consumer group each one's workers read, and the KEDA thresholds its
ScaledObject scales on.

`pipeline keda-triggers` prints, from this plan, the kustomize patch that deploy/cluster/
applies on a Redis Cluster: every ScaledObject gets a lag and a pending trigger of type
`redis-cluster-streams` per partition stream its Deployment reads. tests/test_deploy_files.py
checks deploy/'s manifests against the same plan (names, streams, groups, thresholds), so the
one-node manifests, the Cluster patch and the code cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from pipeline.cli.common import ConfigOpt
from pipeline.cli.exits import Code, fail
from pipeline.runtime.errors import ConfigError
from pipeline.runtime.keys import Keys
from pipeline.runtime.settings import CLUSTER_PARTITIONS
from pipeline.runtime.stage import Stage


@dataclass(frozen=True)
class Thresholds:
    """What one ScaledObject's triggers aim at, per stream: HPA adds a replica for every
    `lag` entries not yet delivered to the group, and for every `pending` entries delivered
    and not yet acknowledged (below what one pod holds per stream, or it never fires)."""

    lag: int
    pending: int

    def lag_per_stream(self, partitions: int) -> int:
        """The lag target of one partition's stream: the HPA follows the busiest trigger,
        so with tasks spread over `partitions` streams each aims at its share, and the
        replicas follow the whole backlog as on one node. (Pending stays per stream: a pod
        holds up to its concurrency in each partition's stream.)"""
        return max(1, -(-self.lag // partitions)) if partitions else self.lag


#: Per stage, by name (the test holds the names to `stages:app`'s; importing `stages` here
#: would load the Claude client into every `pipeline` command). The pending thresholds sit
#: below what one pod holds per stream: 64 in flight ([runtime] concurrency, each partition's
#: stream its own), 1,024 call slots per claude-call lane, 64 shelvings per claude-batch lane.
THRESHOLDS: Mapping[str, Thresholds] = {
    "cache-check": Thresholds(lag=2000, pending=48),
    "router": Thresholds(lag=2000, pending=48),
    "claude-call": Thresholds(lag=200, pending=800),
    "claude-batch": Thresholds(lag=1000, pending=50),
    "store": Thresholds(lag=2000, pending=48),
}
#: A lag trigger wakes at one entry waiting.
ACTIVATION_LAG = 1
#: deploy/base/keda-auth.yaml: how every trigger logs in (TLS, user, password).
AUTHENTICATION = "pipeline-redis"
#: The Secret's key with the one node's `host:port` (redis-streams' addressFromEnv).
ADDRESS_ENV = "REDIS_ADDRESS"
#: The Secret's key with the Cluster nodes' `host:port,host:port,…`
#: (redis-cluster-streams' addressesFromEnv).
ADDRESSES_ENV = "REDIS_ADDRESSES"
SCALED_OBJECT_API = "keda.sh/v1alpha1"
#: The prefix deploy/ uses (its pipeline-env ConfigMap): the header names another one.
DEFAULT_PREFIX = "pipeline"


@dataclass(frozen=True)
class Workload:
    """One Deployment and its ScaledObject: the workers of `stage`, of `lane` only when the
    stage is laned (claude-call per model family: rate limits are per family)."""

    name: str
    stage: Stage
    lane: str | None

    @property
    def group(self) -> str:
        """The consumer group its workers read with: the stage's name."""
        return self.stage.name

    @property
    def thresholds(self) -> Thresholds:
        return THRESHOLDS[self.stage.name]

    @property
    def label(self) -> str:
        """What its trigger names start with: the lane, else the stream (`route-lag`)."""
        return self.lane or self.stage.stream

    def streams(self, keys: Keys) -> list[str]:
        """The streams its workers read: one, or one per partition of `keys`."""
        return [k.stream(self.stage.stream, self.lane) for k in keys.each_partition()]

    def triggers(self, keys: Keys) -> list[dict[str, Any]]:
        """Its KEDA triggers: a lag and a pending trigger per stream it reads, of type
        redis-streams on one node, redis-cluster-streams with partitions (a Cluster)."""
        found: list[dict[str, Any]] = []
        for part, stream in zip(keys.each_partition(), self.streams(keys), strict=True):
            where = self.label if part.partition is None else f"{self.label}-p{part.partition}"
            if part.partition is None:
                trigger_type, address = "redis-streams", {"addressFromEnv": ADDRESS_ENV}
            else:
                trigger_type, address = "redis-cluster-streams", {"addressesFromEnv": ADDRESSES_ENV}
            common = {**address, "stream": stream, "consumerGroup": self.group}
            counts = {
                "lag": {"lagCount": str(self.thresholds.lag_per_stream(keys.partitions)),
                        "activationLagCount": str(ACTIVATION_LAG)},
                "pending": {"pendingEntriesCount": str(self.thresholds.pending)},
            }  # fmt: skip
            for kind, count in counts.items():
                found.append({
                    "type": trigger_type,
                    "name": f"{where}-{kind}",
                    "authenticationRef": {"name": AUTHENTICATION},
                    "metadata": {**common, **count},
                })  # fmt: skip
        return found


def workloads(app_stages: Sequence[Stage]) -> dict[str, Workload]:
    """Deployment name -> workload: `<stage>` per stage, `<stage>-<lane>` per lane of a laned
    stage (claude-call-haiku). Every stage must have thresholds here."""
    found: dict[str, Workload] = {}
    for stage in app_stages:
        if stage.name not in THRESHOLDS:
            raise ValueError(f"no KEDA thresholds for stage {stage.name!r} in {__name__}")
        for lane in stage.lanes or (None,):
            name = stage.name if lane is None else f"{stage.name}-{lane}"
            found[name] = Workload(name, stage, lane)
    return found


def cluster_patch(app_stages: Sequence[Stage], keys: Keys, command: str) -> str:
    """The kustomize patch, as YAML text: one strategic-merge document per ScaledObject whose
    `spec.triggers` is every partition stream's triggers (a ScaledObject is a custom
    resource, whose lists kustomize replaces whole). `command` is named in the header."""
    lines = [
        f"# Generated by `{command}`; do not edit: regenerate it",
        "# (tests/test_deploy_files.py checks that this file is the command's output).",
        "# For deploy/cluster/kustomization.yaml: every ScaledObject of deploy/base/ gets a lag",
        "# and a pending trigger of type redis-cluster-streams per partition stream it reads",
        f"# ({keys.partitions} partitions of prefix {json.dumps(keys.prefix)}), the Cluster nodes "
        f"from {ADDRESSES_ENV}",
        f"# in the Secret (host:port,host:port,...), logged in by {AUTHENTICATION} as on one node.",
    ]
    for name, workload in workloads(app_stages).items():
        doc = {
            "apiVersion": SCALED_OBJECT_API,
            "kind": "ScaledObject",
            "metadata": {"name": name},
            "spec": {"triggers": workload.triggers(keys)},
        }
        lines += ["---", *_yaml(doc)]
    return "\n".join(lines) + "\n"


def _yaml(value: Any, indent: str = "") -> list[str]:
    """Block YAML of maps, lists and strings (PyYAML is not a dependency): every string
    double-quoted as JSON writes it, which YAML reads back as is (`{p3}`, `:` and all)."""
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, Mapping | list):
                lines += [f"{indent}{key}:", *_yaml(item, indent + "  ")]
            else:
                lines.append(f"{indent}{key}: {_scalar(item)}")
        return lines
    if isinstance(value, list):
        for item in value:
            first, *rest = _yaml(item, indent + "  ")
            lines += [f"{indent}- {first.removeprefix(indent + '  ')}", *rest]
        return lines
    return [f"{indent}{_scalar(value)}"]


def _scalar(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"only strings in a KEDA patch, not {value!r}")
    return json.dumps(value)


# ---- the command --------------------------------------------------------------------------


def keda_triggers(
    partitions: Annotated[
        int | None,
        typer.Option(
            "--partitions",
            min=1,
            max=4096,
            help="Partitions of the deployment (default: the config's redis.partitions, else "
            f"{CLUSTER_PARTITIONS}, as on a Redis Cluster).",
        ),
    ] = None,
    prefix: Annotated[
        str | None,
        typer.Option("--prefix", help="Key prefix (default: PIPELINE_PREFIX or the config's)."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Print the KEDA triggers for a Redis Cluster: a kustomize patch giving every
    ScaledObject of deploy/base/ a lag and a pending trigger per partition stream it reads.

    Write it to deploy/cluster/keda-triggers.yaml, then `kubectl apply -k deploy/cluster`
    (docs/DEPLOY.md, "On a Redis Cluster"). The lanes of claude-call and claude-batch are the
    config's model families.
    """
    import stages
    from pipeline.claude.config import load_settings

    try:
        settings = load_settings(config) if prefix is None else load_settings(config, prefix=prefix)
    except ConfigError as exc:
        if prefix is not None and exc.field == "prefix":
            raise fail(str(exc).removeprefix("config: prefix: "), Code.USAGE,
                       label="--prefix") from None  # fmt: skip
        raise
    count = settings.redis.partitions if partitions is None else partitions
    if count is None:
        count = CLUSTER_PARTITIONS
    if count == 0:
        raise fail("the config sets [redis] partitions = 0 (one node's layout), and a Redis "
                   "Cluster needs partitions", Code.USAGE, label="config",
                   hint="pass --partitions N, the workers' partitions")  # fmt: skip
    command = f"pipeline keda-triggers --partitions {count}"
    if settings.prefix != DEFAULT_PREFIX:
        command += f" --prefix {settings.prefix}"
    keys = Keys(settings.prefix, partitions=count)
    typer.echo(cluster_patch(stages.app(settings).stages, keys, command), nl=False)
