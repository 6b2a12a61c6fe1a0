"""QLoRA's compiled 4-bit dequantization computes what bitsandbytes computes (weights, outputs, gradients).

bitsandbytes is the reference: the same packed bytes and ``QuantState`` are dequantized by both, and
bitsandbytes is asked for the FLAT weight (``bitsandbytes_dequantize_flat``). Its CUDA kernel treats
every weight as flat (element i times absmax[i // blocksize], what the quantizer wrote); its AVX-512 CPU
kernel (0.49.2) restarts the block count on each row of a 2-D shape, so on an AVX-512 machine its 2-D
answer is wrong wherever a row is not a multiple of the blocksize (a 64x96 weight at blocksize 64),
while on AVX2 it is right. Asked for the flat vector, every bitsandbytes kernel agrees, so these tests
pass on any x86-64 CPU. bitsandbytes multiplies code x absmax in float32 and rounds once to the stored
dtype; its CPU kernel agrees with that exactly for float32 storage, which is what the exact checks use.
"""

from __future__ import annotations

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402
from litgpt.lora import GPT as LoRAGPT  # noqa: E402
from litgpt.lora import Config as LoRAConfig  # noqa: E402
from litgpt.lora import mark_only_lora_as_trainable  # noqa: E402

from finetune.dequant4bit import (  # noqa: E402
    Packed4bit,
    bitsandbytes_dequantize_flat,
    check_against_bitsandbytes,
    dequantize,
    four_bit_layers,
    use_compiled_dequantize,
)
from finetune.forward import training_loss  # noqa: E402
from finetune.speed import choose_dequantize_4bit  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:_check_is_size:FutureWarning", "ignore:bf16 and fp16 are mixed:UserWarning")

QUANT = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
QUANT_IDS = ["nf4", "nf4-dq", "fp4", "fp4-dq"]


def _params4bit(weight: torch.Tensor, quant_type: str, double: bool, blocksize: int = 64):
    return bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=quant_type, compress_statistics=double, blocksize=blocksize).to("cpu")


@pytest.mark.parametrize(("quant_type", "double"), QUANT, ids=QUANT_IDS)
@pytest.mark.parametrize("shape", [(96, 64), (200, 72), (17, 30)], ids=["even", "many-blocks", "last-block-short"])
def test_dequantize_equals_bitsandbytes(quant_type: str, double: bool, shape: tuple[int, int]) -> None:
    torch.manual_seed(sum(shape))
    p = _params4bit(torch.randn(*shape) * 0.05, quant_type, double)
    ours = dequantize(Packed4bit.of(p), form="eager")
    theirs = bitsandbytes_dequantize_flat(p)
    assert ours.shape == shape and ours.dtype == torch.float32
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("double", [False, True], ids=["nf4", "nf4-dq"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_blocksizes(blocksize: int, double: bool) -> None:
    """Rows of 96 are not a multiple of any of these blocksizes, so blocks straddle rows.

    Compared: ours against bitsandbytes' dequantization of the flat weight (bit for bit), and ours
    against the original weight within the quantizer's own error bound for its flat block (half the
    widest gap of the 4-bit code, times that block's absmax). The bound is what pins the flat-block
    reading as the true one: bitsandbytes' AVX-512 CPU kernel on the 2-D shape, which scales by a
    per-row block, breaks it (not asserted here: that kernel runs only on AVX-512 machines).
    """
    torch.manual_seed(blocksize)
    w = torch.randn(64, 96)
    p = _params4bit(w, "nf4", double, blocksize)
    ours = dequantize(Packed4bit.of(p), form="eager")
    assert torch.equal(ours, bitsandbytes_dequantize_flat(p))
    state = p.quant_state
    absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset if double else state.absmax
    true_absmax = w.reshape(-1, blocksize).abs().amax(1)
    bound = true_absmax * state.code.diff().max() / 2 + (absmax - true_absmax).abs()  # code rounding + scale rounding (double quant.)
    assert bool(((ours - w).abs() <= bound.repeat_interleave(blocksize).view(w.shape) + 1e-6).all())


def test_float16_storage_rounds_once_then_casts_to_the_compute_dtype() -> None:
    """Lightning quantizes from float16; bitsandbytes' matmul then casts the float16 weight to bf16."""
    torch.manual_seed(3)
    w = torch.randn(128, 64).half()
    p16, p32 = _params4bit(w, "nf4", False), _params4bit(w.float(), "nf4", False)
    assert torch.equal(p16.data, p32.data) and torch.equal(p16.quant_state.absmax, p32.quant_state.absmax)  # same bytes, same scales
    exact = bitsandbytes_dequantize_flat(p32)  # float32 product, as the CUDA kernel forms it
    ours16 = dequantize(Packed4bit.of(p16), form="eager")
    assert ours16.dtype == torch.float16 and torch.equal(ours16, exact.half())
    assert torch.equal(dequantize(Packed4bit.of(p16), form="eager", out_dtype=torch.bfloat16), exact.half().to(torch.bfloat16))
    # bitsandbytes' own CPU float16 kernel rounds a few elements the other way: within one float16 step
    cpu16 = bitsandbytes_dequantize_flat(p16)
    torch.testing.assert_close(ours16, cpu16, rtol=2**-10, atol=0)


def test_compiled_dequantize_equals_eager() -> None:
    """The inductor kernel (C++ here, Triton on a GPU) gives the same bits, the double rounding included."""
    torch.manual_seed(4)
    for shape, (quant_type, double) in zip([(96, 64), (40, 30), (64, 128)], [("nf4", False), ("nf4", True), ("fp4", True)]):
        p = _params4bit(torch.randn(*shape).half(), quant_type, double)
        packed = Packed4bit.of(p)
        for out_dtype in (None, torch.bfloat16):
            eager = dequantize(packed, "eager", out_dtype=out_dtype)
            assert torch.equal(dequantize(packed, "compiled", out_dtype=out_dtype), eager)
            assert torch.equal(dequantize(packed, "compiled+cast", out_dtype=out_dtype), eager)


def _linear4bit(in_f: int, out_f: int, bias: bool, quant_type: str, double: bool) -> torch.nn.Module:
    """bitsandbytes' own layer, whose forward dequantizes the 2-D weight: ``in_f`` must be a multiple of the
    blocksize (64) for its AVX-512 CPU kernel to be right (see the module docstring)."""
    if in_f % 64:
        raise ValueError(f"in_f={in_f}: not a multiple of the blocksize 64, bitsandbytes' AVX-512 CPU layer would misread the scales")
    dense = torch.nn.Linear(in_f, out_f, bias=bias)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=double)
    layer.weight = _params4bit(dense.weight.data, quant_type, double)
    if bias:
        layer.bias = torch.nn.Parameter(dense.bias.data.clone())
    return layer.to("cpu")


@pytest.mark.parametrize(("quant_type", "double"), QUANT, ids=QUANT_IDS)
def test_layer_output_and_gradients_equal_bitsandbytes(quant_type: str, double: bool) -> None:
    torch.manual_seed(5)
    theirs = _linear4bit(64, 48, True, quant_type, double)
    ours = copy.deepcopy(theirs)
    assert use_compiled_dequantize(ours, "eager") == 1
    ours.bias.requires_grad_(True)
    theirs.bias.requires_grad_(True)
    x = torch.randn(2, 5, 64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-6)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=0, atol=1e-5)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))


def test_backward_keeps_no_dequantized_weight() -> None:
    """Only the packed bytes outlive the forward: the autograd graph saves no float weight."""
    layer = _linear4bit(256, 512, False, "nf4", False)
    use_compiled_dequantize(layer, "eager")
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert not any(t.shape == (512, 256) for t in saved)
    assert x.grad is not None and x.grad.abs().sum() > 0


def _qlora_tiny(quant_type: str, double: bool) -> torch.nn.Module:
    """A litgpt LoRA model on every linear layer whose frozen base linears are bitsandbytes 4-bit (CPU)."""
    torch.manual_seed(6)
    config = LoRAConfig(
        name="t",
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_query_groups=2,
        intermediate_size=128,
        block_size=32,
        vocab_size=96,
        padded_vocab_size=96,
        mlp_class_name="LLaMAMLP",
        norm_class_name="RMSNorm",
        bias=False,
        lora_r=4,
        lora_alpha=8,
        lora_query=True,
        lora_key=True,
        lora_value=True,
        lora_projection=True,
        lora_mlp=True,
        lora_head=True,
    )
    model = LoRAGPT(config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, child_name, _linear4bit(child.in_features, child.out_features, child.bias is not None, quant_type, double))
    mark_only_lora_as_trainable(model)
    return model


@pytest.mark.parametrize(("quant_type", "double"), [("nf4", False), ("nf4", True)], ids=["nf4", "nf4-dq"])
def test_qlora_model_loss_and_lora_gradients_equal_bitsandbytes(quant_type: str, double: bool) -> None:
    theirs = _qlora_tiny(quant_type, double)
    ours = copy.deepcopy(theirs)
    n = len(four_bit_layers(ours))
    assert n == 2 * 5 + 1  # fused qkv, proj and three MLP linears a block, and the head
    said = []
    assert choose_dequantize_4bit(ours, "compiled", compiled=False, log=said.append) == "compiled"  # inductor's C++ kernel here
    assert "bit-identical to bitsandbytes on all 11 layers" in said[0]
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 96, (2, 32), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels}
    loss_ours, loss_theirs = training_loss(ours, batch), training_loss(theirs, batch)
    loss_ours.backward()
    loss_theirs.backward()
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=0, atol=1e-6)
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_check_names_a_mismatch_and_compiled_refuses() -> None:
    model = _qlora_tiny("nf4", False)
    assert check_against_bitsandbytes(four_bit_layers(model)[0], form="eager") == "bit-identical to bitsandbytes"
    broken = copy.deepcopy(model)
    layer = four_bit_layers(broken)[3]
    layer.weight.quant_state.code = layer.weight.quant_state.code.flip(0)  # our kernel reads the code, bitsandbytes' the type
    with pytest.raises(ValueError, match="differs from bitsandbytes"):
        check_against_bitsandbytes(layer, form="eager")
    with pytest.raises(ValueError, match="speed.dequantize_4bit: no compiled form matched bitsandbytes.*differs"):
        choose_dequantize_4bit(broken, "compiled", compiled=True)


def test_choice_rules() -> None:
    model = _qlora_tiny("nf4", False)
    assert choose_dequantize_4bit(model, "auto", compiled=False) == "bitsandbytes"  # no compiled blocks: no Triton assumed
    assert choose_dequantize_4bit(model, "bitsandbytes", compiled=True) == "bitsandbytes"
    assert choose_dequantize_4bit(torch.nn.Linear(4, 4), "auto", compiled=True) is None  # no 4-bit layers
    with pytest.raises(ValueError, match="speed.dequantize_4bit"):
        choose_dequantize_4bit(model, "triton", compiled=True)


def test_prepare_compiles_blocks_around_the_compiled_dequantization() -> None:
    """The GPU path on the CPU: ``finetune.speed.prepare`` with torch.compile (inductor's C++ backend here)
    picks the compiled form, keeps the 4-bit layers outside the compiled blocks, and trains as bitsandbytes does."""
    import lightning as L

    from finetune.config import TrainArgs
    from finetune.speed import SpeedArgs, prepare

    theirs = _qlora_tiny("nf4", True)
    ours = copy.deepcopy(theirs)
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    wrapped = fabric.setup_module(ours)
    said = []
    fabric.print = said.append
    speed = SpeedArgs(compile=True, micro_batch="fixed", packing=False, dequantize_4bit="compiled")
    setup = prepare(fabric, wrapped, "lora", speed, TrainArgs(micro_batch_size=1), 32, "bnb.nf4-dq")
    assert setup.compiled and setup.dequantize_4bit == "compiled"
    assert any("4-bit dequantization: compiled (bit-identical to bitsandbytes on all 11 layers)" in m for m in said)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 96, (2, 32), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    loss_ours, loss_theirs = training_loss(wrapped.module, batch), training_loss(theirs, batch)
    loss_ours.backward()
    loss_theirs.backward()
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-6)  # inductor may reorder float sums
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in wrapped.module.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
