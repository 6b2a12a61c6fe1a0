"""Multi-turn data: rendered and tokenized as transformers' apply_chat_template does, the loss on every
assistant turn, malformed conversations refused by file and line, and the template saved and served."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from litgpt import Tokenizer

from core.chat import CHAT_TEMPLATE_FILE, NAMED, ChatTemplate, ChatTemplateError, encode_conversation, encode_prompt, special_tokens
from core.prompts import get_style
from finetune.config import EvalArgs, TrainArgs
from finetune.data import IGNORE_INDEX, DataError, encode_row, load_rows

# ChatML with transformers' {% generation %} markers: its assistant mask is the reference for ours.
CHATML_MARKED = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A Llama-2-style template: system folded into the first user turn, strict alternation, EOS after answers.
INST = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ bos_token }}[INST] {% if loop.first and sys %}<<SYS>>\n{{ sys }}\n<</SYS>>\n\n{% endif %}"
    "{{ m['content'].strip() }} [/INST]{% else %} {{ m['content'].strip() }} {{ eos_token }}{% endif %}{% endfor %}"
)
CONVERSATION = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, of course."},
]


@pytest.fixture(scope="module")
def tiny(make_tiny_checkpoint) -> Path:
    return make_tiny_checkpoint()


def hf_tokenizer(checkpoint_dir: Path, template: str):
    from transformers import PreTrainedTokenizerFast

    config = json.loads((checkpoint_dir / "tokenizer_config.json").read_text())
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(checkpoint_dir / "tokenizer.json"),
        bos_token=config["bos_token"],
        eos_token=config["eos_token"],
        unk_token=config["unk_token"],
    )
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("source", [CHATML_MARKED, INST, NAMED["chatml"], NAMED["qa"]], ids=["chatml-marked", "inst", "chatml", "qa"])
def test_rendering_and_tokens_equal_transformers_apply_chat_template(tiny: Path, source: str) -> None:
    tokenizer = Tokenizer(tiny)
    template = ChatTemplate(source, special_tokens(tiny, tokenizer))
    hf = hf_tokenizer(tiny, source)
    messages = CONVERSATION
    assert template.render(messages) == hf.apply_chat_template(messages, tokenize=False)
    assert template.render(messages[:2], add_generation_prompt=True) == hf.apply_chat_template(
        messages[:2], tokenize=False, add_generation_prompt=True
    )
    ids, assistant = encode_conversation(tokenizer, template, messages)
    assert ids == hf.apply_chat_template(messages, tokenize=True)
    # The loss covers each assistant turn (with its end-of-turn marker) and nothing else.
    runs, current = [], []
    for token, is_assistant in zip(ids, assistant):
        if is_assistant:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    texts = [hf.decode(run) for run in runs]
    assert len(texts) == 2 and "4" in texts[0] and "6, of course." in texts[1], texts
    assert not any(c in "".join(texts) for c in ("What", "And 3", "Answer with"))


def test_assistant_mask_equals_transformers_generation_mask(tiny: Path) -> None:
    tokenizer = Tokenizer(tiny)
    ids, assistant = encode_conversation(tokenizer, ChatTemplate(CHATML_MARKED, special_tokens(tiny, tokenizer)), CONVERSATION)
    out = hf_tokenizer(tiny, CHATML_MARKED).apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == out["input_ids"]
    assert assistant == [bool(m) for m in out["assistant_masks"]]
    assert sum(assistant) > 0 and not all(assistant)


def test_encode_row_labels_only_assistant_turns(tiny: Path) -> None:
    tokenizer = Tokenizer(tiny)
    template = ChatTemplate(NAMED["chatml"], special_tokens(tiny, tokenizer))
    ids, assistant = encode_conversation(tokenizer, template, CONVERSATION)
    row = encode_row({"messages": CONVERSATION}, tokenizer, get_style("qa"), 4096, chat=template)
    assert row["input_ids"].tolist() == ids
    assert row["labels"].tolist() == [i if a else IGNORE_INDEX for i, a in zip(ids, assistant)]
    short = encode_row({"messages": CONVERSATION}, tokenizer, get_style("qa"), 10, chat=template)
    assert short["input_ids"].tolist() == ids[:10]
    # An instruction row in a chat run is the one exchange it is.
    one = encode_row({"instruction": "Hi?", "input": "", "output": "Hello."}, tokenizer, get_style("qa"), 4096, chat=template)
    two = encode_conversation(tokenizer, template, [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}])
    assert one["input_ids"].tolist() == two[0]


def test_sentencepiece_tokenizer_reads_special_tokens_in_the_template(make_tiny_checkpoint) -> None:
    ckpt = make_tiny_checkpoint("sentencepiece")
    tokenizer = Tokenizer(ckpt)
    template = ChatTemplate(NAMED["qa"], special_tokens(ckpt, tokenizer))
    ids, assistant = encode_conversation(tokenizer, template, CONVERSATION)
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.eos_id) == 2  # "<s>" and "</s>" as their ids, not text
    answer = [i for i, a in zip(ids, assistant) if a]
    assert answer.count(tokenizer.eos_id) == 2 and "".join(tokenizer.processor.decode(answer).split()) == "46,ofcourse."


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]}, r"messages\[1\].role must be one of"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}, r"messages\[1\].content must be a string"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}, "empty assistant turn"),
        ({"messages": [{"role": "user", "content": "Hi", "weight": 0}, {"role": "assistant", "content": "Yo"}]}, "has keys"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "output": "x"}, "'messages' only"),
    ],
)
def test_malformed_conversation_names_file_and_line(tmp_path: Path, line: dict, message: str) -> None:
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=message) as err:
        load_rows(path)
    assert str(err.value).startswith(f"{path}:2: ")


def test_a_template_refusing_a_conversation_names_file_and_line(tiny: Path, tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    rows = [
        {"messages": CONVERSATION},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = Tokenizer(tiny)
    template = ChatTemplate(INST, special_tokens(tiny, tokenizer), origin="inst")
    first, second = load_rows(path)
    encode_row(first, tokenizer, get_style("qa"), 512, chat=template)
    with pytest.raises(DataError, match=rf"^{path}:2: the chat template \(inst\) refuses this conversation: Conversation roles must alternate"):
        encode_row(second, tokenizer, get_style("qa"), 512, chat=template)
    with pytest.raises(DataError, match=rf"^{path}:1: a conversation needs a chat template"):
        encode_row(first, tokenizer, get_style("qa"), 512)


def test_template_that_is_not_prefix_stable_is_refused(tiny: Path) -> None:
    tokenizer = Tokenizer(tiny)
    # Numbers every turn by the conversation's length: a prefix renders differently from the whole.
    odd = "{% for m in messages %}{{ messages|length }}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="prefix by prefix"):
        encode_conversation(tokenizer, ChatTemplate(odd, special_tokens(tiny, tokenizer), "odd"), CONVERSATION)
    with pytest.raises(ChatTemplateError, match="line 1"):
        ChatTemplate("{% for m in messages %}", {}, "broken")


def _chat_run(base: Path, train_file: Path, out_dir: Path, chat_template: str | None, prompt_style: str | None = None):
    from finetune.config import DataArgs
    from finetune.lora import LoRAArgs, setup

    return setup(
        checkpoint_dir=base,
        out_dir=out_dir,
        lr=3e-3,
        lora=LoRAArgs(r=4, alpha=8),
        data=DataArgs(train_file=train_file, chat_template=chat_template, prompt_style=prompt_style, max_seq_length=128, val_fraction=0.25),
        train=TrainArgs(save_interval=None, log_interval=1, global_batch_size=4, micro_batch_size=4, lr_warmup_steps=1, max_steps=2, max_norm=1.0),
        eval=EvalArgs(interval=0, max_iters=1),
    )


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"What is {i}+{i}?"},
                {"role": "assistant", "content": str(2 * i)},
                {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": "Yes."},
            ]
        }
        for i in range(16)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_run_saves_its_template_and_the_server_uses_it(tiny: Path, chat_file: Path, tmp_path: Path) -> None:
    from finetune.merge import merge
    from server.loading import load_generator
    from server.schemas import ProcessRequest

    final = _chat_run(tiny, chat_file, tmp_path / "run", "chatml")
    assert (final / CHAT_TEMPLATE_FILE).read_text() == NAMED["chatml"]
    merged = merge(final, tmp_path / "merged")
    assert (merged / CHAT_TEMPLATE_FILE).read_text() == NAMED["chatml"]  # travels with the weights
    generator = load_generator(merged, device="cpu", use_template=True)
    req = ProcessRequest(prompt="What is 3+3?", max_new_tokens=1)
    expected = encode_prompt(Tokenizer(merged), ChatTemplate(NAMED["chatml"], special_tokens(merged, Tokenizer(merged))), "What is 3+3?")
    assert generator.prompt(req).ids == expected
    assert Tokenizer(merged).processor.decode(expected).endswith("assistant\n")


def test_chat_run_takes_the_base_model_own_template_or_asks_for_one(tiny: Path, chat_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match="has no chat template.*--data.chat_template"):
        _chat_run(tiny, chat_file, tmp_path / "none", None)
    own = tmp_path / "instruct"
    shutil.copytree(tiny, own)
    config = json.loads((own / "tokenizer_config.json").read_text())
    (own / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": INST}))
    final = _chat_run(own, chat_file, tmp_path / "own", None)
    assert (final / CHAT_TEMPLATE_FILE).read_text() == INST
    assert (tmp_path / "own" / "metrics.csv").is_file()


@pytest.mark.parametrize("rows", ["conversations", "instructions"])
def test_a_prompt_style_a_chat_run_would_not_use_is_refused(tiny: Path, chat_file: Path, tmp_path: Path, rows: str) -> None:
    """A chat run renders every row (and the server every prompt) with its chat template: --data.prompt_style would do nothing."""
    train_file = chat_file
    if rows == "instructions":  # rendered as conversations all the same, since a chat template is given
        train_file = tmp_path / "rows.jsonl"
        train_file.write_text("".join(json.dumps({"instruction": f"{i}+{i}?", "output": str(2 * i)}) + "\n" for i in range(16)))
    with pytest.raises(ValueError, match=r"data.prompt_style: .*chat template"):
        _chat_run(tiny, train_file, tmp_path / "run", "chatml", prompt_style="alpaca")
