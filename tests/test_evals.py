"""make eval: intervals, HELM-shaped tasks, letter logprobs equal to litgpt's own, and a finetune it can see."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from jsonargparse import CLI

from core.prompts import get_style
from evals import run as evals_run
from evals.scoring import Z95, bootstrap, final_number, rouge_l, wilson
from evals.tasks import TaskError, gsm_solution, load_task

QA = get_style("qa")


def test_wilson_ends_solve_the_score_equation():
    for k, n in ((0, 10), (3, 10), (10, 10), (41, 150)):
        p = k / n
        for end in wilson(k, n):
            if 0 < end < 1:  # |p - end| = z * sqrt(end (1 - end) / n): the interval Wilson inverts
                assert abs(p - end) == pytest.approx(Z95 * math.sqrt(end * (1 - end) / n), rel=1e-9, abs=1e-7)
        lo, hi = wilson(k, n)
        assert lo <= p <= hi
    assert wilson(0, 0) == (0.0, 1.0)


def test_bootstrap_is_seeded_and_narrows_with_more_items():
    small, large = [0.0, 1.0] * 10, [0.0, 1.0] * 200
    assert bootstrap(small) == bootstrap(small)
    (a, b), (c, d) = bootstrap(small), bootstrap(large)
    assert a < 0.5 < b and c < 0.5 < d and (d - c) < (b - a)


def _lcs_brute(a: list[str], b: list[str]) -> int:
    for size in range(min(len(a), len(b)), 0, -1):
        subs = {tuple(c) for c in itertools.combinations(b, size)}
        if any(tuple(c) in subs for c in itertools.combinations(a, size)):
            return size
    return 0


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("the cat sat on the mat", "the cat is on the mat"),
        ("a b c d", "d c b a"),
        ("Police arrest a man.", "A man was arrested by police"),
        ("", "x"),
        ("same", "same"),
    ],
)
def test_rouge_l_is_the_f1_of_the_longest_common_subsequence(pred, ref):
    a, b = pred.lower().replace(".", "").split(), ref.lower().split()
    lcs = _lcs_brute(a, b)
    expected = 0.0 if not lcs else 2 * (lcs / len(a)) * (lcs / len(b)) / (lcs / len(a) + lcs / len(b))
    assert rouge_l(pred, ref) == pytest.approx(expected)


def test_gsm_answers_and_shots_as_helm_shows_them():
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 1,072"
    assert final_number(answer) == "1072"
    assert gsm_solution(answer) == "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips. The answer is 1,072."
    assert final_number("so she has 5 apples. The answer is 18.") == "18"
    assert final_number("no number") is None


def write_mmlu(path: Path, rows: list[list[str]]) -> Path:
    import csv

    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_mmlu_csv_is_prompted_like_helm_with_shots_from_its_head(tmp_path):
    rows = [["What is 2+2?", "3", "4", "5", "6", "B"], ["Is ice cold?", "yes", "no", "maybe", "never", "A"], ["Pick C", "a", "b", "c", "d", "C"]]
    task = load_task(write_mmlu(tmp_path / "abstract_algebra_test.csv", rows), shots=1, template=QA)
    assert task.kind == "multiple_choice" and len(task.items) == 2 and task.max_new_tokens == 1 and task.stop == ["\n"]
    assert task.items[0].prompt == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Question: What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        "Question: Is ice cold?\nA. yes\nB. no\nC. maybe\nD. never\nAnswer:"
    )
    assert task.items[0].gold == "A" and task.items[0].choices == ("A", "B", "C", "D")
    with pytest.raises(TaskError, match=r"bad_test.csv:2: answer 'E' is not one of A, B, C, D"):
        load_task(write_mmlu(tmp_path / "bad_test.csv", [rows[0], ["q", "a", "b", "c", "d", "E"]]), shots=0, template=QA)
    with pytest.raises(TaskError, match="leave none to score after 5 shots"):
        load_task(tmp_path / "abstract_algebra_test.csv", shots=5, template=QA)


def test_gsm_jsonl_and_row_files(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"}) + "\n" for i in range(3)))
    task = load_task(gsm, shots=2, template=QA)
    assert task.kind == "gsm" and task.stop == ["\n\n"] and task.max_new_tokens == 400
    assert task.items[0].prompt.endswith("Q: What is 1+1?\nA: 1+1=2 The answer is 2.\n\nQ: What is 2+1?\nA:") and task.items[0].gold == "3"
    rows = tmp_path / "heldout.jsonl"
    rows.write_text(json.dumps({"instruction": "Is 3 even or odd?", "input": "", "output": "odd"}) + "\n{oops\n")
    with pytest.raises(TaskError, match=r"heldout.jsonl:2: invalid JSON"):
        load_task(rows, shots=0, template=QA)
    rows.write_text(json.dumps({"instruction": "Is 3 even or odd?", "input": "", "output": "odd"}) + "\n")
    task = load_task(rows, shots=5, template=QA)  # shots apply to MMLU/GSM8K only
    assert task.kind == "generation" and task.items[0].prompt == QA.apply("Is 3 even or odd?", input="") and task.items[0].gold == "odd"


def test_letter_logprob_through_the_server_equals_litgpt_forward(make_tiny_checkpoint):
    from litgpt import Tokenizer
    from litgpt.model import GPT

    from core.checkpoints import WEIGHTS, load_config

    ckpt = make_tiny_checkpoint()
    prompt = "Question: Is 7 even or odd?\nA. even\nB. odd\nAnswer:"
    tokenizer = Tokenizer(ckpt)
    model = GPT(load_config(ckpt))
    model.load_state_dict(torch.load(ckpt / WEIGHTS, weights_only=True))
    model.eval()
    with evals_run.in_process(ckpt, device="cpu") as client:
        for letter in "AB":
            ids = tokenizer.encode(prompt + f" {letter}", bos=True)
            prefix = tokenizer.encode(prompt, bos=True)
            assert torch.equal(ids[: len(prefix)], prefix)  # the continuation is the last tokens
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids[None])[0].double(), dim=-1)
            want = sum(logprobs[t - 1, ids[t]].item() for t in range(len(prefix), len(ids)))
            got = evals_run.continuation_logprob(client, prompt, f" {letter}", "test")
            assert got == pytest.approx(want, abs=1e-4)


def test_main_scores_mmlu_gsm_and_rows_and_writes_json(make_tiny_checkpoint, tmp_path):
    ckpt = make_tiny_checkpoint()
    mmlu = write_mmlu(tmp_path / "parity_test.csv", [[f"Is {n} even or odd?", "even", "odd", "AB"[n % 2]] for n in range(7)])
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"What is {i}+1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(3)))
    report = evals_run.main(tasks=[mmlu, gsm], checkpoint_dir=ckpt, shots=2, device="cpu", out=tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["overall"] == report["overall"]
    mc = saved["tasks"]["parity_test"]
    assert mc["n"] == 5 and mc["primary"] == "accuracy" and set(mc["metrics"]) == {"accuracy", "exact_match"}
    for item in mc["items"]:
        assert item["chosen"] == max(item["letter_logprobs"], key=item["letter_logprobs"].get)
    assert saved["tasks"]["gsm"]["n"] == 1
    lo, hi = mc["metrics"]["accuracy"]["ci95"]
    assert lo <= mc["metrics"]["accuracy"]["value"] <= hi
    with pytest.raises(SystemExit, match="exactly one of --checkpoint_dir"):
        evals_run.main(tasks=[mmlu])


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--url", "http://127.0.0.1:9", "--device", "cpu"], "error: --device: sets up the checkpoint served in this process; the server at"),
        (["--url", "http://127.0.0.1:9", "--engine", "serial"], "error: --engine: sets up the checkpoint served in this process"),
        (["--url", "http://127.0.0.1:9", "--template", "alpaca"], "error: --template: only row tasks (instruction/output) read it"),
        (["--url", "http://127.0.0.1:9", "--max_new_tokens", "8"], "error: --max_new_tokens: only row tasks (instruction/output) read it"),
        (["--url", "http://127.0.0.1:9", "--tasks", "[{rows}]", "--shots", "2"], "error: --shots: only MMLU and GSM8K tasks put solved examples"),
    ],
)
def test_an_option_none_of_the_tasks_or_a_running_server_reads_is_refused(tmp_path, capsys, flags, expected):
    """Accepted, each would be dropped: a running server is not set up here; MMLU/GSM8K keep HELM's prompts; rows take no shots."""
    mmlu = write_mmlu(tmp_path / "parity_test.csv", [[f"Is {n} even or odd?", "even", "odd", "AB"[n % 2]] for n in range(7)])
    rows = tmp_path / "heldout.jsonl"
    rows.write_text(json.dumps({"instruction": "Is 3 even or odd?", "input": "", "output": "odd"}) + "\n")
    flags = [f.format(rows=rows) for f in flags]
    tasks = [] if "--tasks" in flags else ["--tasks", f"[{mmlu}]"]
    with pytest.raises(SystemExit, match=".") as stopped:
        CLI(evals_run.main, as_positional=False, args=[*tasks, *flags])  # what python -m evals runs
    assert str(stopped.value.code).startswith(expected)  # refused before any request (nothing listens on port 9)


@pytest.mark.slow(reason="the acceptance check: a real 30-step LoRA finetune on the CPU, then two evals of 50 held-out items")
def test_make_eval_separates_the_base_model_from_a_briefly_finetuned_one(make_tiny_checkpoint, tmp_path):
    from finetune import lora
    from finetune.config import DataArgs, EvalArgs, TrainArgs
    from finetune.speed import SpeedArgs

    base = make_tiny_checkpoint()
    rows = [json.loads(line) for line in (base.parent / "data" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (base.parent / "data" / "test.jsonl").read_text().splitlines()]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["task"] == "parity"))
    (tmp_path / "parity_heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held if r["task"] == "parity"))
    final = lora.setup(
        checkpoint_dir=base,
        out_dir=tmp_path / "run",
        lr=3e-3,
        data=DataArgs(train_file=tmp_path / "train.jsonl", prompt_style="qa", max_seq_length=64),
        train=TrainArgs(
            save_interval=None, log_interval=50, global_batch_size=16, micro_batch_size=16, lr_warmup_steps=10, max_steps=30, max_norm=1.0
        ),
        eval=EvalArgs(interval=0),
        speed=SpeedArgs(packing=False),
    )
    task = [tmp_path / "parity_heldout.jsonl"]
    before = evals_run.main(tasks=task, checkpoint_dir=base, template="qa", max_new_tokens=4, device="cpu")["tasks"]["parity_heldout"]
    after = evals_run.main(tasks=task, checkpoint_dir=final, max_new_tokens=4, device="cpu")["tasks"]["parity_heldout"]
    b, a = before["metrics"]["exact_match"], after["metrics"]["exact_match"]
    assert before["n"] == after["n"] == 50
    assert a["ci95"][0] > b["ci95"][1], (b, a)  # the gain is larger than both intervals
