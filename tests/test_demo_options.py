"""The demos refuse a step count they cannot run, naming the option, before building or training anything."""

from __future__ import annotations

import pytest

from scripts import demo, demo_smollm2


@pytest.mark.parametrize("steps", [0, 1, demo.WARMUP_STEPS])
def test_tiny_demo_refuses_steps_within_its_warmup(steps: int, tmp_path) -> None:
    with pytest.raises(SystemExit, match=r"--steps must be more than the demo's 40 warmup steps, got"):
        demo.main(steps=steps, out_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_tiny_demo_has_no_time_budget() -> None:
    """A fixed step count, not a wall-clock cut: the run (and its score) is the same on a busy machine."""
    import inspect

    assert "max_time" not in inspect.signature(demo.main).parameters
    assert demo.demo_settings(800)["train"].max_steps == 800


@pytest.mark.parametrize(("kwargs", "option"), [({"steps": 1}, "--steps"), ({"n_train": 7}, "--n_train"), ({"n_test": 0}, "--n_test")])
def test_smollm2_demo_refuses_bad_sizes(kwargs: dict, option: str, tmp_path) -> None:
    with pytest.raises(SystemExit, match=option):
        demo_smollm2.main(out_dir=tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())
