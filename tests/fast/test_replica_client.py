"""The one table from Ray's, Serve's and gRPC's exception classes to the gateway's errors (``gateway.replica_client``).

Like the SDK tables' test (``test_error_mapping.py``): every exception class an endpoint's call can meet
(every public one of ``ray.exceptions``, ``ray.serve.exceptions`` and gRPC's asyncio status) is caught by
the attempt loop and maps to a stable gateway error type; a Ray upgrade that adds a class outside the
table's bases fails here, naming it. Pure: no Ray cluster (Ray's modules are only imported).
"""
from __future__ import annotations

import grpc
import pytest
import ray.exceptions
import ray.serve.exceptions

from contract.errors import TYPES, GatewayError
from gateway.replica_client import RAY_ERRORS, RAY_FAILURES, ApplicationGone, never_started, ray_failure


def exception_classes(module) -> set[type]:
    return {obj for name in dir(module) if not name.startswith("_")
            for obj in [getattr(module, name)] if isinstance(obj, type) and issubclass(obj, BaseException)}


#: every class an endpoint's call through a Serve handle can raise that is not the gateway's own
MET = exception_classes(ray.exceptions) | exception_classes(ray.serve.exceptions) | {grpc.aio.AioRpcError}

#: the type each class maps to: the first listed base in its MRO decides (most specific first)
EXPECTED = {
    ray.serve.exceptions.DeploymentUnavailableError: "endpoint_not_ready",
    ray.serve.exceptions.BackPressureError: "endpoint_not_ready",
    ray.exceptions.RayActorError: "endpoint_not_ready",
    ray.serve.exceptions.RayServeException: "endpoint_not_ready",
    grpc.aio.AioRpcError: "endpoint_not_ready",
    ray.exceptions.RayError: "cluster_unavailable",
}


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


def made(cls: type) -> BaseException:
    """An instance without its constructor's arguments (the mappers read the class, and a gRPC status)."""
    if issubclass(cls, grpc.aio.AioRpcError):
        return rpc_error(grpc.StatusCode.INTERNAL)
    return cls.__new__(cls)


def listed_base(cls: type) -> type:
    return next(base for base in cls.__mro__ if base in RAY_ERRORS)


def test_the_collection_finds_what_the_table_was_written_for():
    """A guard on the collection itself: an empty set would make the next tests pass vacuously."""
    assert {c.__name__ for c in MET} >= {"ActorDiedError", "ActorUnavailableError", "RayTaskError", "BackPressureError",
                                         "DeploymentUnavailableError", "RequestCancelledError", "AioRpcError"}
    assert len(MET) > 40


@pytest.mark.parametrize("cls", sorted(MET, key=lambda c: c.__qualname__), ids=lambda c: c.__qualname__)
def test_every_class_a_call_can_meet_is_caught_and_maps_to_a_stable_type(cls):
    assert issubclass(cls, RAY_FAILURES), f"{cls.__qualname__} is not caught by the attempt loop: add it to RAY_ERRORS"
    err = ray_failure(made(cls), "ep")
    assert isinstance(err, GatewayError) and err.type in TYPES
    assert err.type == EXPECTED[listed_base(cls)], cls
    assert err.info.retry_after is not None  # (every one of them: try again, here or shortly)


def test_the_tables_mappers_answer_types_of_the_one_table():
    assert set(EXPECTED) == set(RAY_ERRORS)
    for cls in RAY_ERRORS:
        assert ray_failure(made(cls), "ep").type in TYPES


def test_a_subclass_not_listed_maps_by_its_nearest_listed_base():
    class Mine(ray.exceptions.ActorDiedError):
        pass

    class Gone(ray.serve.exceptions.DeploymentUnavailableError):
        pass

    class Lost(ray.exceptions.NodeDiedError):
        pass

    assert ray_failure(Mine.__new__(Mine), "ep").info.message == ray_failure(
        ray.exceptions.ActorDiedError.__new__(ray.exceptions.ActorDiedError), "ep").info.message.replace(
        "ActorDiedError", "Mine")
    gone = ray_failure(Gone.__new__(Gone), "ep")
    assert isinstance(gone, ApplicationGone) and gone.info.retry_after == 5
    assert ray_failure(Lost.__new__(Lost), "ep").type == "cluster_unavailable"


def test_what_each_kind_of_failure_says():
    replica = ray_failure(made(ray.exceptions.ActorDiedError), "ep")
    assert replica.type == "endpoint_not_ready" and "not sent again" in replica.info.message and replica.info.retry_after == 1
    full = ray_failure(made(ray.serve.exceptions.BackPressureError), "ep")
    assert "queue is full" in full.info.message and full.info.retry_after == 1
    assert isinstance(ray_failure(made(ray.serve.exceptions.DeploymentUnavailableError), "ep"), ApplicationGone)
    too_big = ray_failure(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED), "ep")
    assert too_big.type == "payload_too_large" and "GATEWAY_SERVE_GRPC=0" in too_big.info.message
    assert ray_failure(rpc_error(grpc.StatusCode.UNAVAILABLE), "ep").type == "endpoint_not_ready"
    assert ray_failure(made(ray.exceptions.RaySystemError), "ep").type == "cluster_unavailable"


def test_outside_an_endpoints_call_every_failure_is_the_clusters():
    for cls in (ray.exceptions.ActorDiedError, ray.serve.exceptions.DeploymentUnavailableError, ray.exceptions.RayError):
        err = ray_failure(made(cls))
        assert err.type == "cluster_unavailable" and err.info.retry_after == 2 and "did not answer" in err.info.message


def test_only_a_call_no_replica_started_is_sent_again():
    assert never_started(made(ray.serve.exceptions.BackPressureError))
    for cls in MET - {ray.serve.exceptions.BackPressureError}:
        assert not never_started(made(cls)), cls
