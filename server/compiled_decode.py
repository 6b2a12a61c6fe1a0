"""``--compile_decode``: a decode layer's work around its attention compiled by inductor, so it fuses.

A 7B decode step replayed as a CUDA graph still runs ~30 small kernels a layer (RMSNorm's casts,
rope's halves, the residual adds, SiLU times the up projection), ~3 ms of a 6.3 ms step whose weight
reads need 3.45 ms. Here each layer's part before the attention (norm, qkv, rope) and after it
(output projection, residuals, norm, MLP) goes through ``torch.compile``; the paged K/V write, the
block gather and SDPA stay eager between them (compiled, the write into the pool would be a mutated
graph input, and a pool copy where inductor failed to write it in place would cost more than the
fusion gains; not tried), and ``PagedModel._capture`` records the whole step in its own CUDA graph
as without this option. On the CPU in fp32 a tiny layer compiles to 10 kernels, 5 of them the GEMMs (3 before, 7 after).

Why it stays cheap to compile, with ~8 x 8 (length, batch) buckets of graphs:
- the two parts never see the length (only the eager attention does), so length buckets share them;
- they take the layer as an argument and dynamo treats its parameters as inputs, so one compiled
  graph serves all layers; batch 1 gets its own graph (dynamo specializes size 1) and every other
  batch one graph with a dynamic batch size: about 2 graphs per part in all;
- ``fullgraph=True`` and ``fail_on_recompile_limit_hit``: a graph break or a recompile past
  ``RECOMPILE_LIMIT`` raises instead of silently running that layer eagerly.

Mode "default", not "reduce-overhead" (its CUDA graphs would nest in ours) nor "max-autotune-no-cudagraphs":
at batch 1 the GEMMs are matrix-vector products that cuBLAS runs at the weights' read bandwidth,
and max-autotune's Triton GEMM search costs minutes per shape for them; the fusion that is the
point here is the same in both modes.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import torch

RECOMPILE_LIMIT = 8  # graphs per part: batch 1 and dynamic batch, with room for guard variants (e.g. a norm type per layer)


def unavailable_reason(model: torch.nn.Module) -> str | None:
    """Why ``--compile_decode`` cannot compile ``model``'s decode on this platform, or None."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return f"torch.compile does not support Python {sys.version_info.major}.{sys.version_info.minor} on this platform"
    except Exception as e:  # noqa: BLE001 (an import failure is the reason)
        return f"torch.compile is unavailable: {type(e).__name__}: {e}"
    device = next(model.parameters()).device
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "inductor needs Triton for CUDA kernels and it is not installed"
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):  # as triton.runtime.build looks
            return "Triton builds its CUDA launcher with a C compiler (CC, gcc or clang) and none was found"
        if not (header := Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
            return f"Triton builds its CUDA launcher against Python's headers and {header} is missing (python3-dev)"
    elif device.type == "cpu":
        from torch._inductor import config

        cxx = config.cpp.cxx[-1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
        if shutil.which(cxx or "g++") is None:
            return f"inductor needs a C++ compiler for CPU kernels ({cxx}) and none was found"
    else:
        return f"not supported on {device.type}"
    for module in model.modules():
        if type(module).__module__.startswith("bitsandbytes"):
            return f"bitsandbytes layers ({type(module).__name__}, from --quantize) do not compile; leave --compile_decode off"
    return None


def resolve_compile_decode(requested: bool | None, model: torch.nn.Module, trial: Callable[[], None] | None = None) -> bool:
    """``--compile_decode``'s value: as given, or by default (None) on for a CUDA model that torch.compile can
    build, where it was measured faster (Mistral-7B on an H200, BENCHMARKS.md 2026-12-04: batch-1 decode 1.09-1.19x,
    4 clients 1.04-1.26x, 30 clients 0.97-1.27x, under a 24 GiB cap too). Off on the CPU (inductor's C++ build is
    slow and unmeasured there) and where ``unavailable_reason`` says why, which is printed.

    ``trial`` (``trial_compile``), run where the answer would be on, compiles the decode before anything is
    served: a build that fails is refused with its error when the option was asked for, and by default leaves
    the decode eager with that error printed, so an architecture not yet compiled on a GPU (Llama-2 and
    Qwen2.5 have compiled only on the CPU) still serves instead of failing at start-up."""
    if requested is False or (requested is None and not default_on(model)):
        return False
    reason = unavailable_reason(model)
    if reason is None and trial is not None:
        try:
            trial()
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # whatever dynamo, inductor or Triton raised is the reason
            reason = f"compiling the decode failed: {_first_cause(e)}"
            if requested:
                raise ValueError(f"compile_decode: {reason}") from e
    if reason is None:
        return True
    if requested:
        raise ValueError(f"compile_decode: {reason}")
    print(f"compile_decode: off by default here: {reason}", file=sys.stderr, flush=True)
    return False


def _first_cause(error: BaseException) -> str:
    """The error at the bottom of dynamo's wrapping (BackendCompilerFailed says only "backend=... raised:"), in one line."""
    for _ in range(8):  # a chain, not a cycle
        if (cause := error.__cause__ or getattr(error, "inner_exception", None)) is None:
            break
        error = cause
    first_line = next(iter(str(error).strip().splitlines()), "")
    return f"{type(error).__name__}: {first_line[:300]}"


def default_on(model: torch.nn.Module) -> bool:
    """Where ``--compile_decode`` is on unless told otherwise: a CUDA model (the only place it was measured)."""
    return next(model.parameters()).device.type == "cuda"


def trial_compile(model: torch.nn.Module, block_size: int) -> None:
    """Decode batch 1 and batch 2 through the compiled parts on a two-block pool: every graph a decode needs
    (batch 1 and the dynamic batch, ``CompiledPart``) is built here, and dynamo's cache serves them to the
    engine's own pools, so this costs no compile of its own. ``compiled_parts`` refuses with its reason."""
    from server.paged_model import PagedModel

    paged = PagedModel(model, 3, block_size, max_batch=2, max_len=block_size, cuda_graphs=False, compile_decode=True)
    with torch.inference_mode():
        for batch in (1, 2):
            paged.decode([0] * batch, [0] * batch, [[1 + b] for b in range(batch)])
    del paged
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.empty_cache()  # the trial pool's few blocks, before the engine measures its memory


class _Counted:
    """Inductor, counting and logging the graphs it compiles for one part."""

    def __init__(self, name: str) -> None:
        self.name, self.graphs = name, 0
        self.inductor = torch._dynamo.lookup_backend("inductor")

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        shapes = [tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() == 3][:1]
        print(f"compile_decode: compiling {self.name} (graph {self.graphs}, input {shapes})", file=sys.stderr, flush=True)
        return self.inductor(gm, example_inputs)


_BACKENDS: dict[str, _Counted] = {}  # one per part for the process: dynamo's cache is per code object and
# guards on the backend, so a new backend per PagedModel would recompile for the engine's second runner


class CompiledPart:
    """``fn(block, x, *tensors)`` compiled once for every layer; the batch dimension is dynamic above 1."""

    def __init__(self, name: str, fn: Callable) -> None:
        self.backend = _BACKENDS.setdefault(name, _Counted(name))
        self.compiled = torch.compile(fn, backend=self.backend, fullgraph=True)

    @property
    def graphs(self) -> int:
        return self.backend.graphs

    def __call__(self, block: torch.nn.Module, *tensors: torch.Tensor):
        if tensors[0].size(0) > 1:  # one graph for all batch buckets above 1, not one each
            for t in tensors:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True, suppress_errors=False):
            return self.compiled(block, *tensors)


def compiled_parts(paged, model: torch.nn.Module) -> tuple[CompiledPart, CompiledPart]:
    """``PagedModel``'s (before attention, after attention) layer parts, compiled; refused with the reason."""
    if (reason := unavailable_reason(model)) is not None:
        raise ValueError(f"compile_decode: {reason}")
    return CompiledPart("decode_before", paged._decode_before), CompiledPart("decode_after", paged._decode_after)
