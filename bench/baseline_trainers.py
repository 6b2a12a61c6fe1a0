"""Baseline LoRA trainers for the finetuning speed benchmark: upstream ``litgpt finetune_lora`` and HF + PEFT.

Both get the same ``Work`` as our trainer (checkpoint, Alpaca JSON rows, sequence length, LoRA rank
and targets, bf16 or nf4, batch sizes, steps) and report the same measurements. Each runs in its own
subprocess, so its CUDA context and peak memory are its own:

    python -m bench.baseline_trainers upstream --work work.json --out result.json
    python -m bench.baseline_trainers hf --work work.json --out result.json

- ``upstream``: litgpt's real CLI (``litgpt.__main__.main``) with a real ``finetune_lora`` argv. Shims
  (module attributes of ``litgpt.finetune.lora``, no copied source) count tokens and timestamp optimizer
  steps, and switch off what is not training: ``generate_example``, the LoRA checkpoint saves and the
  final merge into a full checkpoint. Validation is off through the CLI (``--eval.*``, and an empty
  validation split, so the sanity check before training has nothing to run). Everything else is
  upstream's, Mistral's sliding-window attention mask included.
- ``hf``: a plain PyTorch loop over transformers ``AutoModelForCausalLM`` (SDPA attention) wrapped by
  ``peft.get_peft_model``; see ``load_hf_model`` for where its weights come from.

Both train on rows of ``work.data_file`` tokenized exactly as ``finetune.data.encode_row`` does
(litgpt's "alpaca" template, prompt masked, truncated to ``max_seq_length``), right-padded with 0.

Measurements: ``useful_tokens_per_s`` counts non-padding tokens, ``padded_tokens_per_s`` every token
of the padded micro-batches; both over the second half of the optimizer steps (steady state), from
timestamps taken after ``torch.cuda.synchronize()``. Peak memory is the child's own (None on CPU).
``wall_s`` is the child's time from its start (library imports and model load included) to the end
of the run, less the HF nf4 run's one-time random checkpoint (``random_checkpoint_s``). Also reported:
``trainable_params`` (the LoRA parameters, equal for both when the targets map right), token totals.
On a CPU (tests) both train in fp32 ("32-true"); on CUDA in bf16 ("bf16-true").
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
PAD_ID = 0  # litgpt's collate pads input ids with 0; all trainers do the same
IGNORE_INDEX = -100
LR = 2e-4  # learning rate of the HF baseline (speed does not depend on it)
# LoRA targets by Work.lora_targets, in litgpt's flags and PEFT's module names (the same layers).
LITGPT_TARGETS = {
    "all": {"query": True, "key": True, "value": True, "projection": True, "mlp": True, "head": True},
    "qv": {"query": True, "key": False, "value": True, "projection": False, "mlp": False, "head": False},
}
PEFT_TARGETS = {
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
    "qv": ["q_proj", "v_proj"],
}


@dataclass
class Work:
    """One finetuning job, identical for every trainer of the benchmark."""

    checkpoint_dir: Path  # litgpt checkpoint plus its HF config.json (bench.random_checkpoint writes both; see hf_model_config)
    data_file: Path  # Alpaca-format JSON list: [{"instruction", "input", "output"}, ...]
    max_seq_length: int = 2048
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: str = "all"  # "all": q, k, v, o, gate, up, down and lm_head; "qv": q and v
    quantize: str | None = None  # None (bf16) or "bnb.nf4"
    micro_batch_size: int = 1
    global_batch_size: int = 1  # gradient accumulation = global / micro
    steps: int = 12  # optimizer steps
    seed: int = 1337

    def __post_init__(self) -> None:
        self.checkpoint_dir, self.data_file = Path(self.checkpoint_dir), Path(self.data_file)
        if self.lora_targets not in LITGPT_TARGETS:
            raise ValueError(f"lora_targets: one of {sorted(LITGPT_TARGETS)}, got {self.lora_targets!r}")
        if self.quantize not in (None, "bnb.nf4"):
            raise ValueError(f"quantize: None or 'bnb.nf4', got {self.quantize!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")
        if self.steps < 2:
            raise ValueError(f"steps: at least 2 (the steady state is the second half), got {self.steps}")

    @property
    def accumulation(self) -> int:
        return self.global_batch_size // self.micro_batch_size

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Work:
        return cls(**json.loads(text))


def run_upstream_litgpt(work: Work, out_dir: Path, record: bool = False) -> dict:
    """Upstream ``litgpt finetune_lora`` on ``work``, in a subprocess; returns its measurements.

    ``record`` adds ``batches`` (every trained micro-batch's input ids) to the result, for tests.
    """
    return _run_child("upstream", work, Path(out_dir), record)


def run_hf_peft(work: Work, out_dir: Path, record: bool = False) -> dict:
    """HF transformers + PEFT LoRA on ``work``, in a subprocess; returns its measurements (``record``: as above)."""
    return _run_child("hf", work, Path(out_dir), record)


def _run_child(kind: str, work: Work, out_dir: Path, record: bool) -> dict:
    """Run ``python -m bench.baseline_trainers <kind>``; its output goes to ``out_dir/<kind>.log``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    work_file, result_file, log_file = out_dir / "work.json", out_dir / "result.json", out_dir / f"{kind}.log"
    work_file.write_text(work.to_json())
    result_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "bench.baseline_trainers",
        kind,
        "--work",
        str(work_file),
        "--out",
        str(result_file),
        "--record",
        str(record).lower(),
    ]
    with log_file.open("w") as log:
        rc = subprocess.run(cmd, check=False, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not result_file.is_file():
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"baseline {kind} failed (exit {rc}); last lines of {log_file}:\n{tail}")
    return json.loads(result_file.read_text())


# ----------------------------------------------------------------------------- measuring


class StepMeter:
    """Tokens per optimizer step and a timestamp at the end of each (after a CUDA sync).

    ``times[0]`` is taken at the first micro-batch, ``times[i]`` at the end of step ``i``. Micro-batch
    token counts may be device tensors: they are read at the step's end, after the sync, so counting
    adds no synchronization of its own. A micro-batch that no step follows is never counted.
    """

    def __init__(self, device_type: str, record: bool = False) -> None:
        self.cuda = device_type == "cuda"
        self.record = record
        self.times: list[float] = []
        self.useful: list[int] = []
        self.padded: list[int] = []
        self.batches: list[list[list[int]]] = []
        self._pending: list[tuple[torch.Tensor | int, int, list[list[int]] | None]] = []

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def micro_batch(self, useful: torch.Tensor | int, input_ids: torch.Tensor) -> None:
        """One micro-batch about to be trained: its non-padding token count and its (padded) input ids."""
        if not self.times:
            self.times.append(self._now())
        self._pending.append((useful, input_ids.numel(), input_ids.tolist() if self.record else None))

    def optimizer_step(self) -> None:
        self.times.append(self._now())
        self.useful.append(sum(int(u.sum()) if isinstance(u, torch.Tensor) else int(u) for u, _, _ in self._pending))
        self.padded.append(sum(p for _, p, _ in self._pending))
        if self.record:
            self.batches.extend(ids for _, _, ids in self._pending)
        self._pending = []

    def summary(self) -> dict:
        n = len(self.useful)
        if n < 1:
            raise RuntimeError("no optimizer step was measured")
        half = n // 2
        seconds = self.times[n] - self.times[half]
        out = {
            "steps": n,
            "useful_tokens_per_s": round(sum(self.useful[half:]) / seconds, 1),
            "padded_tokens_per_s": round(sum(self.padded[half:]) / seconds, 1),
            "useful_tokens_per_step": sum(self.useful) / n,
            "useful_tokens": sum(self.useful),
            "padded_tokens": sum(self.padded),
            "steady_steps": n - half,
            "steady_s": round(seconds, 4),
        }
        if self.record:
            out["batches"] = self.batches
        return out


def peak_memory(device_type: str) -> dict:
    if device_type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
    }


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _write_result(out: Path, result: dict) -> None:
    out.write_text(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------- upstream litgpt


def upstream_argv(work: Work, out_dir: Path, precision: str) -> list[str]:
    """The ``litgpt finetune_lora`` command line for ``work`` (without the program name)."""
    from finetune.data import load_rows

    flags = LITGPT_TARGETS[work.lora_targets]
    n_rows = len(load_rows(work.data_file))
    # Enough epochs that max_steps, not the epoch limit, ends the run (the epoch limit would also generate an example).
    epochs = math.ceil(work.steps * work.global_batch_size / max(1, n_rows)) + 1
    argv = [
        "finetune_lora",
        str(work.checkpoint_dir),
        "--out_dir",
        str(out_dir),
        "--precision",
        precision,
        "--devices",
        "1",
        "--seed",
        str(work.seed),
        "--lora_r",
        str(work.lora_r),
        "--lora_alpha",
        str(work.lora_alpha),
        "--lora_dropout",
        "0.0",
        *[x for name, on in flags.items() for x in (f"--lora_{name}", str(on).lower())],
        "--data",
        "JSON",
        "--data.json_path",
        str(work.data_file),
        "--data.prompt_style",
        "alpaca",
        "--data.mask_prompt",
        "true",
        "--data.val_split_fraction",
        "0.0",  # every row trains; the pre-training sanity validation has nothing to run
        "--data.seed",
        str(work.seed),
        "--train.max_seq_length",
        str(work.max_seq_length),
        "--train.micro_batch_size",
        str(work.micro_batch_size),
        "--train.global_batch_size",
        str(work.global_batch_size),
        "--train.max_steps",
        str(work.steps),
        "--train.epochs",
        str(epochs),
        "--train.lr_warmup_steps",
        "1",
        "--train.save_interval",
        "null",
        "--train.log_interval",
        "1",
        "--eval.interval",
        str(work.steps + 1_000_000),
        "--eval.initial_validation",
        "false",
        "--eval.final_validation",
        "false",
    ]
    if work.quantize is not None:
        argv += ["--quantize", work.quantize]
    return argv


def install_upstream_shims(meter: StepMeter, info: dict) -> None:
    """Patch ``litgpt.finetune.lora`` for measuring, and skip the work after training that is not training.

    - ``CycleIterator`` (the train loop's batch source): each micro-batch's unpadded lengths (upstream's own
      ``token_counts["raw_plus_prompt_template"]``, one entry per row) and padded size go to the meter.
    - ``get_lr_scheduler``: the scheduler's ``step``, called once per optimizer step after ``optimizer.step``
      and ``zero_grad``, also ends the meter's step.
    - ``mark_only_lora_as_trainable``: records the number of trainable parameters in ``info``.
    - ``generate_example``, ``save_lora_checkpoint`` and ``merge_lora`` do nothing.
    """
    from litgpt.finetune import lora

    class MeteredCycleIterator(lora.CycleIterator):
        def __next__(self):
            batch = super().__next__()
            meter.micro_batch(batch["token_counts"]["raw_plus_prompt_template"], batch["input_ids"])
            return batch

    make_scheduler, mark_trainable = lora.get_lr_scheduler, lora.mark_only_lora_as_trainable

    def metered_scheduler(*args, **kwargs):
        scheduler = make_scheduler(*args, **kwargs)
        step = scheduler.step

        def step_and_measure(*a, **k):
            step(*a, **k)
            meter.optimizer_step()

        scheduler.step = step_and_measure
        return scheduler

    def counting_mark_trainable(model, *args, **kwargs):
        mark_trainable(model, *args, **kwargs)
        info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def skipped(*args, **kwargs) -> None:
        return None

    lora.CycleIterator = MeteredCycleIterator
    lora.get_lr_scheduler = metered_scheduler
    lora.mark_only_lora_as_trainable = counting_mark_trainable
    lora.generate_example = skipped
    lora.save_lora_checkpoint = skipped
    lora.merge_lora = skipped


def upstream_child(work: Path, out: Path, record: bool = False) -> None:
    """Child process: run litgpt's CLI on the work in ``work`` (a Work as JSON) and write the result to ``out``."""
    t0 = time.perf_counter()
    job = Work.from_json(Path(work).read_text())
    device = device_type()
    precision = "bf16-true" if device == "cuda" else "32-true"
    meter, info = StepMeter(device, record), {}
    install_upstream_shims(meter, info)
    from litgpt.__main__ import main as litgpt_main

    sys.argv = ["litgpt", *upstream_argv(job, Path(out).parent / "litgpt-run", precision)]
    print(" ".join(sys.argv), flush=True)
    litgpt_main()
    result = {"trainer": "upstream-litgpt", **meter.summary(), **peak_memory(device), "wall_s": round(time.perf_counter() - t0, 1)}
    result.update(info, precision=precision, quantize=job.quantize, device=_device_name(device))
    _write_result(Path(out), result)


# ----------------------------------------------------------------------------- HF transformers + PEFT


def plan_micro_batches(n_rows: int, n_micro: int, micro_batch_size: int, seed: int) -> list[list[int]]:
    """Row indices of each micro-batch: seeded shuffles of all rows, one epoch after another."""
    rng, order = random.Random(seed), []
    while len(order) < n_micro * micro_batch_size:
        epoch = list(range(n_rows))
        rng.shuffle(epoch)
        order += epoch
    return [order[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(n_micro)]


def right_pad(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """HF-style batch: right-padded ``input_ids``, ``attention_mask`` (1 on real tokens), ``labels`` (-100 on padding)."""
    length = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = r["input_ids"], r["labels"], 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def hf_micro_batches(work: Work) -> list[dict[str, torch.Tensor]]:
    """Every micro-batch the HF run trains on, tokenized by ``finetune.data.encode_row`` up front."""
    from litgpt import Tokenizer
    from litgpt.prompts import PromptStyle

    from finetune.data import encode_row, load_rows

    rows = load_rows(work.data_file)
    tokenizer, style = Tokenizer(work.checkpoint_dir), PromptStyle.from_name("alpaca")
    plan = plan_micro_batches(len(rows), work.steps * work.accumulation, work.micro_batch_size, work.seed)
    encoded: dict[int, dict[str, torch.Tensor]] = {}
    for i in {i for batch in plan for i in batch}:
        encoded[i] = encode_row(rows[i], tokenizer, style, work.max_seq_length, mask_prompt=True)
    return [right_pad([encoded[i] for i in batch]) for batch in plan]


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers 4.56 renamed ``torch_dtype`` to ``dtype`` (5.x warns on the old name; older ones lack the new)."""
    import transformers

    new_name = tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (4, 56)
    return {"dtype" if new_name else "torch_dtype": dtype}


def hf_model_config(checkpoint_dir: Path):
    """The transformers config of the checkpoint: its ``config.json``, checked against ``model_config.yaml``.

    Without a config.json, a plain Llama architecture (our ``tiny``) gets one built from the litgpt config;
    both as ``finetune.export_hf`` decides (its ``_hf_config``), so the HF model is the litgpt model's twin.
    """
    from litgpt import Config
    from transformers import AutoConfig

    from finetune.export_hf import _hf_config

    fields = dict(_hf_config(Config.from_file(checkpoint_dir / "model_config.yaml"), [checkpoint_dir]))
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def random_hf_dir(checkpoint_dir: Path, device: torch.device, dtype: torch.dtype, seed: int) -> Path:
    """A Hugging Face checkpoint (random weights) of the checkpoint's architecture (``hf_model_config``).

    Written once next to the checkpoint (``<name>-hf-random``) and reused while the config is unchanged.
    The model is built on ``device`` (fast on a GPU) and freed before returning.
    """
    from transformers import AutoModelForCausalLM

    config = hf_model_config(checkpoint_dir)
    digest = hashlib.sha256(f"{config.to_json_string()}{dtype}{seed}".encode()).hexdigest()
    hf_dir = checkpoint_dir.parent / f"{checkpoint_dir.name}-hf-random"
    marker = hf_dir / ".complete"
    if marker.is_file() and marker.read_text() == digest:
        return hf_dir
    shutil.rmtree(hf_dir, ignore_errors=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **_dtype_kwarg(dtype))
    model.save_pretrained(hf_dir)  # safetensors
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    marker.write_text(digest)
    return hf_dir


def load_hf_model(work: Work, device: torch.device, dtype: torch.dtype, random_dir: Path | None = None):
    """The HF model to train: ``AutoModelForCausalLM`` with SDPA attention, weights random.

    Speed does not depend on weight values. bf16: built from the checkpoint's ``config.json`` directly
    on the device (``from_config``; nothing read or written). nf4: loaded by ``from_pretrained`` with
    ``BitsAndBytesConfig(load_in_4bit, nf4, bf16 compute)`` from ``random_dir`` (default: ``random_hf_dir``,
    a random bf16 model saved once in HF format). That is the standard QLoRA load path, so the layers are
    what a downloaded model's would be (lm_head left unquantized, as transformers does), for a one-time
    write of the bf16 weights (~14.5 GB for a 7B); it needs none of transformers' private quantization
    helpers, whose API differs across versions.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(work.seed)
    if work.quantize is None:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(hf_model_config(work.checkpoint_dir), attn_implementation="sdpa", **_dtype_kwarg(dtype))
    from transformers import BitsAndBytesConfig

    random_dir = random_dir or random_hf_dir(work.checkpoint_dir, device, dtype, work.seed)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    device_map = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(
        random_dir, quantization_config=quantization, attn_implementation="sdpa", device_map=device_map, **_dtype_kwarg(dtype)
    )


def hf_lora(model, work: Work):
    """``peft.get_peft_model`` with LoRA on ``work``'s targets, adapter weights in the model's dtype.

    PEFT would upcast bf16 adapters to fp32 by default (``autocast_adapter_dtype``); they stay bf16 here, as
    litgpt's bf16-true training (upstream's and ours) keeps them. No ``prepare_model_for_kbit_training``: it
    upcasts the unquantized weights to fp32 and turns on gradient checkpointing, which the others don't do.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=work.lora_r,
        lora_alpha=work.lora_alpha,
        lora_dropout=0.0,
        target_modules=PEFT_TARGETS[work.lora_targets],
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config, autocast_adapter_dtype=False)


def hf_optimizer(model, quantize: str | None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; bitsandbytes' paged AdamW for nf4, as QLoRA recipes and litgpt use."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if quantize is not None:
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW(trainable, lr=LR, betas=(0.9, 0.95))
    return torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.95))


def train_hf(model, optimizer: torch.optim.Optimizer, batches: Iterator[dict[str, torch.Tensor]], work: Work, meter: StepMeter) -> None:
    """The training loop: loss from the model (labels -100 on prompt and padding), averaged over accumulation."""
    device = next(p.device for p in model.parameters())
    model.train()
    for step in range(1, work.steps + 1):
        for _ in range(work.accumulation):
            batch = next(batches)
            meter.micro_batch(int(batch["attention_mask"].sum()), batch["input_ids"])
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch, use_cache=False).loss
            (loss / work.accumulation).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.optimizer_step()
        print(f"step {step} | loss (last micro-batch) {loss.item():.4f}", flush=True)  # after the meter's sync: no stall


def hf_child(work: Path, out: Path, record: bool = False) -> None:
    """Child process: train the work in ``work`` (a Work as JSON) with HF + PEFT and write the result to ``out``."""
    t0 = time.perf_counter()
    job = Work.from_json(Path(work).read_text())
    device = torch.device(device_type())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = hf_micro_batches(job)
    random_dir, prep_s = None, 0.0
    if job.quantize is not None:  # the one-time random checkpoint is neither timed nor in peak memory
        t = time.perf_counter()
        random_dir = random_hf_dir(job.checkpoint_dir, device, dtype, job.seed)
        prep_s = time.perf_counter() - t
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
    model = hf_lora(load_hf_model(job, device, dtype, random_dir), job)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {trainable:,}", flush=True)
    meter = StepMeter(device.type, record)
    train_hf(model, hf_optimizer(model, job.quantize), iter(batches), job, meter)
    wall = time.perf_counter() - t0 - prep_s
    result = {"trainer": "hf-peft", **meter.summary(), **peak_memory(device.type), "wall_s": round(wall, 1)}
    result.update(
        random_checkpoint_s=round(prep_s, 1),
        trainable_params=trainable,
        precision=str(dtype).removeprefix("torch."),
        quantize=job.quantize,
        device=_device_name(device.type),
    )
    _write_result(Path(out), result)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI({"upstream": upstream_child, "hf": hf_child}, as_positional=False)
