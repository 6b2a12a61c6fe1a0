"""The in-block 4-bit layer (``finetune::linear_4bit``) computes what bitsandbytes' own layer computes.

Reference: bitsandbytes' ``Linear4bit`` on the same packed bytes and ``QuantState``. The op calls
bitsandbytes' dequantization op on the FLAT weight (see tests/test_dequant4bit.py for why: its AVX-512
CPU kernel misreads 2-D shapes whose rows are not whole blocks); the reference layer dequantizes the 2-D
weight, so every in_features here is a multiple of the blocksize, where all bitsandbytes kernels agree.
Compared bit for bit: output, input gradient, bias gradient, in float32 and bf16.
"""

from __future__ import annotations

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from finetune import linear4bit_op  # noqa: E402
from finetune.dequant4bit import four_bit_layers  # noqa: E402
from finetune.forward import training_loss  # noqa: E402
from finetune.linear4bit_op import check_in_block, use_in_block_linear_4bit  # noqa: E402
from finetune.speed import choose_dequantize_4bit  # noqa: E402
from tests.test_dequant4bit import _qlora_tiny  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:_check_is_size:FutureWarning", "ignore:bf16 and fp16 are mixed:UserWarning")


def _layer(in_f: int, out_f: int, quant_type: str, double: bool, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(in_f + out_f)
    dense = torch.nn.Linear(in_f, out_f)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=dtype, quant_type=quant_type, compress_statistics=double)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.to(dtype), requires_grad=False, quant_type=quant_type, compress_statistics=double).to("cpu")
    layer.bias = torch.nn.Parameter(dense.bias.data.clone())
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("quant_type", "double"), [("nf4", False), ("nf4", True), ("fp4", True)], ids=["nf4", "nf4-dq", "fp4-dq"])
def test_in_block_layer_equals_bitsandbytes(quant_type: str, double: bool, dtype: torch.dtype) -> None:
    theirs = _layer(128, 48, quant_type, double, dtype)
    ours = copy.deepcopy(theirs)
    assert check_in_block(ours) == "bit-identical to bitsandbytes"
    assert use_in_block_linear_4bit([ours]) == 1
    x = torch.randn(3, 5, 128).to(dtype)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), theirs(xb)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad) and torch.equal(ours.bias.grad, theirs.bias.grad)
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_compiled_whole_and_saving_only_the_packed_weight() -> None:
    """fullgraph=True: no graph break around the layer; the backward keeps no float weight."""
    theirs = _layer(256, 192, "nf4", True, torch.float32)
    ours = copy.deepcopy(theirs)
    use_in_block_linear_4bit([ours])
    fn = torch.compile(lambda h: torch.nn.functional.silu(ours(h)) * 2, fullgraph=True)
    x = torch.randn(4, 256)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ya = fn(xa)
    yb = torch.nn.functional.silu(theirs(xb)) * 2
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)  # inductor fuses silu and the scale
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)
    assert saved and not any(t.shape in ((192, 256), (256, 192)) for t in saved)


def test_auto_takes_in_block_only_when_identical_and_timed_faster(monkeypatch) -> None:
    said = []
    model = _qlora_tiny("nf4", True)
    times = iter([2.0, 1.0])  # bitsandbytes timed first, then in-block
    assert choose_dequantize_4bit(model, "auto", compiled=True, log=said.append, timer=lambda: next(times)) == "in-block"
    assert (
        said[-1]
        == "4-bit dequantization: in-block (bit-identical to bitsandbytes on all 11 layers; a step 2000 ms with bitsandbytes, 1000 ms with in-block)"
    )
    assert all(getattr(layer, "traced_in_block", False) for layer in four_bit_layers(model))

    model = _qlora_tiny("nf4", True)
    times = iter([1.0, 1.0])
    assert choose_dequantize_4bit(model, "auto", compiled=True, log=said.append, timer=lambda: next(times)) == "bitsandbytes"
    assert "in-block is not faster here" in said[-1]
    assert not any(getattr(layer, "traced_in_block", False) for layer in four_bit_layers(model))  # switched back

    assert choose_dequantize_4bit(model, "auto", compiled=False, timer=lambda: 0.0) == "bitsandbytes"  # nothing to trace it into
    assert choose_dequantize_4bit(model, "auto", compiled=True, log=said.append) == "bitsandbytes" and "nothing timed it" in said[-1]

    real = linear4bit_op._weight
    monkeypatch.setattr(linear4bit_op, "_weight", lambda *a: real(*a) * 1.001)  # a form that is fast and wrong
    times = iter([2.0, 1.0])
    assert choose_dequantize_4bit(model, "auto", compiled=True, log=said.append, timer=lambda: next(times)) == "bitsandbytes"
    assert "in-block failed its check" in said[-1] and "differs from bitsandbytes" in said[-1]
    with pytest.raises(ValueError, match="speed.dequantize_4bit: in-block: .*differs from bitsandbytes"):
        choose_dequantize_4bit(model, "in-block", compiled=True)


def test_prepare_traces_the_4bit_layers_inside_the_compiled_blocks() -> None:
    """``prepare`` with torch.compile (inductor's C++ backend here) and in-block: the layers are not kept
    eager, and the model trains as bitsandbytes' does."""
    import lightning as L

    from finetune.config import TrainArgs
    from finetune.speed import SpeedArgs, prepare

    theirs = _qlora_tiny("nf4", True)
    ours = copy.deepcopy(theirs)
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    wrapped = fabric.setup_module(ours)
    said = []
    fabric.print = said.append
    speed = SpeedArgs(compile=True, micro_batch="fixed", packing=False, dequantize_4bit="in-block")
    assert speed.quantize_from_compute_dtype
    setup = prepare(fabric, wrapped, "lora", speed, TrainArgs(micro_batch_size=1), 32, "bnb.nf4-dq")
    assert setup.compiled and setup.dequantize_4bit == "in-block"
    assert any(m == "4-bit dequantization: in-block (bit-identical to bitsandbytes on all 11 layers)" for m in said)
    assert not any(getattr(layer, "kept_eager", False) for layer in four_bit_layers(wrapped.module))
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


def test_storage_in_the_compute_dtype_quantizes_from_it() -> None:
    from finetune.quantized_storage import ComputeDtypeStorage, quantizer

    torch.manual_seed(9)
    w = torch.randn(64, 128).to(torch.bfloat16)
    params = bnb.nn.Params4bit(torch.empty(0), requires_grad=False, quant_type="nf4", compress_statistics=True)
    stored = quantizer(torch.bfloat16)(params, w, torch.device("cpu"))
    data, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert stored.quant_state.dtype == torch.bfloat16 and torch.equal(stored.data, data)
    assert torch.equal(stored.quant_state.absmax, state.absmax)
    plugin = ComputeDtypeStorage("nf4-dq", torch.bfloat16)
    assert issubclass(plugin._linear_cls, bnb.nn.Linear4bit) and plugin._linear_cls.quantize is not bnb.nn.Linear4bit.__dict__.get("quantize")
