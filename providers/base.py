"""What a provider is: a deploy spec, an adapter, and how it maps its errors.

A provider module defines a ``Provider`` subclass and registers it in
``providers/__init__.py``. The gateway never imports a provider module directly:
it looks providers up by name, validates deploy bodies with ``spec_class``
(``providers.specs``), builds Serve options with ``replica_options`` and, inside the
replica, calls ``create_adapter``. An adapter follows the engine protocol documented on
``ChatAdapter`` and raises only ``GatewayError``: its SDK's exceptions are mapped by an
exception-class table (``map_by_class``, ``providers.error_mapping``) inside
``reraise_as_gateway_error``, which also redacts the key.

The rest of the package, by concern: ``specs`` (what a deploy says), ``keys`` (how a key is
shown and scrubbed; the key-check verdict), ``deploy_failure`` (why a replica could not start),
``error_mapping`` (SDK exceptions to ``GatewayError``), ``openai_shape`` (reading OpenAI-shaped
answers) and ``params`` (parameter maps). What the gateway shares with providers (errors, stream
events, the call and its result) is ``contract``; nothing here imports ``gateway``.
"""
from __future__ import annotations

import abc
from typing import Any, AsyncIterator, ClassVar, Optional

from contract.calls import ChatCall, ChatResult
from contract.errors import GatewayError
from contract.events import Delta, StreamEvent

from .specs import DeploySpec


def indefinite(word: str) -> str:
    """``word`` with its article: ``an openai``, ``an hf``, ``a zhipu``."""
    return ("an " if word[:1].lower() in "aeiou" or word.lower() == "hf" else "a ") + word


class ChatAdapter(abc.ABC):
    """Lives in a replica and talks to one upstream with one key.

    The engine protocol, which every provider implements and the replica relies on:

    ``chat(call) -> ChatResult``
        One whole answer. Failures raise ``GatewayError`` (map SDK exceptions with the
        provider's exception-class table and ``reraise_as_gateway_error``); nothing else
        may escape (the replica reports any other exception as ``upstream_error`` with its
        class name only). The replica retries what ``errors.TYPES`` marks ``retried``.

    ``stream(call) -> AsyncIterator[StreamEvent]``
        ``Delta`` / ``ToolCallDelta`` events as the upstream sends them, then exactly one
        ``Finish`` (``end_event``), and nothing after; see ``contract.events``. Failures raise
        ``GatewayError``, never a ``Failure`` event: before the first event the replica may
        retry the whole stream (a new ``stream(call)``), after it the failure is reported
        in the stream. Being cancelled (``aclose`` of the generator: the caller went away)
        must close the upstream stream.

    ``aclose()``
        Release connections, threads, models; called when the replica stops.
    """

    @abc.abstractmethod
    async def chat(self, call: ChatCall) -> ChatResult:
        """Answer one call or raise ``GatewayError``."""

    async def stream(self, call: ChatCall) -> AsyncIterator[StreamEvent]:
        raise GatewayError("upstream_bad_request", "this provider cannot stream")
        yield Delta("")  # pragma: no cover - makes this an async generator

    async def aclose(self) -> None:
        """Release connections (called when the replica stops)."""


class Provider(abc.ABC):
    #: route prefix and registry name, e.g. ``openai`` -> ``POST /openai/deploy``
    name: ClassVar[str]
    #: the pydantic model of ``POST /<name>/deploy``
    spec_class: ClassVar[type[DeploySpec]]
    #: ``saas`` (I/O-bound, a fraction of a CPU) or ``local`` (holds a model)
    kind: ClassVar[str] = "saas"
    #: the sampling parameters (``SamplingParams`` fields) this provider honours; a provider whose SDK
    #: names them otherwise declares a parameter map and honours its keys (``providers.params.honoured``)
    params: ClassVar[frozenset] = frozenset({"temperature", "top_p", "max_tokens", "max_completion_tokens", "stop"})

    def check_call(self, call: ChatCall) -> None:
        """What this provider cannot do is a clear 400, never silently dropped."""
        missing = sorted(call.params.given() - self.params)
        if missing:
            raise GatewayError("invalid_request", f"the {self.name} provider does not support: {', '.join(missing)}",
                               fields=missing)

    def replica_options(self, spec: DeploySpec, settings: Any) -> dict[str, Any]:
        """Serve deployment options; SaaS replicas are I/O-bound and take many calls each."""
        return {
            "num_replicas": spec.workers,
            # the adapter's code runs on the replica's own event loop, not in a thread of its own:
            # SaaS adapters only await I/O (a blocking SDK runs in the adapter's executor), and the
            # hop between the two loops was about a quarter of a replica's CPU per call (bench.serve_paths)
            # (and its gRPC server, which the gateway's calls travel on, takes any body the gateway
            # accepts: 4 MiB by default, a pickled call can be larger than its JSON body)
            "ray_actor_options": {"num_cpus": settings.saas_replica_cpus,
                                  "runtime_env": {"env_vars": {
                                      "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                                      "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(max(4 << 20, 4 * settings.max_body_bytes)),
                                  }}},
            "max_ongoing_requests": settings.saas_max_ongoing_requests,
            # the replica's own line per call ("chat ok request_id=... upstream_ms=...") says more than
            # Serve's access line, which would be a second log write per call
            "logging_config": {"enable_access_log": False},
            "health_check_period_s": 10,
            "graceful_shutdown_wait_loop_s": 0.1,  # how often a stopping replica looks for calls still running
            "graceful_shutdown_timeout_s": spec.timeout + 5,
        }

    #: seconds the deploy-time key check may wait, per phase (the SDKs' connect and read timeouts;
    #: it holds the deploy request)
    key_check_timeout: ClassVar[float] = 5.0

    def verify_key(self, spec: DeploySpec) -> Optional[str]:
        """Check the spec's key with a call that costs nothing, in the gateway, before anything starts.

        Called at deploy when the spec has ``verify_key: true``. Raises ``GatewayError``
        (``invalid_key``, ``invalid_request``; see ``judge_key_check``) when the deploy must
        fail; returns ``None`` when the key was accepted, or a warning (no secret) when the
        check could not tell. The default has no such call and checks nothing.
        """
        return None

    def check_deploy(self, spec: DeploySpec) -> None:
        """Refuse, in the gateway and before the cluster, a spec that cannot work.

        SaaS adapters are cheap to build, so building one is the check; providers that
        load a model in the replica override this with checks that load nothing.
        """
        self.create_adapter(spec)

    @abc.abstractmethod
    def create_adapter(self, spec: DeploySpec) -> ChatAdapter:
        """Build the adapter inside the replica (also called once at deploy to validate)."""
