"""A HELM-like request trace: what the organizers' ``helm-run`` sends to ``/process``, and how much.

Shared by ``make eval-time`` (``submission/eval_time.py``: projects the eval's wall time from a
running server) and serving benchmarks. Nothing here reads files or talks to a server.

Where the numbers come from
---------------------------
* Adapter settings (max_new_tokens, stop sequences, temperature, shots) are HELM's run specs as of
  the challenge (2023): ``get_multiple_choice_adapter_spec`` (5 shots, 1 token; the MC-joint adapter
  sends ``top_k_per_token = num_outputs = 5``), ``get_gsm_spec`` (5 shots, 400 tokens, stop "\\n\\n"),
  ``get_math_spec`` with chain of thought (8 shots, 400 tokens, stop "###"),
  ``get_summarization_adapter_spec`` (5 shots by default, 128 tokens, temperature 0.3, stop "###"),
  ``get_big_bench_spec`` (max_tokens 64, stop = the task's ``stop_string``, mostly none; its MC tasks
  go through the MC-joint adapter, which sent 1 token in 2023). The challenge README's table agrees
  (it lists summarization as 0-shot; HELM's summarization adapter asks for 5 and then drops examples
  until prompt + 128 fit the window, which is what this model does: the costlier reading).
* HELM fits every prompt so that prompt + max_new_tokens <= the 2,048-token window, dropping
  in-context examples from the end first; the trace does the same.
* Request multipliers: ``data_augmentation=canonical`` (MMLU) sends each instance 5 times
  (original + 4 perturbations of the question only; the in-context examples are not perturbed).
  ``max_train_instances=big_bench_few_shot_setting`` is a run expander that turns every BIG-bench
  entry into 4 run specs, with 0, 1, 2 and 3 shots (HELM ``MaxTrainInstancesRunExpander``:
  ``"big_bench_few_shot_setting": [0, 1, 2, 3]``), so each BIG-bench instance is sent 4 times.
* Prompt lengths (Llama/Mistral tokens) are estimates from the datasets, not measurements: one
  in-context example (input + answer) is drawn per run spec from a log-normal with the type's mean
  and spread across run specs (e.g. MMLU subjects range from ~60-token examples to ~400 for
  professional_law / the history subjects); the eval instance is the example's input part. Resulting
  prompt means (seed 0): MMLU ~700 (p10 ~250, p90 ~1,650: long subjects reach the window), BBQ ~600,
  TruthfulQA ~450, ETHICS ~450, corr2cause ~1,100, BIG-bench MC ~400 and generative ~175 (0-3
  shots), GSM8K ~800, MATH ~1,450 (7-8 shots under its 1,648 cap), CNN/DM ~1,650 (articles <= 512
  words, ~500-700 tokens: one or two shots fit in 1,920), SAMSum ~1,050 (dialogues ~100-300, 5 shots).
* HELM samples the in-context examples once per run spec (``sample_train``), so every request of a
  run spec starts with the same prefix: ``TraceRequest.prefix_tokens`` is that shared part.

Request counts per set (instances x augmentation x shot settings) are in ``SETS``; the derivation
is written next to the constants below.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

HELM_WINDOW = 2048  # HELM's max_request_length for neurips/local: prompt + max_new_tokens
HELM_CONCURRENCY = 30  # helm-run -n 30: request threads in parallel
HELM_RUN_THREADS = 4  # helm-run's own default for -n/--num-threads (crfm-helm 0.2.4 and 0.5.16), which the organizers' command doesn't set
GREEDY_TEMPERATURE = 1e-7  # what HELM sends when a scenario asks for temperature 0


@dataclass(frozen=True)
class RequestType:
    """One kind of request HELM sends, with its adapter settings and prompt-length model."""

    name: str
    scenarios: str  # which HELM scenarios it stands for
    max_new_tokens: int  # HELM's max_tokens for the run spec
    stop_sequences: tuple[str, ...]
    temperature: float  # the adapter's temperature (0 is sent as GREEDY_TEMPERATURE)
    top_k_per_token: int  # MC joint: num_outputs (5 for get_multiple_choice_adapter_spec); else 1
    shots: tuple[int, ...]  # in-context examples; several values = one run spec per value
    example_tokens: float  # mean tokens of one in-context example (input + answer)
    example_spread: float  # std of that mean across run specs (subjects, tasks)
    instance_fraction: float  # the eval instance (input only) relative to an example
    instance_jitter: float  # relative std of the eval instance within a run spec
    instructions_tokens: int  # the run spec's instructions line before the examples
    augmentation: int = 1  # requests per instance (data_augmentation=canonical: 5)
    # Typical generated length when the model honours the stop sequences (a finetuned model that
    # learned the few-shot format). The projection uses these; see EXPECTED_NEW_TOKENS_NOTE.
    expected_new_tokens: int = 1
    shared_prefix: bool = True  # HELM reuses the same in-context examples within a run spec

    @property
    def kind(self) -> str:
        return "multiple_choice" if self.max_new_tokens == 1 else "generation"

    @property
    def requests_per_instance(self) -> int:
        return self.augmentation * len(self.shots)


MC_STOP = ("\n",)  # the README's table; 1 token is generated either way

TYPES: dict[str, RequestType] = {
    t.name: t
    for t in (
        RequestType(
            "mmlu", "MMLU (57 subjects, data_augmentation=canonical)", 1, MC_STOP, 0.0, 5, (5,),
            example_tokens=110, example_spread=70, instance_fraction=0.95, instance_jitter=0.45,
            instructions_tokens=15, augmentation=5, expected_new_tokens=1,
        ),
        RequestType(
            "bbq", "BBQ (subject=all)", 1, MC_STOP, 0.0, 5, (5,),
            example_tokens=90, example_spread=10, instance_fraction=0.95, instance_jitter=0.3,
            instructions_tokens=10, expected_new_tokens=1,
        ),
        RequestType(
            "truthful_qa", "TruthfulQA mc_single", 1, MC_STOP, 0.0, 5, (5,),
            example_tokens=95, example_spread=10, instance_fraction=0.95, instance_jitter=0.45,
            instructions_tokens=0, expected_new_tokens=1,
        ),
        RequestType(
            "big_bench_mc", "BIG-bench multiple-choice tasks (14 tasks, 25 specs)", 1, MC_STOP, 0.0, 1, (0, 1, 2, 3),
            example_tokens=140, example_spread=110, instance_fraction=0.9, instance_jitter=0.35,
            instructions_tokens=20, expected_new_tokens=1,
        ),
        RequestType(
            "big_bench_gen", "BIG-bench generative tasks (auto_debugging, linguistics_puzzles, operators, repeat_copy_logic)",
            64, (), 0.0, 1, (0, 1, 2, 3),
            example_tokens=80, example_spread=50, instance_fraction=0.8, instance_jitter=0.35,
            instructions_tokens=15, expected_new_tokens=64,
        ),
        RequestType(
            "ethics", "ETHICS (5 subsets: commonsense, deontology, justice, utilitarianism, virtue)", 1, MC_STOP, 0.0, 5, (5,),
            example_tokens=85, example_spread=50, instance_fraction=0.95, instance_jitter=0.5,
            instructions_tokens=15, expected_new_tokens=1,
        ),
        RequestType(
            "corr2cause", "corr2cause", 1, MC_STOP, 0.0, 5, (5,),
            example_tokens=180, example_spread=15, instance_fraction=0.95, instance_jitter=0.3,
            instructions_tokens=15, expected_new_tokens=1,
        ),
        RequestType(
            "gsm", "GSM8K (chain of thought)", 400, ("\n\n",), 0.0, 1, (5,),
            example_tokens=170, example_spread=10, instance_fraction=0.4, instance_jitter=0.35,
            instructions_tokens=0, expected_new_tokens=120,
        ),
        RequestType(
            "math_cot", "MATH with chain of thought (7 subjects x levels)", 400, ("###",), 0.0, 1, (8,),
            example_tokens=220, example_spread=50, instance_fraction=0.35, instance_jitter=0.45,
            instructions_tokens=10, expected_new_tokens=200,
        ),
        RequestType(
            "summarization_cnndm", "CNN/DailyMail (3 sentences)", 128, ("###",), 0.3, 1, (5,),
            example_tokens=650, example_spread=30, instance_fraction=0.88, instance_jitter=0.25,
            instructions_tokens=0, expected_new_tokens=70,
        ),
        RequestType(
            "summarization_samsum", "SAMSum dialogue summarization", 128, ("###",), 0.3, 1, (5,),
            example_tokens=170, example_spread=15, instance_fraction=0.82, instance_jitter=0.4,
            instructions_tokens=0, expected_new_tokens=30,
        ),
    )
}  # fmt: skip

EXPECTED_NEW_TOKENS_NOTE = (
    "generations are assumed to end at their stop sequence after: multiple choice 1 token; "
    "GSM8K ~120 (a reference chain of thought); MATH ~200 (solutions' typical length, cap 400); "
    "CNN/DM ~70 (3 sentences); SAMSum ~30 (1-2 sentences); BIG-bench generative 64 (no stop "
    "sequence, so it runs to max_tokens unless the model emits EOS). The worst case lets every "
    "generation run to max_new_tokens."
)


@dataclass(frozen=True)
class WorkloadSet:
    """One eval run: its time limit and, per request type, instances and HELM run specs."""

    name: str
    title: str
    limit_s: float
    instances: dict[str, int]
    specs: dict[str, int]  # run-spec entries per type (before the BIG-bench shot expansion)

    @property
    def requests(self) -> dict[str, int]:
        """Requests HELM sends per type: instances x augmentation x shot settings."""
        return {t: n * TYPES[t].requests_per_instance for t, n in self.instances.items()}

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def groups(self, type_name: str) -> int:
        """Run specs of a type after expansion: each has its own in-context examples."""
        return self.specs[type_name] * len(TYPES[type_name].shots)


# --- The 2-hour sample conf: run_specs_full_coarse_600_budget.conf (600 instances in 88 entries).
# Sums of max_eval_instances (entries):
#   big_bench_gen  72 (4)  = auto_debugging 18 + linguistics_puzzles 18 + operators 18 + repeat_copy_logic 18
#   big_bench_mc  257 (25) = code_line_description 19 + conceptual_combinations 3+3+4+4+4 + emoji_movie 19
#                           + formal_fallacies_syllogisms_negation 19 + known_unknowns 19 + logic_grid_puzzle 18
#                           + logical_deduction 6+6+6 + novel_concepts 18 + play_dialog_same_or_different 18
#                           + strange_stories 9+9 + strategyqa 18 + symbol_interpretation 3+3+4+4+4
#                           + vitaminc_fact_verification 18 + winowhy 19
#   mmlu          216 (55) = 55 subjects x 3-6 each
#   truthful_qa 9, summarization_cnndm 9, gsm 19, bbq 18 (1 entry each)
# Requests: BIG-bench x4 (shots 0,1,2,3), MMLU x5 (canonical), others x1:
#   288 + 1028 + 1080 + 9 + 9 + 19 + 18 = 2451 requests.
SAMPLE_CONF_INSTANCES = {
    "big_bench_mc": 257, "big_bench_gen": 72, "mmlu": 216, "truthful_qa": 9,
    "summarization_cnndm": 9, "gsm": 19, "bbq": 18,
}  # fmt: skip
SAMPLE_CONF_SPECS = {
    "big_bench_mc": 25, "big_bench_gen": 4, "mmlu": 55, "truthful_qa": 1,
    "summarization_cnndm": 1, "gsm": 1, "bbq": 1,
}  # fmt: skip

# --- The open set: the same run specs with larger caps, ~2,000 instances. The README's table gives
# GSM8K 61 instances; the other types keep the sample conf's proportions, scaled by
# (2000 - 61) / (600 - 19) = 3.337 and rounded: big_bench_mc 858, big_bench_gen 240, mmlu 721,
# truthful_qa 30, summarization_cnndm 30, bbq 60, gsm 61 = 2,000 instances
# = 3,432 + 960 + 3,605 + 30 + 30 + 60 + 61 = 8,178 requests.
OPEN_GSM_INSTANCES = 61
_OPEN_SCALE = (2000 - OPEN_GSM_INSTANCES) / (600 - SAMPLE_CONF_INSTANCES["gsm"])
OPEN_SET_INSTANCES = {t: (OPEN_GSM_INSTANCES if t == "gsm" else round(n * _OPEN_SCALE)) for t, n in SAMPLE_CONF_INSTANCES.items()}

# --- The closed (hidden) set, ~5,000 instances as the README lists them: sam_sum 1000,
# corr2cause 1000, ETHICS 5 subsets x 200, MATH 14 specs x ~71 (= 994), CNN/DM 1000; no
# augmentation, one shot setting each: 4,994 requests.
CLOSED_SET_INSTANCES = {
    "summarization_samsum": 1000, "corr2cause": 1000, "ethics": 5 * 200,
    "math_cot": 14 * 71, "summarization_cnndm": 1000,
}  # fmt: skip
CLOSED_SET_SPECS = {"summarization_samsum": 1, "corr2cause": 1, "ethics": 5, "math_cot": 14, "summarization_cnndm": 1}

MINUTE = 60.0
SETS: dict[str, WorkloadSet] = {
    "sample": WorkloadSet(
        "sample", "2-hour sample conf (run_specs_full_coarse_600_budget.conf)", 120 * MINUTE,
        SAMPLE_CONF_INSTANCES, SAMPLE_CONF_SPECS,
    ),
    "open": WorkloadSet("open", "open set (~2,000 instances)", 300 * MINUTE, OPEN_SET_INSTANCES, SAMPLE_CONF_SPECS),
    "closed": WorkloadSet("closed", "closed set (~5,000 instances)", 600 * MINUTE, CLOSED_SET_INSTANCES, CLOSED_SET_SPECS),
}  # fmt: skip


def _union_set() -> WorkloadSet:
    instances: dict[str, int] = {}
    specs: dict[str, int] = {}
    for s in SETS.values():
        for t, n in s.instances.items():
            instances[t] = instances.get(t, 0) + n
            specs[t] = max(specs.get(t, 0), s.specs[t])
    limit = sum(s.limit_s for s in SETS.values())
    return WorkloadSet("all", "every set together (covers every request type)", limit, instances, specs)


WORKLOADS: dict[str, WorkloadSet] = {**SETS, "all": _union_set()}

# Common English words, one Llama/Mistral/GPT-2 token each with their leading space. Prompts are
# these words at random (seeded), so different instances share no accidental prefix.
DEFAULT_WORDS = (
    "the of and to in is was for on that with as it by at from his an were are which this be or has "
    "had one not but their first new time two after also who its they have been more would into when "
    "there all other about what people year many some than up can out only most over such city made "
    "world three may these used where later under state known while during between both years being "
    "well since part her system day school found use each"
)


@dataclass(frozen=True)
class TraceRequest:
    """One ``/process`` call of the trace, with what the projection needs to know about it."""

    type: str
    group: str  # the run spec it belongs to ("mmlu/3"): same in-context examples within a group
    instance: int  # instance index within the group (augmented copies share it)
    body: dict  # the JSON body, in HELM's vocabulary
    prompt_tokens: int  # target prompt length (tokens, per the calibration used)
    prefix_tokens: int  # the part shared by every request of the group (instructions + shots)
    max_new_tokens: int  # HELM's max_tokens for this request (before any cap)
    expected_new_tokens: int
    shots: int = field(default=0)  # in-context examples kept after fitting the window


def allocate(counts: dict[str, int], n: int, min_per_type: int = 0) -> dict[str, int]:
    """Split ``n`` requests over types in proportion to ``counts`` (largest remainder), giving each
    type with a positive count at least ``min_per_type`` first."""
    types = [t for t, c in counts.items() if c > 0]
    if n < 0 or min_per_type < 0:
        raise ValueError("n and min_per_type must be >= 0")
    base = {t: min_per_type for t in types}
    rest = n - min_per_type * len(types)
    if rest < 0:
        raise ValueError(f"{n} requests cannot give {min_per_type} to each of {len(types)} types")
    total = sum(counts[t] for t in types)
    if not total:
        return base
    shares = {t: rest * counts[t] / total for t in types}
    out = {t: base[t] + int(shares[t]) for t in types}
    left = n - sum(out.values())
    for t in sorted(types, key=lambda t: (-(shares[t] - int(shares[t])), types.index(t)))[:left]:
        out[t] += 1
    return out


def _lognormal(rng: random.Random, mean: float, std: float) -> float:
    if std <= 0:
        return mean
    sigma2 = math.log(1 + (std / mean) ** 2)
    return rng.lognormvariate(math.log(mean) - sigma2 / 2, math.sqrt(sigma2))


def _words(rng: random.Random, words: Sequence[str], tokens: int, tokens_per_word: float) -> str:
    n = max(1, round(tokens / tokens_per_word)) if tokens > 0 else 0
    return " ".join(rng.choices(words, k=n))


@dataclass
class _Group:
    name: str
    shots: int
    example: float  # this run spec's mean example length
    instructions: str
    shot_texts: list[str]
    shot_tokens: list[int]


def _make_group(t: RequestType, index: int, seed: int, words: Sequence[str], tpw: float) -> _Group:
    rng = random.Random(f"group:{seed}:{t.name}:{index}")
    shots = t.shots[index % len(t.shots)]
    example = max(8.0, _lognormal(rng, t.example_tokens, t.example_spread))
    shot_tokens = [max(4, round(_lognormal(rng, example, example * t.instance_jitter))) for _ in range(shots)]
    # Each shot is followed by "\n\n" (about one token), taken from its word budget.
    shot_texts = [_words(rng, words, n - 1, tpw) for n in shot_tokens]
    instructions = _words(rng, words, t.instructions_tokens, tpw)
    return _Group(f"{t.name}/{index}", shots, example, instructions, shot_texts, shot_tokens)


def _perturb(rng: random.Random, text: str, words: Sequence[str], rate: float = 0.1) -> str:
    """A canonical-augmentation copy: the same question with ~10% of its words changed."""
    out = [rng.choice(words) if rng.random() < rate else w for w in text.split(" ")]
    return " ".join(out)


def _prompt(t: RequestType, g: _Group, instance_text: str, instance_tokens: int, cap: int, tpw: float) -> tuple[str, int, int, int]:
    """HELM's fitting: drop in-context examples from the end until the prompt fits ``cap`` tokens,
    then cut the instance if it alone is too long. Returns (text, prompt, prefix, shots kept)."""
    instr = t.instructions_tokens + (1 if t.instructions_tokens else 0)
    answer_cue = 2  # "\nAnswer:" / "Summarize the above article..." style cue, about 2 tokens
    kept = g.shots
    while kept > 0 and instr + sum(g.shot_tokens[:kept]) + instance_tokens + answer_cue > cap:
        kept -= 1
    prefix = instr + sum(g.shot_tokens[:kept])
    if prefix + instance_tokens + answer_cue > cap:
        instance_tokens = max(1, cap - prefix - answer_cue)
        n_words = max(1, round(instance_tokens / tpw))
        instance_text = " ".join(instance_text.split(" ")[:n_words])
    parts = ([g.instructions] if t.instructions_tokens else []) + g.shot_texts[:kept]
    head = "\n\n".join(parts) + ("\n\n" if parts else "")
    return head + instance_text + "\nAnswer:", prefix + instance_tokens + answer_cue, prefix, kept


def body_for(t: RequestType, prompt: str, cap_new_tokens: int | None = None) -> dict:
    """The ``/process`` JSON body HELM's neurips/local client sends for a request of type ``t``."""
    max_new = t.max_new_tokens if cap_new_tokens is None else min(t.max_new_tokens, cap_new_tokens)
    return {
        "prompt": prompt,
        "temperature": GREEDY_TEMPERATURE if t.temperature == 0 else t.temperature,
        "num_return_sequences": 1,
        "max_new_tokens": max_new,
        "top_p": 1.0,
        "echo_prompt": False,
        "top_k_per_token": t.top_k_per_token,
        "stop_sequences": list(t.stop_sequences),
    }


def build_trace(
    n_requests: int,
    seed: int = 0,
    token_text: str | Sequence[str] = DEFAULT_WORDS,
    max_prompt_tokens: int = HELM_WINDOW,
    cap_new_tokens: int | None = None,
    *,
    workload: str = "sample",
    tokens_per_word: float = 1.0,
    min_per_type: int = 0,
    types: Iterable[str] | None = None,
    order: str = "helm",
) -> list[TraceRequest]:
    """``n_requests`` HELM-like requests sampled in proportion to ``workload``'s request mix.

    Args:
        n_requests: how many requests in all.
        seed: everything (group prefixes, instances, order) is a function of the seed.
        token_text: the words prompts are made of (a string is split on whitespace); each should be
            about one token with a leading space. One word gives literally repeated text.
        max_prompt_tokens: the window: prompts are fitted so that prompt + HELM's max_new_tokens
            fit it (dropping in-context examples first), as HELM does.
        cap_new_tokens: cap on the bodies' max_new_tokens (random-weight models never emit stop
            strings, so benchmarks cap generation; ``TraceRequest.max_new_tokens`` keeps HELM's).
        workload: "sample", "open", "closed" (see ``SETS``) or "all" (their union).
        tokens_per_word: tokens one word of ``token_text`` costs with the target tokenizer (see
            ``calibrate_tokens_per_word``); prompts use target/tokens_per_word words.
        min_per_type: give every type of the workload at least this many requests first.
        types: restrict to these types (the mix is renormalised over them).
        order: "helm" (run spec after run spec, as helm-run executes them) or "shuffled".
    """
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {workload!r}")
    if order not in ("helm", "shuffled"):
        raise ValueError(f"order must be 'helm' or 'shuffled', got {order!r}")
    if tokens_per_word <= 0:
        raise ValueError("tokens_per_word must be > 0")
    words = token_text.split() if isinstance(token_text, str) else list(token_text)
    if not words:
        raise ValueError("token_text has no words")
    ws = WORKLOADS[workload]
    counts = ws.requests
    if types is not None:
        wanted = set(types)
        unknown = wanted - set(TYPES)
        if unknown:
            raise ValueError(f"unknown request types {sorted(unknown)}; known: {sorted(TYPES)}")
        counts = {t: c for t, c in counts.items() if t in wanted}
    per_type = allocate(counts, n_requests, min_per_type)

    trace: list[TraceRequest] = []
    for name in TYPES:  # the table's order
        n = per_type.get(name, 0)
        if not n:
            continue
        t = TYPES[name]
        cap = max_prompt_tokens - t.max_new_tokens
        if cap < 8:
            raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves no room for {name}'s prompts")
        rng = random.Random(f"requests:{seed}:{name}")
        n_groups = ws.groups(name)
        groups: dict[int, _Group] = {}
        picked: dict[int, list[TraceRequest]] = {}
        instances_in: dict[int, int] = {}
        # HELM runs a run spec's instances together: fill a group with its share before the next
        per_group = max(1, round(ws.instances[name] / ws.specs[name])) if name in ws.instances else 1
        made, gi, left = 0, 0, 0
        while made < n:
            if left == 0:
                gi, left = rng.randrange(n_groups), per_group
            left -= 1
            if gi not in groups:
                groups[gi] = _make_group(t, gi, seed, words, tokens_per_word)
            g = groups[gi]
            inst = instances_in.get(gi, 0)
            instances_in[gi] = inst + 1
            inst_mean = g.example * t.instance_fraction
            inst_tokens = max(4, round(_lognormal(rng, inst_mean, inst_mean * t.instance_jitter)))
            text = _words(rng, words, inst_tokens, tokens_per_word)
            for copy in range(t.augmentation):
                if made == n:
                    break
                variant = text if copy == 0 else _perturb(rng, text, words)
                prompt, p_tokens, prefix, kept = _prompt(t, g, variant, inst_tokens, cap, tokens_per_word)
                req = TraceRequest(
                    type=name, group=g.name, instance=inst, body=body_for(t, prompt, cap_new_tokens),
                    prompt_tokens=p_tokens, prefix_tokens=prefix if t.shared_prefix else 0,
                    max_new_tokens=t.max_new_tokens, expected_new_tokens=t.expected_new_tokens, shots=kept,
                )  # fmt: skip
                picked.setdefault(gi, []).append(req)
                made += 1
        for gi in sorted(picked):
            trace.extend(picked[gi])
    if order == "shuffled":
        random.Random(f"order:{seed}").shuffle(trace)
    return trace


CALIBRATION_WORDS = 512


def calibration_text(token_text: str | Sequence[str] = DEFAULT_WORDS, n_words: int = CALIBRATION_WORDS, seed: int = 0) -> str:
    """``n_words`` random words of ``token_text``, spaced as in the trace's prompts."""
    words = token_text.split() if isinstance(token_text, str) else list(token_text)
    return " ".join(random.Random(f"calibrate:{seed}").choices(words, k=n_words))


def calibrate_tokens_per_word(
    count_tokens: Callable[[str], int],
    token_text: str | Sequence[str] = DEFAULT_WORDS,
    n_words: int = CALIBRATION_WORDS,
    seed: int = 0,
) -> float:
    """Tokens per word of ``token_text`` for a tokenizer: ``count_tokens(text)`` must return the
    number of tokens of ``text`` (BOS included or not: the count of "" is subtracted)."""
    text = calibration_text(token_text, n_words, seed)
    return max(1e-3, (count_tokens(text) - count_tokens("")) / n_words)


def project(measured: dict[str, float], counts: dict[str, int]) -> float:
    """Projected wall time, in seconds, of sending ``counts[type]`` requests of each type.

    ``measured[type]`` is the effective seconds per request of that type *at HELM's concurrency*:
    the wall time of a batch of such requests kept 30 in flight, divided by their number (so
    1 / completed requests per second). It already folds in queueing and any batching the server
    does; with a serial server it is just the mean service time. HELM runs one run spec after
    another, so the eval's time is the sum over types: ``sum(counts[t] * measured[t])``.

    Not modelled: HELM's own work between requests (scenario download, prompt construction and
    its ``/tokenize`` calls, metrics such as summarization's), and the tail of each run spec where
    fewer than 30 requests remain in flight (it matters only to batching servers).
    """
    missing = sorted(t for t, n in counts.items() if n > 0 and t not in measured)
    if missing:
        raise ValueError(f"no measurement for request types {missing}")
    bad = {t: v for t, v in measured.items() if t in counts and not (math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"measurements must be finite and >= 0 seconds per request, got {bad}")
    return float(sum(n * measured[t] for t, n in counts.items() if n > 0))
