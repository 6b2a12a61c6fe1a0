"""The speed options of every finetune script, and setting the model up for them.

Packing (``finetune.packing``), the fast LoRA layers (``finetune.fast_lora``), torch.compile of each
block, QLoRA's compiled 4-bit dequantization (``finetune.dequant4bit``), and the memory plan
(``finetune.memory_plan``: micro-batch size and activation checkpointing) are decided here, once,
before training starts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import lightning as L
import torch

from core.methods import METHODS
from finetune.attention import unsupported_reason, use_document_attention
from finetune.data import IGNORE_INDEX
from finetune.dequant4bit import check_against_bitsandbytes, four_bit_layers, use_compiled_dequantize
from finetune.fast_lora import use_lora_addmm, use_matmul_qkv_lora
from finetune.linear4bit_op import check_in_block, use_in_block_linear_4bit
from finetune.memory_plan import GIB, ModelShape, Plan, candidates, estimate_gib, gpu_budget, probe_plan

if TYPE_CHECKING:
    from finetune.config import TrainArgs


@dataclass
class SpeedArgs:
    """How fast training runs. Only ``packing`` changes what a batch holds (batch sizes then count packed rows)."""

    packing: bool = True
    """several rows per max_seq_length row, attending only to themselves (lora, full)"""
    compile: bool | None = None
    """torch.compile each transformer block; None: on CUDA"""
    micro_batch: Literal["auto", "fixed"] = (
        "auto"  # "auto": on a GPU the memory plan picks train.micro_batch_size (a divisor of the global batch); "fixed": as given
    )
    checkpoint_blocks: bool | None = None
    """activation checkpointing per block; None: only if memory needs it"""
    gpu_memory_gib: float | None = None
    """cap the run at (and plan the micro-batch for) this much GPU memory, e.g. 24 to rehearse a 4090 run"""
    dequantize_4bit: Literal["bitsandbytes", "in-block", "auto", "compiled"] = "auto"
    """QLoRA's 4-bit layers. "bitsandbytes": its own layers, eager between the compiled pieces. "in-block": bitsandbytes' dequantization as one custom op traced inside each compiled block, weights quantized from the compute dtype. "auto": in-block only if bit-identical to bitsandbytes on every layer AND timed faster in this process; else bitsandbytes. "compiled": our torch-op dequantization (measured 4x slower than bitsandbytes on an H200). The default "auto": on an H200 (BENCHMARKS.md, issue 13, 2026-12-03) it chose in-block and ran 1.27x (2,048-token rows) and 1.86x (mixed lengths) the whole-step speed of "bitsandbytes" at +0.4 GiB peak."""
    lora_addmm: bool = False
    """add each LoRA term inside its GEMM (torch.addmm) instead of in two more passes; off until measured on a GPU"""

    @property
    def quantize_from_compute_dtype(self) -> bool:
        """4-bit weights stored in the compute dtype (``finetune.quantized_storage``): the in-block form needs it
        to skip the float16 -> bf16 cast; "bitsandbytes" and "compiled" keep Lightning's float16, as measured."""
        return self.dequantize_4bit in ("in-block", "auto")


@dataclass
class Setup:
    """What ``prepare`` decided."""

    train: TrainArgs  # with the micro_batch_size that will run
    packing: bool
    checkpoint_blocks: bool
    compiled: bool
    dequantize_4bit: str | None  # "in-block", "compiled", "compiled+cast" or "bitsandbytes"; None: the model has no 4-bit layers


def prepare(
    fabric: L.Fabric,
    model,
    method_name: str,
    speed: SpeedArgs,
    train: TrainArgs,
    max_seq_length: int,
    quantize: str | None,
    resumed_micro_batch: int | None = None,
) -> Setup:
    """Apply the speed options to ``model`` (Fabric-wrapped) and choose the micro-batch; logs each choice."""
    if speed.micro_batch not in ("auto", "fixed"):
        raise ValueError(f"speed.micro_batch: 'auto' or 'fixed', got {speed.micro_batch!r}")
    if speed.gpu_memory_gib is not None and fabric.device.type != "cuda":
        raise ValueError(f"speed.gpu_memory_gib: caps GPU memory, and this run is on {fabric.device.type}; drop it")
    if speed.lora_addmm and method_name != "lora":
        raise ValueError(f"speed.lora_addmm: adds each LoRA term inside its GEMM, and {method_name} has no LoRA layers; drop it")
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
    timer = lambda: step_seconds(fabric, model, max_seq_length, packing)  # noqa: E731
    dequant = choose_dequantize_4bit(gpt, speed.dequantize_4bit, compiled, fabric.print, timer)
    if compiled:
        keep_quantized_layers_eager(gpt)
        compile_blocks(gpt)
    checkpoint_blocks = bool(speed.checkpoint_blocks)
    if fabric.device.type == "cuda":
        budget = gpu_budget(fabric.device, speed.gpu_memory_gib)
        if speed.gpu_memory_gib:  # a true cap: what the allocator would get on that card
            total = torch.cuda.get_device_properties(fabric.device).total_memory / GIB
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget.usable_gib / total), fabric.device)
    if resumed_micro_batch is not None:
        train = dataclasses.replace(train, micro_batch_size=resumed_micro_batch)
    elif speed.micro_batch == "auto" and fabric.device.type == "cuda":
        full = METHODS[method_name].trains_everything
        sharding = dict(devices=fabric.world_size, strategy="fsdp" if type(fabric.strategy).__name__ == "FSDPStrategy" else "ddp")
        shape = ModelShape.of(gpt) if sharding["strategy"] == "ddp" else unsharded_shape(gpt.config, method_name)  # FSDP's are shards
        plans = [
            Plan(m, c, round(estimate_gib(shape, m * max_seq_length, c, quantize, full, compiled, **sharding)["total"], 2), budget.plan_gib)
            for m, c in candidates(train.global_batch_size // fabric.world_size, max_seq_length)
            if speed.checkpoint_blocks is None or c == speed.checkpoint_blocks
        ]
        first = next((i for i, p in enumerate(plans) if p.fits), len(plans) - 1)
        fabric.print(f"memory plan ({budget.describe()}): {plans[first].describe()}")
        if fabric.world_size > 1:  # a probe step is one rank's, and DDP/FSDP steps are collective: every rank takes rank 0's estimate
            plan = fabric.broadcast(plans[first], 0)
        else:
            step = lambda p: probe_step(fabric, model, p, max_seq_length, packing)  # noqa: E731
            plan = probe_plan(step, plans[first:], log=fabric.print, limit_gib=budget.plan_gib)
        train = dataclasses.replace(train, micro_batch_size=plan.micro_batch_size)
        checkpoint_blocks = plan.checkpoint_blocks
    return Setup(train, packing, checkpoint_blocks, compiled, dequant)


def unsharded_shape(config, method_name: str) -> ModelShape:
    """The whole model's ``ModelShape`` from its config (built on the meta device): an FSDP rank holds only shards."""
    method = METHODS[method_name]
    with torch.device("meta"):
        model = method.litgpt.GPT(config)
    method.freeze_all_but_trainable(model)
    return ModelShape.of(model)


def choose_dequantize_4bit(gpt: torch.nn.Module, mode: str, compiled: bool, log=print, timer: Callable[[], float] | None = None) -> str | None:
    """Put the 4-bit layers on one form of dequantization (``SpeedArgs.dequantize_4bit``); returns which.

    "in-block" and "compiled" insist: the form is checked against bitsandbytes on every layer's real
    weight and a mismatch raises. "auto" takes in-block only when blocks are compiled (else there is
    nothing to trace it into), it is bit-identical to bitsandbytes on every layer, and ``timer`` (one
    training step's seconds, blocks compiled) says it is faster than bitsandbytes' layers here;
    otherwise it says why and keeps bitsandbytes'.
    """
    if mode not in ("auto", "in-block", "compiled", "bitsandbytes"):
        raise ValueError(f"speed.dequantize_4bit: 'bitsandbytes', 'in-block', 'auto' or 'compiled', got {mode!r}")
    layers = four_bit_layers(gpt)
    if not layers:
        if mode != "auto":  # set, it would change nothing
            raise ValueError(
                f"speed.dequantize_4bit: {mode!r} is how 4-bit weights dequantize (--quantize bnb.nf4 or bnb.fp4), and this model has none; drop it"
            )
        return None
    if mode == "bitsandbytes" or (mode == "auto" and not compiled):
        return "bitsandbytes"
    if mode == "compiled":
        return _choose_compiled(gpt, layers, log)
    try:
        verdicts = {check_in_block(layer) for layer in layers}
    except Exception as e:
        if mode == "in-block":
            raise ValueError(f"speed.dequantize_4bit: in-block: {type(e).__name__}: {e}") from e
        log(f"4-bit dequantization: bitsandbytes' layers (in-block failed its check: {type(e).__name__}: {e})")
        return "bitsandbytes"
    said = f"{', '.join(sorted(verdicts))} on all {len(layers)} layers"
    if mode == "auto":
        if timer is None:
            log(f"4-bit dequantization: bitsandbytes' layers (in-block is {said}, but nothing timed it)")
            return "bitsandbytes"
        seconds = {}
        for form in ("bitsandbytes", "in-block"):
            apply_dequantize_4bit(gpt, form)
            seconds[form] = timer()
        if seconds["in-block"] >= seconds["bitsandbytes"]:
            apply_dequantize_4bit(gpt, "bitsandbytes")
            log(f"4-bit dequantization: bitsandbytes' layers ({_timings(seconds)}: in-block is not faster here)")
            return "bitsandbytes"
        said += f"; {_timings(seconds)}"
    else:
        apply_dequantize_4bit(gpt, "in-block")
    log(f"4-bit dequantization: in-block ({said})")
    return "in-block"


def _timings(seconds: dict[str, float]) -> str:
    return "a step " + ", ".join(f"{s * 1000:.0f} ms with {form}" for form, s in seconds.items())


def _choose_compiled(gpt: torch.nn.Module, layers: list, log) -> str:
    failures = []
    for form in ("compiled", "compiled+cast"):
        try:
            verdicts = {check_against_bitsandbytes(layer, form) for layer in layers}
        except Exception as e:  # noqa: BLE001 - try the next form, then say why none matched
            failures.append(f"{form}: {type(e).__name__}: {e}")
            continue
        use_compiled_dequantize(gpt, form)
        log(f"4-bit dequantization: {form} ({', '.join(sorted(verdicts))} on all {len(layers)} layers)")
        return form
    raise ValueError("speed.dequantize_4bit: no compiled form matched bitsandbytes; " + "; ".join(failures))


def apply_dequantize_4bit(gpt: torch.nn.Module, form: str) -> None:
    """Switch every 4-bit layer to ``form`` ("bitsandbytes" or "in-block"), dropping what compiled the other.

    The compiled graphs are thrown away (``torch._dynamo.reset``): a block compiled around one form must
    not be reused for the other.
    """
    torch._dynamo.reset()
    for layer in four_bit_layers(gpt):
        for attribute in ("forward", "traced_in_block", "kept_eager"):
            layer.__dict__.pop(attribute, None)
    if form == "in-block":
        use_in_block_linear_4bit(four_bit_layers(gpt))
    elif form != "bitsandbytes":
        raise ValueError(f"apply_dequantize_4bit: 'bitsandbytes' or 'in-block', got {form!r}")


def compile_blocks(gpt: torch.nn.Module) -> None:
    for block in gpt.transformer.h:
        block.compile()


def step_seconds(fabric: L.Fabric, model, max_seq_length: int, packing: bool, steps: int = 3) -> float:
    """Seconds of one training step (micro-batch 1, random tokens) as the model stands, blocks compiled:
    the first step compiles and is not counted. Without enough memory for the step, with checkpointing."""
    gpt = model.module
    keep_quantized_layers_eager(gpt)
    compile_blocks(gpt)
    for checkpoint in (False, True):
        plan = Plan(1, checkpoint, 0.0, 0.0)
        try:
            probe_step(fabric, model, plan, max_seq_length, packing)
            _synchronize(fabric.device)
            started = time.perf_counter()
            for _ in range(steps):
                probe_step(fabric, model, plan, max_seq_length, packing)
            _synchronize(fabric.device)
            return (time.perf_counter() - started) / steps
        except torch.OutOfMemoryError:
            if fabric.device.type == "cuda":
                torch.cuda.empty_cache()
    raise RuntimeError("speed.dequantize_4bit auto: even one checkpointed step of micro-batch 1 ran out of memory; choose a form")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def keep_quantized_layers_eager(model: torch.nn.Module) -> int:
    """Run bitsandbytes layers outside the compiled graphs (all but the in-block ones); returns how many.

    Compiled whole, a block keeps each 4-bit weight's bf16 dequantization alive for the backward
    (QLoRA on Mistral-7B at 2048 tokens: 28.8 GiB instead of 18.4), which defeats quantizing. Left
    outside, the layer's autograd function (bitsandbytes', or ``finetune.dequant4bit``'s, which is
    compiled on its own) dequantizes again in the backward, as it is meant to; the norms, RoPE,
    attention and MLP activations around it are still compiled.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "traced_in_block", False) or getattr(module, "kept_eager", False):
            continue  # finetune.linear4bit_op's layers are meant to be traced; or already done
        if isinstance(module, torch.nn.Linear) and any(c.__module__.startswith("bitsandbytes") for c in type(module).__mro__):
            module.forward = torch.compiler.disable(module.forward)
            module.kept_eager = True
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
        batch |= {
            "positions": torch.arange(max_seq_length, device=device).expand(shape),
            "documents": torch.zeros(shape, dtype=torch.int32, device=device),
        }
    return batch


def probe_step(fabric: L.Fabric, model, plan: Plan, max_seq_length: int, packing: bool) -> None:
    """One forward+backward of a full micro-batch of random tokens (the most memory a real one can take),
    with room held for AdamW's two states per trainable value (made at the first optimizer step).

    Gradients are cleared and the RNG state restored afterwards, so training is as if it never ran.
    """
    from finetune.loop import batch_loss

    gpt = model.module
    device = next(gpt.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        batch = random_batch(gpt.config.vocab_size, plan.micro_batch_size, max_seq_length, packing, device)
        states = 2 * sum(p.numel() * p.element_size() for p in gpt.parameters() if p.requires_grad)
        optimizer_states = torch.empty(states, dtype=torch.uint8, device=device)  # held through the step
        try:
            with fabric.autocast():
                loss = batch_loss(model, batch, plan.checkpoint_blocks)
            fabric.backward(loss)
        finally:
            del optimizer_states
            for p in gpt.parameters():
                p.grad = None
