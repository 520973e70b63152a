"""End to end: a real server process (tiny demo model, CPU) driven by the official openai
client and raw HTTP."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_process import ServerProcess

from cubeserve.bench.serving import parse_args as parse_bench_args
from cubeserve.bench.serving import run as run_bench_async

API_KEY = "sk-cubeserve-test"
CONTEXT_LENGTH = 1024
MAX_REQUEST_BYTES = 100_000
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_cache_dir):
    flags = ["--api-key", API_KEY, "--max-total-tokens", "4096", "--context-length", str(CONTEXT_LENGTH),
             "--max-request-bytes", str(MAX_REQUEST_BYTES), "--served-model-name", "demo"]
    process = ServerProcess(flags, demo_cache_dir, tmp_path_factory.mktemp("server") / "server.log")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def post(server: ServerProcess, path: str, body: dict | None = None, **kwargs) -> httpx.Response:
    headers = kwargs.pop("headers", AUTH)
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60, **kwargs)


def metrics(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=30).text
    return {sample.name: sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples if not sample.labels}


CHAT = [{"role": "user", "content": "Please summarize the following paragraph."}]


def test_startup_log_names_model_dtype_capacity_and_address(server):
    log = server.log()
    assert "serving demo" in log and "dtype=float32" in log and "kv_capacity=4096 tokens" in log
    assert f"http://127.0.0.1:{server.port}" in log


def test_models(client):
    [model] = client.models.list().data
    assert model.id == "demo" and model.model_extra["max_model_len"] == CONTEXT_LENGTH


def test_chat_completion_usage_and_finish(client):
    response = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=5,
                                              extra_body={"ignore_eos": True})
    [choice] = response.choices
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    usage = response.usage
    assert usage.completion_tokens == 5 and usage.prompt_tokens > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_matches_non_stream(client):
    kwargs = dict(model="demo", messages=CHAT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_n2_and_streaming(client):
    response = client.completions.create(model="demo", prompt="The quick brown fox", n=2, max_tokens=4,
                                         seed=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in response.choices) == [0, 1]
    assert response.usage.completion_tokens == 8
    stream = client.completions.create(model="demo", prompt="The quick brown fox", n=2, max_tokens=4, stream=True,
                                       extra_body={"ignore_eos": True})
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert all(texts.values())


def test_stop_string(client):
    kwargs = dict(model="demo", prompt="Once upon a time", max_tokens=24, temperature=0,
                  extra_body={"ignore_eos": True})
    free = client.completions.create(**kwargs).choices[0].text
    stop = free[len(free) // 2:][:3]
    assert stop.strip()
    choice = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["matched_stop"] == stop
    assert choice.text == free[: free.index(stop)]


def test_seed_reproducibility(client):
    def sample(seed: int) -> str:
        return client.completions.create(model="demo", prompt="Hello", max_tokens=16, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_logprobs(client):
    response = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=4, logprobs=True,
                                              top_logprobs=3, extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-4
    legacy = client.completions.create(model="demo", prompt="Hello", max_tokens=3, logprobs=2,
                                       extra_body={"ignore_eos": True}).choices[0].logprobs
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) == 3


def test_native_generate(server):
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
    out = post(server, "/generate", body).json()
    assert len(out["output_ids"]) == 3 and out["meta_info"]["finish_reason"]["type"] == "length"
    ids = post(server, "/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}).json()
    assert ids["meta_info"]["prompt_tokens"] == 3


def test_auth(server, client):
    assert httpx.get(f"{server.url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    rejected = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        rejected.chat.completions.create(model="demo", messages=CHAT)
    assert httpx.get(f"{server.url}/health_generate", headers=AUTH, timeout=30).status_code == 200


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"model": "demo", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"model": "demo", "messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"model": "demo", "messages": CHAT, "max_tokens": CONTEXT_LENGTH + 1}, "max_tokens"),
    ("/v1/chat/completions", {"model": "demo", "messages": CHAT, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"model": "demo", "messages": CHAT, "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {"model": "demo", "messages": CHAT, "n": "two"}, "n"),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]},
     "messages.0.content.0.image_url"),  # a truncated PNG
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "file:///v.mp4", "fps": -1}}]}]},
     "messages.0.content.0.video_url.fps"),
    ("/v1/completions", {"model": "demo", "prompt": [1] * (CONTEXT_LENGTH + 10)}, None),
    ("/v1/completions", {"model": "demo", "prompt": [10**9]}, None),
    ("/v1/completions", {"model": "demo", "prompt": "x", "stop_token_ids": [10**9]}, None),
    ("/generate", {"text": "x", "sampling_params": {"temperature": -2}}, None),
    ("/generate", {"text": "x", "sampling_params": {"no_such_param": 1}}, None),
])
def test_validation_errors(server, path, body, param):
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_engine_errors_name_the_field(server):
    too_long = post(server, "/v1/completions", {"model": "demo", "prompt": [1] * (CONTEXT_LENGTH + 10)})
    assert "context length" in too_long.json()["error"]["message"]
    bad_param = post(server, "/generate", {"text": "x", "sampling_params": {"temperature": -2}})
    assert "temperature" in bad_param.json()["error"]["message"]


def test_malformed_json_and_body_limit(server):
    malformed = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": ',
                           headers={**AUTH, "content-type": "application/json"})
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]["message"]
    huge = post(server, "/v1/chat/completions",
                {"model": "demo", "messages": [{"role": "user", "content": "x" * MAX_REQUEST_BYTES}]})
    assert huge.status_code == 413


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT)


def test_metrics(server, client):
    for _ in range(2):  # the second request hits the prefix cache
        client.chat.completions.create(model="demo", messages=CHAT, max_tokens=3)
    values = metrics(server)
    assert values["cubeserve_kv_pool_capacity_tokens"] == 4096
    assert 0 < values["cubeserve_prefix_cache_hit_rate"] <= 1
    assert values["cubeserve_time_to_first_token_seconds_count"] >= 2
    assert values["cubeserve_inter_token_latency_seconds_count"] >= 2
    assert values["cubeserve_engine_generated_tokens_total"] > 0
    assert "cubeserve_num_running_reqs" in values and "cubeserve_gen_throughput" in values


def test_sse_wire_format(server):
    body = {"model": "demo", "messages": CHAT, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def run_bench(server: ServerProcess, *flags: str) -> dict:
    args = parse_bench_args(["--base-url", server.url, "--api-key", API_KEY, *flags])
    return asyncio.run(run_bench_async(args))


def test_serving_benchmark_load_random_and_sharegpt(server, tmp_path):
    report = run_bench(server, "--num-prompts", "4", "--random-input-len", "8", "--random-output-len", "4",
                       "--request-rate", "20", "--endpoint", "chat")
    assert report["completed"] == 4 and report["failed"] == 0 and report["model"] == "demo"
    assert report["total_output_tokens"] == 16 and report["ttft_ms"]["count"] == 4
    assert set(report["itl_ms"]) == {"mean", "p50", "p90", "p99", "max", "count"}
    conversations = [{"conversations": [{"from": "human", "value": "Tell me a story about a robot " * 3},
                                         {"from": "gpt", "value": "Once upon a time there was a robot. " * 2}]}] * 3
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps(conversations))
    report = run_bench(server, "--dataset", "sharegpt", "--dataset-path", str(dataset), "--num-prompts", "3",
                       "--sharegpt-output-len", "4")
    assert report["completed"] == 3 and report["total_output_tokens"] == 12


def test_serving_benchmark_interference(server):
    report = run_bench(server, "--scenario", "interference", "--background-requests", "2",
                       "--background-output-len", "400", "--inject-requests", "2", "--inject-input-len", "64",
                       "--inject-output-len", "2", "--inject-interval-s", "0.05", "--baseline-s", "0.3")
    assert report["itl_before_ms"]["count"] > 0 and report["itl_during_ms"]["count"] > 0
    assert report["injected"]["completed"] == 2 and report["background"]["failed"] == 0
