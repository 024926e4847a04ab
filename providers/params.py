"""What each of our sampling parameters becomes on a provider's wire: a parameter map, applied by one function.

Our parameters have OpenAI's names and ranges (``contract.calls.SamplingParams``). A provider whose
SDK takes other names or narrower ranges declares a ``ParamMap`` as data: our name -> ``Wire`` (the
provider's name, the top of its range, a transform), the way Portkey's providers declare theirs
(``temperature: {param, min, max}``). ``wire_params`` applies any map, and the provider's ``params``
(what ``Provider.check_call`` lets through; the rest is a 400) are the map's keys (``honoured``), so
what a provider takes and how it is sent are said once, in one place.

An OpenAI-wire provider (``providers.openai_wire``) has no map: its wire is ours, so its ``params``
set alone says what it honours, and a call's parameters go as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from contract.calls import SamplingParams


@dataclass(frozen=True)
class Wire:
    """Where one of our parameters goes on a provider's wire."""

    #: the provider's name for it; None: ours
    name: Optional[str] = None
    #: the top of the provider's range where it ends below ours: a larger value is sent as this
    at_most: Optional[float] = None
    #: what the value becomes on the wire (after ``at_most``)
    transform: Optional[Callable[[Any], Any]] = None


#: our parameter -> where it goes; a parameter a map lacks is one the provider does not take
ParamMap = Mapping[str, Wire]

#: sent under our name, as it is
SAME = Wire()


def as_list(value: Any) -> Any:
    """One string as a list of one (OpenAI's ``stop`` takes either; some SDKs only a list)."""
    return [value] if isinstance(value, str) else value


#: OpenAI's two names of the output limit, both sent as the provider's ``max_tokens``. In this order, so
#: that a call that gives both sends the newer one (``max_completion_tokens``), as ``SamplingParams.max_output``
MAX_TOKENS: ParamMap = {"max_tokens": Wire("max_tokens"), "max_completion_tokens": Wire("max_tokens")}


def honoured(param_map: ParamMap) -> frozenset:
    """The parameters ``param_map`` sends: a provider's ``params``. A name that is not one of ours is a typo."""
    unknown = sorted(set(param_map) - set(SamplingParams.model_fields))
    if unknown:
        raise ValueError(f"not sampling parameters: {unknown}")
    return frozenset(param_map)


def wire_params(params: SamplingParams, param_map: ParamMap) -> dict[str, Any]:
    """The parameters the caller gave, as the provider takes them, in ``param_map``'s order.

    Where two of our names go to one wire name, the later entry wins (``MAX_TOKENS``). A given
    parameter the map lacks is not sent: ``Provider.check_call`` refused it before the call got here.
    """
    out: dict[str, Any] = {}
    for ours, wire in param_map.items():
        value = getattr(params, ours)
        if value is None:
            continue
        if wire.at_most is not None:
            value = min(value, wire.at_most)
        if wire.transform is not None:
            value = wire.transform(value)
        out[wire.name or ours] = value
    return out
