"""Baseline servers for the serving benchmark: how the 2023 starter kit and the winning teams served.

Same endpoints and JSON as our server (``/process``, ``/tokenize``, ``/decode``, ``/health``, the
models of ``server/schemas.py``; in fact our own app, ``server.app.create_app``), and like the starter
kit one request at a time: our ``SerialEngine``'s single worker thread runs the baseline's
generation. Two kinds, over the same litgpt checkpoint:

- ``litgpt``: upstream ``litgpt.generate.base.generate`` on litgpt's ``GPT``, loaded as litgpt's own
  generate script loads it (Fabric, bf16-true on CUDA, 32-true on CPU). Upstream ``generate`` returns
  no logprobs, so every token gets logprob 0.0 and an empty ``top_logprob``: this baseline skips the
  log-softmax and top-k work our server does, which favours it in a speed comparison.
- ``hf``: transformers ``generate`` on the checkpoint exported with ``finetune.export_hf`` (cached in
  ``hf_dir``). Logprobs come from the raw logits (``output_logits``), as in our server, so they are
  comparable; ``top_logprob`` holds ``top_k_per_token`` entries.

Both decode as the request says, nothing more: the model's ``generation_config.json`` sampling
defaults (Llama 2 ships temperature 0.6, top_p 0.9) are not applied. Stop sequences are cut from the
text after generation (generation runs to ``max_new_tokens`` or EOS), as the starter kit did.
``echo_prompt`` prepends the prompt's tokens with logprob 0.0 (HELM's generation requests never echo).

    python -m bench.baseline_servers --kind litgpt --checkpoint_dir checkpoints/tiny --port 8081
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI

from server.app import create_app
from server.engine import SerialEngine
from server.schemas import Completion, ProcessRequest, Token

KINDS = ("litgpt", "hf")
CONTEXT_TOKENS = 6  # left context when decoding one token's text (a lone Llama piece loses its space)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Baseline:
    """Request handling shared by both kinds; a subclass supplies the tokenizer and ``_generate``."""

    bos_id: int | None
    eos_id: int | None
    block_size: int
    vocab_size: int  # /decode refuses ids outside it, as our server does

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _generate(self, ids: list[int], req: ProcessRequest) -> tuple[list[int], list[float], list[dict[int, float]]]:
        """Generated ids (no EOS), their logprobs and top-k alternatives (id -> logprob) per token."""
        raise NotImplementedError

    def _piece(self, context: list[int], token_id: int) -> str:
        """The text ``token_id`` adds after ``context`` (decoded with a few tokens of context)."""
        window = context[-CONTEXT_TOKENS:]
        return self.decode(window + [token_id])[len(self.decode(window)) :]

    def run(self, req: ProcessRequest) -> tuple[list[Completion], int]:
        ids = self.encode(req.prompt)
        room = self.block_size - req.max_new_tokens  # left-truncate (BOS kept) so the answer fits
        dropped = max(0, len(ids) - room)
        if dropped:
            keep_bos = ids[0] == self.bos_id
            ids = ids[:1] + ids[1 + dropped :] if keep_bos else ids[dropped:]
        if req.seed is not None:
            torch.manual_seed(req.seed)  # the starter kit seeded the global RNG per request
        return [self._complete(ids, req) for _ in range(req.n)], dropped

    def _complete(self, ids: list[int], req: ProcessRequest) -> Completion:
        gen, logprobs, tops = self._generate(ids, req) if req.max_new_tokens > 0 and ids else ([], [], [])
        prompt_text = self.decode(ids)
        text = self.decode(ids + gen)[len(prompt_text) :]
        if req.stop_sequences and (hits := [i for s in req.stop_sequences if (i := text.find(s)) != -1]):
            text = text[: min(hits)]
        tokens, pos, full = [], 0, ids + gen
        for i, (tid, lp, top) in enumerate(zip(gen, logprobs, tops)):
            if pos >= len(text):
                break  # the rest was cut by a stop sequence
            context = full[max(0, len(ids) + i - CONTEXT_TOKENS) : len(ids) + i]
            piece = self._piece(context, tid)[: len(text) - pos]
            alternatives: dict[str, float] = {}
            for c, v in sorted(top.items(), key=lambda cv: -cv[1]):
                alternatives.setdefault(self._piece(context, c), v)  # two ids with the same text: the likelier
            tokens.append(Token(text=piece, logprob=lp, top_logprob=alternatives))
            pos += len(piece)
        if req.echo_prompt:
            echo = [Token(text=self._piece(ids[:i], t), logprob=0.0, top_logprob={}) for i, t in enumerate(ids) if t != self.bos_id]
            tokens, text = echo + tokens, prompt_text + text
        return Completion(text=text, tokens=tokens, logprob=sum(t.logprob for t in tokens))


class LitGPTBaseline(Baseline):
    """Upstream litgpt: ``GPT`` + ``litgpt.generate.base.generate``, loaded like litgpt's generate script."""

    def __init__(self, checkpoint_dir: Path, device: torch.device) -> None:
        import lightning as L
        from litgpt import GPT, Config, Tokenizer
        from litgpt.utils import load_checkpoint

        fabric = L.Fabric(
            accelerator=device.type,
            devices=[device.index or 0] if device.type == "cuda" else 1,
            precision="bf16-true" if device.type == "cuda" else "32-true",
        )
        config = Config.from_file(checkpoint_dir / "model_config.yaml")
        with fabric.init_module(empty_init=True):
            model = GPT(config)
        model.eval()
        self.model = fabric.setup_module(model)
        load_checkpoint(fabric, self.model, checkpoint_dir / "lit_model.pth")  # lazy load + load_state_dict
        self.device, self.dtype = fabric.device, model.transformer.wte.weight.dtype
        self.tokenizer = Tokenizer(checkpoint_dir)
        self.bos_id, self.eos_id, self.block_size = self.tokenizer.bos_id, self.tokenizer.eos_id, config.block_size
        self.vocab_size = self.tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).tolist()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.processor.decode(ids) if ids else ""  # skips special tokens (both backends)

    def _generate(self, ids: list[int], req: ProcessRequest) -> tuple[list[int], list[float], list[dict[int, float]]]:
        from litgpt.generate.base import generate

        prompt = torch.tensor(ids, device=self.device)
        total = len(ids) + req.max_new_tokens
        self.model.set_kv_cache(batch_size=1, max_seq_length=total, device=self.device, dtype=self.dtype)
        try:
            out = generate(
                self.model,
                prompt,
                total,
                temperature=0.0 if req.greedy else req.temperature,
                top_k=req.top_k or None,
                top_p=req.top_p,
                eos_id=self.eos_id,
                include_prompt=False,
            )
        finally:
            self.model.clear_kv_cache()
        gen = [int(t) for t in out.tolist()]
        if gen and gen[-1] == self.eos_id:  # upstream returns the EOS it stopped at
            gen.pop()
        return gen, [0.0] * len(gen), [{} for _ in gen]


class HFBaseline(Baseline):
    """transformers ``generate`` one request at a time, on the checkpoint exported to HF format."""

    def __init__(self, checkpoint_dir: Path, device: torch.device, hf_dir: Path | None = None) -> None:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from finetune.export_hf import HF_CONFIG, export_hf

        hf_dir = Path(hf_dir) if hf_dir is not None else checkpoint_dir.parent / f"{checkpoint_dir.name}-hf"
        if not (hf_dir / HF_CONFIG).is_file():
            export_hf(checkpoint_dir, hf_dir)  # copies tokenizer.json / tokenizer.model and their configs too
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        # transformers 4.56 renamed torch_dtype to dtype (5.x warns on the old name; older ones lack the new).
        new_name = tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (4, 56)
        kwargs = {"dtype" if new_name else "torch_dtype": dtype}
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa", **kwargs).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        self.device = device
        self.bos_id, self.eos_id = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        self.block_size = self.model.config.max_position_embeddings
        self.vocab_size = len(self.tokenizer)
        # Only the request decides decoding: no sampling defaults from the model's generation_config.json.
        self.model.generation_config = GenerationConfig(bos_token_id=self.bos_id, eos_token_id=self.eos_id, pad_token_id=self.eos_id)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.inference_mode()
    def _generate(self, ids: list[int], req: ProcessRequest) -> tuple[list[int], list[float], list[dict[int, float]]]:
        sampling = {} if req.greedy else {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k}
        input_ids = torch.tensor([ids], device=self.device)
        out = self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=req.max_new_tokens,
            do_sample=not req.greedy,
            **sampling,
            output_logits=True,  # raw logits: logprobs before temperature/top-k/top-p, like our server
            return_dict_in_generate=True,
            pad_token_id=self.eos_id,
        )
        gen = out.sequences[0, len(ids) :].tolist()
        logprobs = self.model.compute_transition_scores(out.sequences, out.logits, normalize_logits=True)[0].tolist()
        tops: list[dict[int, float]] = [{} for _ in gen]
        if req.top_k_per_token > 0:
            values, top_ids = torch.log_softmax(torch.stack(out.logits, dim=1)[0].float(), dim=-1).topk(req.top_k_per_token)
            tops = [dict(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]
        if gen and gen[-1] == self.eos_id:
            gen = gen[:-1]
        n = len(gen)
        return gen, logprobs[:n], tops[:n]


def load_baseline(kind: str, checkpoint_dir: Path, device: str = "auto", hf_dir: Path | None = None) -> Baseline:
    torch_device = resolve_device(device)
    if kind == "litgpt":
        return LitGPTBaseline(Path(checkpoint_dir), torch_device)
    if kind == "hf":
        return HFBaseline(Path(checkpoint_dir), torch_device, hf_dir)
    raise ValueError(f"kind: choose one of {list(KINDS)}, got {kind!r}")


def create_baseline_app(kind: str, checkpoint_dir: Path, device: str = "auto", hf_dir: Path | None = None) -> FastAPI:
    """The baseline behind our own app (same endpoints, validation and HTTP path), one request at a time.

    The baseline plays both roles the app needs: the serial engine's generator (``run``) and the
    codec (``encode``, ``decode``, ``vocab_size``); only generation differs from our server.
    """
    baseline = load_baseline(kind, checkpoint_dir, device, hf_dir)
    return create_app(SerialEngine(baseline), baseline, model_name=f"baseline-{kind}")


def serve(
    kind: Literal["litgpt", "hf"],
    checkpoint_dir: Path,
    hf_dir: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8081,
    device: str = "auto",
) -> None:
    """Serve a baseline with our server's endpoints, for the serving benchmark to compare against.

    Args:
        kind: "litgpt" (upstream litgpt generate, no logprobs) or "hf" (transformers generate).
        checkpoint_dir: a merged or base litgpt checkpoint (lit_model.pth, model_config.yaml, tokenizer).
        hf_dir: for kind "hf": where the Hugging Face export is cached (default: <checkpoint_dir>-hf beside it).
        host: interface to bind.
        port: TCP port.
        device: "auto" (CUDA if available), "cpu", "cuda" or "cuda:N".
    """
    import uvicorn

    app = create_baseline_app(kind, checkpoint_dir, device, hf_dir)
    print(f"serving baseline {kind} of {checkpoint_dir} on http://{host}:{port} ({resolve_device(device)})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(serve, as_positional=False)
