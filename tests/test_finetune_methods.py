"""Every finetuning method trains the intended parameters; resume is exact; the budget stops runs cleanly."""

import csv
import json
import shutil

import lightning as L
import pytest
import torch
from litgpt import Tokenizer

from core.checkpoints import WEIGHTS
from core.methods import METHODS
from core.prompts import get_style
from finetune import adapter, adapter_v2, full, lora
from finetune.adapter_args import AdapterArgs
from finetune.budget import BudgetPlanner, Schedule
from finetune.config import DataArgs, EvalArgs, TrainArgs
from finetune.data import Collate, encode_row, load_rows
from finetune.loop import Progress, fit
from finetune.merge import merge
from finetune.run import build_model, build_optimizer
from server.loading import load_generator
from server.schemas import ProcessRequest

METHOD_CONFIG = {
    "lora": {
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_query": True,
        "lora_key": True,
        "lora_value": True,
        "lora_projection": True,
        "lora_mlp": True,
        "lora_head": True,
    },
    "adapter": AdapterArgs(prompt_length=4, start_layer=1).as_config(),
    "adapter_v2": AdapterArgs(prompt_length=4, start_layer=1).as_config(),
    "full": {},
}
LR = {"lora": 3e-3, "adapter": 5e-2, "adapter_v2": 5e-2, "full": 1e-3}


@pytest.fixture(scope="module")
def tiny(make_tiny_checkpoint):
    base = make_tiny_checkpoint()
    return base, base.parent / "data" / "train.jsonl"


def small_train(**overrides) -> TrainArgs:
    args = dict(save_interval=None, log_interval=1, global_batch_size=8, micro_batch_size=8, lr_warmup_steps=2, max_steps=8, max_norm=1.0)
    return TrainArgs(**{**args, **overrides})


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_lowers_the_loss_and_trains_only_its_parameters(tiny, name):
    base_dir, train_file = tiny
    method = METHODS[name]
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    fabric.seed_everything(0, verbose=False)
    model = build_model(fabric, method, METHOD_CONFIG[name], base_dir, quantize=None)
    optimizer = build_optimizer(fabric, model, LR[name], 0.0)
    tokenizer, style = Tokenizer(base_dir), get_style("qa")
    rows = [encode_row(r, tokenizer, style, 64) for r in load_rows(train_file)[:64]]
    fixed = Collate()(rows[:8])  # the same batch every step: its loss must fall
    losses = []
    fit(
        fabric,
        model,
        optimizer,
        lambda: fixed,
        Schedule(12, 2),
        LR[name],
        BudgetPlanner(float("inf"), 12),
        Progress(total_steps=12),
        small_train(max_steps=12, log_interval=100),
        EvalArgs(interval=0),
        log=lambda row: losses.append(row["loss"]),
    )
    # A clear, steady fall (adapter v1 is slowest: a zero-init gate over 3k parameters).
    assert losses[-1] < losses[0] - 0.3 and losses[-1] < losses[len(losses) // 2], f"{name}: {losses}"

    base = torch.load(base_dir / WEIGHTS, weights_only=True)
    trained = {k.replace(".linear.", "."): v for k, v in model.state_dict().items()}  # LoRA wraps linears
    changed = {k for k, v in trained.items() if k in base and not torch.equal(v, base[k])}
    extra = {k for k in trained if k not in base}  # the method's own new parameters
    if name == "full":
        assert changed == {k for k in base if k.endswith("weight")}  # every weight moved
        assert not extra
    else:
        trainable = {n.replace(".linear.", ".") for n, p in model.module.named_parameters() if p.requires_grad}
        # LoRA and adapter v1: base weights bit-identical; adapter v2 also tunes its bias/scale and the norms.
        assert changed <= trainable
        assert extra and extra <= trainable
        if name in ("lora", "adapter"):
            assert not changed, f"{name} changed base weights: {sorted(changed)[:3]}"
        else:
            assert all("norm" in k or k.startswith("transformer.ln_f") for k in changed), sorted(changed)


def run_lora(tiny, out_dir, **kwargs):
    base_dir, train_file = tiny
    args = dict(
        checkpoint_dir=base_dir,
        out_dir=out_dir,
        lr=3e-3,
        lora=lora.LoRAArgs(r=4, alpha=8, dropout=0.1),  # dropout: resume must restore the RNG too
        data=DataArgs(train_file=train_file, max_seq_length=64, val_fraction=0.2),
        train=small_train(max_steps=12, save_interval=4, micro_batch_size=4, global_batch_size=8),
        eval=EvalArgs(interval=4, max_iters=2),
    )
    return lora.setup(**{**args, **kwargs})


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, tiny):
    """40 rows: 8 batches of 4 per epoch, so 12 steps of 2 micro-batches cross epoch boundaries."""
    path = tmp_path_factory.mktemp("small") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in load_rows(tiny[1])[:40]))
    return tiny[0], path


def test_resume_equals_an_uninterrupted_run(small_data, tmp_path):
    from finetune.state import STATE_FILE, unsound

    full_run = run_lora(small_data, tmp_path / "a")
    interrupted = tmp_path / "b"
    interrupted.mkdir()
    shutil.copytree(tmp_path / "a" / "step-000004", interrupted / "step-000004")  # "crashed" after step 4
    # ... while writing step 8, the old way (a 0-byte state), and again mid-save (a stale temporary).
    shutil.copytree(tmp_path / "a" / "step-000008", interrupted / "step-000008")
    (interrupted / "step-000008" / STATE_FILE).write_bytes(b"")
    (interrupted / ".step-000008.tmp-999999999").mkdir()
    resumed = run_lora(small_data, interrupted, resume="auto")
    assert not (interrupted / ".step-000008.tmp-999999999").exists()
    assert unsound(interrupted / "step-000008", f"{WEIGHTS}.lora") is None  # redone and replaced whole

    rows_a = list(csv.DictReader((tmp_path / "a" / "metrics.csv").open()))
    rows_b = list(csv.DictReader((interrupted / "metrics.csv").open()))
    assert [r["step"] for r in rows_b] == [str(s) for s in range(5, 13)]
    for a, b in zip(rows_a[4:], rows_b):
        assert (a["loss"], a["lr"], a["tokens"], a["val_loss"]) == (b["loss"], b["lr"], b["tokens"], b["val_loss"])
    weights_a = torch.load(full_run / f"{WEIGHTS}.lora", weights_only=True)["model"]
    weights_b = torch.load(resumed / f"{WEIGHTS}.lora", weights_only=True)["model"]
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_resume_refuses_another_optimizers_state(small_data, tmp_path):
    """A checkpoint whose optimizer state is not torch AdamW's (QLoRA runs once used bitsandbytes' paged AdamW)."""
    from core.integrity import save_torch
    from finetune.state import STATE_FILE

    run_lora(small_data, tmp_path / "a", train=small_train(max_steps=4, save_interval=4, micro_batch_size=4, global_batch_size=8))
    state_file = tmp_path / "a" / "step-000004" / STATE_FILE
    state = torch.load(state_file, weights_only=True)
    state["optimizer"]["state"] = {
        i: {"state1": s["exp_avg"], "state2": s["exp_avg_sq"], "step": s["step"]} for i, s in state["optimizer"]["state"].items()
    }
    save_torch(state, state_file)  # a sound file (hash recorded), just another optimizer's
    with pytest.raises(ValueError, match=r"resume: .*step-000004/training_state.pth holds another optimizer's state .*'state1'"):
        run_lora(small_data, tmp_path / "a", resume="auto")


def test_resume_auto_without_checkpoints_starts_fresh_and_true_requires_one(small_data, tmp_path):
    run_lora(
        small_data, tmp_path / "fresh", resume="auto", train=small_train(max_steps=2, lr_warmup_steps=1, micro_batch_size=4, global_batch_size=8)
    )
    with pytest.raises(FileNotFoundError, match="resume"):
        run_lora(small_data, tmp_path / "none", resume=True)


def test_budget_stops_the_run_and_the_final_checkpoint_serves(small_data, tmp_path):
    final = run_lora(
        small_data, tmp_path / "budget", max_time="4s", train=small_train(max_steps=100_000, micro_batch_size=4, global_batch_size=8, log_interval=50)
    )
    trained = json.loads((final / "trained.json").read_text())
    elapsed = [float(r["elapsed_s"]) for r in csv.DictReader((tmp_path / "budget" / "metrics.csv").open())]
    longest_step = max(b - a for a, b in zip([0.0] + elapsed, elapsed))
    # The budget cut the 100k-step plan short: either the time check stopped the loop, or (once the
    # first steps were measured) the schedule was shortened to end inside the budget. No step starts
    # once the last step's duration would cross the budget, so the run ends within one (unforeseeably
    # slow) step of it.
    assert 0 < trained["steps"] < 100_000
    assert trained["seconds"] <= 4.0 + longest_step
    merged = merge(final, out_dir=tmp_path / "merged")
    request = ProcessRequest(prompt="Is 3 even or odd?\nAnswer:", temperature=0, max_new_tokens=3, echo_prompt=True)
    assert load_generator(merged, device="cpu").run(request)[0][0].text.startswith(request.prompt)


@pytest.mark.parametrize("script", [adapter, adapter_v2, full])
def test_other_method_scripts_run_end_to_end_and_serve(tiny, tmp_path, script):
    base_dir, train_file = tiny
    final = script.setup(
        checkpoint_dir=base_dir,
        out_dir=tmp_path / "run",
        data=DataArgs(train_file=train_file, max_seq_length=64),
        train=small_train(max_steps=3),
        eval=EvalArgs(interval=0),
        **({"adapter": AdapterArgs(prompt_length=4, start_layer=1)} if script is not full else {}),
    )
    method = METHODS[script.__name__.split(".")[-1]]
    assert (final / method.weights_file).is_file() and (final / "prompt_style.yaml").is_file()
    assert (final / "data_card.json").is_file() and (tmp_path / "run" / "loss.png").is_file()
    generator = load_generator(final, device="cpu")  # unmerged adapters load base + adapter; full loads as is
    assert type(generator.model._forward_module).__module__ == method.module
    request = ProcessRequest(prompt="Is 3 even or odd?\nAnswer:", temperature=0, max_new_tokens=3, echo_prompt=True)
    assert generator.run(request)[0][0].text.startswith(request.prompt)
    if not method.mergeable:
        with pytest.raises(ValueError, match="cannot be folded"):
            merge(final)


def test_quantize_is_refused_on_cpu_and_for_full(tiny, tmp_path):
    with pytest.raises(ValueError, match="quantize: bnb.nf4 .*needs an NVIDIA GPU"):
        run_lora(tiny, tmp_path / "q", quantize="bnb.nf4")
    from finetune.run import make_fabric

    with pytest.raises(ValueError, match="full finetuning"):
        make_fabric("bf16-true", "bnb.nf4", METHODS["full"])


def test_a_recipe_run_records_its_data_card_and_template(tiny, tmp_path):
    from finetune.recipes import build, load_recipe

    base_dir, train_file = tiny
    recipe_path = tmp_path / "mix.yaml"
    recipe_path.write_text(
        "name: local-mix\ntemplate: alpaca\nseed: 3\nsources:\n"
        f"  - name: tiny\n    dataset: json\n    data_files: {train_file}\n    license: apache-2.0\n    max_rows: 200\n"
        "    fields: {instruction: instruction, input: input, output: output}\n"
    )
    final = lora.setup(
        checkpoint_dir=base_dir,
        out_dir=tmp_path / "run",
        data=DataArgs(recipe=recipe_path, max_seq_length=128),
        train=small_train(max_steps=2, lr_warmup_steps=1),
        eval=EvalArgs(interval=0),
    )
    card = json.loads((final / "data_card.json").read_text())
    rows, expected = build(load_recipe(recipe_path), count_tokens=lambda text: 0)
    assert card["rows_sha256"] == expected["rows_sha256"] and card["sources"][0]["license"] == "apache-2.0"
    assert type(__import__("core.prompts", fromlist=["load_style"]).load_style(final)).__name__ == "Alpaca"  # the recipe's template


def test_rows_without_response_tokens_are_dropped_or_refused(tiny, tmp_path):
    base_dir, train_file = tiny
    with pytest.raises(ValueError, match="data.max_seq_length: 8 tokens leave no response tokens"):
        lora.setup(
            checkpoint_dir=base_dir,
            out_dir=tmp_path / "r",
            data=DataArgs(train_file=train_file, max_seq_length=8),
            train=small_train(max_steps=1),
            eval=EvalArgs(interval=0),
        )


def test_rows_cut_by_max_seq_length_are_counted(tiny, tmp_path, capsys):
    """A row longer than data.max_seq_length loses its end (its EOS, a conversation's later turns): the run says how many."""
    import re

    base_dir, train_file = tiny
    tokenizer, style, limit = Tokenizer(base_dir), get_style("qa"), 16
    full = [
        (len(tokenizer.encode(style.apply(r["instruction"], input=r["input"]))), len(tokenizer.encode(r["output"], bos=False, eos=True)))
        for r in load_rows(train_file)
    ]
    cut = sum(1 for prompt, response in full if prompt < limit < prompt + response)  # some response left, not all of it
    lost = sum(prompt + response - limit for prompt, response in full if prompt < limit < prompt + response)
    assert cut > 0
    lora.setup(
        checkpoint_dir=base_dir,
        out_dir=tmp_path / "r",
        data=DataArgs(train_file=train_file, max_seq_length=limit),
        train=small_train(max_steps=1),
        eval=EvalArgs(interval=0, final_validation=False),
    )
    out = capsys.readouterr().out
    said = [
        (int(n), int(t.replace(",", "")))
        for n, t in re.findall(r"cut (\d+) of \d+ rows to data.max_seq_length 16 tokens: ([\d,]+) labelled tokens", out)
    ]
    assert len(said) == 2, out  # the training rows, the validation rows
    assert (sum(n for n, _ in said), sum(t for _, t in said)) == (cut, lost)


def test_planner_shortens_the_schedule_to_the_budget_and_warns(capsys):
    planner = BudgetPlanner(max_seconds=100.0, planned_steps=1000, measure_steps=4, skip_steps=2)
    answers = [planner.observe(step, elapsed=0.5 * step, tokens_per_step=1000) for step in range(1, 7)]
    assert answers[:5] == [None] * 5  # measuring
    fits = answers[5]
    assert planner.sec_per_step == pytest.approx(0.5)
    assert fits == 6 + int((100 - 3.0 - planner.reserve_s) / 0.5) < 1000
    out = capsys.readouterr().out
    assert "budget plan: 0.500 s/step" in out and "does not fit the budget" in out
    schedule = Schedule(1000, 10)
    schedule.total_steps = fits
    assert schedule.factor(fits) == 0.0 and schedule.factor(10) == 1.0  # the cosine now ends inside the budget
    assert not planner.out_of_time(90.0) and planner.out_of_time(99.0)


def test_each_logged_loss_is_its_own_steps_though_read_a_step_later(tiny, monkeypatch):
    """The loop reads a step's loss while the next one runs: rows, saves and checks still see their own step."""
    import finetune.loop as loop

    base_dir, train_file = tiny
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    fabric.seed_everything(0, verbose=False)
    model = build_model(fabric, METHODS["lora"], METHOD_CONFIG["lora"], base_dir, quantize=None)
    optimizer = build_optimizer(fabric, model, LR["lora"], 0.0)
    tokenizer, style = Tokenizer(base_dir), get_style("qa")
    rows = [encode_row(r, tokenizer, style, 64) for r in load_rows(train_file)[:48]]
    batches = iter([Collate()(rows[i : i + 4]) for i in range(0, 48, 4)])
    computed, saved, logged = [], [], []
    real_batch_loss = loop.batch_loss

    def recording_batch_loss(*args, **kwargs):
        loss = real_batch_loss(*args, **kwargs)
        computed.append(loss.item())
        return loss

    monkeypatch.setattr(loop, "batch_loss", recording_batch_loss)
    val = [Collate()(rows[:4])]
    progress = fit(
        fabric,
        model,
        optimizer,
        lambda: next(batches),
        Schedule(6, 1),
        LR["lora"],
        BudgetPlanner(float("inf"), 6),
        Progress(total_steps=6),
        small_train(max_steps=6, save_interval=4, micro_batch_size=4, global_batch_size=8),
        EvalArgs(interval=3),
        val,
        on_save=lambda p: saved.append((p.step, p.last_loss, len(logged))),
        log=logged.append,
    )
    train_losses = [c for i, c in enumerate(computed) if i not in (6, 13)]  # validation's own batch_loss calls come after steps 3 and 6
    n = [b["target_index"].numel() for b in (Collate()(rows[i : i + 4]) for i in range(0, 48, 4))]
    pairs = zip(train_losses[::2], train_losses[1::2], n[::2], n[1::2])
    step_losses = [(a * na + b * nb) / (na + nb) for a, b, na, nb in pairs]  # a step logs the mean over its micro-batches' targets
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logged] == pytest.approx(step_losses, rel=1e-6, abs=0)
    assert not any(r["loss"] == pytest.approx(c, rel=1e-4) for r, c in zip(logged, train_losses[1::2]))  # not the last micro-batch's
    assert [r["step"] for r in logged if "val_loss" in r] == [3, 6]
    assert saved == [(4, logged[3]["loss"], 4)]  # saved after step 4 was read and logged, before step 5 ran
    assert progress.step == 6 and progress.last_loss == logged[-1]["loss"] and progress.tokens == logged[-1]["tokens"]

    batches = iter([Collate()(rows[i : i + 4]) for i in range(0, 48, 4)])
    monkeypatch.setattr(loop, "batch_loss", _nan_from_call(real_batch_loss, 5))  # step 3's first micro-batch
    with pytest.raises(FloatingPointError, match="at step 3;"):
        fit(
            fabric,
            model,
            optimizer,
            lambda: next(batches),
            Schedule(6, 1),
            LR["lora"],
            BudgetPlanner(float("inf"), 6),
            Progress(total_steps=6),
            small_train(max_steps=6, micro_batch_size=4, global_batch_size=8),
            EvalArgs(interval=0),
        )


def _nan_from_call(batch_loss, first_nan_call: int):
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        loss = batch_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) >= first_nan_call else loss

    return wrapped


def test_batch_to_device_keeps_the_token_mask_on_the_cpu():
    from finetune.batching import batch_to_device

    batch = Collate()(
        [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3])}, {"input_ids": torch.tensor([4]), "labels": torch.tensor([4])}]
    )
    moved = batch_to_device(batch, torch.device("meta"))
    assert moved.keys() == batch.keys() and moved["mask"] is batch["mask"]
    assert all(v.device.type == "meta" and v.shape == batch[k].shape for k, v in moved.items() if k != "mask")


def test_each_rows_elapsed_is_when_its_own_step_finished(tiny, monkeypatch):
    """Step s takes s seconds of a fake clock a micro-batch: rows read a step late still carry their own step's end."""
    import finetune.loop as loop

    base_dir, train_file = tiny
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    fabric.seed_everything(0, verbose=False)
    model = build_model(fabric, METHODS["lora"], METHOD_CONFIG["lora"], base_dir, quantize=None)
    optimizer = build_optimizer(fabric, model, LR["lora"], 0.0)
    tokenizer, style = Tokenizer(base_dir), get_style("qa")
    rows = [encode_row(r, tokenizer, style, 64) for r in load_rows(train_file)[:40]]
    batches = iter([Collate()(rows[i : i + 4]) for i in range(0, 40, 4)])
    clock, calls = [100.0], []
    real_batch_loss = loop.batch_loss

    def slow_batch_loss(*args, **kwargs):
        calls.append(1)
        clock[0] += (len(calls) + 1) // 2  # micro-batches 1,2 are step 1, 3,4 step 2, ...
        return real_batch_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "batch_loss", slow_batch_loss)
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    logged = []
    fit(
        fabric,
        model,
        optimizer,
        lambda: next(batches),
        Schedule(5, 1),
        LR["lora"],
        BudgetPlanner(float("inf"), 5),
        Progress(total_steps=5),
        small_train(max_steps=5, micro_batch_size=4, global_batch_size=8),
        EvalArgs(interval=0),
        log=logged.append,
    )
    step_seconds = [b - a for a, b in zip([0.0] + [r["elapsed_s"] for r in logged], [r["elapsed_s"] for r in logged])]
    assert step_seconds == [2.0, 4.0, 6.0, 8.0, 10.0]


def test_merge_writes_its_output_once(small_data, tmp_path):
    """With --out_dir the merged weights are written there only (the run directory keeps just the adapter),
    equal to litgpt merging in place; a full finetune's weights are linked, not copied."""
    import shutil

    import torch

    final = run_lora(small_data, tmp_path / "run")
    in_place = tmp_path / "in_place"
    shutil.copytree(final, in_place)
    assert merge(in_place) == in_place  # litgpt's merge_lora next to the adapter: the reference
    merged = merge(final, out_dir=tmp_path / "merged")
    assert not (final / "lit_model.pth").exists()
    assert sorted(p.name for p in merged.iterdir() if p.suffix in (".pth", ".lora", ".yaml") and p.name != "prompt_style.yaml") == [
        "lit_model.pth", "model_config.yaml",
    ]  # fmt: skip
    assert not any(p.is_symlink() for p in merged.iterdir())
    load = lambda d: torch.load(d / "lit_model.pth", weights_only=True)  # noqa: E731
    reference, got = load(in_place), load(merged)
    assert reference.keys() == got.keys() and all(torch.equal(reference[k], got[k]) for k in reference)
    again = merge(merged, out_dir=tmp_path / "served")  # standalone: the same file on disk, not a second copy
    assert (again / "lit_model.pth").stat().st_ino == (merged / "lit_model.pth").stat().st_ino
