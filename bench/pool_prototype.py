"""Measured prototype of pooled SaaS endpoints (docs/numbers.md: memory per endpoint).

    python -m bench.pool_prototype [--endpoints 20]

Today every endpoint is a Serve application whose replicas are processes of their own
(~100 MiB each). The proposal: one Serve application per provider whose replicas hold
one adapter per endpoint, chosen per call with Serve's model multiplexing
(``@serve.multiplexed``, the ``chat_name`` as the multiplexed model id), with the keys
in a key-holder actor (memory only) that a replica reads when it first loads an
endpoint. This script builds exactly that next to the process-per-endpoint design, on
its own local Ray cluster and a fake OpenAI upstream, and prints:

- memory (PSS of the whole machine) per extra endpoint, pooled vs one application each;
- time to "deploy" (register the key, first call loads the adapter) vs a Serve deploy;
- latency of a call through the pool vs through an endpoint's own application.

Nothing here is used by the gateway; it is a measurement to decide on.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import ray
from ray import serve

from .__main__ import start_fake, total_pss_mib


@ray.remote(num_cpus=0)
class KeyHolder:
    """The pool's keys, in this actor's memory only (never in bind args of the shared app)."""

    def __init__(self) -> None:
        self._specs: dict = {}

    def put(self, chat_name: str, spec) -> None:
        self._specs[chat_name] = spec

    def get(self, chat_name: str):
        return self._specs[chat_name]


@serve.deployment(ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=1024)
class OpenAIPool:
    def __init__(self, keys) -> None:
        self._keys = keys

    @serve.multiplexed(max_num_models_per_replica=512)
    async def adapter(self, chat_name: str):
        import providers

        spec = await self._keys.get.remote(chat_name)
        return providers.get("openai").create_adapter(spec)

    async def chat(self, call):
        adapter = await self.adapter(serve.get_multiplexed_model_id())
        return await adapter.chat(call)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.pool_prototype")
    ap.add_argument("--endpoints", type=int, default=20)
    ap.add_argument("--apps", type=int, default=3, help="endpoints deployed as applications of their own, for comparison")
    args = ap.parse_args()

    import providers
    from gateway.serve_apps import bind_endpoint
    from gateway.config import Settings
    from contract.calls import ChatCall

    fake, url = start_fake(0.05)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(num_cpus=2, object_store_memory=100 * 1024 * 1024, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": root, "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}},
             logging_level="ERROR", log_to_driver=False)
    try:
        settings = Settings()
        provider = providers.get("openai")
        call = ChatCall.model_validate({"request_id": "proto", "messages": [{"role": "user", "content": "hi"}]})

        def spec(name: str):
            return provider.spec_class.model_validate({"chat_name": name, "api_key": f"sk-proto-{name}", "model_name": "m",
                                                       "base_url": url, "max_retries": 0})

        keys = KeyHolder.options(name="pool-keys").remote()
        pool = serve.run(OpenAIPool.bind(keys), name="pool-openai", route_prefix=None)
        ray.get(keys.put.remote("warm", spec("warm")))
        pool.options(multiplexed_model_id="warm").chat.remote(call).result()
        time.sleep(2)

        # Pooled: register a key, the first call loads the adapter.
        before = total_pss_mib()
        pooled_deploy = []
        for i in range(args.endpoints):
            name = f"p{i}"
            t = time.perf_counter()
            ray.get(keys.put.remote(name, spec(name)))
            pool.options(multiplexed_model_id=name).chat.remote(call).result()
            pooled_deploy.append(time.perf_counter() - t - 0.05)  # less the upstream's 50 ms
        time.sleep(2)
        pooled_mib = (total_pss_mib() - before) / args.endpoints

        # One application per endpoint (today's design).
        before = total_pss_mib()
        app_deploy, handles = [], []
        for i in range(args.apps):
            name = f"a{i}"
            t = time.perf_counter()
            handles.append(serve.run(bind_endpoint(provider, spec(name), settings), name=name, route_prefix=None))
            app_deploy.append(time.perf_counter() - t)
        time.sleep(2)
        app_mib = (total_pss_mib() - before) / args.apps

        def latency(fn, n: int = 200) -> float:
            for _ in range(20):
                fn()
            samples = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t) * 1000)
            return statistics.median(samples)

        own = latency(lambda: handles[0].chat.remote(call).result())
        pooled = latency(lambda: pool.options(multiplexed_model_id="p1").chat.remote(call).result())
        print(f"| design | memory per extra endpoint (PSS) | deploy (median) | call p50 at concurrency 1 |\n|---|---|---|---|\n"
              f"| one application (process) per endpoint | {app_mib:.1f} MiB | {statistics.median(app_deploy):.2f} s | {own:.1f} ms |\n"
              f"| pooled: {args.endpoints} endpoints multiplexed in one replica | {pooled_mib:.2f} MiB | "
              f"{statistics.median(pooled_deploy) * 1000:.0f} ms | {pooled:.1f} ms |")
    finally:
        serve.shutdown()
        ray.shutdown()
        fake.terminate()


if __name__ == "__main__":
    main()
