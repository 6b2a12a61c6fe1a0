"""Probe for issue 13: can QLoRA's 4-bit layers run inside a compiled block, and what does it buy?

One Mistral-7B block's seven linear layers (nf4, blocksize 64) with LoRA r16, forward + backward on 1 x 2048
tokens, timed with CUDA events (median-free mean of 20 after 3 warm-ups). Side by side in one process:
- eager_bnb: bitsandbytes' ``matmul_4bit`` (what our QLoRA ran), float16 and bfloat16 storage;
- compiled_op: ``torch.ops.bitsandbytes.dequantize_4bit`` inside an autograd function that saves only the
  packed bytes and dequantizes again in the backward, the whole block under ``torch.compile``;
- bf16_compiled: the same block with plain bf16 weights (the ceiling).
Also checks that the op, asked for bf16 directly, equals bitsandbytes' dequantize-then-cast (true only when
the weights were quantized from bf16: float16 storage rounds twice). Run: ``python -m bench.qlora_block_probe``.
"""

import json
import os

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

torch.manual_seed(0)
dev = "cuda"
D, I, KV, T, R = 4096, 14336, 1024, 2048, 16
shapes = {"q": (D, D), "k": (KV, D), "v": (KV, D), "o": (D, D), "gate": (I, D), "up": (I, D), "down": (D, I)}


def quant(w, storage_dtype):
    p = bnb.nn.Params4bit(w.to(storage_dtype), requires_grad=False, quant_type="nf4", compress_statistics=False, blocksize=64).to(dev)
    return p


class DQMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, absmax, shape):
        w = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, 64, "nf4", shape, x.dtype)
        ctx.save_for_backward(packed, absmax)
        ctx.shape = shape
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        packed, absmax = ctx.saved_tensors
        w = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, 64, "nf4", ctx.shape, g.dtype)
        return g @ w, None, None, None


def make(storage):
    layers = {}
    for n, (o, i) in shapes.items():
        w = torch.randn(o, i, device=dev) * 0.02
        p = quant(w, storage)
        A = (torch.randn(R, i, device=dev, dtype=torch.bfloat16) * 0.01).requires_grad_()
        Bm = torch.zeros(o, R, device=dev, dtype=torch.bfloat16).requires_grad_()
        layers[n] = (p, A, Bm)
    return layers


def block(x, layers, mode):
    def lin(n, h):
        p, A, Bm = layers[n]
        if mode == "eager_bnb":
            base = bnb.matmul_4bit(h, p.t(), quant_state=p.quant_state)
        else:
            base = DQMatmul.apply(h, p.data, p.quant_state.absmax, list(p.quant_state.shape))
        return base + (h @ A.t()) @ Bm.t()

    q, k, v = lin("q", x), lin("k", x), lin("v", x)
    a = q + torch.nn.functional.pad(k + v, (0, D - KV))
    h = x + lin("o", a)
    return h + lin("down", torch.nn.functional.silu(lin("gate", h)) * lin("up", h))


def bench(fn, x, n=20):
    for _ in range(3):
        fn(x).sum().backward()
    torch.cuda.synchronize()
    s = torch.cuda.Event(enable_timing=True)
    e = torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn(x).sum().backward()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


res = {"torch": torch.__version__, "bnb": bnb.__version__, "gpu": torch.cuda.get_device_name()}
x = torch.randn(1, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
for storage in (torch.float16, torch.bfloat16):
    L = make(storage)
    sn = str(storage).split(".")[-1]
    res[f"eager_bnb_{sn}_ms"] = bench(lambda x, L=L: block(x, L, "eager_bnb"), x)
    try:
        f = torch.compile(lambda x, L=L: block(x, L, "op"))
        res[f"compiled_op_{sn}_ms"] = bench(f, x)
        torch.cuda.reset_peak_memory_stats()
    except Exception as ex:
        res[f"compiled_op_{sn}_error"] = repr(ex)[:500]
    try:
        res[f"eager_op_{sn}_ms"] = bench(lambda x, L=L: block(x, L, "op"), x)
    except Exception as ex:
        res[f"eager_op_{sn}_error"] = repr(ex)[:500]
    # exactness vs bnb
    with torch.no_grad():
        p = L["q"][0]
        a = F.dequantize_4bit(p.data, p.quant_state).to(torch.bfloat16)
        b = torch.ops.bitsandbytes.dequantize_4bit(p.data, p.quant_state.absmax, 64, "nf4", list(p.quant_state.shape), torch.bfloat16)
        res[f"op_bf16_equals_bnb_cast_{sn}"] = bool(torch.equal(a, b))
    del L
    torch.cuda.empty_cache()
# plain bf16 reference block (no quant), compiled
W = {n: torch.randn(*s, device=dev, dtype=torch.bfloat16) * 0.02 for n, s in shapes.items()}


def block_bf16(x):
    lin = lambda n, h: h @ W[n].t()
    q, k, v = lin("q", x), lin("k", x), lin("v", x)
    a = q + torch.nn.functional.pad(k + v, (0, D - KV))
    h = x + lin("o", a)
    return h + lin("down", torch.nn.functional.silu(lin("gate", h)) * lin("up", h))


res["bf16_compiled_ms"] = bench(torch.compile(block_bf16), x)
print(json.dumps(res, indent=1))
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
open(os.path.join(os.environ.get("OUT", "/tmp"), "qlora_probe.json"), "w").write(json.dumps(res, indent=1))
