"""One training run: it learns, it is reproducible, it diverges cleanly, it resumes, it rejects bad input."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from hptransfer.config.compose import compose_run
from hptransfer.config.frozen import identity_json, run_config, run_id
from hptransfer.config.schema import LATER_KEYS
from hptransfer.sweeps import collect
from hptransfer.train import loop
from hptransfer.train.data import make_batches, shakespeare_bytes
from hptransfer.train.optim import AdamAtan2, lr_factor
from hptransfer.train.rules import apply_rules
from hptransfer.train.step import clipped_steps, setup, train_step
from tests.conftest import TINY, assert_one_line_error, cli

GOLDEN = Path(__file__).parent / "golden" / "tiny_sp_curve.json"


def curve(run_dir: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def train(tmp_path: Path, name: str, *overrides: str) -> dict:
    proc = cli("train", *TINY, *overrides, "--run-dir", str(tmp_path / name), "-q")
    assert proc.returncode == 0, proc.stderr
    return json.loads((tmp_path / name / "result.json").read_text())


def test_adam_atan2_step_equals_the_formula():
    torch.manual_seed(0)
    p0 = torch.randn(5, 3, dtype=torch.float64)
    grads = [torch.randn(5, 3, dtype=torch.float64) for _ in range(2)]
    p = torch.nn.Parameter(p0.clone())
    lr, wd, a, b, (b1, b2) = 0.1, 0.01, 1.27, 2.0, (0.9, 0.95)
    opt = AdamAtan2([p], lr=lr, betas=(b1, b2), weight_decay=wd, a=a, b=b)
    m = v = torch.zeros_like(p0)
    expect = p0.clone()
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        expect = expect * (1 - lr * wd) - lr * a * torch.atan2(m_hat, b * v_hat.sqrt())
        torch.testing.assert_close(p.detach(), expect, rtol=1e-12, atol=1e-12)


def test_schedules():
    def factors(schedule: str) -> list[float]:
        cfg = compose_run([f"optim.schedule={schedule}", "optim.warmup_frac=0.1", "optim.min_lr_frac=0.1",
                           "optim.decay_frac=0.2"])
        return [lr_factor(s, 100, cfg) for s in range(100)]

    cos, lin, wsd, const = (factors(s) for s in ("cosine", "linear", "wsd", "constant"))
    for f in (cos, lin, wsd, const):
        assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert cos[-1] == pytest.approx(0.1) and lin[-1] == pytest.approx(0.1) and wsd[-1] == pytest.approx(0.1)
    assert cos[54] == pytest.approx(0.55, abs=0.01)  # cosine midpoint between 1 and the floor
    assert wsd[79] == 1.0 and wsd[85] < 1.0  # stable until the final 20%
    assert const[-1] == 1.0


def test_batch_and_duration_rules():
    cfg = compose_run(["train.batch_size=64", "scaling.batch.base=16", "scaling.batch.lr_rule=sqrt",
                       "scaling.batch.adam_rule=sde", "optim.lr=0.001", "optim.beta2=0.99", "optim.eps=1e-8"])
    eff, record = apply_rules(cfg)
    assert eff.optim.lr == pytest.approx(0.002) and record["batch_rule"]["k"] == 4
    assert eff.optim.beta2 == pytest.approx(0.99**4) and eff.optim.eps == pytest.approx(5e-9)  # beta -> beta^k
    assert cfg.optim.lr == 0.001  # the run config keeps the swept base value
    cfg = compose_run(["train.tokens=409600", "scaling.duration.base_tokens=102400", "scaling.duration.lr_rule=power",
                       "scaling.duration.wd_rule=timescale", "optim.weight_decay=0.1", "optim.lr=0.001"])
    eff, _ = apply_rules(cfg)
    assert eff.optim.lr == pytest.approx(0.001 * 4**-0.3) and eff.optim.weight_decay == pytest.approx(0.025)


def test_data_sources_and_batches(tmp_path):
    corpus = shakespeare_bytes()
    assert len(corpus) > 4_000_000 and b"Romeo:" in corpus and b"**" not in corpus
    tokens = tmp_path / "toks.bin"
    np.arange(5000, dtype=np.uint16).tofile(tokens)
    cfg = compose_run(["data=tokens", f"data.path={tokens}", "data.vocab_size=5000", "train.seq_len=8",
                       "train.batch_size=3", "data.val_frac=0.1"])
    b = make_batches(cfg)
    assert len(b.train) == 4500 and len(b.val) == 500
    x, y = b.train_batch(7, torch.device("cpu"))
    assert x.shape == (3, 8) and torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y - x, torch.ones_like(x))
    assert torch.equal(x, b.train_batch(7, torch.device("cpu"))[0])  # a function of (seed, step) only
    assert not torch.equal(x, b.train_batch(8, torch.device("cpu"))[0])
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    b = make_batches(compose_run(["data=text", f"data.path={text}", "train.seq_len=16"]))
    assert bytes(b.train[:5]) == b"hello"


def test_short_run_learns_and_records_the_contract(tmp_path):
    r = train(tmp_path, "a", "train.steps=60", "model.width=64", "optim.lr=0.01")
    assert r["status"] == "completed" and r["steps"] == 60 and r["tokens"] == 60 * 4 * 32
    assert r["final_train_loss"] < 0.65 * r["initial_loss"]
    assert r["final_val_loss"] < 0.7 * math.log(256)
    for key in ("run_id", "sweep", "n_params", "n_params_non_embedding", "flops", "wall_s", "tokens_per_s",
                "diverged_at_step", "env", "batch_size", "seq_len"):
        assert key in r, key
    assert r["env"]["torch"] == torch.__version__
    assert len(curve(tmp_path / "a")) == 60
    assert not (tmp_path / "a" / "checkpoint.pt").exists()


def test_same_seed_same_result_other_seed_differs(tmp_path):
    a, b = train(tmp_path, "a"), train(tmp_path, "b")
    train(tmp_path, "c", "train.seed=1")
    assert curve(tmp_path / "a") == curve(tmp_path / "b")
    assert a["final_val_loss"] == b["final_val_loss"]
    assert curve(tmp_path / "a") != curve(tmp_path / "c")


def test_huge_lr_is_diverged_not_a_crash(tmp_path):
    proc = cli("train", *TINY, "optim.lr=10", "--run-dir", str(tmp_path / "d"), "-q")
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "d" / "result.json").read_text())
    assert r["status"] == "diverged" and r["diverged_at_step"] is not None and r["steps"] < 20
    assert r["final_val_loss"] is None


def test_finished_run_is_never_trained_again(tmp_path):
    first = train(tmp_path, "a")
    again = train(tmp_path, "a")
    assert again == first
    proc = cli("train", *TINY, "optim.lr=0.02", "--run-dir", str(tmp_path / "a"))
    assert_one_line_error(proc, "different run's config.yaml")


class Preempted(BaseException):
    """Like SIGTERM/SIGKILL: not an Exception, so nothing records a result."""


def test_resume_from_checkpoint_gives_the_uninterrupted_curve(tmp_path, monkeypatch):
    args = ["train.checkpoint_every=5", "train.steps=20", "train.eval_every=4"]
    train(tmp_path, "whole", *args)
    real = loop.lr_factor

    def preempt_at_12(step: int, total: int, cfg):  # noqa: ANN001
        if step == 12:
            raise Preempted
        return real(step, total, cfg)

    monkeypatch.setattr(loop, "lr_factor", preempt_at_12)
    with pytest.raises(Preempted):
        cli("train", *TINY, *args, "--run-dir", str(tmp_path / "cut"), "-q")
    assert (tmp_path / "cut" / "checkpoint.pt").exists() and not (tmp_path / "cut" / "result.json").exists()
    monkeypatch.setattr(loop, "lr_factor", real)
    resumed = train(tmp_path, "cut", *args)
    assert curve(tmp_path / "cut") == curve(tmp_path / "whole")
    assert val_curve(tmp_path / "cut") == val_curve(tmp_path / "whole") and len(val_curve(tmp_path / "cut")) == 5
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    assert resumed["clip_fraction"] == json.loads((tmp_path / "whole" / "result.json").read_text())["clip_fraction"]
    assert resumed["final_val_loss"] == json.loads((tmp_path / "whole" / "result.json").read_text())["final_val_loss"]


def test_loss_curve_matches_the_golden_file(tmp_path):
    """A regression in how we train shows up as a diff. Regenerate: HPT_UPDATE_GOLDEN=1 pytest -k golden."""
    train(tmp_path, "g", "train.steps=30", "train.log_every=1")
    got = [round(x, 5) for x in curve(tmp_path / "g")]
    if os.environ.get("HPT_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"overrides": TINY + ["train.steps=30"], "loss": got}, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())["loss"]
    assert len(got) == len(want) == 30
    np.testing.assert_allclose(got, want, atol=2e-3)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["model.nope=1"], "model.nope"),
        (["+model.nope=1"], "model.nope"),
        (["optim.lr=fast"], "optim.lr"),
        (["param=bogus"], "param/bogus"),
        (["model.width=100"], "not divisible"),
        (["train.steps=-5"], "train.steps"),
        (["optim.wd_mode=sometimes"], "optim.wd_mode"),
        (["data=text", "data.path=/no/such/file.txt"], "no such file"),
        (["data=text"], "data.path"),
        (["optim.lr=nan"], "optim.lr"),
        (["model.q_per_kv=3"], "model.q_per_kv"),
        (["model.q_per_kv=1", "model.n_kv_heads=1"], "at most one"),
        (["param=completep", "init.scheme=constant"], "init.scheme"),
        (["scaling.duration.wd_rule=power"], "scaling.timescale.c"),
        (["train.eval_every=-1"], "train.eval_every"),
        (["train.eval_batches=0"], "train.eval_batches"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    proc = cli("train", *TINY, *args, "--run-dir", str(tmp_path / "x"))
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "x").exists()  # nothing written for bad input


def test_empty_data_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(cli("train", "data=text", f"data.path={empty}"), "empty")


@pytest.mark.parametrize("clip,fraction", [("1e-6", 1.0), ("0", None), ("1e6", 0.0)])
def test_clip_fraction_counts_the_steps_where_clipping_was_active(tmp_path, clip, fraction):
    r = train(tmp_path, "c", f"optim.grad_clip={clip}")
    assert r["status"] == "completed" and r["clip_fraction"] == fraction


def test_train_step_counts_clipped_steps_on_the_device():
    """train_step still returns the loss (the coordinate check and the benchmark rely on it); the count is apart."""
    cfg = compose_run([*TINY, "optim.grad_clip=1e-6"])
    s = setup(cfg, torch.device("cpu"))
    x, y = make_batches(cfg).train_batch(0, torch.device("cpu"))
    loss = train_step(s, x, y)
    assert loss.shape == () and clipped_steps(s) == 1 and s.clipped.device.type == "cpu"
    train_step(s, x, y)
    assert clipped_steps(s) == 2
    assert clipped_steps(setup(compose_run([*TINY, "optim.grad_clip=0"]), torch.device("cpu"))) is None


def test_result_records_the_decay_rules(tmp_path):
    r = train(tmp_path, "w", "optim.weight_decay=0.1", "optim.wd_mode=coupled", "train.tokens=5120",
              "scaling.duration.base_tokens=2560", "scaling.duration.wd_rule=timescale")
    eff = r["effective"]
    assert eff["duration_rule"]["r"] == 2 and eff["duration_rule"]["wd_factor"] == 0.5
    assert eff["weight_decay"] == pytest.approx(0.05)
    assert eff["wd_timescale"]["fraction"] == pytest.approx(1 / (0.004 * 0.05 * 40))  # 40 steps of 4 x 32 tokens


def test_periodic_evaluations_record_the_val_curve_and_change_no_training(tmp_path):
    none = train(tmp_path, "none", "train.eval_every=0")
    every = train(tmp_path, "every", "train.eval_every=3", "train.eval_batches=2")
    assert val_curve(tmp_path / "none") == [(20, none["final_val_loss"])]  # 0: only the final one, as before
    steps = [s for s, _ in val_curve(tmp_path / "every")]
    assert steps == [3, 6, 9, 12, 15, 18, 20]  # the final one stays the final evaluation (train.val_batches)
    assert val_curve(tmp_path / "every")[-1] == (20, every["final_val_loss"])
    # Evaluating along the way trains the same model: the same losses, the same final validation loss.
    assert curve(tmp_path / "every") == curve(tmp_path / "none") and every["final_val_loss"] == none["final_val_loss"]
    # Each evaluation follows the training step before it: the file is in step order.
    rows = [json.loads(ln) for ln in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] - ("val_loss" in r) for r in rows] == sorted(r["step"] - ("val_loss" in r) for r in rows)
    vals = [v for _, v in val_curve(tmp_path / "every")]
    assert vals[0] > vals[-2] and all(math.isfinite(v) for v in vals)  # it learns


def test_the_default_run_evaluates_along_the_way_and_old_ids_stay():
    """train.eval_every and train.eval_batches are later keys: at their defaults a run keeps the id it had."""
    cfg = compose_run([])
    assert cfg.train.eval_every == LATER_KEYS["train.eval_every"] == 50 and cfg.train.steps == 200
    assert cfg.train.eval_batches == LATER_KEYS["train.eval_batches"] == 4
    assert "eval_" not in identity_json(run_config(cfg))
    assert run_id(compose_run(["train.eval_every=25"])) != run_id(cfg)


def test_a_diverged_run_records_evaluations_only_before_it_diverged(tmp_path):
    r = train(tmp_path, "d", "optim.lr=10", "train.eval_every=1", "train.log_every=5")
    assert r["status"] == "diverged"
    steps = [s for s, _ in val_curve(tmp_path / "d")]
    assert all(s < r["diverged_at_step"] for s in steps) and steps == list(range(1, r["diverged_at_step"]))


def test_collect_has_the_val_curve_beside_the_training_curve(tmp_path):
    """curve_val_step / curve_val_loss from the same one bulk parse; file by file gives the same."""
    train(tmp_path, "a", "train.eval_every=4")
    train(tmp_path, "b", "train.eval_every=0")
    (tmp_path / "c").mkdir()  # running: a line being appended
    (tmp_path / "c" / "metrics.jsonl").write_text('{"step": 0, "loss": 5.5}\n{"step": 1, "val_loss": 5.2}\n{"st')
    dirs = [str(tmp_path / n) for n in ("a", "b", "c", "missing")]
    step, loss, val_step, val_loss = collect.all_curves(dirs)
    assert step.type == collect.SCHEMA.field("curve_step").type and val_step.type == pa.list_(pa.int64())
    assert val_loss.type == collect.SCHEMA.field("curve_val_loss").type == pa.list_(pa.float64())
    for i, d in enumerate(dirs[:2]):
        assert list(zip(val_step[i].as_py(), val_loss[i].as_py(), strict=True)) == val_curve(Path(d))
        assert loss[i].as_py() == curve(Path(d))
    assert val_step.to_pylist() == [[4, 8, 12, 16, 20], [20], [1], []]
    assert [collect.curve(Path(d), "val_loss")[0] for d in dirs] == val_step.to_pylist()  # the per-file reader
    assert step.to_pylist()[2] == [0]  # a validation line is no training step
    # A null validation loss: read file by file, still both curves.
    (tmp_path / "c" / "metrics.jsonl").write_text('{"step": 0, "loss": 5.5}\n{"step": 1, "val_loss": null}\n')
    assert [a.to_pylist() for a in collect.all_curves(dirs[2:3])] == [[[0]], [[5.5]], [[1]], [[None]]]
