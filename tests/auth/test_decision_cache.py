"""The decision cache: bounded, least recently used first out, each answer for
its own time."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from conveyor.shared.auth import AuthorizationResult, DecisionCache, Principal, Resource
from conveyor.shared.errors import UnavailableError
from tests.auth.support import ALICE, MALLORY, ManualClock

MODEL = Resource(type="registry.conveyor.dev/Model", name="models/fraud", owner_team="team-a")


def answer(allowed: bool = True, ttl: float = 5.0, decision: str = "d1") -> AuthorizationResult:
    return AuthorizationResult(
        allowed=allowed,
        decision_id=decision,
        policy_ids=("p",),
        reasons=("because",),
        cache_ttl=timedelta(seconds=ttl),
    )


def key(principal: Principal = ALICE, name: str = "models/fraud") -> tuple[object, ...]:
    resource = Resource(type=MODEL.type, name=name, owner_team="team-a")
    return DecisionCache.key(principal, "registry.GetModel", resource, {"authn_method": "jwt"})


def test_the_least_recently_used_answer_goes_first() -> None:
    cache = DecisionCache(2, timedelta(seconds=10), clock=ManualClock())
    cache.put(key(name="models/a"), answer(decision="a"))
    cache.put(key(name="models/b"), answer(decision="b"))
    assert cache.get(key(name="models/a")) is not None  # a is now the most recent
    cache.put(key(name="models/c"), answer(decision="c"))

    assert len(cache) == 2
    assert cache.get(key(name="models/b")) is None
    assert cache.get(key(name="models/a")) == answer(decision="a")
    assert cache.get(key(name="models/c")) == answer(decision="c")


def test_an_answer_expires_after_its_own_ttl_capped_by_the_maximum() -> None:
    clock = ManualClock()
    cache = DecisionCache(10, timedelta(seconds=5), clock=clock)
    cache.put(key(name="models/short"), answer(ttl=1))
    cache.put(key(name="models/long"), answer(ttl=60))  # kept 5 s at most
    cache.put(key(name="models/given"), answer(ttl=60), timedelta(seconds=3))

    clock.advance(0.9)
    assert cache.get(key(name="models/short")) is not None
    clock.advance(0.1)
    assert cache.get(key(name="models/short")) is None
    clock.advance(1.9)
    assert cache.get(key(name="models/given")) is not None
    clock.advance(0.1)
    assert cache.get(key(name="models/given")) is None
    assert cache.get(key(name="models/long")) is not None
    clock.advance(2.0)
    assert cache.get(key(name="models/long")) is None
    assert len(cache) == 0


def test_nothing_is_kept_without_a_ttl_or_room() -> None:
    cache = DecisionCache(10, timedelta(seconds=5), clock=ManualClock())
    cache.put(key(), answer(ttl=0))
    assert cache.get(key()) is None
    no_maximum = DecisionCache(10, timedelta(0), clock=ManualClock())
    no_maximum.put(key(), answer(ttl=5))
    assert no_maximum.get(key()) is None
    no_room = DecisionCache(0, timedelta(seconds=5), clock=ManualClock())
    no_room.put(key(), answer())
    assert no_room.get(key()) is None


def test_each_part_of_the_question_is_in_the_key() -> None:
    base = DecisionCache.key(ALICE, "registry.GetModel", MODEL, {"authn_method": "jwt"})
    others = [
        DecisionCache.key(MALLORY, "registry.GetModel", MODEL, {"authn_method": "jwt"}),
        DecisionCache.key(ALICE, "registry.UpdateModel", MODEL, {"authn_method": "jwt"}),
        DecisionCache.key(
            ALICE,
            "registry.GetModel",
            Resource(type=MODEL.type, name=MODEL.name, owner_team="team-b"),
            {"authn_method": "jwt"},
        ),
        DecisionCache.key(
            ALICE,
            "registry.GetModel",
            Resource(type=MODEL.type, name=MODEL.name, owner_team="team-a", attributes={"x": 1}),
            {"authn_method": "jwt"},
        ),
        DecisionCache.key(ALICE, "registry.GetModel", MODEL, {"authn_method": "mtls"}),
        DecisionCache.key(
            Principal(kind="user", id="alice", roles=("approver",), team="team-a"),
            "registry.GetModel",
            MODEL,
            {"authn_method": "jwt"},
        ),
    ]
    assert all(other != base for other in others)
    assert len(set(others)) == len(others)
    same = DecisionCache.key(ALICE, "registry.GetModel", MODEL, {"authn_method": "jwt"})
    assert same == base


async def test_concurrent_misses_for_one_question_share_one_request() -> None:
    cache = DecisionCache(10, timedelta(seconds=10), clock=ManualClock())
    release = asyncio.Event()
    asked: list[str] = []

    async def ask() -> AuthorizationResult:
        asked.append("policy")
        await release.wait()
        return answer(decision="shared")

    waiters = [asyncio.create_task(cache.get_or_fetch(key(), ask)) for _ in range(8)]
    other = asyncio.create_task(cache.get_or_fetch(key(name="models/other"), ask))
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*waiters, other)

    assert asked == ["policy", "policy"]  # one per distinct question
    assert {r.decision_id for r in results} == {"shared"}
    assert await cache.get_or_fetch(key(), ask) == answer(decision="shared")  # now cached
    assert len(asked) == 2


async def test_a_failed_request_fails_every_waiter_and_is_not_kept() -> None:
    cache = DecisionCache(10, timedelta(seconds=10), clock=ManualClock())
    calls = 0

    async def unreachable() -> AuthorizationResult:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        raise UnavailableError("policy is down", reason="POLICY_UNAVAILABLE")

    outcomes = await asyncio.gather(
        *(cache.get_or_fetch(key(), unreachable) for _ in range(4)), return_exceptions=True
    )
    assert calls == 1
    assert all(isinstance(o, UnavailableError) for o in outcomes)
    with pytest.raises(UnavailableError):
        await cache.get_or_fetch(key(), unreachable)  # asked again, not a cached failure
    assert calls == 2


async def test_a_cancelled_waiter_does_not_cancel_the_others() -> None:
    cache = DecisionCache(10, timedelta(seconds=10), clock=ManualClock())
    release = asyncio.Event()

    async def ask() -> AuthorizationResult:
        await release.wait()
        return answer()

    first = asyncio.create_task(cache.get_or_fetch(key(), ask))
    second = asyncio.create_task(cache.get_or_fetch(key(), ask))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert (await second) == answer()
    with pytest.raises(asyncio.CancelledError):
        await first
