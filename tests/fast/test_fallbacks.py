"""Fallback graphs: the cycle check at deploy (gateway.endpoints) and the deploy order of an endpoints file (gateway.apply)."""
from __future__ import annotations

import pytest

from gateway import endpoints
from gateway.apply import EndpointEntry, ordered
from gateway.deploy_checks import fallback_cycle
from contract.errors import GatewayError


@pytest.mark.parametrize("name, fallbacks, graph, cycle", [
    ("a", ["a"], {}, ["a", "a"]),                                         # itself
    ("a", ["b"], {"b": ["a"]}, ["a", "b", "a"]),                          # two
    ("a", ["b"], {"b": ["c"], "c": ["a"]}, ["a", "b", "c", "a"]),         # three
    ("a", ["x", "b"], {"x": [], "b": ["a"]}, ["a", "b", "a"]),            # the second fallback leads back
    ("a", ["b", "c"], {"b": ["d"], "c": ["d"], "d": []}, None),           # a diamond is no cycle
    ("a", ["b", "c"], {"b": ["d"], "c": ["d"], "d": ["a"]}, ["a", "b", "d", "a"]),  # the first path found
    ("a", ["b"], {"b": ["c"], "c": ["b"]}, None),                         # a cycle that does not pass through a
    ("a", ["b"], {"b": ["ghost"]}, None),                                 # names the graph lacks lead nowhere
    ("a", ["ghost"], {}, None),
    ("a", [], {"b": ["a"]}, None),                                        # no fallbacks, no cycle
    ("a", ["b"], {"a": ["zzz"], "b": []}, None),                          # a's old fallbacks do not count
    ("a", ["b"], {"a": [], "b": ["a"]}, ["a", "b", "a"]),                 # a redeploy that closes a loop
])
def test_fallback_cycle(name, fallbacks, graph, cycle):
    assert fallback_cycle(name, fallbacks, graph) == cycle


def chain(n: int) -> dict[str, list[str]]:
    return {f"n{i}": [f"n{i + 1}"] for i in range(n)} | {f"n{n}": []}


def test_a_long_chain_without_a_cycle():
    assert fallback_cycle("new", ["n0"], chain(500)) is None


def test_a_long_chain_back_to_the_new_endpoint():
    graph = chain(200) | {"n200": ["new"]}
    assert fallback_cycle("new", ["n0"], graph) == ["new"] + [f"n{i}" for i in range(201)] + ["new"]


def test_a_wide_graph_of_shared_targets_is_checked_quickly():
    # 8 fallbacks each (the most a spec takes), in 4 layers: 4096 paths, none back
    layers = [[f"l{d}_{i}" for i in range(8)] for d in range(5)]
    graph = {node: list(layers[d + 1]) for d in range(4) for node in layers[d]} | {node: [] for node in layers[4]}
    assert fallback_cycle("new", layers[0], graph) is None
    graph[layers[4][-1]] = ["new"]
    assert fallback_cycle("new", layers[0], graph) == ["new", "l0_0", "l1_0", "l2_0", "l3_0", "l4_7", "new"]


def test_the_graph_given_is_not_changed():
    graph = {"b": ["c"], "c": []}
    fallback_cycle("a", ["b"], graph)
    assert graph == {"b": ["c"], "c": []}


def test_check_fallbacks_refuses_an_endpoint_as_its_own_fallback_before_reading_the_cluster():
    # (the other refusals read the records from the registry actor: tests/test_resilience.py has them over HTTP;
    # patching ray.get here would reach the watcher threads of the real-Ray tests that share this process)
    checker = endpoints.Endpoints(cluster=None, settings=None)
    with pytest.raises(GatewayError) as info:
        checker._check_fallbacks("a", ["b", "a"])
    assert info.value.type == "invalid_request"
    assert info.value.info.message == "'a' cannot be its own fallback" and info.value.info.fields == ["fallbacks"]
    assert checker._check_fallbacks("a", []) is None


# -- the deploy order of an endpoints file ------------------------------------------------------------
def entry(name: str, fallbacks=None) -> EndpointEntry:
    data = {"chat_name": name, "provider": "openai", "model_name": "m"}
    if fallbacks is not None:
        data["fallbacks"] = fallbacks
    return EndpointEntry.model_validate(data)


def names(entries) -> list[str]:
    return [e.chat_name for e in entries]


@pytest.mark.parametrize("spec, order", [
    ([("a", None), ("b", None)], ["a", "b"]),                             # file order without fallbacks
    ([("a", ["b"]), ("b", None)], ["b", "a"]),                            # the target first
    ([("a", ["b", "c"]), ("b", ["c"]), ("c", None)], ["c", "b", "a"]),
    ([("x", None), ("a", ["b", "elsewhere"]), ("b", [])], ["x", "b", "a"]),  # names not in the file are skipped
    ([("a", ["c"]), ("b", ["c"]), ("c", None)], ["c", "a", "b"]),         # a shared target once
])
def test_ordered_deploys_fallback_targets_first(spec, order):
    assert names(ordered([entry(n, f) for n, f in spec])) == order


@pytest.mark.parametrize("spec", [
    [("a", ["b"]), ("b", ["a"])],
    [("a", ["b"]), ("b", ["c"]), ("c", ["a"]), ("d", None)],
    [("a", ["a"])],
])
def test_ordered_ends_on_a_cycle_with_every_entry_once(spec):
    out = names(ordered([entry(n, f) for n, f in spec]))
    assert sorted(out) == sorted(n for n, _ in spec)


def test_an_endpoints_file_names_a_key_pool_by_its_variables():
    """``api_keys_env``: each key from its variable (a weight each, if given); the key variables are known to the start
    (kept out of Ray's environment); a missing variable, or both fields, is refused naming the field, never a key."""
    import yaml
    from pydantic import ValidationError

    from gateway.apply import key_variables, plan

    entry = EndpointEntry.model_validate({"chat_name": "pool", "provider": "openai", "model_name": "m",
                                         "api_keys_env": ["K1", {"env": "K2", "weight": 3}]})
    env = {"K1": "sk-pool-key-one-1111", "K2": "sk-pool-key-two-2222"}
    assert entry.body(env)["api_keys"] == [{"key": env["K1"], "weight": 1}, {"key": env["K2"], "weight": 3}]
    [(_, spec)] = plan([entry], env)
    assert spec.pool() == [(env["K1"], 1), (env["K2"], 3)]
    [(_, missing)] = plan([entry], {"K1": env["K1"]})
    assert isinstance(missing, GatewayError) and "K2 is not set" in missing.info.message
    assert missing.info.fields == ["api_keys_env"] and env["K1"] not in missing.info.message
    with pytest.raises(ValidationError):
        EndpointEntry.model_validate({"chat_name": "x", "provider": "openai", "api_key_env": "A", "api_keys_env": ["B"]})
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump({"endpoints": [{"chat_name": "a", "provider": "openai", "api_key_env": "ONE"},
                                      {"chat_name": "b", "provider": "openai", "api_keys_env": ["TWO", {"env": "THREE"}]}]}, f)
        f.flush()
        assert key_variables(f.name) == {"ONE", "TWO", "THREE"}
