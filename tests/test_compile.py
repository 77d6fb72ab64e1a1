"""torch.compile trains every parameterization in one graph, compiled once, on the eager loss curve.

Multipliers are plain floats on the modules, so Dynamo folds them into the graph; a multiplier
kept as an attribute of a parameter tensor would be lost or force a graph break. Every preset
goes through the real training loop (`train.compile=true`) with `fullgraph=True` (a graph break
is an error) and Dynamo's `error_on_recompile` (a second compile is an error). Most presets use
the `aot_eager` backend: Dynamo and AOTAutograd, where constants are captured, without Inductor's
C++ code generation, which costs 10-25 s per model on a CPU; one preset runs the full Inductor
path to check the generated kernels train on the eager curve too.
"""

import functools
import json
from pathlib import Path

import pytest
import torch
import torch._dynamo

from hptransfer.config.compose import compose_run
from hptransfer.train import loop
from hptransfer.train.param import PRESETS
from tests.conftest import TINY

# Width and depth off the base (32 x 1), so every preset's multipliers differ from 1.
SHAPE = ["model.width=64", "model.n_layers=2", "train.steps=4", "train.log_every=2", "train.final_window=2"]


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def train(tmp_path: Path, name: str, *overrides: str) -> list[float]:
    result = loop.train(compose_run([*TINY, *SHAPE, *overrides]), tmp_path / name, progress=False)
    assert result["status"] == "completed", result.get("error")  # a graph break or recompile fails the run
    return losses(tmp_path / name)


def compiled_curve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preset: str, *overrides: str,
                   **compile_kwargs: str) -> list[float]:
    """The loss curve of `preset` trained with train.compile=true, graph breaks and recompiles being errors."""
    torch._dynamo.reset()  # a fresh cache: this model's first compile is not a recompile of the last test's
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, fullgraph=True, **compile_kwargs))
    with torch._dynamo.config.patch(error_on_recompile=True):
        return train(tmp_path, "compiled", f"param={preset}", "train.compile=true", *overrides)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_compile_every_preset_one_graph_same_losses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preset: str):
    eager = train(tmp_path, "eager", f"param={preset}")
    compiled = compiled_curve(tmp_path, monkeypatch, preset, backend="aot_eager")
    assert compiled == pytest.approx(eager, rel=1e-5)


def test_inductor_trains_on_the_eager_curve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    one_layer = "model.n_layers=1"  # half the kernels to generate: a cold Inductor cache costs ~20 s a layer
    eager = train(tmp_path, "eager", "param=mup", one_layer)  # muP: multipliers on E, H and R, 1/d attention
    compiled = compiled_curve(tmp_path, monkeypatch, "mup", one_layer)
    assert compiled == pytest.approx(eager, rel=1e-4)  # fused kernels sum in another order
