"""The serving benchmark's baseline servers (bench/baseline_servers.py) against our own server.

All three serve the same tiny random-weight checkpoint on the CPU in fp32, so greedy decoding must
pick the same tokens: the baselines must return our server's continuation text, token count and
tokenization, and the HF baseline (which reports logprobs) our server's logprobs. Expectations come
from our server's responses, never from hard-coded model output.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from bench.baseline_servers import create_baseline_app
from server.app import create_app
from server.engine import SerialEngine
from server.loading import load_generator
from server.schemas import ProcessResponse

KINDS = ("litgpt", "hf")
PROMPTS = ("The capital of France is ", "Q: What is 3 + 4?\nA:", "hello world, the cat sat on the mat. ")
# What HELM's neurips/local client sends for a greedy generation request.
HELM_BODY = {
    "temperature": 1e-7,
    "num_return_sequences": 1,
    "max_new_tokens": 8,
    "top_p": 1.0,
    "echo_prompt": False,
    "top_k_per_token": 1,
    "stop_sequences": [],
}


@pytest.fixture(scope="module")
def clients(make_tiny_checkpoint, tmp_path_factory) -> dict[str, TestClient]:
    """Our server (as conftest's ``serve`` builds it, but once per module) and both baselines."""
    checkpoint = make_tiny_checkpoint()
    generator = load_generator(checkpoint, device="cpu")
    hf_dir = tmp_path_factory.mktemp("baseline") / "tiny-hf"
    started = {"ours": TestClient(create_app(SerialEngine(generator), generator.codec))}
    for kind in KINDS:
        started[kind] = TestClient(create_baseline_app(kind, checkpoint, device="cpu", hf_dir=hf_dir))
    for client in started.values():
        client.__enter__()
    yield started
    for client in started.values():
        client.__exit__(None, None, None)


def process(client: TestClient, **body) -> ProcessResponse:
    response = client.post("/process", json={**HELM_BODY, **body})
    assert response.status_code == 200, response.text
    return ProcessResponse.model_validate(response.json())


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_continuation_equals_our_server(clients, kind, prompt):
    ours, theirs = process(clients["ours"], prompt=prompt), process(clients[kind], prompt=prompt)
    assert ours.text, "the reference continuation is empty: nothing is compared"
    assert theirs.text == ours.text
    assert len(theirs.tokens) == len(ours.tokens) == HELM_BODY["max_new_tokens"]
    assert [c.text for c in theirs.completions] == [theirs.text]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_hf_logprobs_equal_our_server(clients, prompt):
    ours, hf = process(clients["ours"], prompt=prompt, top_k_per_token=3), process(clients["hf"], prompt=prompt, top_k_per_token=3)
    assert [t.logprob for t in hf.tokens] == pytest.approx([t.logprob for t in ours.tokens], abs=1e-3)
    assert hf.logprob == pytest.approx(ours.logprob, abs=1e-2)
    for mine, reference in zip(hf.tokens, ours.tokens):
        assert sorted(mine.top_logprob.values()) == pytest.approx(sorted(reference.top_logprob.values()), abs=1e-3)
        assert max(mine.top_logprob.values()) == pytest.approx(mine.logprob, abs=1e-5)  # greedy took the top one


@pytest.mark.parametrize("prompt", PROMPTS)
def test_litgpt_reports_no_logprobs(clients, prompt):
    """Upstream litgpt generate returns none: 0.0 and no alternatives (documented in the module)."""
    response = process(clients["litgpt"], prompt=prompt)
    assert all(t.logprob == 0.0 and t.top_logprob == {} for t in response.tokens)
    assert response.logprob == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_tokenize_and_decode_equal_our_server(clients, kind):
    for text in (*PROMPTS, "Café, naïve: 3.14 ", ""):
        ours = clients["ours"].post("/tokenize", json={"text": text}).json()["tokens"]
        theirs = clients[kind].post("/tokenize", json={"text": text})
        assert theirs.status_code == 200
        assert theirs.json()["tokens"] == ours
        decoded = clients[kind].post("/decode", json={"tokens": ours}).json()["text"]
        assert decoded == clients["ours"].post("/decode", json={"tokens": ours}).json()["text"]
    truncated = clients[kind].post("/tokenize", json={"text": PROMPTS[0], "max_length": 3}).json()["tokens"]
    assert truncated == clients["ours"].post("/tokenize", json={"text": PROMPTS[0], "max_length": 3}).json()["tokens"]


@pytest.mark.parametrize("kind", KINDS)
def test_stop_sequences_cut_the_text(clients, kind):
    full = process(clients["ours"], prompt=PROMPTS[0]).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.find(stop)]
    assert stop and len(expected) < len(full)
    response = process(clients[kind], prompt=PROMPTS[0], stop_sequences=["never appears", stop])
    assert response.text == expected
    assert response.text == process(clients["ours"], prompt=PROMPTS[0], stop_sequences=["never appears", stop]).text
    assert len("".join(t.text for t in response.tokens)) <= len(expected)


@pytest.mark.parametrize("kind", KINDS)
def test_health(clients, kind):
    response = clients[kind].get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ready"
