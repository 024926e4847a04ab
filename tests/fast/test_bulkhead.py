"""The bulkhead's policy, on an event loop, without Ray: calls counted, shares, the bounded wait."""
from __future__ import annotations

import asyncio

from gateway.bulkhead import Bulkhead


def run(coro):
    return asyncio.run(coro)


async def fill(bulkhead: Bulkhead, name: str, tries: int) -> int:
    got = 0
    for _ in range(tries):
        got += await bulkhead.take(name)
    return got


def test_one_hung_endpoint_takes_three_quarters_and_two_still_leave_the_rest_a_share():
    async def main():
        b = Bulkhead(seats=1000, total=100)
        assert await fill(b, "hung1", 200) == 75  # three quarters of the process
        assert await fill(b, "hung2", 200) == 18  # three quarters of what hung1 left
        healthy = await fill(b, "healthy", 200)
        assert healthy >= 1 and b.held() < 100  # something is always left for the next endpoint
        assert await fill(b, "another", 1) == 1
    run(main())


def test_the_endpoint_cap_holds_below_the_share():
    async def main():
        b = Bulkhead(seats=10, total=100)
        assert await fill(b, "a", 50) == 10
        assert await fill(b, "b", 50) == 10
    run(main())


def test_a_call_past_the_seats_waits_its_turn_and_is_seated_when_one_is_given_back():
    async def main():
        b = Bulkhead(seats=2, total=100, queue=4, wait_s=5)
        assert await fill(b, "a", 2) == 2
        waiter = asyncio.ensure_future(b.take("a"))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        b.give_back("a")
        assert await asyncio.wait_for(waiter, 1) is True
        assert b.in_flight("a") == 2
    run(main())


def test_the_wait_is_bounded_in_time_and_in_length():
    async def main():
        b = Bulkhead(seats=1, total=100, queue=2, wait_s=0.2)
        assert await b.take("a")
        waiting = [asyncio.ensure_future(b.take("a")) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert await b.take("a") is False  # the queue is full: refused at once
        assert await asyncio.gather(*waiting) == [False, False]  # no seat within 0.2 s
        assert b.in_flight("a") == 1
        assert await b.take("b")  # other endpoints never waited
    run(main())


def test_a_caller_that_leaves_while_waiting_holds_no_seat():
    async def main():
        b = Bulkhead(seats=1, total=100, queue=2, wait_s=5)
        assert await b.take("a")
        waiter = asyncio.ensure_future(b.take("a"))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        b.give_back("a")
        assert b.in_flight("a") == 0 and b.held() == 0
        assert await b.take("a")
    run(main())


def test_no_wait_means_refused_at_once():
    async def main():
        b = Bulkhead(seats=1, total=100, queue=0, wait_s=2)
        assert await b.take("a") and await b.take("a") is False
    run(main())
