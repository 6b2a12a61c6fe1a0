"""``python -m server --checkpoint_dir ...``: serve a checkpoint over HTTP (what `make serve` runs)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import uvicorn

from core.precision import ServeQuantize
from core.workload import HELM_WINDOW
from server.app import create_app
from server.engine import Engine, EngineKind, make_engine
from server.gpu_memory import cap
from server.loading import load_generator, resolve_device
from server.paged_model import ATTENTION_TOKENS
from server.scheduler import KVReservation


class _DrainingServer(uvicorn.Server):
    """uvicorn, whose SIGTERM/SIGINT first tells the engine to refuse new work and then, however the
    engine is doing, ends the process once ``drain_s`` has passed."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_s: float) -> None:
        super().__init__(config)
        self.engine, self.drain_s, self._deadline = engine, drain_s, None

    def handle_exit(self, sig, frame) -> None:
        self.engine.drain()
        if self._deadline is None:
            self._deadline = threading.Timer(self.drain_s, _exit_now, (self.drain_s,))
            self._deadline.daemon = True
            self._deadline.start()
        super().handle_exit(sig, frame)


def _exit_now(drain_s: float) -> None:
    print(f"shutdown: in-flight work did not finish within --drain_s {drain_s:g}; exiting", file=sys.stderr, flush=True)
    os._exit(1)


def serve(
    checkpoint_dir: Path = Path("checkpoints/tiny"),
    host: str = "127.0.0.1",
    port: int = 8080,
    device: str = "auto",
    dtype: Literal["bf16", "fp16", "fp32"] | None = None,
    quantize: ServeQuantize | None = None,
    use_template: bool = False,
    base_checkpoint_dir: Path | None = None,
    engine: EngineKind = "auto",
    max_seq_length: int = HELM_WINDOW,
    gpu_memory_gib: float | None = None,
    kv_block_size: int = 16,
    kv_tokens: int | None = None,
    kv_reservation: KVReservation = "lazy",
    max_batch: int = 32,
    max_queue: int = 1024,
    prefill_tokens: int = 4096,
    attention_tokens: int | None = ATTENTION_TOKENS,
    cuda_graphs: bool = True,
    compile_decode: bool | None = None,
    overlap_decode: bool = False,
    warmup: bool = True,
    drain_s: float = 30.0,
) -> None:
    """Serve ``/process``, ``/tokenize``, ``/decode`` and ``/health``.

    Args:
        checkpoint_dir: a merged or base checkpoint in litgpt format.
        host: interface to bind; the Docker image uses 0.0.0.0.
        port: TCP port; the Docker image uses 80.
        device: "auto" (CUDA if available), "cpu", "cuda" or "cuda:N".
        dtype: default bf16 on GPUs that support it, fp32 on CPU.
        quantize: bitsandbytes weights on a CUDA GPU (dtype is then the compute dtype). Fits a 13B model on a 24 GB card.
        use_template: wrap prompts in the template saved with the checkpoint (prompt_style.yaml).
            Off by default because HELM sends complete few-shot prompts.
        base_checkpoint_dir: for an unmerged finetune output (lit_model.pth.lora, .adapter or .adapter_v2 only): the
            base model, if it moved since training (default: as recorded in hyperparameters.yaml); refused for a
            standalone checkpoint, which has no base to read.
        engine: "auto" (continuous batching unless the model needs the serial path, e.g. adapter
            methods), "batched" or "serial" (one request at a time on litgpt's own forward).
        max_seq_length: the served window, prompt plus generation (HELM's neurips/local window is
            2048); longer prompts are left-truncated. At most the model's block_size.
        gpu_memory_gib: behave as on a GPU with this much memory (e.g. 24 for an RTX 4090): the process
            cannot allocate more, and the KV cache takes what the weights leave.
        kv_block_size: positions per KV-cache block.
        kv_tokens: KV-cache size in tokens (all sequences together); default: on a GPU what is left
            after the weights, a measured worst-case step with every decode graph, and a small margin
            (refused if a given size does not fit there); on the CPU 2 full windows.
        kv_reservation: what admitting a request reserves in the KV cache. "up_front": every block
            it can ever write (prompt plus max_new_tokens for each sequence), so nothing is ever
            preempted, but a small pool runs few requests at once. "lazy" (as vLLM): the prompt's
            blocks; sequences grow a block at a time, and when the pool runs out the latest-arrived
            running request is preempted and later recomputed (same greedy output). The default:
            on Llama-2-7B under a true 24 GiB cap it served HELM's max_tokens at 30 clients 1.13x faster
            (16% fewer decode steps, MMLU p50 1.66 -> 0.58 s), 0 errors (BENCHMARKS.md, 2026-12-04).
        max_batch: sequences in flight at most (HELM sends 30 requests at once); at least 16, the
            most sequences one request may ask for.
        max_queue: requests waiting at most; past it /process answers 503 with Retry-After.
        prefill_tokens: prompt tokens computed per forward pass; longer prompts are split.
        attention_tokens: K/V positions one attention call gathers at most (sequences x positions read):
            short prefill segments and decode batches past it are attended in groups, so the worst step's
            memory, which the KV pool is sized after, stays small. 16,384 (default) is 256 MiB of K+V
            for Llama-2-7B (8 full 2,048 windows) instead of 1 GiB for 32; steps under it are one call as
            before. A call reads one whole sequence at least. 0 or null: no bound (one call per step).
        cuda_graphs: replay each decode step as a CUDA graph (CUDA only).
        compile_decode: run each decode layer's work around its attention through torch.compile (inductor), so
            its small kernels fuse, then capture it in the same CUDA graphs (``server.compiled_decode``).
            Batched engine only; not with --quantize. Default (null): on with CUDA where torch.compile can build
            it, off on the CPU and with --quantize: on Mistral-7B (H200, BENCHMARKS.md 2026-12-04) batch-1 decode
            was 1.09-1.19x, 4 clients 1.04-1.26x and 30 clients 0.97-1.27x the eager decode, under a 24 GiB cap
            too. It compiles at start-up (~5 s): if that fails, the default stays eager with the error printed and
            an explicit true is refused with it. false: the eager decode.
        overlap_decode: enqueue each decode step before the previous one's samples are read back, so the host's
            work per token (readback, texts and stops, scheduling, inputs) runs while the GPU decodes (vLLM v1's
            async scheduling; ``server.batch_engine``). Same answers. Batched engine only. Off until a GPU bench
            shows it faster.
        warmup: capture every decode graph before accepting requests (~a few seconds per 10 graphs).
        drain_s: on SIGTERM, seconds to finish the requests in flight before the process exits.
    """
    try:
        if drain_s <= 0:
            raise ValueError(f"drain_s: must be positive, got {drain_s}")
        cap(resolve_device(device), gpu_memory_gib)
        generator = load_generator(checkpoint_dir, device, dtype, quantize, use_template, base_checkpoint_dir, max_seq_length)
        options = dict(max_batch=max_batch, prefill_tokens=prefill_tokens, kv_block_size=kv_block_size, kv_tokens=kv_tokens,
                       max_queue=max_queue, cuda_graphs=cuda_graphs, gpu_memory_gib=gpu_memory_gib,
                       kv_reservation=kv_reservation, compile_decode=compile_decode, attention_tokens=attention_tokens,
                       overlap_decode=overlap_decode)  # fmt: skip
        served = make_engine(generator, engine, **options)
        if memory := getattr(served, "memory", None):
            print(memory, flush=True)
    except ValueError as e:  # includes CheckpointError: a clear one-line refusal, not a traceback
        raise SystemExit(f"error: {e}") from None
    if warmup and hasattr(served, "warmup"):
        start = time.perf_counter()
        graphs = served.warmup()
        if graphs:
            print(f"captured {graphs} decode graphs in {time.perf_counter() - start:.1f} s", flush=True)
    app = create_app(served, generator.codec, model_name=Path(checkpoint_dir).name, drain_s=0.05 * drain_s)
    mode = f"{quantize} ({generator.dtype} compute)" if quantize else str(generator.dtype)
    kind = type(served).__name__
    pool = getattr(served, "stats", {})
    cache = f", KV cache {pool['kv_blocks'] * pool['kv_block_size']} tokens" if "kv_blocks" in pool else ""
    print(f"serving {checkpoint_dir} on http://{host}:{port} ({generator.device}, {mode}, {kind}{cache})", flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=0.9 * drain_s)
    _DrainingServer(config, served, drain_s).run()


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(serve)
