"""The QLoRA dequantization alone: ours (``finetune.dequant4bit``) vs bitsandbytes', per weight shape.

    python -m bench.dequant4bit --out_dir $OUT

Each weight is quantized the way Lightning's bitsandbytes plugin does it (from float16), then turned
into the bf16 weight a QLoRA matmul needs: bitsandbytes' ``dequantize_4bit(...).to(bf16)`` (what its
``MatMul4Bit`` runs, twice a step) against our compiled forms. Printed JSON per shape and quantization:
milliseconds, the effective bandwidth over the fewest bytes the job must move (packed bytes and scales
read, bf16 written), whether the results are bit-identical, and for the whole Mistral-7B (every linear
layer, forward and backward) the milliseconds a step spends dequantizing with each. A device-to-device
copy gives the bandwidth ceiling.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# Mistral-7B's linear layers: (out, in) -> how many of them
MISTRAL_7B = {(6144, 4096): 32, (4096, 4096): 32, (14336, 4096): 64, (4096, 14336): 32, (32000, 4096): 1}


def time_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events through triton's do_bench on a GPU)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, rep=max(20, repeats), return_mode="median"))
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs(device: torch.device, repeats: int) -> float:
    """Bytes read + written per second by a large device-to-device copy: the ceiling for this job."""
    n = 2**28 if device.type == "cuda" else 2**22
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    return round(2 * n * 4 / (time_ms(lambda: dst.copy_(src), repeats) / 1e3) / 1e9, 1)


def bench_shape(shape: tuple[int, int], double: bool, device: torch.device, repeats: int) -> dict:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from finetune.dequant4bit import Packed4bit, dequantize

    weight = (torch.randn(shape) * 0.02).half()
    params = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=double, blocksize=64).to(device)
    data, state = params.data, params.quant_state
    packed = Packed4bit.of(params)
    reference = bnbF.dequantize_4bit(data, state).to(torch.bfloat16)
    n = weight.numel()
    ideal_bytes = n // 2 + state.absmax.numel() * state.absmax.element_size() + 2 * n
    runs = {
        "bitsandbytes": lambda: bnbF.dequantize_4bit(data, state).to(torch.bfloat16),
        "compiled": lambda: dequantize(packed, "compiled", torch.bfloat16),
        "compiled+cast": lambda: dequantize(packed, "compiled+cast", torch.bfloat16),
    }
    out = {}
    for name, fn in runs.items():
        ms = time_ms(fn, repeats)
        out[name] = {
            "ms": round(ms, 5),
            "effective_gbs": round(ideal_bytes / (ms / 1e3) / 1e9, 3),
            "bit_identical": bool(torch.equal(fn(), reference)),
        }
    out["compiled_speedup"] = round(out["bitsandbytes"]["ms"] / out["compiled"]["ms"], 2)
    return out


def main(out_dir: Path = Path("out/bench"), shapes: list[tuple[int, int]] | None = None, repeats: int = 50) -> dict:
    """Time each shape (default: Mistral-7B's linear layers) for nf4 and nf4 with double quantization.

    Args:
        shapes: (out_features, in_features) pairs; the Mistral-7B step projection needs the default.
        repeats: timing repetitions (milliseconds of repetition on a GPU).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    counts = MISTRAL_7B if shapes is None else {tuple(s): 1 for s in shapes}
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "copy_bandwidth_gbs": copy_bandwidth_gbs(device, repeats),
        "shapes": {},
    }
    for quant in ("nf4", "nf4-dq"):
        per_step = {"bitsandbytes": 0.0, "compiled": 0.0, "compiled+cast": 0.0}
        for shape, count in counts.items():
            row = bench_shape(shape, quant == "nf4-dq", device, repeats)
            result["shapes"][f"{quant} {shape[0]}x{shape[1]}"] = row
            for name in per_step:
                per_step[name] += 2 * count * row[name]["ms"]  # forward and backward
            print(json.dumps({f"{quant} {shape[0]}x{shape[1]}": row}), flush=True)
        label = "mistral_7b_step_ms" if shapes is None else "all_shapes_twice_ms"
        result[f"{quant} {label}"] = {k: round(v, 2) for k, v in per_step.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dequant4bit.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
