"""The one table from error class to gRPC status: complete, specific, rich details."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from moe_router import errors
from moe_router.status_mapping import (
    ERROR_DOMAIN,
    STATUS_TABLE,
    reason_for,
    status_code_for,
    to_status,
)


def _details(status: status_pb2.Status) -> tuple[error_details_pb2.ErrorInfo, list]:
    """Unpack the ErrorInfo and RetryInfo details of a google.rpc.Status."""
    info = error_details_pb2.ErrorInfo()
    retries = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retries.append(retry)
    return info, retries


def test_every_exported_error_class_has_its_own_row() -> None:
    exported = {getattr(errors, name) for name in errors.__all__}
    unmapped = sorted(cls.__name__ for cls in exported if cls not in STATUS_TABLE)
    assert not unmapped, f"add these error classes to STATUS_TABLE: {unmapped}"


def test_reasons_are_unique_so_the_client_can_map_back() -> None:
    reasons = [entry.reason for cls, entry in STATUS_TABLE.items()
               if cls is not errors.DynamicMoEError]
    assert len(reasons) == len(set(reasons))


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.ValidationError("bad shape"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFoundError("no router 'x'"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExistsError("region 'in' taken"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.CircuitOpenError("open", 2.0, "CIRCUIT_OPEN"), grpc.StatusCode.UNAVAILABLE),
        (errors.DrainingError("draining"), grpc.StatusCode.UNAVAILABLE),
        (errors.OverloadedError("full", 0.1, "QUEUE_FULL"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.DeadlineExceededError("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.AuthenticationError("no key"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.RouterConfigurationError("bad"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.RouterMemoryError("oom"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.BackendError("device lost"), grpc.StatusCode.INTERNAL),
        (errors.ExpertDispatchError("x"), grpc.StatusCode.INTERNAL),
        (RuntimeError("CUDA error: an illegal memory access"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_code_of_each_error(exc: BaseException, code: grpc.StatusCode) -> None:
    assert status_code_for(exc) == code
    assert to_status(exc).code == code.value[0]
    # and grpcio-status turns it into the grpc.Status the handler aborts with
    assert rpc_status.to_status(to_status(exc)).code == code


def test_subclass_without_a_row_takes_its_parents() -> None:
    class OddValidation(errors.ValidationError):
        pass

    assert status_code_for(OddValidation("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_for(OddValidation("x")) == "INVALID_INPUT"


def test_overloaded_error_carries_its_own_reason_and_retry_delay() -> None:
    status = to_status(errors.OverloadedError("slow down", 1.25, "RATE_LIMITED"), "req-7")
    info, retries = _details(status)
    assert info.reason == "RATE_LIMITED"
    assert info.domain == ERROR_DOMAIN
    assert info.metadata["request_id"] == "req-7"
    assert info.metadata["error"] == "OverloadedError"
    assert len(retries) == 1
    assert retries[0].retry_delay.ToNanoseconds() == 1_250_000_000
    assert "slow down" in status.message and "req-7" in status.message


def test_circuit_open_reason_and_retry_info() -> None:
    info, retries = _details(to_status(errors.CircuitOpenError("open", 3.0, "CIRCUIT_OPEN")))
    assert info.reason == "CIRCUIT_OPEN"
    assert retries[0].retry_delay.seconds == 3


def test_errors_without_retry_delay_carry_no_retry_info() -> None:
    info, retries = _details(to_status(errors.ValidationError("NaN in hidden_states")))
    assert info.reason == "INVALID_INPUT"
    assert retries == []


def test_unexpected_exception_text_is_not_sent() -> None:
    status = to_status(KeyError("secret internal path /opt/x"), "req-9")
    assert status.code == grpc.StatusCode.INTERNAL.value[0]
    assert "secret" not in status.message
    assert "req-9" in status.message
    info, _ = _details(status)
    assert info.reason == "INTERNAL"
