"""The HTTP contract HELM's ``neurips/local`` client and the starter kit rely on (README "Serving contract").

Runs the real app (serial engine, CPU) over the tiny random-weight checkpoint, with both tokenizer
backends where it is cheap. Random weights produce odd text (byte tokens, U+FFFD), which is exactly
what a contract test wants. No test hard-codes a model output: each derives its expectation from a
first real response (a greedy reference run, a tokenization) and checks the contract's relation.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine import make_engine
from server.generate import Generator
from server.loading import load_generator
from server.schemas import MAX_SEQUENCES, MAX_TOP_LOGPROBS, DecodeResponse, ProcessResponse, TokenizeResponse
from server.text import REPLACEMENT

try:
    import jsonschema
except ImportError:  # the test extra installs it; without it the pydantic models check the shape
    jsonschema = None

STARTER_SPEC = json.loads((Path(__file__).parent / "fixtures" / "starter_open_api_spec.json").read_text())
STARTER_PROCESS = STARTER_SPEC["components"]["schemas"]["ProcessRequest"]
STARTER_TOKENIZE = STARTER_SPEC["components"]["schemas"]["TokenizeRequest"]
# What HELM's neurips/local client puts in every /process body.
HELM_FIELDS = {
    "prompt", "temperature", "num_return_sequences", "max_new_tokens",
    "top_p", "echo_prompt", "top_k_per_token", "stop_sequences",
}  # fmt: skip
HELM_WINDOW = 2048
BACKENDS = ("huggingface", "sentencepiece")
ENGINE_KINDS = ("serial", "batched")  # every contract test runs against both engines
PROMPT = "The capital of France is "
LONG_TEXT = "hello world, the cat sat on the mat. " * 400  # far more than 2048 tokens with either tokenizer
PYDANTIC_MODELS = {m.__name__: m for m in (ProcessResponse, TokenizeResponse, DecodeResponse)}


# --------------------------------------------------------------------------------------------------
# Servers: one per tokenizer backend per module (loading is cheap, but 60+ tests add up).


@dataclass
class Server:
    client: TestClient
    generator: Generator  # white-box handle, used only to monkeypatch EOS / sampling and read limits
    backend: str

    def openapi(self) -> dict:
        if not hasattr(self, "_openapi"):
            response = self.client.get("/openapi.json")
            assert response.status_code == 200
            self._openapi = response.json()
        return self._openapi


@pytest.fixture(scope="module")
def servers(make_tiny_checkpoint) -> Callable[[str, str], Server]:
    started: dict[tuple[str, str], Server] = {}

    def get(backend: str, engine: str) -> Server:
        if (backend, engine) not in started:
            generator = load_generator(make_tiny_checkpoint(backend), device="cpu")
            # small batched settings so that chunked prefill, prefix sharing and forks all happen
            options = {"prefill_tokens": 64, "kv_block_size": 8, "kv_tokens": 4096} if engine == "batched" else {}
            client = TestClient(create_app(make_engine(generator, engine, **options), generator.codec))
            client.__enter__()
            started[backend, engine] = Server(client, generator, backend)
        return started[backend, engine]

    yield get
    for server in started.values():
        server.client.__exit__(None, None, None)


@pytest.fixture(params=ENGINE_KINDS)
def hf(request, servers) -> Server:
    return servers("huggingface", request.param)


@pytest.fixture(params=[(b, e) for b in BACKENDS for e in ENGINE_KINDS], ids=lambda p: f"{p[0]}-{p[1]}")
def server(request, servers) -> Server:
    return servers(*request.param)


# --------------------------------------------------------------------------------------------------
# Helpers: calls that also check every response against the schema.


def validate(server: Server, name: str, instance: dict) -> None:
    """``instance`` conforms to component ``name`` of the app's own /openapi.json."""
    if jsonschema is not None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": server.openapi()["components"]}
        jsonschema.Draft202012Validator(schema).validate(instance)
    elif name in PYDANTIC_MODELS:
        PYDANTIC_MODELS[name].model_validate(instance, strict=False)


def check_helm_fields(data: dict) -> None:
    """The fields HELM reads, with the exact JSON types it expects, and their invariants."""
    assert isinstance(data["request_time"], float) and data["request_time"] >= 0
    assert data["completions"], "at least one sequence"
    first = data["completions"][0]
    assert (data["text"], data["tokens"], data["logprob"]) == (first["text"], first["tokens"], first["logprob"])
    for seq in data["completions"]:
        assert isinstance(seq["text"], str) and isinstance(seq["logprob"], float)
        for token in seq["tokens"]:
            assert isinstance(token["text"], str)
            assert isinstance(token["logprob"], float) and token["logprob"] <= 0
            assert isinstance(token["top_logprob"], dict)
            assert all(isinstance(k, str) and isinstance(v, float) and v <= 0 for k, v in token["top_logprob"].items())
        assert "".join(t["text"] for t in seq["tokens"]) == seq["text"]
        assert seq["logprob"] == pytest.approx(sum(t["logprob"] for t in seq["tokens"]), abs=1e-4)


def process(server: Server, **body) -> dict:
    response = server.client.post("/process", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    validate(server, "ProcessResponse", data)
    check_helm_fields(data)
    return data


def tokenize(server: Server, text: str, **body) -> list[int]:
    response = server.client.post("/tokenize", json={"text": text, **body})
    assert response.status_code == 200, response.text
    data = response.json()
    validate(server, "TokenizeResponse", data)
    assert all(isinstance(i, int) for i in data["tokens"])
    assert isinstance(data["request_time"], float) and data["request_time"] >= 0
    return data["tokens"]


def decode(server: Server, ids: list[int]) -> str:
    response = server.client.post("/decode", json={"tokens": ids})
    assert response.status_code == 200, response.text
    data = response.json()
    validate(server, "DecodeResponse", data)
    assert isinstance(data["text"], str) and isinstance(data["request_time"], float)
    return data["text"]


def unprocessable(server: Server, path: str, **kwargs) -> list[dict]:
    response = server.client.post(path, **kwargs)
    assert response.status_code == 422, response.text
    validate(server, "HTTPValidationError", response.json())
    return response.json()["detail"]


def same_tokens(got: list[dict], want: list[dict]) -> None:
    assert [t["text"] for t in got] == [t["text"] for t in want]
    assert [t["logprob"] for t in got] == pytest.approx([t["logprob"] for t in want], abs=1e-5)
    for g, w in zip(got, want):
        assert g["top_logprob"].keys() == w["top_logprob"].keys()
        assert list(g["top_logprob"].values()) == pytest.approx(list(w["top_logprob"].values()), abs=1e-5)


def starts(tokens: list[dict]) -> list[int]:
    """Character offset of each token in the concatenated text."""
    out, pos = [], 0
    for token in tokens:
        out.append(pos)
        pos += len(token["text"])
    return out


def greedy(server: Server, max_new_tokens: int = 40, **body) -> dict:
    return process(server, prompt=PROMPT, temperature=0, max_new_tokens=max_new_tokens, **body)


# --------------------------------------------------------------------------------------------------
# Schemas: both vocabularies, defaults, documentation.


def test_openapi_documents_endpoints_and_both_vocabularies(hf):
    doc = hf.openapi()
    for path, method in (("/process", "post"), ("/tokenize", "post"), ("/decode", "post"), ("/health", "get")):
        assert method in doc["paths"].get(path, {}), f"{method.upper()} {path} is not documented"
    for path, request, response in (
        ("/process", "ProcessRequest", "ProcessResponse"),
        ("/tokenize", "TokenizeRequest", "TokenizeResponse"),
        ("/decode", "DecodeRequest", "DecodeResponse"),
    ):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(f"/{request}")
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(f"/{response}")

    schemas = doc["components"]["schemas"]

    def types(prop: dict) -> set[str]:
        return {prop["type"]} if "type" in prop else {p["type"] for p in prop.get("anyOf", [])}

    for ours, theirs in ((schemas["ProcessRequest"], STARTER_PROCESS), (schemas["TokenizeRequest"], STARTER_TOKENIZE)):
        assert set(theirs["properties"]) <= set(ours["properties"]), "every starter-kit field is documented"
        assert ours.get("required", []) == theirs.get("required", [])
        for name, prop in theirs["properties"].items():
            assert prop["type"] in types(ours["properties"][name]), name
            if "default" in prop:
                assert ours["properties"][name].get("default") == prop["default"], f"{name}: starter default"
    assert HELM_FIELDS <= set(schemas["ProcessRequest"]["properties"]), "every HELM field is documented"
    assert schemas["DecodeRequest"]["properties"]["tokens"]["items"]["type"] == "integer"
    token = schemas["Token"]
    assert set(token["required"]) >= {"text", "logprob", "top_logprob"}
    assert token["properties"]["top_logprob"]["additionalProperties"]["type"] == "number"
    assert set(schemas["ProcessResponse"]["required"]) >= {"text", "tokens", "logprob", "request_time"}


def test_health_ready_and_organizers_check(hf):
    response = hf.client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"
    process(hf, prompt="The capital of France is ")  # the organizers' readiness probe, all defaults


def test_starter_kit_request_with_every_field(server):
    values = {"prompt": PROMPT, "num_samples": 2, "max_new_tokens": 6, "top_k": 20, "temperature": 0.5, "seed": 3}
    assert set(values) == set(STARTER_PROCESS["properties"]), "the starter spec changed: update this test"
    data = process(server, **values)
    assert len(data["completions"]) == 2
    assert all(1 <= len(seq["tokens"]) <= 6 for seq in data["completions"])


def test_helm_request_with_every_field(server):
    body = {
        "prompt": PROMPT, "temperature": 1e-7, "num_return_sequences": 2, "max_new_tokens": 6,
        "top_p": 0.9, "echo_prompt": True, "top_k_per_token": 3, "stop_sequences": ["###"],
    }  # fmt: skip
    assert set(body) == HELM_FIELDS
    data = process(server, **body)
    assert len(data["completions"]) == 2
    n_prompt = len(tokenize(server, PROMPT)) - 1  # BOS is not returned
    for seq in data["completions"]:
        assert seq["text"].startswith(PROMPT)
        assert n_prompt < len(seq["tokens"]) <= n_prompt + 6
        assert all(len(t["top_logprob"]) <= 3 for t in seq["tokens"])


def test_tokenize_request_fields(server):
    body = {"text": LONG_TEXT, "truncation": False, "max_length": HELM_WINDOW}
    assert set(body) == set(STARTER_TOKENIZE["properties"])
    full = tokenize(server, **body)  # as HELM sends it
    assert len(full) > HELM_WINDOW
    assert tokenize(server, LONG_TEXT) == full[:HELM_WINDOW]  # starter defaults: truncation true, 2048
    assert tokenize(server, LONG_TEXT, truncation=True, max_length=5) == full[:5]
    assert tokenize(server, LONG_TEXT, truncation=False, max_length=5) == full
    ordinary = "The cat sat on the mat."
    assert decode(server, tokenize(server, ordinary, truncation=False)) == ordinary


def test_unknown_fields_are_ignored(hf):
    plain = greedy(hf, max_new_tokens=5)
    extra = greedy(hf, max_new_tokens=5, model="neurips/local", best_of=3, logprobs=True, future_field={"a": [1]})
    assert extra["text"] == plain["text"]
    same_tokens(extra["tokens"], plain["tokens"])
    assert tokenize(hf, PROMPT, unknown=1) == tokenize(hf, PROMPT)
    response = hf.client.post("/decode", json={"tokens": tokenize(hf, PROMPT), "skip_special": False})
    assert response.status_code == 200 and response.json()["text"] == decode(hf, tokenize(hf, PROMPT))


def test_starter_defaults_apply(hf):
    # temperature 0.8, top_k 200, num_samples 1 (seeded, so the explicit request must sample the same)
    implicit = process(hf, prompt=PROMPT, seed=11)
    explicit = process(hf, prompt=PROMPT, seed=11, temperature=0.8, top_k=200, max_new_tokens=50, num_samples=1)
    assert len(implicit["completions"]) == 1
    assert len(implicit["tokens"]) <= 50
    assert implicit["text"] == explicit["text"]
    same_tokens(implicit["tokens"], explicit["tokens"])
    # max_new_tokens 50, checked on its own with greedy decoding
    default_length = process(hf, prompt=PROMPT, temperature=0)
    assert default_length["text"] == greedy(hf, max_new_tokens=50)["text"]
    assert len(default_length["tokens"]) <= 50


# --------------------------------------------------------------------------------------------------
# Behaviour.


def _stopped(server: Server, stops: list[str], **body) -> dict:
    return greedy(server, stop_sequences=stops, top_k_per_token=2, **body)


@pytest.fixture
def reference(server) -> tuple[Server, dict]:
    """A greedy run without stop sequences; the stop tests cut it."""
    return server, greedy(server, top_k_per_token=2)


def _first_candidate(ref: dict, ok: Callable[[int, int, str], str | None]) -> tuple[int, str]:
    """First token index i (not among the last few, whose text a final flush may extend) for which
    ``ok(i, start_of_i, text)`` proposes a stop string."""
    tokens, text = ref["tokens"], ref["text"]
    offsets = starts(tokens)
    for i in range(1, len(tokens) - 4):
        if (stop := ok(i, offsets[i], text)) is not None:
            return i, stop
    pytest.fail(f"no usable stop candidate in {text!r}")


def test_stop_inside_a_token_keeps_it_trimmed(reference):
    server, ref = reference
    tokens, offsets = ref["tokens"], starts(ref["tokens"])

    def inside(i, start, text):
        if len(tokens[i]["text"]) < 2:
            return None
        stop = text[start + 1 : start + 5]
        return stop if len(stop) == 4 and text.find(stop) == start + 1 else None

    i, stop = _first_candidate(ref, inside)
    cut = offsets[i] + 1
    got = _stopped(server, [stop])
    assert got["text"] == ref["text"][:cut]
    assert stop not in got["text"]
    same_tokens(got["tokens"][:-1], tokens[:i])
    last = got["tokens"][-1]
    assert last["text"] == tokens[i]["text"][:1]  # the straddling token stays, trimmed to the cut
    assert last["logprob"] == pytest.approx(tokens[i]["logprob"], abs=1e-5)  # and its logprob counts
    assert got["logprob"] == pytest.approx(sum(t["logprob"] for t in tokens[: i + 1]), abs=1e-4)


def test_stop_at_a_token_boundary_drops_that_token(reference):
    server, ref = reference
    tokens = ref["tokens"]

    def boundary(i, start, text):
        if not tokens[i - 1]["text"] or not tokens[i]["text"]:
            return None
        stop = text[start : start + 3]
        return stop if len(stop) == 3 and text.find(stop) == start else None

    i, stop = _first_candidate(ref, boundary)
    got = _stopped(server, [stop])
    assert got["text"] == ref["text"][: starts(tokens)[i]]
    same_tokens(got["tokens"], tokens[:i])
    assert got["logprob"] == pytest.approx(sum(t["logprob"] for t in tokens[:i]), abs=1e-4)


def test_earliest_of_several_stops_wins(reference):
    server, ref = reference
    text = ref["text"]
    offsets = starts(ref["tokens"])

    def first_at(p: int, stop: str) -> bool:
        return len(stop) >= 2 and text.find(stop) == p

    # one stop complete before the other begins: the first one to appear stops generation
    candidates = [(p, text[p : p + 3]) for p in offsets[1:-4] if first_at(p, text[p : p + 3])]
    early = candidates[0] if candidates else None
    late = next((c for c in candidates if c[0] >= early[0] + 3), None) if early else None
    assert late is not None, f"no usable stops in {text!r}"
    got = _stopped(server, [late[1], early[1]])  # list order does not matter
    assert got["text"] == text[: early[0]]
    same_tokens(got["tokens"], _stopped(server, [early[1]])["tokens"])
    assert _stopped(server, [late[1]])["text"] == text[: late[0]]

    # two stops completed by the same token: the one that starts first wins
    both = [
        (p, text[p - 3 : p + 1], text[p : p + 2])
        for i, p in enumerate(offsets[1:-4], start=1)
        if p >= 3 and len(ref["tokens"][i]["text"]) >= 2 and first_at(p - 3, text[p - 3 : p + 1]) and first_at(p, text[p : p + 2])
    ]
    assert both, f"no usable stops in {text!r}"
    p, long_stop, short_stop = both[0]
    got = _stopped(server, [short_stop, long_stop])
    assert got["text"] == text[: p - 3]
    assert short_stop not in got["text"] and long_stop not in got["text"]


def test_stop_never_found_returns_everything(reference):
    server, ref = reference
    stop = "\u2603 never \u2603"
    assert stop not in ref["text"]
    got = _stopped(server, [stop, "\u2604"])
    assert got["text"] == ref["text"]
    same_tokens(got["tokens"], ref["tokens"])
    assert got["logprob"] == pytest.approx(ref["logprob"], abs=1e-4)


def test_eos_ends_generation_and_is_not_returned(server, monkeypatch):
    ref = greedy(server, max_new_tokens=30, top_k_per_token=0)
    tokens = ref["tokens"]
    # the id greedy produced at step k: a word token " word", which /tokenize("word") gives alone
    for k in range(1, len(tokens)):
        text = tokens[k]["text"]
        if not (len(text) > 2 and text[0] == " " and text[1:].isalpha()):
            continue
        if any(t["text"] == text for t in tokens[:k]):
            continue
        ids = tokenize(server, text[1:])
        if ids[:1] == [server.generator.codec.bos_id]:
            ids = ids[1:]
        if len(ids) == 1 and decode(server, ids) == text[1:]:
            eos = ids[0]
            break
    else:
        pytest.fail(f"no word token to turn into EOS in {ref['text']!r}")

    monkeypatch.setattr(server.generator.codec, "eos_id", eos)
    got = greedy(server, max_new_tokens=30, top_k_per_token=0)
    same_tokens(got["tokens"], tokens[:k])  # ends right before EOS; EOS itself is not returned
    assert got["text"] == ref["text"][: starts(tokens)[k]]
    # several sequences: each one ends at its own EOS
    many = greedy(server, max_new_tokens=30, top_k_per_token=0, num_return_sequences=2)
    assert [c["text"] for c in many["completions"]] == [got["text"]] * 2


def test_num_return_sequences_and_num_samples(hf):
    body = dict(prompt=PROMPT, max_new_tokens=8, temperature=1.0, seed=5)
    data = process(hf, **body, num_return_sequences=3)
    assert len(data["completions"]) == 3
    assert len({c["text"] for c in data["completions"]}) > 1, "independent samples (very likely distinct)"
    assert len(process(hf, **body, num_samples=2)["completions"]) == 2
    assert len(process(hf, **body, num_samples=2, num_return_sequences=3)["completions"]) == 3
    assert len(process(hf, **body, num_samples=4, num_return_sequences=1)["completions"]) == 1
    assert len(process(hf, **body)["completions"]) == 1


def test_seed_is_deterministic_even_with_interleaved_requests(hf):
    body = dict(prompt=PROMPT, max_new_tokens=12, temperature=1.0, top_k=0, num_return_sequences=2)

    def texts(data: dict) -> list[str]:
        return [c["text"] for c in data["completions"]]

    reference = {seed: texts(process(hf, **body, seed=seed)) for seed in (1, 2, 3)}
    assert texts(process(hf, **body, seed=1)) == reference[1]  # repeated call
    assert len({tuple(v) for v in reference.values()}) == 3, "different seeds give different samples"

    async def concurrently() -> list[tuple[int | None, httpx.Response]]:
        transport = httpx.ASGITransport(app=hf.client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            seeds = [1, 2, 3, 1, 3, 2, 1, None, 2]
            bodies = [{**body, "seed": s} if s is not None else body for s in seeds]
            responses = await asyncio.gather(*(client.post("/process", json=b) for b in bodies))
            return list(zip(seeds, responses))

    for seed, response in asyncio.run(concurrently()):
        assert response.status_code == 200, response.text
        validate(hf, "ProcessResponse", response.json())
        check_helm_fields(response.json())
        if seed is not None:
            assert texts(response.json()) == reference[seed], f"seed {seed} changed under concurrency"


def test_greedy_is_deterministic_and_tiny_temperature_is_greedy(server):
    first = greedy(server, max_new_tokens=20, top_k_per_token=1)
    again = greedy(server, max_new_tokens=20, top_k_per_token=1)
    assert again["text"] == first["text"]
    same_tokens(again["tokens"], first["tokens"])
    helm_zero = process(server, prompt=PROMPT, temperature=1e-7, max_new_tokens=20, seed=99, top_p=0.5, top_k=3)
    assert helm_zero["text"] == first["text"]
    same_tokens(helm_zero["tokens"], first["tokens"])
    many = greedy(server, max_new_tokens=20, num_return_sequences=2)
    assert [c["text"] for c in many["completions"]] == [first["text"]] * 2
    for token in first["tokens"]:  # greedy takes the likeliest token
        assert token["logprob"] == pytest.approx(max(token["top_logprob"].values()), abs=1e-6)
    # top_logprob keys are token texts in context: the greedy token's own text is its single key
    # (except where a character is split over tokens, and for the last token, which may carry a flush)
    plain = [t for t in first["tokens"][:-1] if t["text"] and REPLACEMENT not in t["text"]]
    assert plain, first["text"]
    for token in plain:
        assert list(token["top_logprob"]) == [token["text"]]


def test_top_k_per_token(server):
    none = greedy(server, max_new_tokens=10, top_k_per_token=0, echo_prompt=True)
    assert all(t["top_logprob"] == {} for t in none["tokens"])
    five = greedy(server, max_new_tokens=10, top_k_per_token=5, echo_prompt=True)
    ten = greedy(server, max_new_tokens=10, top_k_per_token=10, echo_prompt=True)
    assert five["text"] == ten["text"] == none["text"]
    sizes = [len(t["top_logprob"]) for t in five["tokens"]]
    assert all(1 <= n <= 5 for n in sizes) and sizes.count(5) > len(sizes) // 2  # fewer only where texts merge
    for t5, t10 in zip(five["tokens"], ten["tokens"]):
        top5, top10 = t5["top_logprob"], t10["top_logprob"]
        assert t5["logprob"] <= max(top5.values()) + 1e-6
        for key, value in top5.items():  # the same alternatives with the same values...
            assert top10[key] == pytest.approx(value, abs=1e-6)
        floor = min(top5.values())  # ...and they are the largest ones
        assert all(key in top5 for key, value in top10.items() if value > floor + 1e-6)
    sampled = process(server, prompt=PROMPT, max_new_tokens=10, temperature=1.5, top_k=0, seed=4, top_k_per_token=5)
    for token in sampled["tokens"]:
        assert token["logprob"] <= max(token["top_logprob"].values()) + 1e-6


def test_echo_scores_the_prompt(server):
    ids = tokenize(server, PROMPT, truncation=False)
    bos = ids[:1] == [server.generator.codec.bos_id]
    scored = process(server, prompt=PROMPT, echo_prompt=True, max_new_tokens=0, temperature=0, top_k_per_token=3)
    assert scored["text"] == PROMPT
    assert len(scored["tokens"]) == len(ids) - int(bos)  # BOS is not returned, nothing generated
    assert all(t["logprob"] < 0 for t in scored["tokens"])  # every prompt token is scored (BOS is context)
    assert all(len(t["top_logprob"]) >= 1 for t in scored["tokens"])
    # echo plus generation: the prompt's tokens, then exactly what generation alone returns
    generated = greedy(server, max_new_tokens=5, top_k_per_token=3)
    both = greedy(server, max_new_tokens=5, top_k_per_token=3, echo_prompt=True)
    assert both["text"] == PROMPT + generated["text"]
    same_tokens(both["tokens"], scored["tokens"] + generated["tokens"])
    empty = process(server, prompt="", echo_prompt=True, max_new_tokens=0)
    assert empty["text"] == "" and empty["tokens"] == []


def test_context_overflow(server):
    block = server.generator.max_seq_length
    assert block == HELM_WINDOW
    n_prompt = len(tokenize(server, LONG_TEXT, truncation=False))
    assert n_prompt > 2 * block
    data = process(server, prompt=LONG_TEXT, max_new_tokens=10, temperature=0)
    assert data["truncated_prompt_tokens"] == n_prompt - (block - 10)
    assert 1 <= len(data["tokens"]) <= 10
    # echo keeps the tail of the prompt (and BOS, which is not returned)
    echoed = process(server, prompt=LONG_TEXT, max_new_tokens=0, echo_prompt=True, temperature=0)
    assert echoed["truncated_prompt_tokens"] == n_prompt - block
    assert len(echoed["tokens"]) == block - 1
    assert echoed["text"] and LONG_TEXT.endswith(echoed["text"])
    # a max_new_tokens that leaves no room for any prompt is refused, naming the field
    for too_many in (block, block + 1, 10**6):
        detail = unprocessable(server, "/process", json={"prompt": PROMPT, "max_new_tokens": too_many})
        assert any(e["loc"][-1] == "max_new_tokens" for e in detail)


def test_invalid_bytes_never_repeat_earlier_text(server, monkeypatch):
    """Random weights emit byte tokens that are not valid UTF-8 ("d" as a byte, then a lone lead
    byte). Per-token texts must still be new text only: never a second copy of the context."""
    import server.generate as generate

    codec = server.generator.codec
    processor = codec.tokenizer.processor
    piece_id = processor.token_to_id if server.backend == "huggingface" else processor.piece_to_id
    word = tokenize(server, "cat")[-1]
    lead = piece_id("<0xE2>")  # starts a 3-byte character that never comes
    # ends with an unfinished character: the last token carries it as U+FFFD
    script = [word, piece_id("<0x64>"), piece_id("<0xEF>"), word, word, lead]
    steps = iter(script)
    # a sampled request: its rows go through generate.sample, which the script replaces
    monkeypatch.setattr(generate, "sample", lambda logits, req, gen: logits.new_full((logits.size(0),), next(steps)).long())
    data = process(server, prompt=PROMPT, max_new_tokens=len(script), temperature=1.0, top_k_per_token=5)
    assert len(data["tokens"]) == len(script)
    assert "France" not in data["text"], f"context text repeated: {data['text']!r}"
    keys = [key for token in data["tokens"] for key in token["top_logprob"]]  # alternatives: new text only
    assert not [key for key in keys if "France" in key], keys
    assert data["tokens"][-1]["text"] == REPLACEMENT
    # the same text as decoding everything at once, up to how a bad byte run is rendered
    whole = decode(server, tokenize(server, PROMPT) + script)
    ours = PROMPT + data["text"]
    assert len(ours) == len(whole)
    assert all(a == b or b == REPLACEMENT for a, b in zip(ours, whole)), (ours, whole)
    # EOS right after an unfinished character: the character is not lost either
    steps = iter([word, lead, codec.eos_id])
    data = process(server, prompt=PROMPT, max_new_tokens=5, temperature=1.0)
    assert len(data["tokens"]) == 2 and data["text"].endswith(REPLACEMENT)
    assert PROMPT + data["text"] == decode(server, tokenize(server, PROMPT) + [word, lead])


# --------------------------------------------------------------------------------------------------
# 422s name the field.

BAD_PROCESS = [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"num_return_sequences": MAX_SEQUENCES + 1}, "num_return_sequences"),
    ({"num_return_sequences": 0}, "num_return_sequences"),
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": MAX_SEQUENCES + 1}, "num_samples"),
    ({"top_k_per_token": MAX_TOP_LOGPROBS + 1}, "top_k_per_token"),
    ({"top_k_per_token": -1}, "top_k_per_token"),
    ({"prompt": ""}, "prompt"),
    ({"stop_sequences": ["\n", ""]}, "stop_sequences"),
    ({"stop_sequences": "###"}, "stop_sequences"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
]


@pytest.mark.parametrize(("change", "field"), BAD_PROCESS, ids=[f"{f}={v}" for (c, f) in BAD_PROCESS for v in [c[f]]])
def test_process_422_names_the_field(hf, change, field):
    detail = unprocessable(hf, "/process", json={"prompt": PROMPT, "max_new_tokens": 2, **change})
    assert any(field in e["loc"] for e in detail), detail
    if field == "prompt":
        assert any(e["loc"][-1] == "prompt" for e in detail)


def test_edge_values_are_accepted(hf):
    ok = dict(prompt=PROMPT, max_new_tokens=1)
    for change in ({"top_p": 1.0}, {"temperature": 0}, {"num_return_sequences": MAX_SEQUENCES},
                   {"top_k_per_token": MAX_TOP_LOGPROBS}, {"seed": 2**64 - 1}, {"seed": -(2**63)},
                   {"prompt": "", "echo_prompt": True}):  # fmt: skip
        process(hf, **{**ok, **change})


def test_other_422s(hf):
    vocab = hf.generator.codec.vocab_size
    good = tokenize(hf, PROMPT)
    for bad in (vocab, 10**9, -1):
        detail = unprocessable(hf, "/decode", json={"tokens": [*good, bad, 0]})
        assert any(e["loc"][-2:] == ["tokens", len(good)] for e in detail), detail
    decode(hf, [*good, vocab - 1])
    detail = unprocessable(hf, "/tokenize", json={"text": PROMPT, "max_length": 0})
    assert any(e["loc"][-1] == "max_length" for e in detail)
    unprocessable(hf, "/process", content=b"not json {", headers={"content-type": "application/json"})
    unprocessable(hf, "/process", json=[PROMPT])
    detail = unprocessable(hf, "/process", json={"max_new_tokens": 3})
    assert any(e["loc"][-1] == "prompt" for e in detail)
    detail = unprocessable(hf, "/tokenize", json={"truncation": False})
    assert any(e["loc"][-1] == "text" for e in detail)
