"""The speed options of every finetune script, and setting the model up for them.

Packing (``finetune.packing``), the fast LoRA layers (``finetune.fast_lora``), torch.compile of each
block, QLoRA's compiled 4-bit dequantization (``finetune.dequant4bit``), and the memory plan
(``finetune.memory_plan``: micro-batch size and activation checkpointing) are decided here, once,
before training starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import lightning as L
import torch
from litgpt.args import TrainArgs

from finetune.attention import unsupported_reason, use_document_attention
from finetune.data import IGNORE_INDEX
from finetune.dequant4bit import check_against_bitsandbytes, four_bit_layers, use_compiled_dequantize
from finetune.fast_lora import use_lora_addmm, use_matmul_qkv_lora
from finetune.memory_plan import GIB, ModelShape, Plan, candidates, estimate_gib, gpu_budget_gib, probe_plan


@dataclass
class SpeedArgs:
    """How fast training runs. Only ``packing`` changes what a batch holds (batch sizes then count packed rows)."""

    packing: bool = True  # several rows per max_seq_length row, attending only to themselves (lora, full)
    compile: bool | None = None  # torch.compile each transformer block; None: on CUDA
    micro_batch: str = "auto"  # "auto": the memory plan picks train.micro_batch_size (a divisor of the global batch); "fixed": as given
    checkpoint_blocks: bool | None = None  # activation checkpointing per block; None: only if memory needs it
    gpu_memory_gib: float | None = None  # plan for (and cap the run at) this much memory, e.g. 24 to rehearse a 4090 run
    dequantize_4bit: str = "auto"  # QLoRA weights: "compiled" (fused kernels), "bitsandbytes" (its own), "auto": compiled if it matches, when compile is on
    lora_addmm: bool = False  # add each LoRA term inside its GEMM (torch.addmm) instead of in two more passes; off until measured on a GPU


@dataclass
class Setup:
    """What ``prepare`` decided."""

    train: TrainArgs  # with the micro_batch_size that will run
    packing: bool
    checkpoint_blocks: bool
    compiled: bool
    dequantize_4bit: str | None  # "compiled", "compiled+cast" or "bitsandbytes"; None: the model has no 4-bit layers


def prepare(
    fabric: L.Fabric, model, method_name: str, speed: SpeedArgs, train: TrainArgs, max_seq_length: int, quantize: str | None,
    resumed_micro_batch: int | None = None,
) -> Setup:
    """Apply the speed options to ``model`` (Fabric-wrapped) and choose the micro-batch; logs each choice."""
    if speed.micro_batch not in ("auto", "fixed"):
        raise ValueError(f"speed.micro_batch: 'auto' or 'fixed', got {speed.micro_batch!r}")
    gpt = model.module
    packing = speed.packing
    if packing and (reason := unsupported_reason(gpt)) is not None:
        fabric.print(f"packing off: this model has {reason}; training on padded batches")
        packing = False
    if packing:
        use_document_attention(gpt)
    use_matmul_qkv_lora(gpt)
    if speed.lora_addmm:
        use_lora_addmm(gpt)
    compiled = speed.compile if speed.compile is not None else fabric.device.type == "cuda"
    dequant = choose_dequantize_4bit(gpt, speed.dequantize_4bit, compiled, fabric.print)
    if compiled:
        keep_quantized_layers_eager(gpt)
        for block in gpt.transformer.h:
            block.compile()
    checkpoint_blocks = bool(speed.checkpoint_blocks)
    if resumed_micro_batch is not None:
        train = dataclasses.replace(train, micro_batch_size=resumed_micro_batch)
    elif speed.micro_batch == "auto" and fabric.device.type == "cuda":
        budget = gpu_budget_gib(fabric.device, speed.gpu_memory_gib)
        if speed.gpu_memory_gib:
            total = torch.cuda.get_device_properties(fabric.device).total_memory / GIB
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), fabric.device)
        shape = ModelShape.of(gpt)
        plans = [
            Plan(m, c, round(estimate_gib(shape, m * max_seq_length, c, quantize, method_name == "full", compiled)["total"], 2), budget)
            for m, c in candidates(train.global_batch_size, max_seq_length)
            if speed.checkpoint_blocks is None or c == speed.checkpoint_blocks
        ]
        first = next((i for i, p in enumerate(plans) if p.fits), len(plans) - 1)
        fabric.print(f"memory plan ({budget:.0f} GiB): {plans[first].describe()}")
        plan = probe_plan(lambda p: probe_step(fabric, model, p, max_seq_length, packing), plans[first:], log=fabric.print)
        train = dataclasses.replace(train, micro_batch_size=plan.micro_batch_size)
        checkpoint_blocks = plan.checkpoint_blocks
    return Setup(train, packing, checkpoint_blocks, compiled, dequant)


def choose_dequantize_4bit(gpt: torch.nn.Module, mode: str, compiled: bool, log=print) -> str | None:
    """Put the 4-bit layers on a compiled dequantization, or leave them on bitsandbytes'; returns which.

    "auto" takes a compiled one when blocks are compiled (so a GPU with Triton is there), the first of
    ``finetune.dequant4bit``'s compiled forms that builds and matches bitsandbytes on every layer's real
    weight; otherwise it says why and keeps bitsandbytes'. "compiled" insists and raises instead.
    """
    if mode not in ("auto", "compiled", "bitsandbytes"):
        raise ValueError(f"speed.dequantize_4bit: 'auto', 'compiled' or 'bitsandbytes', got {mode!r}")
    layers = four_bit_layers(gpt)
    if not layers:
        return None
    if mode == "bitsandbytes" or (mode == "auto" and not compiled):
        return "bitsandbytes"
    failures = []
    for form in ("compiled", "compiled+cast"):
        try:
            verdicts = {check_against_bitsandbytes(layer, form) for layer in layers}
        except Exception as e:  # noqa: BLE001 - a fast path that fails to build or to match is not taken
            failures.append(f"{form}: {type(e).__name__}: {e}")
            continue
        use_compiled_dequantize(gpt, form)
        log(f"4-bit dequantization: {form} ({', '.join(sorted(verdicts))} on all {len(layers)} layers)")
        return form
    if mode == "compiled":
        raise ValueError("speed.dequantize_4bit: no compiled form matched bitsandbytes; " + "; ".join(failures))
    log("4-bit dequantization: bitsandbytes' kernels (the compiled ones failed their check: " + "; ".join(failures) + ")")
    return "bitsandbytes"


def keep_quantized_layers_eager(model: torch.nn.Module) -> int:
    """Run bitsandbytes layers outside the compiled graphs; returns how many.

    Compiled whole, a block keeps each 4-bit weight's bf16 dequantization alive for the backward
    (QLoRA on Mistral-7B at 2048 tokens: 28.8 GiB instead of 18.4), which defeats quantizing. Left
    outside, the layer's autograd function (bitsandbytes', or ``finetune.dequant4bit``'s, which is
    compiled on its own) dequantizes again in the backward, as it is meant to; the norms, RoPE,
    attention and MLP activations around it are still compiled.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and any(c.__module__.startswith("bitsandbytes") for c in type(module).__mro__):
            module.forward = torch.compiler.disable(module.forward)
            changed += 1
    return changed


def random_batch(vocab_size: int, micro_batch_size: int, max_seq_length: int, packing: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """A full micro-batch of random tokens, every position but the first labelled, built on ``device``.

    ``packing``: in the packed layout (positions, one document a row), which takes the document-mask path.
    """
    shape = (micro_batch_size, max_seq_length)
    ids = torch.randint(0, vocab_size, shape, device=device)
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "target_index": torch.arange(micro_batch_size * (max_seq_length - 1), device=device)}
    if packing:
        batch |= {"positions": torch.arange(max_seq_length, device=device).expand(shape), "documents": torch.zeros(shape, dtype=torch.int32, device=device)}
    return batch


def probe_step(fabric: L.Fabric, model, plan: Plan, max_seq_length: int, packing: bool) -> None:
    """One forward+backward of a full micro-batch of random tokens (the most memory a real one can take).

    Gradients are cleared and the RNG state restored afterwards, so training is as if it never ran.
    """
    from finetune.loop import batch_loss

    gpt = model.module
    device = next(gpt.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        batch = random_batch(gpt.config.vocab_size, plan.micro_batch_size, max_seq_length, packing, device)
        try:
            with fabric.autocast():
                loss = batch_loss(model, batch, plan.checkpoint_blocks)
            fabric.backward(loss)
        finally:
            for p in gpt.parameters():
                p.grad = None
