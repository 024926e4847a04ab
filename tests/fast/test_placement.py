"""Placement at deploy: the ``resources`` field, the SaaS default off GPU nodes, and why workers are missing."""
from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

import providers
from gateway.config import Settings
from gateway.endpoint_views import workers_missing
from gateway.placement import ACCELERATOR_LABEL, NODE_GROUP_LABEL, NODE_ID_LABEL, avoid_gpu_nodes, placement_options
from providers.openai_provider import OpenAIDeploySpec
from providers.vllm_provider import VLLMDeploySpec

SETTINGS = Settings()
CPU_NODE = {"NodeID": "c" * 56, "Alive": True, "Resources": {"CPU": 8.0},
            "Labels": {NODE_ID_LABEL: "c" * 56, NODE_GROUP_LABEL: "cpu"}}
GPU_NODE = {"NodeID": "a" * 56, "Alive": True, "Resources": {"CPU": 16.0, "GPU": 2.0},
            "Labels": {NODE_ID_LABEL: "a" * 56, ACCELERATOR_LABEL: "H100", NODE_GROUP_LABEL: "gpu"}}
FAKE_GPU_NODE = {"NodeID": "b" * 56, "Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0},  # (ray start --num-gpus=1)
                 "Labels": {NODE_GROUP_LABEL: "cpu"}}
#: a gateway pod: a Ray node without resources (KubeRay)
EMPTY_NODE = {"NodeID": "d" * 56, "Alive": True, "Resources": {}, "Labels": {}}


def saas(**fields) -> OpenAIDeploySpec:
    return OpenAIDeploySpec(chat_name="ep", model_name="m", api_key="sk-test", **fields)


# -- the field ------------------------------------------------------------------------------------
def test_resources_are_custom_ray_resources_each_worker_asks_for():
    spec = saas(resources={"cpu_pool": 0.01, "node:10.0.0.7": 1, "accelerator_type:H100": 0.5})
    assert spec.resources == {"cpu_pool": 0.01, "node:10.0.0.7": 1.0, "accelerator_type:H100": 0.5}
    assert spec.public()["resources"] == spec.resources  # (the listing row)
    assert saas().resources == {} and saas().public()["resources"] == {}


@pytest.mark.parametrize("resources, words", [
    ({"CPU": 1}, "Ray's own"), ({"GPU": 1}, "Ray's own"), ({"memory": 1e9}, "Ray's own"),
    ({"object_store_memory": 1}, "Ray's own"), ({"": 1}, "not a resource name"), ({" ": 1}, "not a resource name"),
    ({"two words": 1}, "not a resource name"), ({"x" * 129: 1}, "not a resource name"),
    ({"pool": 0}, "between"), ({"pool": -1}, "between"), ({"pool": 0.00001}, "between"), ({"pool": 1e10}, "between"),
    ({"pool": math.nan}, "finite"), ({"pool": math.inf}, "finite"), ({"pool": "much"}, "number"),
    ({f"r{i}": 1 for i in range(17)}, "at most 16"),
])
def test_resources_refuses_what_is_not_a_custom_resource_request(resources, words):
    with pytest.raises(ValidationError) as caught:
        saas(resources=resources)
    assert words in str(caught.value) and caught.value.errors()[0]["loc"][0] == "resources"


def test_every_provider_takes_resources_and_lists_it_in_its_deploy_form():
    for name in providers.names():
        schema = providers.get(name).spec_class.model_json_schema()
        prop = schema["properties"]["resources"]
        assert prop["type"] == "object" and prop["additionalProperties"] == {"type": "number"}
        assert prop["title"] == "Custom resources per worker" and "ray start --resources" in prop["description"]
        assert "resources" not in schema.get("required", [])


# -- what the replicas ask Ray for ----------------------------------------------------------------
def test_each_worker_asks_for_the_deploys_resources():
    provider = providers.get("openai")
    options = placement_options(provider, saas(resources={"cpu_pool": 0.5}), SETTINGS, [CPU_NODE, GPU_NODE])
    actor = options["ray_actor_options"]
    assert actor["resources"] == {"cpu_pool": 0.5} and actor["num_cpus"] == SETTINGS.saas_replica_cpus
    assert "label_selector" not in actor and "fallback_strategy" not in actor  # (its own resources replace the default)
    assert "resources" not in provider.replica_options(saas(), SETTINGS)["ray_actor_options"]  # (the provider's own: unchanged)


def test_a_tensor_parallel_worker_asks_for_them_in_its_placement_groups_first_bundle():
    """Serve puts the replica in bundle 0 and refuses actor resources that bundle lacks."""
    spec = VLLMDeploySpec(chat_name="ep", model_path="/models/q", gpus_per_worker=2, resources={"gpu_pool": 1})
    options = placement_options(providers.get("vllm"), spec, SETTINGS, [GPU_NODE])
    assert options["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 1, "gpu_pool": 1.0}, {"GPU": 1}]
    assert options["ray_actor_options"]["resources"] == {"gpu_pool": 1.0}


def test_the_options_pass_rays_and_serves_own_checks():
    from ray._common.ray_option_utils import validate_actor_options
    from ray.serve._private.config import ReplicaConfig

    for spec, nodes in ((saas(resources={"cpu_pool": 0.5}), [CPU_NODE]), (saas(), [CPU_NODE, GPU_NODE, FAKE_GPU_NODE])):
        actor = placement_options(providers.get("openai"), spec, SETTINGS, nodes)["ray_actor_options"]
        validate_actor_options(actor, in_options=True)
        ReplicaConfig.create(lambda: None, ray_actor_options=actor)


# -- SaaS workers off GPU nodes by default ---------------------------------------------------------
def test_saas_workers_prefer_the_nodes_without_gpus():
    actor = placement_options(providers.get("openai"), saas(), SETTINGS, [CPU_NODE, GPU_NODE, FAKE_GPU_NODE])["ray_actor_options"]
    # (the GPU group's future nodes too, not the group a CPU node is in)
    assert actor["label_selector"] == {NODE_ID_LABEL: f"!in({'a' * 56},{'b' * 56})", ACCELERATOR_LABEL: "!in(H100)",
                                       NODE_GROUP_LABEL: "!in(gpu)"}
    assert actor["fallback_strategy"] == [{"label_selector": {}}]  # (preferred: full CPU nodes still leave a GPU node)


@pytest.mark.parametrize("nodes", [[], [CPU_NODE], [GPU_NODE], [GPU_NODE, FAKE_GPU_NODE],
                                   [GPU_NODE, {**CPU_NODE, "Alive": False}], [GPU_NODE, EMPTY_NODE]])
def test_nothing_to_avoid_without_both_kinds_of_node(nodes):
    assert avoid_gpu_nodes(nodes) is None
    assert "label_selector" not in placement_options(providers.get("openai"), saas(), SETTINGS, nodes)["ray_actor_options"]


def test_local_models_are_placed_by_their_gpus_not_kept_off_gpu_nodes():
    spec = VLLMDeploySpec(chat_name="ep", model_path="/models/q")
    actor = placement_options(providers.get("vllm"), spec, SETTINGS, [CPU_NODE, GPU_NODE])["ray_actor_options"]
    assert "label_selector" not in actor and actor["num_gpus"] == 1


# -- why workers are missing -----------------------------------------------------------------------
def test_workers_missing_says_how_many_and_why():
    running = {"state": "RUNNING", "node_ip": "10.0.0.7", "node_id": "n1"}
    assert workers_missing(2, [running, running]) is None and workers_missing(None, []) is None
    pending = {"state": "STARTING", "node_ip": None, "node_id": None}
    missing = workers_missing(3, [running, pending], "Deployment 'openai' has 1 replicas that have taken more than "
                                                     "30s to be scheduled.", {"node_b": 1})
    assert missing["count"] == 2
    assert missing["why"].startswith("1 pending: no live node has the free resources each worker needs "
                                     "(custom resources: node_b 1)")
    assert "Serve says: Deployment 'openai' has 1 replicas" in missing["why"] and "1 not started by Serve yet" in missing["why"]
    loading = {"state": "STARTING", "node_ip": "10.0.0.8", "node_id": "n2"}
    assert workers_missing(2, [running, loading]) == {"count": 1, "why": "1 starting on 10.0.0.8"}


# -- the embedded head's resources ------------------------------------------------------------------
def test_the_embedded_head_carries_the_resources_its_setting_names():
    assert Settings.from_env({"GATEWAY_RAY_RESOURCES": '{"cpu_pool": 100}'}).ray_resources == {"cpu_pool": 100}
    assert Settings.from_env({}).ray_resources is None
    for bad in ("cpu_pool", "[1]", '{"CPU": 4}', '{"cpu_pool": 1.5}', '{"cpu_pool": 0}'):
        with pytest.raises(SystemExit, match="GATEWAY_RAY_RESOURCES"):
            Settings.from_env({"GATEWAY_RAY_RESOURCES": bad})
