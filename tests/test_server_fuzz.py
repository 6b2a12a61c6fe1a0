"""Fuzz the real server (``python -m server`` on the tiny model, over HTTP): no body gets a 5xx, and it still answers after.

hypothesis draws bodies for ``/process``, ``/tokenize`` and ``/decode``: the fields HELM and the starter
kit send, with values in range, at the edges and far outside them, of the wrong JSON type, text with
any code point (lone surrogates included, JSON-escaped as a client's encoder writes them), unknown
fields, and bodies that are not objects or not JSON at all. Almost all of those are 422s, so bodies the
schema accepts are fuzzed apart, every field at its edges (temperature 0 to 1e308, top_p down to 5e-324,
16 sequences, extreme seeds, any Unicode prompt and stop): each must be a 200 with what was asked for
(as many completions, at most max_new_tokens, no stop sequence left in the text). A fixed seed and a
bounded number of cases keep the run the same every time (``derandomize``) and short.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow(reason="a real server process (the only place a 5xx or a dead server is real) and 360 fuzzed requests")
CASES = 60  # per endpoint
FUZZ = settings(max_examples=CASES, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))

_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=40)  # lone surrogates too
_big = st.sampled_from([2**31, 2**63, 2**64, 10**30, -(2**63) - 1])
_int = st.one_of(st.integers(-3, 40), _big)
_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-7, 1e-60, 1.0, 1.0000001, -0.0, 5e-324]))
_json = st.recursive(
    st.none() | st.booleans() | _int | _float | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=6,
)


def _field(good):
    """Mostly plausible values, sometimes any JSON value at all."""
    return st.one_of(good, good, good, _json)


PROCESS = st.fixed_dictionaries(
    {},
    optional={
        "prompt": _field(_text),
        "temperature": _field(_float),
        "num_return_sequences": _field(_int),
        "num_samples": _field(_int),
        "max_new_tokens": _field(st.one_of(st.integers(-2, 12), st.sampled_from([2047, 2048, 10**9]))),
        "top_p": _field(_float),
        "top_k": _field(_int),
        "echo_prompt": _field(st.booleans()),
        "top_k_per_token": _field(_int),
        "stop_sequences": _field(st.lists(_text, max_size=3)),
        "seed": _field(_int),
        "unknown_field": _json,
    },
)
TOKENIZE = st.fixed_dictionaries({}, optional={"text": _field(_text), "truncation": _field(st.booleans()), "max_length": _field(_int)})
DECODE = st.fixed_dictionaries({}, optional={"tokens": _field(st.lists(st.one_of(st.integers(-5, 600), _big), max_size=12))})


# Bodies the schema accepts, every field at or near its edges: these must be answered (200), and as asked.
_unicode = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=("Cs",)), max_size=40)  # no surrogates
_stop = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=4)
ACCEPTED = st.fixed_dictionaries(
    {"prompt": _unicode.filter(bool)},
    optional={
        "temperature": st.sampled_from([0.0, 5e-324, 1e-7, 1e-5, 1.00001e-5, 0.3, 1.0, 2.0, 100.0, 1e30, 1e308]),
        "top_p": st.sampled_from([5e-324, 1e-60, 1e-46, 1e-7, 0.5, 0.999999, 1.0]),
        "top_k": st.one_of(st.integers(0, 3), st.sampled_from([1023, 1024, 1025, 2**31, 2**63])),
        "num_return_sequences": st.integers(1, 16),
        "num_samples": st.integers(1, 16),
        "max_new_tokens": st.integers(0, 16),
        "echo_prompt": st.booleans(),
        "top_k_per_token": st.integers(0, 50),
        "stop_sequences": st.lists(_stop, max_size=3),
        "seed": st.sampled_from([0, 1, -(2**63), 2**63 - 1, 2**64 - 1]),
    },
)
TOKENIZE_ACCEPTED = st.fixed_dictionaries({"text": _unicode}, optional={"truncation": st.booleans(), "max_length": st.integers(1, 3000)})


def _body(objects):
    """An object body most of the time; otherwise another JSON value, or bytes that are not JSON."""
    raw = st.one_of(st.binary(max_size=30), st.just(b'{"prompt": "x"'), st.just(b'{"prompt": "\\ud800"}'), st.just(b""))
    return st.one_of(*([objects.map(lambda b: json.dumps(b).encode())] * 6), _json.map(lambda b: json.dumps(b).encode()), raw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(make_tiny_checkpoint, tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("fuzz") / "server.log", "w+")
    command = [sys.executable, "-m", "server", "--checkpoint_dir", str(make_tiny_checkpoint()), "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    deadline = time.monotonic() + 180
    while True:
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            pytest.fail(f"server did not start: {log.read()[-2000:]}")
        time.sleep(0.5)
    yield client, process, log
    process.terminate()
    process.wait(timeout=60)
    client.close()


def _post(server, path: str, body: bytes) -> httpx.Response:
    client, process, log = server
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    if response.status_code >= 500:
        log.seek(0)
        pytest.fail(f"{path} {body[:300]!r} -> {response.status_code} {response.text[:300]}\nserver log tail:\n{log.read()[-3000:]}")
    return response


@FUZZ
@given(body=_body(PROCESS))
def test_process(server, body):
    _post(server, "/process", body)


@FUZZ
@given(body=_body(TOKENIZE))
def test_tokenize(server, body):
    _post(server, "/tokenize", body)


@FUZZ
@given(body=_body(DECODE))
def test_decode(server, body):
    _post(server, "/decode", body)


@FUZZ
@given(body=ACCEPTED)
def test_process_answers_what_the_schema_accepts(server, body):
    response = _post(server, "/process", json.dumps(body).encode())
    assert response.status_code == 200, (body, response.text[:300])
    answer, n = response.json(), body.get("num_return_sequences", body.get("num_samples", 1))
    assert len(answer["completions"]) == n and answer["completions"][0]["text"] == answer["text"]
    for completion in answer["completions"]:
        if not body.get("echo_prompt"):  # generated text only: at most max_new_tokens, cut before any stop sequence
            assert len(completion["tokens"]) <= body.get("max_new_tokens", 50)
            assert not any(stop in completion["text"] for stop in body.get("stop_sequences", [])), completion["text"]
        assert all(len(t["top_logprob"]) <= max(body.get("top_k_per_token", 1), 1) for t in completion["tokens"])


@FUZZ
@given(body=TOKENIZE_ACCEPTED, ids=st.lists(st.integers(0, 1023), max_size=12))
def test_tokenize_and_decode_answer_what_the_schema_accepts(server, body, ids):
    response = _post(server, "/tokenize", json.dumps(body).encode())
    assert response.status_code == 200, (body, response.text[:300])
    if body.get("truncation", True):
        assert len(response.json()["tokens"]) <= body.get("max_length", 2048)
    assert _post(server, "/decode", json.dumps({"tokens": ids}).encode()).status_code == 200


def test_server_is_alive_and_right_after_the_fuzz(server):
    """Runs after the fuzz (file order): health is ready and a normal request is answered as before."""
    client, process, _ = server
    assert process.poll() is None
    assert client.get("/health").status_code == 200
    ids = client.post("/tokenize", json={"text": "The capital of France is "}).json()["tokens"]
    assert client.post("/decode", json={"tokens": ids}).json()["text"] == "The capital of France is "
    response = client.post("/process", json={"prompt": "The capital of France is ", "max_new_tokens": 4, "temperature": 1e-7})
    assert response.status_code == 200 and len(response.json()["tokens"]) <= 4
