"""What local model replicas share: the deploy spec, placement, prompts and decoding.

A local endpoint holds a model in each replica (``hf``: transformers, CPU or GPU;
``vllm``: vLLM's async engine on GPUs). Engines are imported inside the replica only:
the gateway process never needs torch or vLLM. Loading failures are raised as
``DeployFailure`` with a stable reason, which ``GET /deployments/<chat_name>`` shows.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import Field, field_validator, model_validator

from contract.errors import GatewayError
from contract.events import Delta, Finish
from contract.calls import ChatCall, ChatResult

from .base import ChatAdapter, Provider
from .deploy_failure import DeployFailure
from .specs import DeploySpec

#: caller parameters every local engine honours (``user`` only labels a request upstream; it has no effect here)
LOCAL_PARAMS = frozenset({"temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "user"})


class LocalDeploySpec(DeploySpec):
    """``POST /hf/deploy`` and (with the vLLM fields) ``POST /vllm/deploy``."""

    #: a folder on every node that may run a replica, or a hub id (downloaded only then, and only with network)
    model_path: str = Field(min_length=1, max_length=1024)
    #: shown in listings and answers; defaults to the folder name of ``model_path``
    model_name: str = Field("", max_length=200)
    gpus_per_worker: int = Field(0, ge=0, le=16)
    cpus_per_worker: float = Field(1.0, gt=0, le=256)
    #: prompt + completion tokens one call may use (default: the model's own limit)
    max_model_len: Optional[int] = Field(None, ge=16, le=10_000_000)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    #: run the model repository's own Python code (ChatGLM, Baichuan need it): only for code you trust
    trust_remote_code: bool = False
    #: a Jinja chat template for models whose tokenizer has none
    chat_template: Optional[str] = Field(None, max_length=65536)
    #: completion tokens when the caller does not say (``max_tokens``)
    default_max_tokens: int = Field(512, ge=1, le=1_000_000)
    #: calls one replica holds at once (the rest wait in Serve's queue)
    max_ongoing_requests: int = Field(8, ge=1, le=4096)
    timeout: float = Field(600.0, gt=0, le=86400)
    #: a local model has no rate limits or flaky network to retry
    max_retries: int = Field(0, ge=0, le=10)
    deploy_timeout: float = Field(1800.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _name(self) -> "LocalDeploySpec":
        if not self.model_name:
            object.__setattr__(self, "model_name", Path(self.model_path.rstrip("/")).name or self.model_path)
        return self

    @field_validator("model_path")
    @classmethod
    def _path(cls, value: str) -> str:
        if "\x00" in value or value.startswith(("http://", "https://")):
            raise ValueError("model_path is a folder (absolute path) or a hub id like 'Qwen/Qwen2.5-0.5B-Instruct'")
        return value

    def is_hub_id(self) -> bool:
        return is_hub_id(self.model_path)

    def public(self) -> dict[str, Any]:
        out = super().public()
        out.update(model_path=self.model_path, gpus_per_worker=self.gpus_per_worker, cpus_per_worker=self.cpus_per_worker,
                   max_model_len=self.max_model_len, dtype=self.dtype)
        return out


def is_hub_id(path: str) -> bool:
    """``org/name`` with no leading ``/``, ``.`` or ``~`` and no such folder here."""
    return (not path.startswith(("/", ".", "~")) and path.count("/") == 1 and not os.path.exists(path))


class LocalProvider(Provider):
    """A model held in each replica; subclasses name the engine and build the adapter."""

    kind: ClassVar[str] = "local"
    params: ClassVar[frozenset] = LOCAL_PARAMS
    #: Python packages the engine needs in the replica (checked in the gateway when it shares the environment)
    engine_packages: ClassVar[tuple[str, ...]] = ()
    install_hint: ClassVar[str] = ""

    def check_call(self, call: ChatCall) -> None:
        super().check_call(call)
        if any(m.role == "tool" or m.tool_calls for m in call.messages):
            raise GatewayError("invalid_request", f"the {self.name} provider does not support tool calls in messages",
                               fields=["messages"])

    def check_deploy(self, spec: DeploySpec) -> None:
        """Loads nothing: the packages must be importable; the path is checked where the replica runs."""
        import importlib.util

        missing = [p for p in self.engine_packages if importlib.util.find_spec(p) is None]
        if missing:
            raise GatewayError("deploy_failed", f"the {self.name} provider needs {', '.join(missing)} on the cluster's nodes: "
                                                f"{self.install_hint}", reason="engine_missing", provider=self.name)

    def replica_options(self, spec: LocalDeploySpec, settings: Any) -> dict[str, Any]:  # type: ignore[override]
        return {
            "num_replicas": spec.workers,
            "ray_actor_options": {"num_cpus": spec.cpus_per_worker, "num_gpus": spec.gpus_per_worker},
            "max_ongoing_requests": spec.max_ongoing_requests,
            "health_check_period_s": 10,
            "health_check_timeout_s": 60,
            "graceful_shutdown_wait_loop_s": 0.5,
            "graceful_shutdown_timeout_s": min(spec.timeout, 120) + 5,
            # Loading again after an out-of-memory or a bad path only fails again, minutes later.
            "max_constructor_retry_count": 1,
        }


class LocalAdapter(ChatAdapter):
    """A model in this replica: engines implement ``stream``; ``chat`` is the same stream, collected."""

    _spec: LocalDeploySpec

    async def chat(self, call: ChatCall) -> ChatResult:
        text: list[str] = []
        end = Finish("stop")
        async for event in self.stream(call):
            if isinstance(event, Delta):
                text.append(event.text)
            elif isinstance(event, Finish):
                end = event
        return ChatResult(output="".join(text), finish_reason=end.reason, usage=end.usage,
                          upstream_model=self._spec.model_name)


def model_source(spec: LocalDeploySpec) -> tuple[str, bool]:
    """``(path or hub id, local_files_only)``; a missing folder is a ``DeployFailure``."""
    if spec.is_hub_id():
        return spec.model_path, False
    path = Path(spec.model_path).expanduser()
    if not path.is_dir():
        import socket

        raise DeployFailure("model_not_found", f"model_path {spec.model_path} is not a folder on node {socket.gethostname()} "
                                               "(the weights must be on every node that can run a replica)")
    return str(path), True


def load_tokenizer(spec: LocalDeploySpec):
    """The model's tokenizer, with a chat template (the spec's, or the tokenizer's own)."""
    from transformers import AutoTokenizer

    source, local_only = model_source(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, trust_remote_code=spec.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - the reason goes to the operator
        raise DeployFailure("load_error", f"cannot load the tokenizer of {spec.model_path}: {type(exc).__name__}: {str(exc)[:300]}") from None
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise DeployFailure("load_error", f"{spec.model_path} has no chat template; give one in the deploy field chat_template")
    return tokenizer


def prompt_ids(tokenizer, call: ChatCall, spec: LocalDeploySpec, limit: Optional[int]) -> tuple[list[int], int]:
    """The chat-templated prompt as token ids and the completion budget.

    ``limit`` is the context length (prompt + completion); a prompt that leaves no room
    is the caller's error, said with numbers.
    """
    messages = [{"role": m.role, "content": m.content or ""} for m in call.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - e.g. a template that refuses a system message
        raise GatewayError("invalid_request", f"the model's chat template refused these messages: {str(exc)[:300]}",
                           fields=["messages"]) from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    wanted = call.params.max_output() or spec.default_max_tokens
    if limit is not None:
        room = limit - len(ids)
        if room < 1:
            raise GatewayError("invalid_request", f"the prompt has {len(ids)} tokens; this endpoint's context is {limit} tokens",
                               fields=["messages"])
        wanted = min(wanted, room)
    return ids, wanted


def stop_strings(call: ChatCall) -> list[str]:
    stop = call.params.stop
    if stop is None:
        return []
    return [s for s in ([stop] if isinstance(stop, str) else stop) if s]


class Detokenizer:
    """Turns generated token ids into text deltas, honouring stop strings.

    Text that might be the start of a stop string, or half of a multi-byte
    character, is held back until it is known.
    """

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self._tokenizer = tokenizer
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # what was emitted
        self.stopped = False

    def push(self, ids: list[int]) -> str:
        """Add tokens; answer the new text that can be shown now."""
        self.ids.extend(ids)
        full = self._tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self._stops:
            at = full.find(stop)
            if at != -1:
                self.stopped = True
                return self._emit(full[:at])
        if full.endswith("\ufffd"):
            return ""
        return self._emit(full[: max(len(self.text), len(full) - self._hold)])

    def flush(self) -> str:
        if self.stopped:
            return ""
        full = self._tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._emit(full.rstrip("\ufffd"))

    def _emit(self, upto: str) -> str:
        if not upto.startswith(self.text):  # a tokenizer that rewrites earlier text: show only what is new
            self.text = upto
            return ""
        delta, self.text = upto[len(self.text):], upto
        return delta


def load_failure(exc: BaseException, spec: LocalDeploySpec) -> DeployFailure:
    """A loading exception as a ``DeployFailure`` with the reason an operator acts on."""
    if isinstance(exc, DeployFailure):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if "out of memory" in lowered or "outofmemory" in lowered or "no available memory for the cache" in lowered:
        return DeployFailure("out_of_gpu_memory", f"{spec.model_path} does not fit in the GPU memory of one worker "
                                                  f"({text[:300]}); use more gpus_per_worker, a smaller max_model_len or quantization")
    if isinstance(exc, (TypeError, ValueError)) and ("argument" in lowered or "engine" in lowered or "invalid" in lowered):
        return DeployFailure("bad_engine_argument", text[:400])
    if isinstance(exc, (OSError, FileNotFoundError)) and ("not found" in lowered or "no such file" in lowered or "does not appear" in lowered):
        return DeployFailure("model_not_found", f"{spec.model_path}: {text[:300]}")
    return DeployFailure("load_error", f"cannot load {spec.model_path}: {text[:400]}")
