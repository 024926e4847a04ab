"""``EndpointRecord`` and ``Health`` (``gateway.records``): typed, and lossless over the dicts the registry stores;
``RegistryClient`` types what the registry actor answers, within one timeout.

The records here are built the way the gateway builds them (``Endpoints``' deploys, the registry's ``settle``,
``get`` and ``list``, which add the health view), and as an older gateway left them (optional keys missing).
"""
from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

from contract.errors import GatewayError
from gateway.records import EndpointRecord, Health, PendingDeploy
from gateway.registry_client import RegistryClient, RegistryUnavailable
from providers.openai_provider import OpenAIDeploySpec

NOW = "2025-01-01T00:00:00+00:00"
LATER = "2025-01-01T00:05:00+00:00"


def public(**fields) -> dict:
    spec = OpenAIDeploySpec(chat_name="ep", model_name="m", api_key="sk-test-1234567890", fallbacks=["other"], **fields)
    return {**spec.public(), "provider": "openai"}


def pending(fresh: bool = True) -> dict:
    return {"id": "d1", "fresh": fresh, "public": public(), "digest": "abc", "started": 1.0, "deadline": 301.0}


def deploying() -> dict:  # (a fresh deploy under way, as ``Endpoints`` stores it)
    return {"chat_name": "ep", **public(), "config_digest": "abc", "status": "DEPLOYING", "created_at": NOW,
            "updated_at": NOW, "pending": pending()}


def settled(record: dict) -> dict:  # (the registry's ``settle`` of a deploy that runs)
    p = record["pending"]
    out = {k: v for k, v in record.items() if k != "pending"}
    out.update(p["public"], config_digest=p["digest"], status="RUNNING", updated_at=LATER)
    out.pop("failure", None)
    return out


SHORT_HEALTH = {"state": "ok", "consecutive_failures": 0}
COOLING = {"state": "cooling_down", "consecutive_failures": 3, "cooldown_until": 1700000000.5,
           "last_error": "upstream_timeout", "cooldowns": 1}
FAILURE = {"reason": "load_error", "message": "the model could not be loaded"}

RECORDS = {
    "deploying": deploying(),
    "running": settled(deploying()),
    "running, listed (short health)": {**settled(deploying()), "health": SHORT_HEALTH},
    "running, cooling down": {**settled(deploying()), "health": COOLING},
    "running, ok again": {**settled(deploying()), "health": {**COOLING, "state": "ok", "consecutive_failures": 0,
                                                              "cooldown_until": None}},
    "failed before it started": {"chat_name": "ep", "provider": "openai", **public(), "status": "DEPLOY_FAILED",
                                 "failure": FAILURE, "created_at": NOW, "updated_at": NOW},
    "failed while starting": {**{k: v for k, v in deploying().items() if k != "pending"}, "status": "DEPLOY_FAILED",
                              "failure": FAILURE, "updated_at": LATER},
    "an update that failed": {**settled(deploying()), "last_update_failure": FAILURE},
    "an update under way": {**settled(deploying()), "pending": pending(fresh=False)},
    "a forgotten application": {"chat_name": "ep", **public(), "config_digest": "", "status": "RUNNING",
                                "created_at": NOW, "updated_at": NOW},
    # an older gateway's: no timeout, fallbacks, config_digest, created_at or health; an int timeout; a key unknown here
    "old-style": {"chat_name": "old", "provider": "zhipu", "model": "glm-4", "workers": 1, "status": "RUNNING",
                  "updated_at": NOW},
    "old-style, int timeout, null fallbacks": {"chat_name": "old", "provider": "openai", "timeout": 30,
                                               "fallbacks": None, "base_url": "https://x", "failure": None},
    "no status": {"chat_name": "old", "provider": "openai", "model": "m"},
}


@pytest.mark.parametrize("name", RECORDS)
def test_a_stored_record_comes_back_as_it_was_key_order_included(name):
    stored = RECORDS[name]
    record = EndpointRecord.from_dict(stored)
    assert record.to_dict() == stored
    assert json.dumps(record.to_dict()) == json.dumps(stored)  # (what GET /deployments shows, byte for byte)
    assert EndpointRecord.from_dict(json.loads(json.dumps(stored))).to_dict() == stored  # (through the GCS's JSON)


def test_the_fields_are_typed():
    record = EndpointRecord.from_dict({**settled(deploying()), "health": COOLING})
    assert (record.chat_name, record.provider, record.status, record.timeout) == ("ep", "openai", "RUNNING", 60.0)
    assert record.fallbacks == ("other",) and record.config_digest == "abc" and record.updated_at == LATER
    assert record.health == Health("cooling_down", 3, 1700000000.5, "upstream_timeout", 1) and not record.health.ok
    assert record.workers == 1 and record.resources == {} and record.price is None
    assert record.spec["model"] == "m" and "chat_name" not in record.spec and "health" not in record.spec
    assert record.pending is None and record.pending_deploy is None and record.failure is None


def test_an_old_record_reads_with_defaults():
    record = EndpointRecord.from_dict(RECORDS["old-style"])
    assert (record.timeout, record.fallbacks, record.config_digest, record.created_at) == (60.0, (), "", None)
    assert record.health == Health() and record.health.ok
    assert EndpointRecord.from_dict(RECORDS["no status"]).status == "RUNNING"


def test_the_pending_deploy_is_typed():
    record = EndpointRecord.from_dict(RECORDS["an update under way"])
    deploy = record.pending_deploy
    assert deploy == PendingDeploy(id="d1", fresh=False, public=public(), digest="abc", started=1.0, deadline=301.0)
    assert deploy.workers == 1 and deploy.to_dict() == pending(fresh=False)


def test_health_keeps_the_registry_shapes():
    assert Health.from_dict(None) == Health() and Health.from_dict(None).to_dict() == SHORT_HEALTH
    assert Health.from_dict(SHORT_HEALTH).to_dict() == SHORT_HEALTH
    assert Health.from_dict(COOLING).to_dict() == COOLING
    full_ok = {"state": "ok", "consecutive_failures": 0, "cooldown_until": None, "last_error": None, "cooldowns": 0}
    assert Health.from_dict(full_ok).to_dict() == full_ok  # (the registry's view once it saw a success)
    assert Health(state="probing", last_error="x").to_dict() == {"state": "probing", "consecutive_failures": 0,
                                                                 "cooldown_until": None, "last_error": "x", "cooldowns": 0}


def test_a_changed_record_keeps_its_order_and_drops_what_ended():
    listed = EndpointRecord.from_dict({**settled(deploying()), "health": SHORT_HEALTH})
    cooled = listed.with_health(Health.from_dict(COOLING))
    assert cooled.to_dict() == {**settled(deploying()), "health": COOLING}
    assert list(cooled.to_dict()) == list(listed.to_dict())
    assert listed.to_dict() == {**settled(deploying()), "health": SHORT_HEALTH}  # (frozen: the original is unchanged)

    no_health = EndpointRecord.from_dict(settled(deploying()))
    assert list(no_health.with_health(Health.from_dict(COOLING)).to_dict())[-1] == "health"  # (added at the end)

    under_way = EndpointRecord.from_dict(settled(deploying())).updating(PendingDeploy.from_dict(pending(False)))
    assert under_way.to_dict() == {**settled(deploying()), "pending": pending(False)}
    import dataclasses

    done = dataclasses.replace(EndpointRecord.from_dict(deploying()), pending=None, status="RUNNING")
    assert "pending" not in done.to_dict() and done.to_dict()["status"] == "RUNNING"


def test_the_records_a_deploy_writes_are_the_dicts_it_always_wrote():
    p = PendingDeploy.from_dict(pending())
    assert EndpointRecord.deploying("ep", public(), "abc", p, NOW).to_dict() == deploying()
    assert list(EndpointRecord.deploying("ep", public(), "abc", p, NOW).to_dict()) == list(deploying())
    spec_public = {k: v for k, v in public().items() if k != "provider"}
    failed = EndpointRecord.failed("ep", "openai", spec_public, FAILURE, NOW)
    assert list(failed.to_dict().items()) == list(RECORDS["failed before it started"].items())
    assert list(EndpointRecord.adopted("ep", public(), NOW).to_dict().items()) == \
        list(RECORDS["a forgotten application"].items())


def test_a_record_made_here_shows_what_it_has():
    assert EndpointRecord("a", "openai").to_dict() == {"chat_name": "a", "provider": "openai", "status": "RUNNING"}
    made = EndpointRecord("a", "openai", fallbacks=("b",), spec={"model": "m"}).to_dict()
    assert made == {"chat_name": "a", "provider": "openai", "status": "RUNNING", "fallbacks": ["b"], "model": "m"}


# -- RegistryClient: the typed calls, awaited on a loop (a fake actor: no Ray) -----------------------------
class _Method:
    def __init__(self, answer) -> None:
        self.answer = answer

    def remote(self, *args):
        future = asyncio.get_running_loop().create_future()
        if self.answer is not _SILENT:
            future.set_result(self.answer(*args) if callable(self.answer) else self.answer)
        return future


_SILENT = object()


class _Cluster:
    def __init__(self, actor, lost: bool = False) -> None:
        self.actor, self.lost, self.closed, self.connected, self.ups = actor, lost, False, True, 0

    def ensure_up(self) -> None:
        self.ups += 1
        if self.lost:
            raise GatewayError("cluster_unavailable", "lost", retry_after=2)

    def registry(self):
        return self.actor


def test_the_client_types_what_the_actor_answers():
    actor = SimpleNamespace(get=_Method(lambda name: {**settled(deploying()), "health": COOLING}),
                            list=_Method([settled(deploying()), RECORDS["old-style"]]),
                            record_failure=_Method(COOLING), record_success=_Method(SHORT_HEALTH))
    client = RegistryClient(_Cluster(actor))

    async def run():
        record = await client.aget("ep")
        assert isinstance(record, EndpointRecord) and record.health.state == "cooling_down"
        assert await client.anames() == ["ep", "old"]
        assert await client.arecord_failure("ep", "upstream_timeout", False, 3, 60, 30) == Health.from_dict(COOLING)
        assert (await client.record_success_nowait("ep")).ok

    asyncio.run(run())


def test_a_silent_registry_is_unavailable_after_the_one_timeout_and_a_lost_cluster_at_once():
    client = RegistryClient(_Cluster(SimpleNamespace(get=_Method(_SILENT))), timeout_s=0.05)
    with pytest.raises(RegistryUnavailable) as info:
        asyncio.run(client.aget("ep"))
    assert info.value.type == "cluster_unavailable" and info.value.info.retry_after == 2

    lost = RegistryClient(_Cluster(SimpleNamespace(get=_Method(_SILENT)), lost=True), timeout_s=60)
    began = time.monotonic()
    with pytest.raises(GatewayError) as info:
        asyncio.run(lost.aget("ep"))
    assert not isinstance(info.value, RegistryUnavailable) and time.monotonic() - began < 1
    with pytest.raises(GatewayError):
        lost.record_success_nowait("ep")
