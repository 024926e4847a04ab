"""vLLM on GPUs: each replica holds one vLLM async engine, tensor parallel over its GPUs.

``POST /vllm/deploy {"chat_name": "qwen_local", "model_path": "/models/Qwen2.5-7B-Instruct",
"workers": 2, "gpus_per_worker": 1, "max_model_len": 8192, "gpu_memory_utilization": 0.9}``

Only vLLM's documented public API is used (``AsyncEngineArgs``, ``AsyncLLMEngine
.from_engine_args``, ``generate(prompt, sampling_params, request_id)``, ``abort``,
``SamplingParams``), so a vLLM upgrade does not break the gateway. The pinned version
that matches the pinned Ray is in ``requirements-gpu.txt``. The chat template comes from
the model's tokenizer (the same code as the ``hf`` provider), and the prompt is handed
to vLLM as token ids, so usage counts are the engine's.
"""
from __future__ import annotations

import dataclasses
import uuid
from typing import Any, AsyncIterator, ClassVar, Optional

from pydantic import Field, field_validator

from contract.errors import GatewayError
from contract.events import Delta, Finish, StreamEvent
from contract.calls import ChatCall, Usage

from .deploy_failure import DeployFailure
from .local import LocalAdapter, LocalDeploySpec, LocalProvider, load_failure, load_tokenizer, model_source, prompt_ids, stop_strings


class VLLMDeploySpec(LocalDeploySpec):
    MODEL_TYPES = ("local/vllm",)

    gpus_per_worker: int = Field(1, ge=1, le=16)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    quantization: Optional[str] = Field(None, max_length=64)
    #: any other ``vllm.AsyncEngineArgs`` field (e.g. ``enforce_eager``); checked against vLLM in the replica
    engine_args: dict[str, Any] = Field(default_factory=dict, max_length=64)
    max_ongoing_requests: int = Field(64, ge=1, le=4096)

    @field_validator("engine_args")
    @classmethod
    def _owned_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = {"model", "tensor_parallel_size", "max_model_len", "gpu_memory_utilization", "dtype", "quantization",
                 "trust_remote_code", "tokenizer"}
        clash = sorted(owned & set(value))
        if clash:
            raise ValueError(f"set {', '.join(clash)} as deploy fields, not in engine_args")
        return value

    def public(self) -> dict[str, Any]:
        out = super().public()
        out.update(gpu_memory_utilization=self.gpu_memory_utilization, quantization=self.quantization,
                   engine_args=sorted(self.engine_args))
        return out


def engine_args_of(spec: VLLMDeploySpec, source: str):
    """``vllm.AsyncEngineArgs`` for a spec; an unknown or bad field is a ``DeployFailure``."""
    from vllm import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(spec.engine_args) - known)
    if unknown:
        raise DeployFailure("bad_engine_argument", f"vLLM has no engine argument {', '.join(unknown)}")
    args = {"model": source, "tensor_parallel_size": spec.gpus_per_worker, "gpu_memory_utilization": spec.gpu_memory_utilization,
            "dtype": spec.dtype, "trust_remote_code": spec.trust_remote_code, **spec.engine_args}
    if spec.max_model_len:
        args["max_model_len"] = spec.max_model_len
    if spec.quantization:
        args["quantization"] = spec.quantization
    if spec.gpus_per_worker > 1:
        args.setdefault("distributed_executor_backend", "ray")  # workers in this replica's placement group
    try:
        return AsyncEngineArgs(**args)
    except (TypeError, ValueError) as exc:
        raise DeployFailure("bad_engine_argument", f"{type(exc).__name__}: {str(exc)[:300]}") from None


class VLLMAdapter(LocalAdapter):
    def __init__(self, spec: VLLMDeploySpec) -> None:
        self._spec = spec
        try:
            from vllm import AsyncLLMEngine
        except ImportError as exc:
            raise DeployFailure("engine_missing", f"the vllm provider needs vLLM on this node: pip install -r requirements-gpu.txt ({exc})") from None
        try:
            source, _ = model_source(spec)
            self._tokenizer = load_tokenizer(spec)
            self._engine = AsyncLLMEngine.from_engine_args(engine_args_of(spec, source))
        except Exception as exc:  # noqa: BLE001 - every loading failure gets a reason
            raise load_failure(exc, spec) from None
        self._limit = spec.max_model_len or getattr(self._tokenizer, "model_max_length", None)
        if self._limit and self._limit > 10_000_000:  # "unlimited" sentinel of some tokenizers
            self._limit = None

    def _sampling(self, call: ChatCall, budget: int):
        from vllm import SamplingParams

        p = call.params
        fields: dict[str, Any] = {"max_tokens": budget}
        for name in ("temperature", "top_p", "seed"):
            value = getattr(p, name)
            if value is not None:
                fields[name] = value
        stops = stop_strings(call)
        if stops:
            fields["stop"] = stops
        return SamplingParams(**fields)

    async def stream(self, call: ChatCall) -> AsyncIterator[StreamEvent]:
        ids, budget = prompt_ids(self._tokenizer, call, self._spec, self._limit)
        request_id = f"{call.request_id or 'req'}-{uuid.uuid4().hex[:8]}"
        sent, finished, last = 0, False, None
        try:
            async for output in self._engine.generate({"prompt_token_ids": ids}, self._sampling(call, budget), request_id):
                last = output
                completion = output.outputs[0]
                if len(completion.text) > sent:
                    yield Delta(completion.text[sent:])
                    sent = len(completion.text)
                finished = output.finished
        except GatewayError:
            raise
        except Exception as exc:  # noqa: BLE001 - an engine failure is the endpoint's, said in words
            raise GatewayError("upstream_error", f"the vLLM engine failed: {type(exc).__name__}: {str(exc)[:300]}") from None
        finally:
            if not finished:
                await self._engine.abort(request_id)  # the caller went away: free the sequence's KV cache
        if last is None:
            raise GatewayError("upstream_error", "the vLLM engine answered nothing")
        completion = last.outputs[0]
        prompt_tokens = len(last.prompt_token_ids or ids)
        generated = len(completion.token_ids)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=generated, total_tokens=prompt_tokens + generated)
        yield Finish(completion.finish_reason or "stop", usage)

    async def aclose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()


class VLLMProvider(LocalProvider):
    name = "vllm"
    spec_class = VLLMDeploySpec
    engine_packages: ClassVar[tuple[str, ...]] = ("vllm",)
    install_hint = "pip install -r requirements-gpu.txt on each GPU node"

    def check_deploy(self, spec: VLLMDeploySpec) -> None:
        # The gateway may run where vLLM is not installed (a CPU box joined to a GPU cluster):
        # the replica checks the engine; the GPU count is checked against the cluster.
        return None

    def replica_options(self, spec: VLLMDeploySpec, settings: Any) -> dict[str, Any]:  # type: ignore[override]
        options = super().replica_options(spec, settings)
        if spec.gpus_per_worker > 1:
            # Tensor parallel: the replica and its GPU workers are placed together on one node.
            options["ray_actor_options"] = {"num_cpus": spec.cpus_per_worker, "num_gpus": 0}
            options["placement_group_bundles"] = [{"CPU": spec.cpus_per_worker, "GPU": 1}] + [{"GPU": 1}] * (spec.gpus_per_worker - 1)
            options["placement_group_strategy"] = "STRICT_PACK"
        return options

    def create_adapter(self, spec: VLLMDeploySpec) -> VLLMAdapter:
        return VLLMAdapter(spec)
