"""The standard `grpc.health.v1.Health/Check` call, without depending on grpcio-health-checking.

The client depends on grpcio and protobuf only, so the two tiny health messages are described here and
built in a private descriptor pool: a private pool cannot clash with `grpc_health.v1.health_pb2` when the
server process (which does use grpcio-health-checking) imports both.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CHECK_METHOD = "/grpc.health.v1.Health/Check"
SERVING_STATUS = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")


def _build() -> tuple[type, type]:
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="grpc/health/v1/health.proto", package="grpc.health.v1")
    fdp.syntax = "proto3"
    request = fdp.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    response = fdp.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(SERVING_STATUS):
        status.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=F.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=F.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")),
    )


HealthCheckRequest, HealthCheckResponse = _build()


def serialize_request(service: str) -> bytes:
    return HealthCheckRequest(service=service).SerializeToString()


def parse_status(data: bytes) -> str:
    """The response's status name: "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN"."""
    value = HealthCheckResponse.FromString(data).status
    return SERVING_STATUS[value] if 0 <= value < len(SERVING_STATUS) else str(value)
