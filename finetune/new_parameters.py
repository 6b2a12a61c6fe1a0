"""Initialize the parameters a method adds (LoRA's A and B, the adapters' prompts, gates, scales and biases)
when the model was built with ``fabric.init_module(empty_init=True)``.

QLoRA builds the model with empty init, so that a 7B model's float weights are not initialized only to be
replaced by the checkpoint's. But empty init skips every ``reset_parameters``, the added parameters
included, and the checkpoint does not hold them: left as they were, they are whatever the allocator handed
out. On a fresh CUDA process that is mostly zeros (LoRA A = B = 0 is a saddle: almost nothing trains);
after an earlier model in the same process it is old data, and the first loss was NaN (H200, 2026-12-02).

So: every floating parameter is filled with NaN before the checkpoint is loaded, the checkpoint overwrites
what it holds, and each module whose own parameters are all trainable and still NaN gets its ``reset_parameters``, the
same initialization as without empty init. A parameter still NaN after that is an error that names it:
a base weight the checkpoint lacks, or an added parameter with no initializer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _plain_parameters(module: torch.nn.Module, recurse: bool):
    """Floating parameters, not the packed 4-bit/8-bit weights (quantized at load, by the precision plugin)."""
    for name, p in module.named_parameters(recurse=recurse):
        if p.is_floating_point() and p.device.type != "meta" and type(p).__module__.split(".")[0] != "bitsandbytes":
            yield name, p


@torch.no_grad()
def load_and_initialize(model: torch.nn.Module, load: Callable[[], None]) -> list[str]:
    """Run ``load`` (which loads the checkpoint into ``model``), then initialize what it did not load.

    Returns the names of the modules that were initialized. Raises ``ValueError`` naming any parameter
    that neither the checkpoint nor its module's ``reset_parameters`` set.
    """
    for _, p in _plain_parameters(model, recurse=True):
        p.fill_(float("nan"))
    load()
    initialized = []
    for module_name, module in model.named_modules():
        own = [p for _, p in _plain_parameters(module, recurse=False)]
        if own and all(p.requires_grad and bool(p.isnan().all()) for p in own) and hasattr(module, "reset_parameters"):
            module.reset_parameters()
            initialized.append(module_name)
    unset = [name for name, p in _plain_parameters(model, recurse=True) if bool(p.isnan().any())]
    if unset:
        shown = ", ".join(unset[:5]) + (f" and {len(unset) - 5} more" if len(unset) > 5 else "")
        raise ValueError(f"checkpoint: neither the checkpoint nor an initializer set {shown} (a checkpoint of another model?)")
    return initialized
