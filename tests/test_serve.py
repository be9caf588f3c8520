"""`cepe serve` over real HTTP: a uvicorn server on a free loopback port with a tiny CEPE model.

Clients: `httpx` for raw requests (malformed bodies, status codes) and the `openai` package for
what its users do (completions, chat, streaming, documents through `extra_body`).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _serve_helpers import DECODER_LEN, TEXT, save_tiny_cepe  # noqa: E402

GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from pipeline.stages.serve import ServeConfig, build

    root = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_cepe(root / "model")
    port = _free_port()
    config = ServeConfig(model=str(model_dir), port=port, device="cpu", max_tokens=64, default_max_tokens=8,
                         max_context_tokens=2000, max_document_tokens=1500, cache_dir=str(root / "cache"),
                         max_batch=4, max_queue=16, max_request_bytes=200_000, model_name="tiny")
    session, app = build(config)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if uv.started:
            break
        time.sleep(0.05)
    assert uv.started, "server did not start"
    yield {"url": f"http://127.0.0.1:{port}", "session": session, "root": root}
    uv.should_exit = True
    thread.join(10)
    session.close()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server["url"], timeout=60) as client:
        yield client


@pytest.fixture
def oai(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)


def _error(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_health_and_models(http):
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["chunk_len"] == 16 and health["decoder_len"] == DECODER_LEN
    assert http.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_completion_with_the_openai_client_and_streaming_gives_the_same_text(oai):
    out = oai.completions.create(model="tiny", prompt="Once upon a time", **GREEDY)
    text = out.choices[0].text
    assert out.object == "text_completion" and out.usage.completion_tokens == 12 and text
    assert out.choices[0].finish_reason == "length"
    pieces = [c.choices[0].text for c in oai.completions.create(model="tiny", prompt="Once upon a time", stream=True,
                                                                **GREEDY)]
    assert len(pieces) > 2 and "".join(pieces) == text  # streamed piece by piece, same greedy text


def test_chat_completion_streams_with_the_chat_template(oai):
    messages = [{"role": "user", "content": "Who is Emma?"}]
    out = oai.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    assert out.choices[0].message.role == "assistant"
    chunks = list(oai.chat.completions.create(model="tiny", messages=messages, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_stop_sequences_end_the_text_before_them(http):
    body = {"prompt": "Once upon a time", "temperature": 0, "max_tokens": 24}
    full = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    words = full.split()
    stop = words[len(words) // 2]
    expected = full[: full.find(stop)]
    out = http.post("/v1/completions", json={**body, "stop": [stop, "never-there"]}).json()
    assert out["choices"][0]["text"] == expected and out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] < 24
    with http.stream("POST", "/v1/completions", json={**body, "stop": stop, "stream": True}) as r:
        events = [e[len("data: "):] for e in "".join(r.iter_text()).split("\n\n") if e and e != "data: [DONE]"]
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events) == expected


def test_sse_wire_format(http):
    with http.stream("POST", "/v1/completions", json={"prompt": "Hello", "stream": True, **GREEDY}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 12


def test_documents_round_trip_and_cache_hit_equals_cold(server, http, oai):
    text = TEXT * 3
    posted = http.post("/v1/documents", json={"text": text})
    assert posted.status_code == 201, posted.text
    doc = posted.json()
    assert doc["id"].startswith("doc-") and doc["tokens"] > 16 and doc["chunks"] == -(-doc["tokens"] // 16)
    again = http.post("/v1/documents", json={"text": text})
    assert again.status_code == 200 and again.json()["id"] == doc["id"] and not again.json()["created"]
    assert http.get(f"/v1/documents/{doc['id']}").json()["tokens"] == doc["tokens"]

    prompt = "Question: who is she? Answer:"
    hits = server["session"].cache.hits
    cached = oai.completions.create(model="tiny", prompt=prompt, extra_body={"documents": [doc["id"]]}, **GREEDY)
    assert server["session"].cache.hits == hits + 1
    cold = oai.completions.create(model="tiny", prompt=prompt, extra_body={"context": text}, **GREEDY)
    plain = oai.completions.create(model="tiny", prompt=prompt, **GREEDY)
    assert cached.choices[0].text == cold.choices[0].text  # the cache gives the cold request's tokens
    assert cached.usage.context_tokens == doc["tokens"]
    assert cached.choices[0].text != plain.choices[0].text  # ... and the document is read at all

    # evicted from memory, read back from its safetensors file: still the same tokens
    server["session"].cache._docs.clear()
    server["session"].cache.bytes = 0
    assert http.get(f"/v1/documents/{doc['id']}").json()["cached"] == "disk"
    from_disk = oai.completions.create(model="tiny", prompt=prompt, extra_body={"documents": [doc["id"]]}, **GREEDY)
    assert from_disk.choices[0].text == cold.choices[0].text

    assert http.delete(f"/v1/documents/{doc['id']}").json()["deleted"] is True
    _error(http.get(f"/v1/documents/{doc['id']}"), 404)
    _error(http.delete(f"/v1/documents/{doc['id']}"), 404)
    assert not list((server["root"] / "cache").rglob(f"{doc['id']}*"))


def test_the_readme_example_with_the_openai_client(oai):
    doc = oai.post("/documents", body={"text": TEXT}, cast_to=object)["id"]
    pieces = [c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model="cepe", messages=[{"role": "user", "content": "Who is Emma?"}], stream=True, max_tokens=8,
        temperature=0, extra_body={"documents": [doc]})]
    assert "".join(pieces)


def test_passages_are_chunked_each_on_its_own(http):
    doc = http.post("/v1/documents", json={"passages": ["A short passage.", "Another one, also short."]}).json()
    assert doc["chunks"] == 2  # two passages under 16 tokens each: one chunk each


def test_concurrent_clients_get_their_own_answers(server, http):
    prompts = [f"Story number {i}:" for i in range(6)]
    alone = [http.post("/v1/completions", json={"prompt": p, **GREEDY}).json()["choices"][0]["text"] for p in prompts]
    batches = server["session"].worker.batches

    def ask(p):
        with httpx.Client(base_url=server["url"], timeout=60) as c:
            return c.post("/v1/completions", json={"prompt": p, **GREEDY}).json()["choices"][0]["text"]

    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert server["session"].worker.batches - batches < 6  # some requests shared a batch
    metrics = http.get("/metrics").text
    assert "cepe_generated_tokens_total" in metrics and "cepe_time_to_first_token_seconds_count" in metrics
    assert "cepe_document_cache_hits" in metrics


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 65}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": 5}, 400, "prompt"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "documents": ["doc-0000"]}, 404, "documents[0]"),
    ({"prompt": "hi", "documents": "doc-0000"}, 400, "documents"),
    ({"prompt": "hi", "context": "word " * 2100}, 413, "context[0]"),
    ({"prompt": "word " * 200, "max_tokens": 8}, 400, "prompt"),
    ({"prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "hi", "seed": 2**70, "temperature": 0.5}, 400, "seed"),
    ({"prompt": "hi", "n": 2}, 400, "n"),
])
def test_bad_completion_requests(http, body, status, param):
    assert _error(http.post("/v1/completions", json=body), status)["param"] == param


def test_a_body_without_json_content_type_is_read_as_json(http):
    # what `curl -d '{...}'` sends: application/x-www-form-urlencoded
    r = http.post("/v1/completions", content=json.dumps({"prompt": "Hi", **GREEDY}),
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12
    _error(http.post("/v1/completions", content=b"garbage", headers={"content-type": "text/plain"}), 400)
    _error(http.post("/v1/completions", json=[1, 2]), 400)


def test_bad_bodies_and_routes(http):
    assert _error(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
                  400)["code"] == "invalid_json"
    _error(http.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}), 400)
    _error(http.post("/v1/chat/completions", json={"messages": []}), 400)
    parts = {"role": "user", "content": [{"type": "text", "text": "Who is "}, {"type": "text", "text": "Emma?"}]}
    joined = {"role": "user", "content": "Who is Emma?"}
    answers = [http.post("/v1/chat/completions", json={"messages": [m], **GREEDY}).json() for m in (parts, joined)]
    assert answers[0]["choices"] == answers[1]["choices"]  # content parts are joined text
    _error(http.post("/v1/documents", json={}), 400)
    _error(http.post("/v1/documents", json={"text": "a", "passages": ["b"]}), 400)
    _error(http.post("/v1/documents", json={"text": "word " * 1600}), 413)
    _error(http.post("/v1/documents", content=b"x" * 300_000), 413)
    _error(http.get("/v1/documents/..%2F..%2Fetc%2Fpasswd"), 404)  # ids never reach the file system unchecked
    assert _error(http.get("/v1/documents/doc-..passwd"), 404)["code"] == "document_not_found"
    _error(http.get("/v1/nothing"), 404)
    assert http.get("/health").json()["status"] == "ok"  # none of it hurt the server


def test_document_cache_is_a_byte_bounded_lru_with_files_of_its_model_only(tmp_path):
    from pipeline.errors import CepeError
    from pipeline.serve.documents import Document, DocumentCache, document_id

    cache = DocumentCache(3 * 400, str(tmp_path), "model-a", torch.device("cpu"), torch.float32)
    docs = [Document(document_id("text", str(i)), torch.full((10, 10), float(i)), 10, 1) for i in range(4)]
    for doc in docs[:3]:
        cache.put(doc, write=False)
    cache.get(docs[0].id)  # most recent now: docs[1] is the least recently used
    cache.put(docs[3])
    assert cache.bytes <= 1200 and len(cache) == 3 and cache.evictions == 1
    assert cache.get(docs[1].id)[0] is None and cache.get(docs[0].id)[1] == "memory"
    with pytest.raises(CepeError, match="more than the cache"):
        cache.put(Document("doc-" + "0" * 32, torch.zeros(40, 10), 40, 1))
    # docs[3] was written: another cache of the same model reads it back, another model does not
    assert torch.equal(DocumentCache(10**6, str(tmp_path), "model-a", torch.device("cpu"),
                                     torch.float32).get(docs[3].id)[0].states, docs[3].states)
    assert DocumentCache(10**6, str(tmp_path), "model-b", torch.device("cpu"), torch.float32).get(docs[3].id)[0] is None
    damaged = tmp_path / "model-a" / f"{docs[3].id}.safetensors"
    damaged.write_bytes(b"\x00" * 64)
    assert DocumentCache(10**6, str(tmp_path), "model-a", torch.device("cpu"), torch.float32).get(docs[3].id)[0] is None


def test_worker_batches_compatible_jobs_and_refuses_past_its_queue():
    from pipeline.serve.engine import Decoding, Job, QueueFull, Worker

    gate = threading.Event()
    seen = []

    class Engine:
        def run_batch(self, jobs):
            gate.wait(10)
            seen.append([j.max_new_tokens for j in jobs])

    worker = Worker(Engine(), max_batch=2, max_queue=3)
    try:
        first = worker.submit(Job([1], None, 0))  # taken at once, blocks in the engine
        time.sleep(0.2)
        sampled = Job([1], None, 9, Decoding(do_sample=True))
        worker.submit_many([Job([1], None, 1), sampled, Job([1], None, 2)])
        with pytest.raises(QueueFull):
            worker.submit(Job([1], None, 3))
        gate.set()
        for job in (first, sampled):
            assert job.done.wait(10)
    finally:
        worker.close()
    assert seen == [[0], [1, 2], [9]]  # greedy jobs together, the sampled one on its own
