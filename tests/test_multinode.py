"""What holds across gateway hosts and Ray nodes: one two-node cluster on this machine (``tests/multinode.py``)
and two gateway hosts (A and B, real gunicorn) for the whole module.

In order, the destructive ones last: a deploy and an undeploy seen by the other host at once; a
cooldown and a client key's limit shared by both hosts; an endpoint pinned to the second node runs
there and is reached from both hosts; host A killed under load (B loses nothing; A restarted
redeploys nothing); the second node killed under load (LAST: it destroys the node). Each fault test
prints a table (fault, what callers saw, requests lost).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.fakes.upstreams import openai_error
from tests.multinode import (NODE_IP, HEAD_IP, SHARED, Host, Load, MultiNode, call, nodes, outcomes, print_table,
                             start_host, wait_until)
from tests.procs import wait_ready

ADMIN = "mn-admin-" + uuid.uuid4().hex
LIMITED = "mn-limited-" + uuid.uuid4().hex
SUFFIX = uuid.uuid4().hex[:6]
FILED = f"mn_filed_{SUFFIX}"  # the endpoints file's one endpoint (unpinned)
ON_A, ON_B = f"mn_on_a_{SUFFIX}", f"mn_on_b_{SUFFIX}"  # pinned to node_a / node_b (``pinned``)
ON_BOTH = f"mn_on_both_{SUFFIX}"  # asks for SHARED, which both nodes carry (``pinned``)
#: the pinned-to-node_b endpoint's call timeout: a call the gateway waits on gives up after it + 5 s
ON_B_TIMEOUT = 3


@dataclass
class Setup:
    cluster: MultiNode
    a: Host
    b: Host
    env: dict  # every host's settings (a restarted host gets the same)
    tmp: Path
    hosts: list = field(default_factory=list)  # every host started (teardown stops each)
    admin: dict = field(default_factory=lambda: {"Authorization": f"Bearer {ADMIN}"})


@pytest.fixture(scope="module")
def mn(tmp_path_factory, fake_openai):
    tmp = tmp_path_factory.mktemp("multinode")
    began = time.monotonic()
    keys = tmp / "keys.yaml"
    keys.write_text(yaml.safe_dump([{"key": LIMITED, "name": "mn-limited", "rate_per_minute": 2}]))
    endpoints = tmp / "endpoints.yaml"
    endpoints.write_text(yaml.safe_dump({"endpoints": [
        {"chat_name": FILED, "provider": "openai", "model_name": "m", "api_key_env": "MN_FILED_KEY",
         "base_url": fake_openai.base_url, "max_retries": 0}]}))
    env = {"GATEWAY_ADMIN_TOKEN": ADMIN, "GATEWAY_API_KEYS_FILE": str(keys), "GATEWAY_ENDPOINTS_FILE": str(endpoints),
           "MN_FILED_KEY": f"sk-mn-filed-{SUFFIX}"}
    cluster = MultiNode(tmp)
    hosts: list[Host] = []
    try:
        cluster.start_head()
        head_up = time.monotonic()
        cluster.start_node2()  # the second node and both hosts come up together
        hosts += [start_host("A", cluster.address, tmp / "host-a.log", **env),
                  start_host("B", cluster.address, tmp / "host-b.log", **env)]
        cluster.wait_node2()
        for host in hosts:
            wait_ready(host.base, host.proc, host.log_path, limit=150)
        print(f"\nmultinode setup: head {head_up - began:.1f}s, then node 2 and hosts A and B ready "
              f"{time.monotonic() - head_up:.1f}s later; nodes {cluster.node_ids}")
        yield Setup(cluster, hosts[0], hosts[1], env, tmp, hosts)
    finally:
        stopping = time.monotonic()
        for host in hosts:  # (SIGTERM to all first: they stop together)
            if host.proc.poll() is None:
                host.proc.terminate()
        for host in hosts:
            host.stop()
        cluster.stop()
        print(f"\nmultinode teardown: {time.monotonic() - stopping:.1f}s; module's fixture lived "
              f"{time.monotonic() - began:.1f}s")


def deploy_body(fake_openai, chat_name: str, **fields) -> dict:
    return {"api_key": f"sk-mn-{uuid.uuid4().hex}", "chat_name": chat_name, "model_name": "m",
            "base_url": fake_openai.base_url, "max_retries": 0, **fields}


@pytest.fixture(scope="module")
def pinned(mn, fake_openai):
    """``ON_A`` (one worker, ``resources: {node_a: 1}``, deployed through B), ``ON_B`` (two workers,
    ``resources: {node_b: 1}``, through A: unpinned, Serve would spread two replicas over both nodes) and
    ``ON_BOTH`` (two workers asking for ``SHARED``, which both nodes carry: Serve spreads them)."""
    began = time.monotonic()
    with mn.a.http() as a, mn.b.http() as b:
        for client, name, fields in ((b, ON_A, {"resources": {"node_a": 1}}),
                                     (a, ON_B, {"resources": {"node_b": 1}, "workers": 2, "timeout": ON_B_TIMEOUT}),
                                     (b, ON_BOTH, {"resources": {SHARED: 1}, "workers": 2})):
            r = client.post("/openai/deploy", headers=mn.admin, json=deploy_body(fake_openai, name, **fields))
            if r.status_code in (400, 422) and "resources" in r.text and "deploy_failed" not in r.text:
                pytest.fail(f"the deploy field 'resources' is not there yet (providers/specs.py, gateway/deploy_checks.py): "
                            f"{r.status_code} {r.text[:300]}")
            assert r.status_code == 200, r.text
    print(f"\npinned endpoints deployed in {time.monotonic() - began:.1f}s")
    return ON_A, ON_B, ON_BOTH


def view(host: Host, name: str) -> dict:
    with host.http() as client:
        r = client.get(f"/deployments/{name}", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    return r.json()


# -- 1. a change made through one host is seen by the other at once -------------------------------------

def test_a_deploy_through_a_is_served_through_b_and_an_undeploy_through_b_is_seen_by_a(mn, fake_openai):
    began = time.monotonic()
    name = f"mn_first_{SUFFIX}"
    with mn.a.http() as a, mn.b.http() as b:
        r = a.post("/openai/deploy", headers=mn.admin, json=deploy_body(fake_openai, name))
        assert r.status_code == 200 and r.json()["status"] == "RUNNING", r.text
        deployed = time.monotonic()
        first = call(b, name, mn.admin)  # B never saw it: it asks the registry
        assert first.status == 200 and not first.error, first
        assert call(a, name, mn.admin).status == 200  # now A holds it in its cache (GATEWAY_ENDPOINT_CACHE_S, 2 s)
        r = b.post("/openai/undeploy", headers=mn.admin, json={"chat_name": name})
        assert r.status_code == 200, r.text
        undeployed = time.monotonic()
        seen = []
        while time.monotonic() - undeployed < 3.0:  # past A's cache time, so the end state is known too
            seen.append(call(a, name, mn.admin))
            time.sleep(0.1)
        listed = a.get(f"/deployments/{name}", headers=mn.admin)
    print(f"\ndeploy through A ({deployed - began:.1f}s), first chat through B: {first.status} in {first.took:.2f}s")
    print("after the undeploy through B, A answered: " + ", ".join(
        f"{x.at - undeployed:.2f}s:{x.status}{' ' + x.error if x.error else ''}" for x in seen))
    stale = [x for x in seen if x.status != 404]
    print_table("deploy through A / undeploy through B", [
        ("undeploy through B, A had the endpoint cached", outcomes(seen),
         f"{len(stale)} answered other than 404 (stale), the last {stale[-1].at - undeployed:.2f}s after"
         if stale else "0 (404 at once)")])
    for x in stale:
        print(f"  stale answer {x.at - undeployed:.2f}s after: {x.status} {x.error} Retry-After {x.retry_after}: {x.message}")
    assert listed.status_code == 404
    assert seen[-1].status == 404 and seen[-1].error == "not_found", seen[-1]
    # A had it cached (GATEWAY_ENDPOINT_CACHE_S): Serve's "no such deployment" makes it ask the registry again,
    # so its very first call after the undeploy is a 404 (it was a 503 "failed to deploy" from the stale cache)
    assert not stale, outcomes(stale)


# -- 2. shared state: cooldowns, client-key limits -----------------------------------------------------------

def test_a_client_keys_limit_and_a_cooldown_hold_across_hosts(mn, fake_openai):
    limited = {"Authorization": f"Bearer {LIMITED}"}
    with mn.a.http() as a, mn.b.http() as b:
        # the key's rate (2 a minute) is the cluster's, not each host's
        through_a = [call(a, FILED, limited) for _ in range(2)]
        assert [x.status for x in through_a] == [200, 200], through_a
        r = b.post("/chat", headers=limited, json={"chat_name": FILED, "content": "third"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limited", r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert call(b, FILED, mn.admin).status == 200  # (another caller of the same endpoint is not limited)

        # a cooldown entered through A (a rejected key cools down at once) is B's too
        name = f"mn_cool_{SUFFIX}"
        body = deploy_body(fake_openai, name)
        r = b.post("/openai/deploy", headers=mn.admin, json=body)
        assert r.status_code == 200, r.text
        try:
            fake_openai.script(body["api_key"], openai_error(401, "Incorrect API key provided", "invalid_request_error",
                                                             "invalid_api_key"))
            r = a.post("/chat", headers=mn.admin, json={"chat_name": name, "content": "x"})
            assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_auth", r.text
            asked = len(fake_openai.requests_for(body["api_key"]))
            skipped = []
            for client in (b, a, b):
                r = client.post("/chat", headers=mn.admin, json={"chat_name": name, "content": "y"})
                skipped.append(r)
                assert r.status_code == 503 and r.json()["error"]["type"] == "endpoint_not_ready", r.text
                assert "cooling down" in r.json()["error"]["message"] and int(r.headers["Retry-After"]) >= 1
            assert len(fake_openai.requests_for(body["api_key"])) == asked  # skipped: the upstream was not asked
            assert view(mn.b, name)["health"]["state"] == "cooling_down"
        finally:
            b.post("/openai/undeploy", headers=mn.admin, json={"chat_name": name})
    print_table("shared state", [
        ("key limited to 2/min: 2 calls through A, then B", "200, 200, then 429 rate_limited through B", "-"),
        ("401 through A (cools down at once)", "B, A, B: " + ", ".join(
            f"{r.status_code} Retry-After {r.headers['Retry-After']}" for r in skipped), "-")])


# -- 3. placement ----------------------------------------------------------------------------------------------

def test_an_endpoint_pinned_to_the_second_node_runs_only_there_and_both_hosts_reach_it(mn, pinned):
    on_a, on_b, _ = pinned
    ids = mn.cluster.node_ids
    known = {n["node_id"]: n for n in nodes(mn.cluster.address)}
    assert known[ids["node_b"]]["resources"].get("node_b") == 100 and known[ids["node_b"]]["ip"] == NODE_IP
    assert known[ids["node_a"]]["resources"].get("node_a") == 100 and known[ids["node_a"]]["ip"] == HEAD_IP
    for name, node, ip, workers in ((on_b, "node_b", NODE_IP, 2), (on_a, "node_a", HEAD_IP, 1)):
        shown = view(mn.b, name)
        assert "replicas" in shown, f"the listing shows no replicas yet (gateway/endpoint_views.py): {shown}"
        replicas = shown["replicas"]
        assert shown.get("resources") == {node: 1.0}, shown
        print(f"\n{name}: {replicas}")
        assert len(replicas) == workers, replicas
        assert all(r["node_id"] == ids[node] and r["node_ip"] == ip and r["state"] == "RUNNING" for r in replicas), \
            (node, ids, replicas)
    # both hosts reach both, over each replica's gRPC server (the default); the calls through a host with
    # GATEWAY_SERVE_GRPC=0 (Ray actor calls) are made by the restarted host A, in the host-kill test
    with mn.a.http() as a, mn.b.http() as b:
        answers = [call(client, name, mn.admin) for client in (a, b) for name in (on_a, on_b) for _ in range(3)]
    assert all(x.status == 200 and not x.error for x in answers), outcomes(answers)


def test_saas_workers_without_resources_keep_off_the_gpu_node(mn, fake_openai):
    """node_b says it has a GPU: an unpinned SaaS endpoint's workers all run on node_a (preferred, not required:
    ``gateway.endpoints.avoid_gpu_nodes``), where Serve would otherwise spread two of them over both nodes."""
    name = f"mn_saas_{SUFFIX}"
    known = {n["node_id"]: n for n in nodes(mn.cluster.address)}
    assert known[mn.cluster.node_ids["node_b"]]["resources"].get("GPU") == 1
    with mn.a.http() as a:
        r = a.post("/openai/deploy", headers=mn.admin, json=deploy_body(fake_openai, name, workers=2))
        assert r.status_code == 200, r.text
        try:
            replicas = view(mn.b, name)["replicas"]
            print(f"\nunpinned SaaS endpoint, 2 workers: {replicas}")
            assert len(replicas) == 2 and all(r["node_id"] == mn.cluster.node_ids["node_a"] for r in replicas), replicas
            assert call(a, name, mn.admin).status == 200
        finally:
            assert a.post("/openai/undeploy", headers=mn.admin, json={"chat_name": name}).status_code == 200


# -- 4. a gateway host killed ---------------------------------------------------------------------------------

def test_host_a_killed_under_load_b_loses_nothing_and_a_restarted_redeploys_nothing(mn, pinned):
    on_a, on_b, _ = pinned
    names = (FILED, on_a, on_b)
    before = {name: view(mn.b, name) for name in names}
    through_b = [Load(f"B-{name}", mn.b.base, name, mn.admin).start() for name in names]
    through_a = Load(f"A-{on_a}", mn.a.base, on_a, mn.admin, timeout=10).start()
    time.sleep(1.5)
    killed = mn.a.kill()
    time.sleep(1.0)
    # host A again: a fresh gunicorn on a new port, the same settings, and replicas called as Ray actor calls
    restarted = start_host("A2", mn.cluster.address, mn.tmp / "host-a2.log", GATEWAY_SERVE_GRPC="0", **mn.env)
    mn.hosts.append(restarted)
    wait_ready(restarted.base, restarted.proc, restarted.log_path, limit=150)
    ready = time.monotonic()
    time.sleep(0.5)
    for load in (*through_b, through_a):
        load.stop()
    mn.a = restarted
    after = {name: view(restarted, name) for name in names}
    with restarted.http() as a2:  # through the restarted host, without gRPC: both nodes' replicas answer
        answers = [call(a2, name, mn.admin) for name in (on_a, on_b) for _ in range(3)]
    text = restarted.log_path.read_text()
    kept = ("config_digest", "updated_at", "status")
    changed = {name: ({k: before[name].get(k) for k in kept}, {k: after[name].get(k) for k in kept})
               for name in names if any(before[name].get(k) != after[name].get(k) for k in kept)}

    lost_b = [x for load in through_b for x in load.lost()]
    in_flight = [x for x in through_a.answers if x.at < killed <= x.at + x.took]  # A's callers whose call it had taken
    refused = [x for x in through_a.answers if x.at >= killed]  # sent after: nothing listens at A's port
    print(f"\nhost A killed; the restarted host was ready {ready - killed:.1f}s after the kill")
    for load in (*through_b, through_a):
        print(f"  {load.label}: {outcomes(load.answers)}")
    print_table("host A killed (SIGKILL, master and worker)", [
        ("host A killed", f"through B ({len(through_b)} endpoints): {outcomes([x for load in through_b for x in load.answers])}",
         str(len(lost_b))),
        ("", f"through A: in flight at the kill {outcomes(in_flight)}; sent after it {outcomes(refused)}",
         f"{len([x for x in in_flight if x.status != 200])} in flight at A (its callers retry elsewhere)"),
        ("host A restarted (new port, GATEWAY_SERVE_GRPC=0)", f"ready {ready - killed:.1f}s after the kill; "
         f"calls to both nodes' replicas: {outcomes(answers)}", f"redeployed: {sorted(changed) or 'none'}")])
    assert not lost_b, f"B lost calls while A died: {outcomes(lost_b)}"
    assert all(len(load.answers) >= 5 for load in through_b), [len(load.answers) for load in through_b]
    assert all(x.status == 200 and not x.error for x in answers), outcomes(answers)
    assert not changed, f"the restarted host redeployed: {changed}"  # the same deploys (digest, time), still running
    assert f'"chat_name": "{FILED}", "provider": "openai", "status": "unchanged"' in text, text[-3000:]


# -- 5. the second node killed (LAST: the node stays dead) --------------------------------------------------------

def test_the_second_node_killed_under_load_only_its_endpoint_fails(mn, pinned):
    on_a, on_b, on_both = pinned
    where = {r["node_id"] for r in view(mn.b, on_both)["replicas"]}
    loads = [Load(f"{host.name}-{name}", host.base, name, mn.admin, timeout=ON_B_TIMEOUT + 20).start()
             for host in (mn.a, mn.b) for name in (on_a, on_b)]
    # ON_BOTH's callers honour Retry-After (as the README asks callers to)
    loads += [Load(f"{host.name}-{on_both}", host.base, on_both, mn.admin, timeout=60, honour_retry_after=True).start()
              for host in (mn.a, mn.b)]
    time.sleep(1.5)
    killed = mn.cluster.node2.kill()
    node_b = mn.cluster.node_ids["node_b"]
    wait_until("the GCS declares the second node dead",
               lambda: not next(n for n in nodes(mn.cluster.address) if n["node_id"] == node_b)["alive"], 60)
    dead = time.monotonic()

    def failing_fast() -> bool:  # each host's last 3 callers of ON_B were told no worker runs (not left to time out)
        last = [[x for x in load.answers if x.at > dead][-3:] for load in loads if load.chat_name == on_b]
        return all(len(f) == 3 and all(x.error == "endpoint_not_ready" for x in f) for f in last)

    try:
        wait_until("calls to the dead node's endpoint are answered endpoint_not_ready", failing_fast, ON_B_TIMEOUT + 25)
        settled = time.monotonic()
    except AssertionError:
        settled = None
    for load in loads:
        load.stop()

    shown = wait_until("the listing says ON_B has no worker",
                       lambda: (v := view(mn.b, on_b))["workers_running"] == 0 and v, 30)
    # ON_BOTH's workers are back, both on the node that still carries SHARED
    back = wait_until("ON_BOTH runs its 2 workers again", lambda: (v := view(mn.a, on_both))["workers_running"] == 2
                      and all(r["state"] == "RUNNING" for r in v["replicas"]) and v, 60)
    ready = {}
    for host in (mn.a, mn.b):
        with host.http() as client:
            ready[host.name] = client.get("/readyz").status_code
    on_a_answers = [x for load in loads if load.chat_name == on_a for x in load.answers]
    on_b_after = [x for load in loads if load.chat_name == on_b for x in load.answers if x.at + x.took >= killed]
    lost_a = [x for x in on_a_answers if x.status != 200 or x.error]
    on_both_answers = [x for load in loads if load.chat_name == on_both for x in load.answers]
    lost_both = [x for x in on_both_answers if x.status != 200 or x.error]
    retried_both = [x for x in on_both_answers if x.tries > 1]
    failed_b = [x for x in on_b_after if x.status != 200 or x.error]
    print(f"\nnode 2 killed; the GCS declared it dead {dead - killed:.1f}s later; calls to {on_b} answered endpoint_not_ready "
          + (f"{settled - killed:.1f}s after the kill" if settled else "NOT within the wait"))
    for load in loads:
        print(f"  {load.label}: {outcomes(load.answers)}; slowest {max(x.took for x in load.answers):.1f}s")
    for load in loads:
        for x in (x for x in load.answers if x.at + x.took >= killed and (x.status != 200 or x.error)):
            print(f"    {load.label} sent {x.at - killed:+.1f}s, answered after {x.took:.1f}s: {x.status} {x.error} "
                  f"Retry-After {x.retry_after}: {x.message[:150]}")
    print(f"  listing of {on_b} after: status={shown.get('status')} workers_running={shown.get('workers_running')} "
          f"workers_missing={shown.get('workers_missing')} replicas={shown.get('replicas')} health={shown.get('health')}")
    print_table("node 2 killed (SIGKILL, its whole process group)", [
        ("node 2 killed: endpoint on node_a", outcomes(on_a_answers), str(len(lost_a))),
        (f"node 2 killed: endpoint on both nodes ({len(where)} node(s) before)",
         f"{outcomes(on_both_answers)}; {len(retried_both)} took more than one call (Retry-After honoured); workers "
         f"back on {sorted({r['node_ip'] for r in back['replicas']})}", str(len(lost_both))),
        ("node 2 killed: endpoint on node_b", f"{outcomes(on_b_after)}; slowest "
         f"{max((x.took for x in on_b_after), default=0):.1f}s", f"{len(failed_b)} of {len(on_b_after)}"),
        ("(the listing after)", f"{on_b}: status {shown.get('status')}, workers_running 0, workers_missing "
         f"{shown.get('workers_missing')}", "-")])
    assert not lost_a, f"the node_a endpoint lost calls: {outcomes(lost_a)}"
    assert not lost_both, f"callers of the endpoint on both nodes lost calls: {outcomes(lost_both)}"
    assert {r["node_id"] for r in back["replicas"]} == {mn.cluster.node_ids["node_a"]}, back["replicas"]
    assert not back.get("workers_missing"), back
    # the dead node's endpoint: once Serve knows its workers are gone, callers are answered at once
    # (503 with Retry-After, "no worker ... is running") instead of waiting for the endpoint's deadline
    assert any(x.error == "endpoint_not_ready" and "no worker" in x.message for x in failed_b), outcomes(failed_b)
    assert failed_b, "no call to the dead node's endpoint failed"
    assert all(x.status is not None for x in failed_b), outcomes(failed_b)  # every caller got an HTTP answer
    assert all(x.status in (502, 503, 504) for x in failed_b), outcomes(failed_b)
    assert max(x.took for x in on_b_after) < ON_B_TIMEOUT + 5 + 10, outcomes(on_b_after)  # nobody hangs
    assert settled is not None, "calls to the dead node's endpoint were never answered endpoint_not_ready"
    assert ready == {mn.a.name: 200, mn.b.name: 200}, ready
    missing = shown.get("workers_missing")  # the listing says the workers are missing, and why
    assert missing and missing["count"] == 2 and missing["why"], shown
