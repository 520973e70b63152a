"""The HTTP layer (protocol, validation, auth, limits, SSE, metrics) against a fake tokenizer
manager: fast, no engine process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cubeserve.engine.io_struct import EngineStats, GenerateReqInput
from cubeserve.engine.tokenizer_manager import EngineDeadError
from cubeserve.server.context import ModelInfo, ServingContext
from cubeserve.server.http_server import create_app
from cubeserve.server.limits import AdmissionControl
from cubeserve.server.metrics import ServerMetrics, ThroughputMeter
from cubeserve.server_args import ServerArgs

MODEL = "fake-model"
CONTEXT_LENGTH = 64
MAX_RUNNING = 2
MAX_QUEUED = 2
API_KEY = "sk-test-key"


class FakeManager:
    """Emits one token per step: id 100 + step, text " w<step>", logprob -0.5 * (step + 1).

    A prompt containing "hang" blocks until ``release`` is set; "bad" raises ValueError like
    the real manager does for invalid sampling params; "dead" raises EngineDeadError; "full"
    ends at once with the abort the engine sends when its waiting queue is full.
    """

    def __init__(self) -> None:
        self.requests: list[GenerateReqInput] = []
        self.aborted: list[str] = []
        self.release = asyncio.Event()
        self.started_hanging = asyncio.Event()
        self.dead = False

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    def token_text(self, token_id: int) -> str:
        return f" w{token_id - 100}"

    async def get_stats(self) -> EngineStats:
        if self.dead:
            raise EngineDeadError("the engine process died (exit code -9)")
        return EngineStats(
            num_running_reqs=1, num_waiting_reqs=2, kv_pool_capacity_tokens=1000, kv_pool_used_tokens=250,
            prefix_cache_hit_tokens=30, prefix_cache_query_tokens=120, generated_tokens_total=500,
            num_retracted_reqs=3,
        )

    async def generate_request(self, obj: GenerateReqInput) -> AsyncIterator[dict[str, Any]]:
        self.requests.append(obj)
        prompt = obj.text or json.dumps(obj.messages) if obj.input_ids is None else ""
        if "bad" in prompt:
            raise ValueError("temperature must be >= 0, got -1")
        if "dead" in prompt:
            raise EngineDeadError("the engine process died (exit code -9)")
        if "hang" in prompt:
            self.started_hanging.set()
            await self.release.wait()
        if "full" in prompt:
            full = {"type": "abort", "matched": None, "message": "the waiting queue is full (2 requests)",
                    "status_code": 503}
            meta = {"id": obj.rid, "prompt_tokens": 1, "completion_tokens": 0, "cached_tokens": 0, "finish_reason": full}
            yield {"text": "", "delta": "", "output_ids": [], "index": 0, "meta_info": meta}
            return
        params = obj.sampling_params
        n, max_new = params.get("n", 1), params.get("max_new_tokens", 3)
        prompt_tokens = len(obj.input_ids) if obj.input_ids is not None else len(prompt.split())
        finished = False
        try:
            for step in range(max_new):
                for index in range(n):
                    yield self._chunk(obj, index, step, max_new, prompt_tokens)
                await asyncio.sleep(0)
            finished = True
        finally:
            if not finished:  # like the real manager: closing the iterator early aborts
                self.aborted.append(obj.rid)

    def _chunk(self, obj: GenerateReqInput, index: int, step: int, max_new: int, prompt_tokens: int) -> dict:
        ids = [100 + i for i in range(step + 1)]
        meta: dict[str, Any] = {
            "id": obj.rid, "prompt_tokens": prompt_tokens, "completion_tokens": step + 1, "cached_tokens": 1,
            "finish_reason": {"type": "length", "matched": None} if step + 1 == max_new else None,
        }
        if obj.return_logprob:
            meta["output_token_logprobs"] = [(-0.5 * (i + 1), 100 + i, None) for i in range(step + 1)]
            meta["output_top_logprobs"] = [
                [(-0.5 * (i + 1), 100 + i, None), (-3.0, 199, None)][: obj.top_logprobs_num] for i in range(step + 1)
            ]
        return {
            "text": "".join(f" w{i}" for i in range(step + 1)), "delta": f" w{step}", "output_ids": ids,
            "index": index, "meta_info": meta,
        }


def make_app(manager: FakeManager, **server_args: Any):
    args = ServerArgs(max_queued_requests=MAX_QUEUED, **server_args)
    model = ModelInfo(name=MODEL, path="/models/fake", dtype="float32", context_length=CONTEXT_LENGTH,
                      kv_capacity_tokens=1000, max_running_requests=MAX_RUNNING)
    ctx = ServingContext(manager=manager, model=model, metrics=ServerMetrics(),
                         admission=AdmissionControl(MAX_RUNNING + MAX_QUEUED))
    return create_app(ctx, args)


def run(scenario, **server_args: Any) -> Any:
    """Runs ``scenario(client, manager)`` against a fresh app."""

    async def main() -> Any:
        manager = FakeManager()
        transport = httpx.ASGITransport(app=make_app(manager, **server_args))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await scenario(client, manager)

    return asyncio.run(main())


def request(method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def scenario(client: httpx.AsyncClient, _: FakeManager) -> httpx.Response:
        return await client.request(method, path, **kwargs)

    return run(scenario, **kwargs.pop("server_args", {}))


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], **fields}


def sse_events(response: httpx.Response) -> list[Any]:
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"] and error["type"]
    return error


# --------------------------------------------------------------------------- responses


def test_chat_completion_fields_and_usage():
    body = request("POST", "/v1/chat/completions", json=chat(max_tokens=3)).json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": " w0 w1 w2"}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 1}}


def test_chat_request_reaches_manager_as_sampling_params():
    async def scenario(client, manager):
        fields = dict(max_completion_tokens=2, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, seed=7,
                      repetition_penalty=1.1, stop=["x"], logit_bias={"5": 2.5}, logprobs=True, top_logprobs=2)
        assert (await client.post("/v1/chat/completions", json=chat(**fields))).status_code == 200
        return manager.requests[0]

    obj = run(scenario)
    assert obj.messages == [{"role": "user", "content": "hello there"}]
    assert obj.sampling_params == {
        "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "seed": 7,
        "stop": ["x"], "logit_bias": {"5": 2.5}, "n": 1, "ignore_eos": False, "skip_special_tokens": True,
        "spaces_between_special_tokens": True, "max_new_tokens": 2,
    }
    assert obj.return_logprob and obj.top_logprobs_num == 2


def test_multimodal_parts_pass_through():
    async def scenario(client, manager):
        content = [
            {"type": "text", "text": "what happens?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "video_url", "video_url": {"url": "file:///videos/a.mp4", "fps": 1.0, "max_frames": 16}},
        ]
        body = chat(messages=[{"role": "user", "content": content}], return_cubes=True)
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        return manager.requests[0], content

    obj, content = run(scenario)
    assert obj.messages == [{"role": "user", "content": content}]
    assert obj.return_cubes


def test_chat_n2_logprobs():
    body = request("POST", "/v1/chat/completions", json=chat(n=2, max_tokens=2, logprobs=True, top_logprobs=2)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    content = body["choices"][1]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == [" w0", " w1"]
    assert content[1]["logprob"] == -1.0 and content[1]["bytes"] == list(b" w1")
    assert [top["token"] for top in content[0]["top_logprobs"]] == [" w0", " w99"]
    assert body["usage"]["completion_tokens"] == 4 and body["usage"]["prompt_tokens"] == 5


def test_chat_stream_with_usage():
    response = request("POST", "/v1/chat/completions",
                       json=chat(stream=True, n=2, max_tokens=2, stream_options={"include_usage": True}))
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert all(event["object"] == "chat.completion.chunk" for event in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    texts = {0: "", 1: ""}
    finish = {}
    for event in events[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
            if "finish_reason" in choice:
                finish[choice["index"]] = choice["finish_reason"]
    assert texts == {0: " w0 w1", 1: " w0 w1"} and finish == {0: "length", 1: "length"}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


def test_completion_batch_and_logprobs():
    body = request("POST", "/v1/completions",
                   json={"model": MODEL, "prompt": ["a b", "c d e"], "n": 2, "max_tokens": 2, "logprobs": 1}).json()
    assert body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    logprobs = body["choices"][2]["logprobs"]
    assert logprobs == {"tokens": [" w0", " w1"], "token_logprobs": [-0.5, -1.0],
                        "top_logprobs": [{" w0": -0.5}, {" w1": -1.0}], "text_offset": [0, 3]}
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 8


def test_completion_stream_token_prompt():
    response = request("POST", "/v1/completions",
                       json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 3, "stream": True, "logprobs": 0})
    events = sse_events(response)
    assert "".join(e["choices"][0]["text"] for e in events) == " w0 w1 w2"
    assert [e["choices"][0]["logprobs"]["text_offset"] for e in events] == [[0], [3], [6]]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_native_generate():
    single = request("POST", "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}).json()
    assert single["text"] == " w0 w1" and single["output_ids"] == [100, 101]
    assert single["meta_info"]["finish_reason"]["type"] == "length"
    batch = request("POST", "/generate", json={"input_ids": [[1], [2, 3]], "sampling_params": {"max_new_tokens": 1}})
    assert [out["index"] for out in batch.json()] == [0, 1]
    stream = request("POST", "/generate", json={"text": "hi", "stream": True, "sampling_params": {"max_new_tokens": 2}})
    assert [event["text"] for event in sse_events(stream)] == [" w0", " w0 w1"]


def test_models_and_health():
    models = request("GET", "/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == CONTEXT_LENGTH
    assert request("GET", f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert_error(request("GET", "/v1/models/other"), 404, "model")
    assert request("GET", "/health").status_code == 200
    assert request("GET", "/health_generate").status_code == 200


def test_metrics_parse():
    async def scenario(client, _):
        await client.post("/v1/chat/completions", json=chat(max_tokens=3))
        await client.post("/v1/chat/completions", json=chat(messages=[]))
        return (await client.get("/metrics")).text

    families = {f.name: f for f in text_string_to_metric_families(run(scenario))}
    value = lambda name: families[name].samples[0].value  # noqa: E731
    assert value("cubeserve_kv_pool_usage") == 0.25
    assert value("cubeserve_prefix_cache_hit_rate") == 0.25
    assert value("cubeserve_num_waiting_reqs") == 2
    assert value("cubeserve_num_retracted_reqs") == 3
    ttft_count = [s for s in families["cubeserve_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft_count[0].value == 1
    itl_count = [s for s in families["cubeserve_inter_token_latency_seconds"].samples if s.name.endswith("_count")]
    assert itl_count[0].value == 2
    statuses = {(s.labels["endpoint"], s.labels["status"]): s.value
                for s in families["cubeserve_http_requests"].samples if s.name.endswith("_total")}
    assert statuses[("/v1/chat/completions", "200")] == 1 and statuses[("/v1/chat/completions", "400")] == 1


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fields, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": []}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}]},
     "messages.0.content.0.image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v", "fps": 0}}]}]},
     "messages.0.content.0.video_url.fps"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": CONTEXT_LENGTH + 1}, "max_tokens"),
    ({"max_completion_tokens": "many"}, "max_completion_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"n": 0}, "n"),
    ({"seed": "x"}, "seed"),
    ({"stop": [""]}, "stop.0"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"model": "other-model"}, "model"),
])
def test_chat_validation_errors(fields, param):
    status = 404 if param == "model" else 400
    assert_error(request("POST", "/v1/chat/completions", json=chat(**fields)), status, param)


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "prompt": ""}, "prompt"),
    ({"model": MODEL, "prompt": []}, "prompt"),
    ({"model": MODEL, "prompt": [-1]}, "prompt.0"),
    ({"model": MODEL, "prompt": "x", "echo": True}, "echo"),
    ({"model": MODEL, "prompt": "x", "logprobs": 30}, "logprobs"),
    ({"prompt": "x"}, "model"),
])
def test_completion_validation_errors(body, param):
    assert_error(request("POST", "/v1/completions", json=body), 400, param)


@pytest.mark.parametrize("body, param", [
    ({}, "input_ids"),
    ({"text": "a", "input_ids": [1]}, "input_ids"),
    ({"text": "a", "sampling_params": {"n": 0}}, "sampling_params"),
    ({"text": ["a", "b"], "rid": "r"}, "rid"),
])
def test_generate_validation_errors(body, param):
    assert_error(request("POST", "/generate", json=body), 400, param)


def test_malformed_json_and_wrong_body_type():
    error = assert_error(request("POST", "/v1/chat/completions", content=b"{not json",
                                 headers={"content-type": "application/json"}), 400, None)
    assert "JSON" in error["message"]
    assert_error(request("POST", "/v1/completions", json=[1, 2]), 400, None)


def test_manager_value_error_is_400():
    error = assert_error(request("POST", "/v1/completions", json={"model": MODEL, "prompt": "bad"}), 400, None)
    assert "temperature" in error["message"]
    stream = request("POST", "/v1/completions", json={"model": MODEL, "prompt": "bad", "stream": True})
    assert_error(stream, 400, None)


def test_dead_engine_is_503():
    assert_error(request("POST", "/v1/completions", json={"model": MODEL, "prompt": "dead"}), 503, None)

    async def scenario(client, manager):
        manager.dead = True
        return [await client.get(path) for path in ("/health", "/metrics")]

    for response in run(scenario):
        assert "engine process died" in assert_error(response, 503, None)["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_engine_queue_full_is_503_with_retry_after(stream: bool):
    response = request("POST", "/v1/completions", json={"model": MODEL, "prompt": "full", "stream": stream})
    error = assert_error(response, 503, None)
    assert error["type"] == "server_overloaded" and "queue is full" in error["message"]
    assert response.headers["retry-after"] == "1"


def test_body_size_limit():
    big = chat(messages=[{"role": "user", "content": "x" * 2000}])
    assert_error(request("POST", "/v1/chat/completions", json=big, server_args={"max_request_bytes": 1000}), 413, None)

    async def chunked_body():
        yield json.dumps(big).encode()

    response = request("POST", "/v1/chat/completions", content=chunked_body(),
                       headers={"content-type": "application/json"}, server_args={"max_request_bytes": 1000})
    assert_error(response, 413, None)


def test_auth():
    auth = {"Authorization": f"Bearer {API_KEY}"}
    server_args = {"api_key": API_KEY}
    assert request("GET", "/health", server_args=server_args).status_code == 200
    for path in ("/v1/models", "/metrics", "/health_generate"):
        error = assert_error(request("GET", path, server_args=server_args), 401, None)
        assert error["type"] == "authentication_error"
        assert request("GET", path, headers=auth, server_args=server_args).status_code == 200
    wrong = {"Authorization": "Bearer sk-wrong"}
    rejected = request("POST", "/v1/chat/completions", json=chat(), headers=wrong, server_args=server_args)
    assert_error(rejected, 401, None)
    accepted = request("POST", "/v1/chat/completions", json=chat(), headers=auth, server_args=server_args)
    assert accepted.status_code == 200


def test_queue_full_is_503_with_retry_after():
    async def scenario(client, manager):
        hanging = asyncio.create_task(client.post("/v1/completions", json={"model": MODEL, "prompt": "hang", "n": 3}))
        await manager.started_hanging.wait()
        # 3 of the 4 sequences in flight: n=2 does not fit any more, n=1 does.
        refused = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2})
        admitted = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        manager.release.set()
        return refused, admitted, await hanging

    refused, admitted, hanging = run(scenario)
    assert_error(refused, 503, None)
    assert refused.headers["retry-after"] == "1"
    assert admitted.status_code == 200 and hanging.status_code == 200


def test_request_larger_than_capacity_is_400():
    body = {"model": MODEL, "prompt": "x", "n": MAX_RUNNING + MAX_QUEUED + 1}
    assert_error(request("POST", "/v1/completions", json=body), 400, "n")


def test_stream_closed_early_aborts_request():
    async def scenario(client, manager):
        app = client._transport.app
        ctx = app.state.ctx
        from cubeserve.server.serving_common import open_stream

        class Connected:  # a request whose client never disconnects
            async def receive(self):
                await asyncio.Event().wait()

        obj = GenerateReqInput(text="x", sampling_params={"max_new_tokens": 10})
        deltas = await open_stream(ctx, Connected(), [obj])
        await anext(deltas)
        await deltas.aclose()
        return manager.aborted, obj.rid, ctx.admission.in_flight

    aborted, rid, in_flight = run(scenario)
    assert aborted == [rid] and in_flight == 0


def test_throughput_meter_uses_the_last_window():
    meter = ThroughputMeter(window_s=10.0)
    assert meter.update(0, now=0.0) == 0.0
    assert meter.update(100, now=5.0) == 20.0
    assert meter.update(300, now=12.0) == 25.0  # from t=0: the t=5 sample is less than a window old
    assert meter.update(400, now=20.0) == 20.0  # from t=5: the t=0 sample is dropped
    assert meter.update(400, now=40.0) == 0.0


def test_built_in_demo_model_is_listed_under_a_short_name() -> None:
    from types import SimpleNamespace

    from cubeserve.server.http_server import build_context
    from cubeserve.server_args import ServerArgs

    info = SimpleNamespace(model_path="/cache/demo-quicksviewer", dtype="float32", context_len=4096,
                           kv_capacity_tokens=8192, max_running_requests=8)
    manager = SimpleNamespace(info=info)
    assert build_context(manager, ServerArgs()).model.name == "cubeserve-demo"
    assert build_context(manager, ServerArgs(model_path="/m/qv")).model.name == "/cache/demo-quicksviewer"
    named = ServerArgs(model_path="/m/qv", served_model_name="qv")
    assert build_context(manager, named).model.name == "qv"
