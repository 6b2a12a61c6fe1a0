"""Gradient accumulation: a step's gradient is the mean over every labelled token of its global batch,
however the batch is split into micro-batches (padded or packed rows with unequal labelled tokens)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from litgpt.model import GPT, Config

from finetune.budget import BudgetPlanner, Schedule
from finetune.config import EvalArgs, TrainArgs
from finetune.data import IGNORE_INDEX, Collate
from finetune.loop import Progress, fit
from finetune.packing import PackCollate

LENGTHS = [(30, 2), (12, 9), (25, 20), (9, 3), (40, 1), (14, 12), (20, 18), (8, 2)]  # (tokens, prompt tokens): unequal targets


def _rows() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, prompt in LENGTHS:
        ids = torch.randint(0, 101, (n,), generator=g)
        labels = ids.clone()
        labels[:prompt] = IGNORE_INDEX
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _model() -> GPT:
    torch.manual_seed(0)
    config = Config(name="t", block_size=64, vocab_size=101, padded_vocab_size=101, n_layer=2, n_embd=32, n_head=4, n_query_groups=2)
    return GPT(config).double()


def _reference(rows: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    """litgpt's own forward on each row alone; cross-entropy summed over every target of the batch, over their number."""
    model = _model()
    total = sum(F.cross_entropy(model(r["input_ids"][None])[0, :-1], r["labels"][1:], reduction="sum") for r in rows)
    loss = total / sum(int((r["labels"][1:] != IGNORE_INDEX).sum()) for r in rows)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(("layout", "micro_rows"), [("padded", 1), ("padded", 2), ("padded", 8), ("packed", 2), ("packed", 4)])
def test_a_steps_gradient_is_the_token_mean_of_its_global_batch_however_split(layout: str, micro_rows: int) -> None:
    rows = _rows()
    if layout == "padded":
        micro_batches = [Collate()(rows[i : i + micro_rows]) for i in range(0, 8, micro_rows)]
        global_batch, micro_batch = 8, micro_rows
    else:  # two rows per packed row: micro_rows rows are micro_rows / 2 packed rows
        pairs = [rows[i : i + 2] for i in range(0, 8, 2)]
        per = micro_rows // 2
        micro_batches = [PackCollate(64)(pairs[i : i + per]) for i in range(0, 4, per)]
        global_batch, micro_batch = 4, per
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=1.0))
    train = TrainArgs(global_batch_size=global_batch, micro_batch_size=micro_batch, max_steps=1, save_interval=None, max_norm=None, log_interval=1)
    batches, logged = iter(micro_batches), []
    schedule, planner = Schedule(1, 1), BudgetPlanner(float("inf"), 1)
    fit(
        fabric,
        model,
        optimizer,
        lambda: next(batches),
        schedule,
        1.0,
        planner,
        Progress(total_steps=1),
        train,
        EvalArgs(interval=0),
        log=logged.append,
    )
    trained = {n: before[n] - p.detach() for n, p in model.module.named_parameters()}  # SGD at lr 1: the gradient
    loss, reference = _reference(rows)
    assert logged[0]["loss"] == pytest.approx(loss, rel=1e-12)  # the logged loss is that same mean
    for name, grad in reference.items():
        torch.testing.assert_close(trained[name], grad, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_two_ranks_gradients_averaged_as_ddp_does_are_the_token_mean_of_the_global_batch() -> None:
    """The run's batches (``RankBatches`` with each row's targets) on two ranks of two micro-batches of 2 rows:
    each rank's weighted loss, gradients averaged over ranks (what DDP's all-reduce does), is one process's step."""
    from finetune.batching import EpochBatches
    from finetune.distributed import RankBatches
    from finetune.loop import batch_loss, loss_weights, target_count

    rows = _rows()
    lengths, targets = [len(r["input_ids"]) for r in rows], [int((r["labels"][1:] != IGNORE_INDEX).sum()) for r in rows]
    averaged, drawn_rows = {}, []
    for rank in (0, 1):
        order = RankBatches(EpochBatches(8, 2, seed=3), rank, 2, lengths, targets)
        drawn = []
        for _ in range(2):  # accumulation: global 8 = 2 ranks x 2 micro-batches x 2 rows
            ids = order.next()
            drawn_rows += [rows[i] for i in ids]
            batch = Collate()([rows[i] for i in ids])
            assert order.rank_targets == target_count(batch)  # the host's count is the labels' (no device read in the step)
            drawn.append({**batch, "targets": order.targets, "rank_targets": order.rank_targets})
        model = _model()
        sum(batch_loss(model, b) * w for b, w in zip(drawn, loss_weights(drawn, world_size=2))).backward()
        for n, p in model.named_parameters():
            averaged[n] = averaged.get(n, 0) + p.grad / 2
    assert sorted(id(r) for r in drawn_rows) == sorted(id(r) for r in rows)  # the two ranks' steps hold every row once
    _, reference = _reference(rows)
    for name, grad in reference.items():
        torch.testing.assert_close(averaged[name], grad, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
