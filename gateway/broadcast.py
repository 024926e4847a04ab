"""Fan-out (``POST /chat/broadcast``): one call to every endpoint named, each through the dispatcher like any call.

Each endpoint costs the caller's key a call and a seat of the bulkhead, as any call: these
functions only start the calls (``Dispatcher.chat`` / ``Dispatcher.stream``) at once and gather
their answers, whole (``gather``) or merged as their events come (``merged``).
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Optional

from contract.calls import ChatCall
from contract.errors import ErrorInfo, GatewayError
from contract.events import Failure, Finish, StreamEvent

if TYPE_CHECKING:
    from .dispatch import Outcome
    from .endpoint_cache import Endpoint
    from .limits import Caller
    from .streams import Stream

log = logging.getLogger("gateway.dispatch")

#: a streamed broadcast with nothing to say this long yields None (an SSE comment goes out)
_KEEPALIVE_S = 10.0


async def merged(stream: Callable[..., Awaitable["Stream"]], chat_names: list[str], make_call: Callable[[str], ChatCall],
                 caller: Optional["Caller"] = None
                 ) -> AsyncIterator[Optional[tuple[str, StreamEvent, Optional["Endpoint"]]]]:
    """Stream from every endpoint at once (``stream``: the dispatcher's), merged as the events come:
    ``(chat_name, event, endpoint)``, and ``None`` after ``_KEEPALIVE_S`` without any (time for the
    caller to write a keep-alive).

    Each name ends with exactly one ``Finish`` or ``Failure`` (a name that could not open its
    stream: its error as a ``Failure``, with no endpoint). Closing the iterator (the client
    left) cancels every stream, which cancels the replicas' (and upstream) streams.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(name: str, call: ChatCall) -> None:
        opened, ended = None, False
        try:
            opened = await stream(name, call, caller=caller)
            async for event in opened:
                ended = isinstance(event, (Finish, Failure))
                queue.put_nowait((name, event, opened.endpoint))
        except GatewayError as err:
            ended = True
            queue.put_nowait((name, Failure(err.info), None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one endpoint's failure ends its column, not the others
            log.error("broadcast stream of %s failed: %s", name, type(exc).__name__)
        finally:
            if opened is not None:
                await opened.aclose()
            if not ended:  # (whatever happened, the column ends)
                queue.put_nowait((name, Failure(ErrorInfo(type="internal_error", message="the gateway failed; see its log")), None))

    pumps = [asyncio.ensure_future(pump(name, make_call(name))) for name in chat_names]
    left = len(pumps)
    try:
        while left:
            try:
                item = await asyncio.wait_for(queue.get(), _KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield None  # nothing for a while: the caller may write a keep-alive
                continue
            if isinstance(item[1], (Finish, Failure)):
                left -= 1
            yield item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def gather(chat: Callable[..., Awaitable["Outcome"]], chat_names: list[str], make_call: Callable[[str], ChatCall],
                 caller: Optional["Caller"] = None) -> dict[str, Any]:
    """Ask every endpoint at once (``chat``: the dispatcher's); answers per name (an ``Outcome`` or the
    ``GatewayError`` it failed with), in the time of the slowest."""
    answers = await asyncio.gather(*(chat(name, make_call(name), caller=caller) for name in chat_names),
                                   return_exceptions=True)
    out: dict[str, Any] = {}
    for name, answer in zip(chat_names, answers):
        if isinstance(answer, BaseException) and not isinstance(answer, GatewayError):
            raise answer
        out[name] = answer
    return out
