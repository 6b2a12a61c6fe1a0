"""The finetuning methods and where litgpt keeps each one's model, config and trainable filter.

Shared by training (which parameters train, which weights to save) and serving (how to rebuild an
unmerged run: base weights + the method's small weights file, with the method's litgpt model class).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Method:
    name: str
    module: str  # litgpt module with GPT and Config for this method
    weights_file: str  # what a run saves: the small trainable weights, or the whole model for "full"
    config_prefix: str | None  # hyperparameters that belong to the method's Config (e.g. "lora_")
    mark_trainable: str | None  # litgpt function name; None: everything trains
    saved_filter: str | None  # litgpt (key, value) -> bool filter of the weights to save; None: all

    @property
    def litgpt(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def trains_everything(self) -> bool:
        """No frozen base ("full"): the run saves the whole model, loads it strictly, and can't quantize it."""
        return self.mark_trainable is None

    @property
    def mergeable(self) -> bool:
        """Whether the trained weights fold into a plain GPT (adapters add attention prefixes; they don't)."""
        return self.name in ("lora", "full")

    def config_kwargs(self, hparams: dict) -> dict:
        """The method's litgpt ``Config`` fields from a run's ``hyperparameters.yaml``: its group (``lora: {r: 8}`` ->
        ``lora_r: 8``), or the flat ``lora_r`` keys of runs recorded before there were groups (and of litgpt's own runs)."""
        if self.config_prefix is None:
            return {}
        group = hparams.get(self.config_prefix.rstrip("_"))
        if isinstance(group, dict):
            return {self.config_prefix + k: v for k, v in group.items()}
        return {k: v for k, v in hparams.items() if k.startswith(self.config_prefix)}

    def freeze_all_but_trainable(self, model) -> None:
        if self.mark_trainable is not None:
            getattr(self.litgpt, self.mark_trainable)(model)

    def keep(self, key: str, value) -> bool:
        return True if self.saved_filter is None else getattr(self.litgpt, self.saved_filter)(key, value)


METHODS: dict[str, Method] = {
    "lora": Method("lora", "litgpt.lora", "lit_model.pth.lora", "lora_", "mark_only_lora_as_trainable", "lora_filter"),
    "adapter": Method("adapter", "litgpt.adapter", "lit_model.pth.adapter", "adapter_", "mark_only_adapter_as_trainable", "adapter_filter"),
    "adapter_v2": Method(
        "adapter_v2", "litgpt.adapter_v2", "lit_model.pth.adapter_v2", "adapter_", "mark_only_adapter_v2_as_trainable", "adapter_filter"
    ),
    "full": Method("full", "litgpt.model", "lit_model.pth", None, None, None),
}


def unmerged_method(files: set[str]) -> Method | None:
    """The method of a run directory that holds only its small weights file (no merged lit_model.pth)."""
    if METHODS["full"].weights_file in files:
        return None
    for method in METHODS.values():
        if method.weights_file in files:
            return method
    return None
