"""What a chat call becomes: validation of the bodies, the parameters each provider takes, the SDK kwargs."""
from __future__ import annotations

import pytest

from contract.errors import GatewayError
from contract.calls import ChatCall, Message, SamplingParams
from gateway.schemas import ChatRequest, BroadcastRequest, validate
from providers.params import MAX_TOKENS, SAME, Wire, honoured, wire_params
from providers.qwen_provider import QWEN_PARAMS, QwenAdapter, QwenDeploySpec, QwenProvider
from providers.zhipu_provider import ZHIPU_PARAMS, ZhipuAdapter, ZhipuDeploySpec, ZhipuProvider

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]


def call(**params) -> ChatCall:
    return ChatCall(request_id="req-1", messages=[Message(role="user", content="hi")], params=SamplingParams(**params))


@pytest.fixture(scope="module")
def zhipu():
    return ZhipuAdapter(ZhipuDeploySpec(chat_name="a", model_name="glm-4", api_key="id.secret"))


@pytest.fixture(scope="module")
def qwen():
    return QwenAdapter(QwenDeploySpec(chat_name="a", model_name="qwen-max", api_key="sk-qwen-key", timeout=12.5))


# -- the SDK kwargs ----------------------------------------------------------------------
def test_zhipu_request_of_a_plain_call(zhipu):
    assert zhipu._request(call()) == {"model": "glm-4", "messages": [{"role": "user", "content": "hi"}],
                                      "request_id": "req-1"}


def test_qwen_request_of_a_plain_call(qwen):
    assert qwen._request(call()) == {
        "model": "qwen-max", "messages": [{"role": "user", "content": "hi"}], "result_format": "message",
        "api_key": "sk-qwen-key", "base_address": "https://dashscope.aliyuncs.com/api/v1",
        "request_timeout": 13, "headers": {"X-Request-Id": "req-1"},
    }


@pytest.mark.parametrize("given, zhipu_sent, qwen_sent", [
    (0.0, 0.0, 0.0), (0.7, 0.7, 0.7), (1.5, 1.0, 1.5), (2.0, 1.0, 1.99),
])
def test_temperature_is_capped_to_each_providers_range(zhipu, qwen, given, zhipu_sent, qwen_sent):
    assert zhipu._request(call(temperature=given))["temperature"] == zhipu_sent
    assert qwen._request(call(temperature=given))["temperature"] == qwen_sent


@pytest.mark.parametrize("params, max_tokens", [
    ({"max_tokens": 5}, 5),
    ({"max_completion_tokens": 7}, 7),
    ({"max_tokens": 5, "max_completion_tokens": 7}, 7),  # the newer name wins
])
def test_max_tokens_under_either_name(zhipu, qwen, params, max_tokens):
    assert zhipu._request(call(**params))["max_tokens"] == max_tokens
    assert qwen._request(call(**params))["max_tokens"] == max_tokens


@pytest.mark.parametrize("stop, sent", [("END", ["END"]), (["a", "b"], ["a", "b"])])
def test_stop_is_always_a_list(zhipu, qwen, stop, sent):
    assert zhipu._request(call(stop=stop))["stop"] == sent
    assert qwen._request(call(stop=stop))["stop"] == sent


def test_zhipu_sends_user_as_user_id_and_passes_tools_through(zhipu):
    sent = zhipu._request(call(user="u-42", tools=TOOLS, tool_choice="auto", seed=7, top_p=0.9,
                               response_format={"type": "json_object"}))
    assert sent["user_id"] == "u-42" and "user" not in sent
    assert sent["tools"] == TOOLS and sent["tool_choice"] == "auto"
    assert sent["seed"] == 7 and sent["top_p"] == 0.9 and sent["response_format"] == {"type": "json_object"}


def test_qwen_passes_tools_through(qwen):
    sent = qwen._request(call(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "lookup"}}, seed=1))
    assert sent["tools"] == TOOLS
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert sent["seed"] == 1


def test_unset_parameters_are_not_sent(zhipu, qwen):
    for sent in (zhipu._request(call()), qwen._request(call())):
        assert not {"temperature", "top_p", "max_tokens", "stop", "seed", "tools", "tool_choice", "user_id"} & set(sent)


def test_qwen_sends_its_base_url_and_a_whole_second_timeout():
    adapter = QwenAdapter(QwenDeploySpec(chat_name="a", model_name="m", api_key="k", base_url="http://relay:8/api/v1/",
                                         timeout=0.2))
    sent = adapter._request(call())
    assert sent["base_address"] == "http://relay:8/api/v1" and sent["request_timeout"] == 1


# -- what each provider supports ----------------------------------------------------------------
@pytest.mark.parametrize("provider, params, refused", [
    (QwenProvider(), {"user": "u"}, ["user"]),
    (QwenProvider(), {"temperature": 1, "user": "u", "tools": TOOLS}, ["user"]),
    (QwenProvider(), {"temperature": 1, "seed": 3, "tools": TOOLS, "stop": "x"}, []),
    (ZhipuProvider(), {"user": "u", "tools": TOOLS, "tool_choice": "auto", "seed": 1}, []),
])
def test_check_call_refuses_what_a_provider_cannot_do(provider, params, refused):
    if not refused:
        provider.check_call(call(**params))
        return
    with pytest.raises(GatewayError) as info:
        provider.check_call(call(**params))
    assert info.value.type == "invalid_request"
    assert info.value.info.fields == refused
    assert f"the {provider.name} provider does not support: {', '.join(refused)}" == info.value.info.message


def test_a_provider_with_the_base_parameters_only_names_every_one_it_refuses():
    from providers.base import Provider

    class Bare(Provider):
        name = "bare"
        spec_class = None

        def create_adapter(self, spec):  # pragma: no cover - never built here
            raise AssertionError

    with pytest.raises(GatewayError) as info:
        Bare().check_call(call(seed=1, user="u", tools=TOOLS, temperature=0.5))
    assert info.value.info.fields == ["seed", "tools", "user"]


@pytest.mark.parametrize("body, key", [
    ({"chat_name": "a", "model_name": "glm-4", "api_key": "nodot"}, "api_key"),
    ({"chat_name": "a", "model_name": "glm-4", "api_key": "a.b.c"}, "api_key"),
])
def test_a_zhipu_key_is_id_dot_secret(body, key):
    with pytest.raises(GatewayError) as info:
        validate(ZhipuDeploySpec, body)
    assert info.value.info.fields == [key]
    assert body["api_key"] not in info.value.info.message


def test_qwen_takes_no_proxy():
    with pytest.raises(GatewayError) as info:
        validate(QwenDeploySpec, {"chat_name": "a", "model_name": "m", "api_key": "k", "proxy": "http://p:3128"})
    assert "HTTPS_PROXY" in info.value.info.message



# -- each provider's parameter map (``providers.params``) ------------------------------------------
#: what each of our parameters becomes on each provider's wire: (ours, given, zhipu's (name, value), qwen's)
WIRE_TABLE = [
    ("temperature", 0.0, ("temperature", 0.0), ("temperature", 0.0)),
    ("temperature", 1.5, ("temperature", 1.0), ("temperature", 1.5)),
    ("temperature", 2.0, ("temperature", 1.0), ("temperature", 1.99)),
    ("top_p", 0.9, ("top_p", 0.9), ("top_p", 0.9)),
    ("max_tokens", 5, ("max_tokens", 5), ("max_tokens", 5)),
    ("max_completion_tokens", 7, ("max_tokens", 7), ("max_tokens", 7)),
    ("stop", "END", ("stop", ["END"]), ("stop", ["END"])),
    ("stop", ["a", "b"], ("stop", ["a", "b"]), ("stop", ["a", "b"])),
    ("user", "u-42", ("user_id", "u-42"), None),  # Qwen: refused (below), never sent
    ("seed", 7, ("seed", 7), ("seed", 7)),
    ("response_format", {"type": "json_object"}, ("response_format", {"type": "json_object"}),
     ("response_format", {"type": "json_object"})),
    ("tools", TOOLS, ("tools", TOOLS), ("tools", TOOLS)),
    ("tool_choice", "auto", ("tool_choice", "auto"), ("tool_choice", "auto")),
]


@pytest.mark.parametrize("ours, given, zhipu_sent, qwen_sent", WIRE_TABLE)
def test_each_parameter_on_each_providers_wire(ours, given, zhipu_sent, qwen_sent):
    for param_map, sent in ((ZHIPU_PARAMS, zhipu_sent), (QWEN_PARAMS, qwen_sent)):
        assert wire_params(SamplingParams(**{ours: given}), param_map) == (dict([sent]) if sent else {})


def test_the_wire_table_covers_every_parameter():
    assert {row[0] for row in WIRE_TABLE} == set(SamplingParams.model_fields)


@pytest.mark.parametrize("provider, param_map, refused", [
    (ZhipuProvider(), ZHIPU_PARAMS, set()),
    (QwenProvider(), QWEN_PARAMS, {"user"}),
])
def test_a_provider_honours_its_maps_parameters_and_refuses_the_rest(provider, param_map, refused):
    assert provider.params == frozenset(param_map) == set(SamplingParams.model_fields) - refused
    for name in refused:
        with pytest.raises(GatewayError) as info:
            provider.check_call(call(**{name: next(given for ours, given, *_ in WIRE_TABLE if ours == name)}))
        assert info.value.info.fields == [name]


def test_both_output_limits_send_the_newer_one_whatever_the_map_order():
    both = SamplingParams(max_tokens=5, max_completion_tokens=7)
    assert wire_params(both, MAX_TOKENS) == {"max_tokens": 7} == {"max_tokens": both.max_output()}


def test_a_parameter_a_map_lacks_is_not_sent_and_a_map_names_only_our_parameters():
    assert wire_params(SamplingParams(user="u", seed=1), {"seed": SAME}) == {"seed": 1}
    assert wire_params(SamplingParams(temperature=0.5), {"temperature": Wire("temp", at_most=0.2, transform=str)}) == \
        {"temp": "0.2"}
    with pytest.raises(ValueError, match="temprature"):
        honoured({"temprature": SAME})


# -- validation of the chat bodies ------------------------------------------------------------
def invalid(model, data) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        validate(model, data)
    assert info.value.type == "invalid_request"
    return info.value


def test_an_unknown_field_says_what_was_meant():
    err = invalid(ChatRequest, {"chat_name": "a", "content": "hi", "temprature": 0.5})
    assert err.info.message == "unknown field: 'temprature' (did you mean 'temperature'?)"
    assert err.info.fields == ["temprature"]


def test_an_unknown_field_without_a_close_name_lists_the_fields():
    err = invalid(ChatRequest, {"chat_name": "a", "content": "hi", "zzz": 1})
    assert err.info.message.startswith("unknown field: 'zzz'; the fields are: ")
    assert "chat_name" in err.info.message and "messages" in err.info.message


def test_a_missing_chat_name_says_what_it_takes():
    err = invalid(ChatRequest, {"content": "hi"})
    assert err.info.message == "chat_name is required: the endpoint's name (GET /v1/models lists the ones you may use)"
    assert err.info.fields == ["chat_name"]


@pytest.mark.parametrize("data, says", [
    ({"chat_name": "a"}, "content or messages is required"),
    ({"chat_name": "a", "zzz": 1}, "content or messages is required"),  # also after an unknown field
    ({"chat_name": "a", "content": "x", "messages": [{"role": "user", "content": "x"}]}, "not both"),
    ({"chat_name": "a", "messages": []}, "'messages' is empty"),
    ({"chat_name": "a", "content": "x", "stop": ["1", "2", "3", "4", "5"]}, "stop takes 1 to 4 strings"),
    ({"chat_name": "a", "content": "x", "stop": []}, "stop takes 1 to 4 strings"),
    ({"chat_name": "-a", "content": "x"}, "chat_name: 1-64 letters, digits"),
    ({"chat_name": "a", "content": "x", "temperature": 2.5}, "temperature"),
    ({"chat_name": "a", "messages": [{"role": "user"}]}, "a message needs content"),
])
def test_chat_request_refusals(data, says):
    assert says in invalid(ChatRequest, data).info.message


def test_a_four_item_stop_list_is_fine():
    assert validate(ChatRequest, {"chat_name": "a", "content": "x", "stop": ["1", "2", "3", "4"]}).stop == ["1", "2", "3", "4"]


def test_validation_never_echoes_the_input():
    secret = "sk-this-is-a-secret-0123456789"
    err = invalid(ChatRequest, {"chat_name": "a", "content": "x", "temperature": secret, "api_key": secret})
    assert secret not in err.info.message
    assert "unknown field: 'api_key'" in err.info.message


def test_a_body_that_is_not_an_object():
    assert "JSON object" in invalid(ChatRequest, ["chat_name"]).info.message


def test_broadcast_names_each_endpoint_once():
    assert "lists an endpoint twice" in invalid(BroadcastRequest, {"chat_names": ["a", "a"], "content": "x"}).info.message


def test_content_becomes_one_user_message():
    request = validate(ChatRequest, {"chat_name": "a", "content": "hi", "temperature": 0.3, "max_tokens": 9})
    made = request.to_call("r")
    assert made.messages == [Message(role="user", content="hi")]
    assert made.params.given() == {"temperature", "max_tokens"}


# -- the OpenAI-compatible request -------------------------------------------------------------------
try:
    from gateway.openai_compat import CompletionRequest
except ImportError:  # pragma: no cover - renamed while others edit it
    CompletionRequest = None

needs_compat = pytest.mark.skipif(CompletionRequest is None, reason="gateway.openai_compat.CompletionRequest is gone")
OK_MESSAGES = [{"role": "user", "content": "x"}]


@needs_compat
@pytest.mark.parametrize("field, value, only", [
    ("n", 2, 1), ("presence_penalty", 0.5, 0), ("frequency_penalty", -1, 0),
])
def test_compat_parameters_the_gateway_cannot_honour_are_refused(field, value, only):
    err = invalid(CompletionRequest, {"model": "a", "messages": OK_MESSAGES, field: value})
    assert err.info.message == f"{field} is not supported by this gateway (leave it out, or send {only})"
    assert err.info.fields == [field]


@needs_compat
def test_compat_nulls_are_not_given_and_the_only_values_pass():
    request = validate(CompletionRequest, {"model": "a", "messages": OK_MESSAGES, "n": 1, "presence_penalty": 0,
                                           "temperature": None, "user": None})
    assert request.to_call("r").params.given() == set()


@needs_compat
def test_compat_missing_model_says_what_it_takes():
    err = invalid(CompletionRequest, {"messages": OK_MESSAGES})
    assert err.info.message == "model is required: the endpoint's chat_name (GET /v1/models lists them)"


@needs_compat
def test_compat_content_parts_are_joined_and_function_is_tool():
    request = validate(CompletionRequest, {"model": "a", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "function", "content": "r", "tool_call_id": "t"}]})
    made = request.to_call("r")
    assert [(m.role, m.content) for m in made.messages] == [("user", "ab"), ("tool", "r")]


@needs_compat
def test_compat_image_parts_are_refused():
    request = validate(CompletionRequest, {"model": "a", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]})
    with pytest.raises(GatewayError) as info:
        request.to_call("r")
    assert info.value.info.fields == ["messages"] and "'image_url'" in info.value.info.message
