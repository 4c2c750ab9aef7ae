"""OTLP/gRPC for `otlp_sender`: the payload goes out as it is, through one channel."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import grpc  # type: ignore[import-untyped,unused-ignore]
from google.protobuf.message import DecodeError  # type: ignore[import-untyped,unused-ignore]
from google.rpc.error_details_pb2 import RetryInfo  # type: ignore[import-untyped,unused-ignore]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from observability.otlp_sender import (
    Attempt,
    RetryingSender,
    Settings,
    log_partial_success,
    read_file,
)

__all__ = ["GrpcSender"]

_RETRYABLE_GRPC = frozenset(
    {"CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE", "UNAVAILABLE", "DATA_LOSS"}
)
_GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
#: gRPC's own reconnect backoff grows to 120 s; a restarted collector is back within 5.
_GRPC_OPTIONS = (("grpc.max_reconnect_backoff_ms", 5000),)


class GrpcSender(RetryingSender):
    """OTLP/gRPC: the payload goes out as it is, through one channel, never re-parsed."""

    def __init__(self, settings: Settings, plaintext: bool) -> None:

        super().__init__(settings.endpoint, settings.timeout_s)
        target = urlsplit(settings.endpoint).netloc or settings.endpoint
        compression = grpc.Compression.Gzip if settings.gzip else grpc.Compression.NoCompression
        if plaintext:
            self._channel = grpc.insecure_channel(
                target, options=_GRPC_OPTIONS, compression=compression
            )
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read_file(settings.ca_file),
                private_key=read_file(settings.client_key_file),
                certificate_chain=read_file(settings.client_cert_file),
            )
            self._channel = grpc.secure_channel(
                target, credentials, options=_GRPC_OPTIONS, compression=compression
            )
        # No request serializer: the bytes are the request.
        self._export = self._channel.unary_unary(
            _GRPC_METHOD, response_deserializer=ExportTraceServiceResponse.FromString
        )
        # gRPC wants bytes for a `-bin` key.
        self._metadata = tuple(
            (key, value.encode() if key.endswith("-bin") else value)
            for key, value in settings.headers.items()
        )

    def _attempt(self, body: bytes, timeout_s: float) -> Attempt:

        try:
            response = self._export(body, timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            return _grpc_failure(exc)
        log_partial_success(response)
        return Attempt(ok=True)

    def _close(self) -> None:
        self._channel.close()


def _grpc_failure(exc: Any) -> Attempt:
    code = exc.code().name
    wait_s = _retry_info_s(exc.trailing_metadata() or ())
    retryable = code in _RETRYABLE_GRPC or (code == "RESOURCE_EXHAUSTED" and wait_s is not None)
    return Attempt(ok=False, retryable=retryable, wait_s=wait_s,
                    reason=f"{code}: {exc.details()}")  # fmt: skip


def _retry_info_s(trailing_metadata: Any) -> float | None:
    """The delay a `google.rpc.RetryInfo` in the trailers asks for, if there is one."""
    for key, value in trailing_metadata:
        if key == "google.rpc.retryinfo-bin":
            try:
                delay = RetryInfo.FromString(value).retry_delay
            except DecodeError:  # as if absent
                return None
            return float(delay.seconds + delay.nanos / 1e9)
    return None
