"""Hugging Face ``transformers`` in each replica: small models on CPUs, or a GPU without vLLM.

``POST /hf/deploy {"chat_name": "tiny", "model_path": "/models/Qwen2.5-0.5B-Instruct", "workers": 1}``

Each replica loads the model once and generates one call at a time on a thread of its
own (torch is blocking; the replica's event loop stays free for health checks and
streams). Streaming, stop strings, usage and cancellation (the caller went away: the
generation stops at the next token) work as for every provider.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, ClassVar, Optional

from contract.errors import GatewayError
from contract.events import Delta, Finish, StreamEvent
from contract.calls import ChatCall, Usage

from .local import (Detokenizer, LocalAdapter, LocalDeploySpec, LocalProvider, load_failure, load_tokenizer, model_source,
                    prompt_ids, stop_strings)


class HFDeploySpec(LocalDeploySpec):
    MODEL_TYPES = ("local/hf", "local/transformers")


_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


class HFAdapter(LocalAdapter):
    def __init__(self, spec: HFDeploySpec) -> None:
        self._spec = spec
        model_source(spec)  # a missing folder fails before the seconds torch takes to import
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError as exc:
            from .deploy_failure import DeployFailure

            raise DeployFailure("engine_missing", f"the hf provider needs torch and transformers on this node ({exc})") from None
        self._torch = torch
        try:
            self._tokenizer = load_tokenizer(spec)
            source, local_only = model_source(spec)
            if spec.gpus_per_worker == 0:
                torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
            kwargs: dict[str, Any] = {"local_files_only": local_only, "trust_remote_code": spec.trust_remote_code,
                                      "dtype": _DTYPES.get(spec.dtype, "auto")}
            if spec.gpus_per_worker > 1:
                kwargs["device_map"] = "auto"  # spread over the replica's GPUs (needs accelerate)
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            if spec.gpus_per_worker == 1:
                model = model.to("cuda")
            self._model = model.eval()
        except Exception as exc:  # noqa: BLE001 - every loading failure gets a reason
            raise load_failure(exc, spec) from None
        config_len = getattr(self._model.config, "max_position_embeddings", None)
        self._limit: Optional[int] = min(x for x in (spec.max_model_len, config_len) if x) if (spec.max_model_len or config_len) else None
        eos = self._model.generation_config.eos_token_id if self._model.generation_config else None
        if eos is None:
            eos = self._tokenizer.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else next(iter(self._eos), 0)
        # One generation at a time per replica: torch already uses the replica's CPUs/GPU fully.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="generate")

    async def stream(self, call: ChatCall) -> AsyncIterator[StreamEvent]:
        ids, budget = prompt_ids(self._tokenizer, call, self._spec, self._limit)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        detok = Detokenizer(self._tokenizer, stop_strings(call))
        future = loop.run_in_executor(self._pool, self._generate, call, ids, budget, queue, loop, cancel, detok)
        finish: Optional[str] = None
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                yield Delta(item)
            await future  # raises what the generation raised
            tail = detok.flush()
            if tail:
                yield Delta(tail)
            generated = len(detok.ids)
            last = detok.ids[-1] if detok.ids else None
            finish = "stop" if detok.stopped or last in self._eos or generated < budget else "length"
            usage = Usage(prompt_tokens=len(ids), completion_tokens=generated, total_tokens=len(ids) + generated)
            yield Finish(finish, usage)
        finally:
            cancel.set()  # the caller went away (or we are done): the generation stops at its next token

    def _generate(self, call: ChatCall, ids: list[int], budget: int, queue: asyncio.Queue, loop, cancel: threading.Event,
                  detok: Detokenizer) -> None:
        torch = self._torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731

        class Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, value) -> None:
                if not self.prompt_seen:  # generate() hands the prompt over first
                    self.prompt_seen = True
                    return
                delta = detok.push([int(t) for t in value.reshape(-1).tolist()])
                if detok.stopped:
                    cancel.set()
                if delta:
                    put(delta)

            def end(self) -> None:
                pass

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        p = call.params
        kwargs: dict[str, Any] = {"max_new_tokens": budget, "pad_token_id": self._pad}
        if p.temperature is not None:
            kwargs["do_sample"] = p.temperature > 0
            if p.temperature > 0:
                kwargs["temperature"] = p.temperature
        if p.top_p is not None:
            kwargs["top_p"] = p.top_p
        if kwargs.get("do_sample") is False:  # greedy: no sampling knobs left over from the model's defaults
            kwargs.update(temperature=None, top_p=None, top_k=None)
        try:
            if p.seed is not None:
                torch.manual_seed(p.seed)
            device = self._model.device
            input_ids = torch.tensor([ids], device=device)
            with torch.inference_mode():
                self._model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=Streamer(),
                                     stopping_criteria=StoppingCriteriaList([Cancelled()]), **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported to the caller as ours
            kind = "upstream_error"
            message = f"generation failed: {type(exc).__name__}: {str(exc)[:300]}"
            if "out of memory" in str(exc).lower():
                message = "the model ran out of memory generating this answer; try a shorter prompt or max_tokens"
            raise GatewayError(kind, message) from None
        finally:
            put(None)

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        model, self._model = self._model, None
        del model
        if self._spec.gpus_per_worker and self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()


class HFProvider(LocalProvider):
    name = "hf"
    spec_class = HFDeploySpec
    engine_packages: ClassVar[tuple[str, ...]] = ("torch", "transformers")
    install_hint = "pip install -r requirements-local.txt"

    def create_adapter(self, spec: HFDeploySpec) -> HFAdapter:
        return HFAdapter(spec)
