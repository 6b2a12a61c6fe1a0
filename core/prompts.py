"""Prompt templates shared by training and serving, so the two can never disagree.

Templates are litgpt ``PromptStyle`` classes. A finetune run saves its style next to the weights
(``prompt_style.yaml``, litgpt's own format, which records our class by module path); the server
reads it back from the same file. Any litgpt style name (``alpaca``, ``default``, ...) also works.
"""

from __future__ import annotations

from pathlib import Path

from litgpt.prompts import PromptStyle, has_prompt_style, load_prompt_style, prompt_styles, save_prompt_style


class QA(PromptStyle):
    """``{instruction}\\n[{input}\\n]Answer:``, then the response after a space.

    The same shape as HELM's few-shot prompts (``...\\nAnswer: B``), which is why it is our default:
    a model trained on it is already at home with what the evaluation sends.
    """

    def apply(self, prompt: str, *, sys_prompt: str | None = None, **kwargs: str) -> str:
        body = f"{prompt}\n{kwargs['input']}" if kwargs.get("input") else prompt
        return f"{sys_prompt or ''}{body}\nAnswer:"


OUR_STYLES: dict[str, type[PromptStyle]] = {"qa": QA}
prompt_styles.update({k: v for k, v in OUR_STYLES.items() if k not in prompt_styles})


def get_style(name: str) -> PromptStyle:
    if name not in prompt_styles:
        raise ValueError(f"unknown prompt style {name!r}; choose one of {sorted(prompt_styles)}")
    return PromptStyle.from_name(name)


def save_style(style: str | PromptStyle, checkpoint_dir: Path) -> None:
    save_prompt_style(get_style(style) if isinstance(style, str) else style, checkpoint_dir)


def load_style(checkpoint_dir: Path) -> PromptStyle | None:
    """The style a checkpoint was trained with, or None for a base model that has none."""
    return load_prompt_style(checkpoint_dir) if has_prompt_style(checkpoint_dir) else None
