"""Chat templates for multi-turn data: rendered as transformers' ``apply_chat_template`` renders them.

A template is Jinja, as in a model's ``tokenizer_config.json`` (``chat_template``). Training renders
every turn of a conversation and puts the loss on the assistant turns only; a run saves its template
next to the weights (``chat_template.jinja``, the file transformers also writes and reads), and the
server renders prompts with that same file. A base model without a template takes a named one
(``NAMED``) or a ``.jinja`` file.

Which characters belong to an assistant turn is found from the template itself: the conversation up
to turn i with the generation prompt, and up to turn i included, are both prefixes of the whole
rendering; the text between them is the turn (its end-of-turn marker included, so the model learns to
stop). A template that does not render conversations prefix by prefix is refused.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

CHAT_TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant")

# Templates for base models that ship none. ``bos_token`` is set only for tokenizers that add a BOS.
NAMED = {
    # ChatML (OpenAI's turn format, used by Qwen2.5 and many others): role headers and an end-of-turn marker.
    "chatml": (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Our ``qa`` prompt style turn by turn: HELM's "question\nAnswer: answer" shape, EOS after each answer.
    "qa": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'user' %}{{ m['content'] }}\nAnswer:"
        "{% else %} {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    ),
}


class ChatTemplateError(ValueError):
    """A template that cannot be used, or a conversation it refuses; the message says which and why."""


def model_chat_template(checkpoint_dir: Path) -> str | None:
    """The template a checkpoint carries: its ``chat_template.jinja``, else ``tokenizer_config.json``'s."""
    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / CHAT_TEMPLATE_FILE).is_file():
        return (checkpoint_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    config_path = checkpoint_dir / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # several named templates: transformers takes "default"
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def resolve_template(spec: str | None, checkpoint_dir: Path) -> tuple[str, str]:
    """``(template text, where it came from)`` for ``--data.chat_template``: None (the model's own), a name, a .jinja file."""
    if spec is None:
        own = model_chat_template(checkpoint_dir)
        if own is None:
            raise ChatTemplateError(
                f"data.chat_template: {checkpoint_dir} has no chat template (no {CHAT_TEMPLATE_FILE}, none in "
                f"tokenizer_config.json); pass --data.chat_template with one of {sorted(NAMED)} or a .jinja file"
            )
        return own, f"{checkpoint_dir}'s own"
    if spec in NAMED:
        return NAMED[spec], spec
    path = Path(spec)
    if path.suffix == ".jinja" and path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    raise ChatTemplateError(f"data.chat_template: {spec!r} is neither one of {sorted(NAMED)} nor a .jinja file")


def special_tokens(checkpoint_dir: Path, tokenizer) -> dict[str, str]:
    """``bos_token``, ``eos_token``... as transformers passes them to templates (its ``special_tokens_map``).

    Read from ``tokenizer_config.json``; BOS and EOS fall back to the tokenizer's own. ``bos_token`` is
    left out for tokenizers that add no BOS, so ``{{ bos_token }}`` renders nothing there.
    """
    path = Path(checkpoint_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    piece = tokenizer.processor.id_to_token if tokenizer.backend == "huggingface" else tokenizer.processor.id_to_piece
    for key, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)):
        if key not in out and token_id is not None:
            out[key] = piece(token_id)
    if not tokenizer.use_bos:
        out.pop("bos_token", None)
    return out


class ChatTemplate:
    """A compiled chat template with the special-token strings it is rendered with."""

    def __init__(self, source: str, specials: dict[str, str], origin: str = "") -> None:
        self.source, self.specials, self.origin = source, dict(specials), origin
        self._compiled  # noqa: B018 - a template that does not compile fails here, before training

    @classmethod
    def for_checkpoint(cls, checkpoint_dir: Path, tokenizer, spec: str | None = None) -> ChatTemplate:
        source, origin = resolve_template(spec, checkpoint_dir)
        return cls(source, special_tokens(checkpoint_dir, tokenizer), origin)

    @cached_property
    def _compiled(self):
        """Compiled as transformers compiles chat templates (sandbox, trim/lstrip blocks, its globals)."""
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(jinja2.ext.Extension):
            """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask markers) render their body."""

            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
                return jinja2.nodes.Scope(body).set_lineno(lineno)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template ({self.origin or 'given'}): line {e.lineno}: {e.message}") from None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.specials)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template ({self.origin}) refuses this conversation: {e}") from None

    def assistant_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the ``[start, end)`` characters of each assistant turn."""
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(before) and text.startswith(through)) or (spans and len(before) < spans[-1][1]):
                raise ChatTemplateError(
                    f"the chat template ({self.origin}) does not render conversations prefix by prefix (turn {i}), so "
                    "its assistant turns cannot be found; use another --data.chat_template"
                )
            spans.append((len(before), len(through)))
        return text, spans


def encode_text(tokenizer, text: str, cuts: list[int] = ()) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` with the ``(start, end)`` characters each came from, special-token strings as their ids.

    As transformers tokenizes a rendered template (``add_special_tokens=False``): the template writes
    BOS/EOS itself. The Hugging Face backend tokenizes the whole text. sentencepiece, which does not
    read special-token strings, encodes the pieces between them (and between ``cuts``) one by one.
    """
    if tokenizer.backend == "huggingface":
        encoding = tokenizer.processor.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]
    processor = tokenizer.processor
    specials = {processor.id_to_piece(i): i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None and i >= 0}
    bounds = sorted({0, len(text), *cuts} | {b for s in specials for start in _find_all(text, s) for b in (start, start + len(s))})
    ids, offsets = [], []
    for start, end in zip(bounds, bounds[1:]):
        piece = text[start:end]
        if piece in specials:
            ids.append(specials[piece])
            offsets.append((start, end))
            continue
        piece_ids = processor.encode(piece)
        ids += piece_ids
        offsets += [(start, end)] * len(piece_ids)  # pieces never cross a cut, so the piece's span will do
    return ids, offsets


def _find_all(text: str, s: str) -> list[int]:
    out, i = [], text.find(s)
    while i >= 0:
        out.append(i)
        i = text.find(s, i + len(s))
    return out


def encode_conversation(tokenizer, template: ChatTemplate, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of the whole conversation, and which of them belong to an assistant turn (the loss)."""
    text, spans = template.assistant_spans(messages)
    ids, offsets = encode_text(tokenizer, text, [b for span in spans for b in span])
    assistant = [any(s < span_end and e > span_start for span_start, span_end in spans) for s, e in offsets]
    return ids, assistant


def encode_prompt(tokenizer, template: ChatTemplate, prompt: str) -> list[int]:
    """A serving prompt as one user turn with the generation prompt: what the model saw before each answer."""
    return encode_text(tokenizer, template.render([{"role": "user", "content": prompt}], add_generation_prompt=True))[0]


def save_chat_template(template: ChatTemplate, checkpoint_dir: Path) -> None:
    (Path(checkpoint_dir) / CHAT_TEMPLATE_FILE).write_text(template.source, encoding="utf-8")
