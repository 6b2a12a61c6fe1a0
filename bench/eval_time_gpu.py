"""``make eval-time`` on a GPU with random weights: helm-run's schedule projected at 4 and 30 threads.

    python -m bench.eval_time_gpu --out_dir $OUT [--model Mistral-7B-v0.1] [--threads '[4, 30]'] [--gpu_memory_gib 24]
    python -m bench.eval_time_gpu --out_dir /tmp/x --model tiny --requests_per_type 1   (tries it on a CPU)

Serves ``model`` with random bf16 weights (``bench.serve.prepare_checkpoint``; the tiny model's
tokenizer) with ``python -m server`` in its own process, then runs ``submission.eval_time`` against
it once per thread count, with ``--gpu auto`` (this machine's card) so the report carries the
projection for this GPU and the labelled estimate for the track cards. Random weights never emit a
stop sequence, so the generation lengths are the module's assumed ones (see ``core.workload``).
Writes ``$OUT/eval_time_t<threads>.json`` and ``$OUT/eval_time_gpu.json`` (the projections side by side).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.serve import Server, _free_port, prepare_checkpoint, server_command
from submission import eval_time


def main(
    out_dir: Path,
    model: str = "Mistral-7B-v0.1",
    threads: tuple[int, ...] = (4, 30),
    requests_per_type: int = 8,
    gpu_memory_gib: float | None = None,
) -> dict:
    """Project the eval for ``model`` (random weights) served on this GPU, at each thread count.

    Args:
        out_dir: where the reports go.
        model: litgpt config served with random bf16 weights.
        threads: helm-run -n values to measure and project.
        requests_per_type: trace requests per request type (11 types).
        gpu_memory_gib: cap the server's allocator as on a card of this size (24: the 4090 track).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"model": model, "gpu_memory_gib": gpu_memory_gib, "threads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = prepare_checkpoint(model, None, Path(tmp))
        port = _free_port()
        extra = ["--gpu_memory_gib", str(gpu_memory_gib)] if gpu_memory_gib else []
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only to try the bench itself
        with Server(server_command("ours", ckpt, port, device, Path(tmp), ours_args=extra), port, out_dir / "eval_time_server.log") as server:
            for n in threads:
                report = eval_time.main(
                    url=server.url, requests_per_type=requests_per_type, threads=n, gpu="auto", out=out_dir / f"eval_time_t{n}.json"
                )
                summary["gpu"] = report["gpu_title"]
                summary["threads"][n] = {
                    name: {
                        "projected_s": round(s["projected_s"], 1),
                        "no_barrier_s": round(s["no_barrier_s"], 1),
                        "worst_case_s": round(s["worst_case_s"], 1),
                        "limit_s": s["limit_s"],
                        "estimates_s": {card: round(e["projected_s"], 1) for card, e in s["estimates"].items()},
                    }
                    for name, s in report["sets"].items()
                }
    (out_dir / "eval_time_gpu.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
