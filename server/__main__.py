"""``python -m server --checkpoint_dir ...``: serve a checkpoint over HTTP (what `make serve` runs)."""

from __future__ import annotations

import time
from pathlib import Path

import uvicorn

from server.app import create_app
from server.engine import make_engine
from server.loading import load_generator


def serve(
    checkpoint_dir: Path = Path("checkpoints/tiny"),
    host: str = "127.0.0.1",
    port: int = 8080,
    device: str = "auto",
    dtype: str | None = None,
    quantize: str | None = None,
    use_template: bool = False,
    base_checkpoint_dir: Path | None = None,
    engine: str = "auto",
    decode_rows: int = 32,
    prompt_rows: int = 32,
    prefill_tokens: int = 4096,
    cuda_graphs: bool = True,
    warmup: bool = True,
) -> None:
    """Serve ``/process``, ``/tokenize``, ``/decode`` and ``/health``.

    Args:
        checkpoint_dir: a merged or base checkpoint in litgpt format.
        host: interface to bind; the Docker image uses 0.0.0.0.
        port: TCP port; the Docker image uses 80.
        device: "auto" (CUDA if available), "cpu", "cuda" or "cuda:N".
        dtype: "bf16", "fp16" or "fp32"; default bf16 on GPUs that support it, fp32 on CPU.
        quantize: bitsandbytes weights on a CUDA GPU: "bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq" or "bnb.int8"
            (dtype is then the compute dtype). Fits a 13B model on a 24 GB card.
        use_template: wrap prompts in the template saved with the checkpoint (prompt_style.yaml).
            Off by default because HELM sends complete few-shot prompts.
        base_checkpoint_dir: for an unmerged LoRA output (lit_model.pth.lora only): the base model, if it
            moved since training (default: as recorded in hyperparameters.yaml).
        engine: "auto" (continuous batching unless the model needs the serial path, e.g. adapter
            methods), "batched" or "serial" (one request at a time on litgpt's own forward).
        decode_rows: sequences generated together (HELM sends 30 requests at once).
        prompt_rows: KV-cache rows that hold computed prompts, reused for shared few-shot prefixes.
            Both shrink to fit free GPU memory.
        prefill_tokens: prompt tokens computed per forward pass; longer prompts are split.
        cuda_graphs: replay each decode step as a CUDA graph (CUDA only).
        warmup: capture every decode graph before accepting requests (~a few seconds per 10 graphs).
    """
    try:
        generator = load_generator(checkpoint_dir, device, dtype, quantize, use_template, base_checkpoint_dir)
        options = dict(decode_rows=decode_rows, prompt_rows=prompt_rows, prefill_tokens=prefill_tokens, cuda_graphs=cuda_graphs)
        served = make_engine(generator, engine, **options)
    except ValueError as e:  # includes CheckpointError: a clear one-line refusal, not a traceback
        raise SystemExit(f"error: {e}") from None
    if warmup and hasattr(served, "warmup"):
        start = time.perf_counter()
        graphs = served.warmup()
        if graphs:
            print(f"captured {graphs} decode graphs in {time.perf_counter() - start:.1f} s", flush=True)
    app = create_app(served, generator.codec, model_name=Path(checkpoint_dir).name)
    mode = f"{quantize} ({generator.dtype} compute)" if quantize else str(generator.dtype)
    kind = type(served).__name__
    print(f"serving {checkpoint_dir} on http://{host}:{port} ({generator.device}, {mode}, {kind})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(serve, as_positional=False)
