"""/openapi.json and /docs: the pydantic models (`server.schemas`) describe what the server really accepts and
answers: real responses validate against the response models, the request bodies the server accepts validate
against the request models, and each route's OpenAPI operation points at them."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from dsv4_ascend.engine import Engine  # noqa: E402
from dsv4_ascend.server import BackgroundServer, create_app  # noqa: E402
from dsv4_ascend.server import schemas as sc  # noqa: E402

NAME = "tiny"
TIMEOUT = 120.0
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
REQUESTS = [  # (path, body, request model, response model): bodies as the tests of each feature send them
    ("/v1/completions", {"model": NAME, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "logprobs": 2,
                         "echo": True, "seed": 3, "stop": ["zz"]}, sc.CompletionRequest, sc.CompletionResponse),
    ("/v1/completions", {"model": NAME, "prompt": [[0, 5, 6], "Hi"], "max_tokens": 2, "n": 2, "best_of": 3,
                         "prompt_logprobs": 1, "presence_penalty": 0.5, "logit_bias": {"7": -5}},
     sc.CompletionRequest, sc.CompletionResponse),
    ("/v1/chat/completions", {"model": NAME, "messages": MSGS, "max_tokens": 3, "logprobs": True, "top_logprobs": 2,
                              "thinking": True, "tool_choice": "auto", "response_format": {"type": "text"}},
     sc.ChatCompletionRequest, sc.ChatCompletionResponse),
    ("/v1/chat/completions", {"model": NAME, "messages": MSGS, "max_tokens": 3, "n": 2, "seed": 1,
                              "structured_outputs": {"choice": ["yes", "no"]}, "bad_words": ["zz"]},
     sc.ChatCompletionRequest, sc.ChatCompletionResponse),
    ("/tokenize", {"messages": MSGS, "add_generation_prompt": False, "return_token_strs": True}, sc.TokenizeRequest,
     sc.TokenizeResponse),
    ("/tokenize", {"prompt": "Hello", "add_special_tokens": False}, sc.TokenizeRequest, sc.TokenizeResponse),
    ("/detokenize", {"tokens": [5, 6, 7]}, sc.DetokenizeRequest, sc.DetokenizeResponse),
]


@pytest.fixture(scope="module")
def server(served_tiny):
    model, tok, _ = served_tiny
    srv = BackgroundServer(create_app(Engine(model, max_slots=4, max_seq_len=128), tok, served_model_name=NAME,
                                      api_key="k")).start()
    yield srv
    srv.stop(60)


def test_openapi_document_and_docs_page(server):
    doc = httpx.get(server.url + "/openapi.json", timeout=TIMEOUT).json()  # no API key needed, as /health
    schemas = doc["components"]["schemas"]
    for path, _, request, response in REQUESTS:
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + request.__name__)
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/" + response.__name__)
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert {"echo", "n", "best_of", "prompt_logprobs", "prompt"} <= set(schemas["CompletionRequest"]["properties"])
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert {"n", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
            "bad_words"} <= set(chat)
    assert chat["temperature"]["anyOf"][0]["maximum"] == 2  # the bounds the server enforces are documented
    assert "text/event-stream" in doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(doc["paths"]["/health"]) == {"get"}  # HEAD answers but is not a second operation
    assert httpx.head(server.url + "/health", timeout=TIMEOUT).status_code == 200
    page = httpx.get(server.url + "/docs", timeout=TIMEOUT)
    assert page.status_code == 200 and "/openapi.json" in page.text


def test_real_requests_and_responses_match_the_models(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT, headers={"Authorization": "Bearer k"}) as h:
        for path, body, request, response in REQUESTS:
            request.model_validate(body)
            r = h.post(path, json=body)
            assert r.status_code == 200, r.text
            response.model_validate(r.json())
        sc.ModelList.model_validate(h.get("/v1/models").json())
        sc.ModelCard.model_validate(h.get(f"/v1/models/{NAME}").json())
        sc.VersionResponse.model_validate(h.get("/version").json())
        bad = h.post("/v1/completions", json={"model": NAME, "prompt": "Hi", "n": 0})
        assert bad.status_code == 400 and sc.ErrorResponse.model_validate(bad.json()).error.param == "n"
