"""Optimizer families with their own width exponents (docs/science.md#other-optimizer-families): SGD against
microsoft/mup's MuSGD, Lion and decoupled decay against the formulas, every family trains, the coordinate
check passes muP under each and catches SP under SGD, and a pair with no published rule is a one-line error."""

import json
import math

import pytest
import torch

from hptransfer.config.compose import compose_run
from hptransfer.config.schema import OPTIMIZER_PRESETS
from hptransfer.train.coord import coord_check
from hptransfer.train.model import build, param_specs
from hptransfer.train.optim import SGDW, Lion, MuonAdamW, build_optimizer
from hptransfer.train.param import EPS_CLASSES, OPTIMIZER_LR, PRESETS, for_optimizer
from tests.conftest import TINY, assert_one_line_error, cli
from tests.test_param import built_with_mup

BASE = ["param.base_width=64", "param.base_depth=2", "model.head_dim=16"]


# --- the table: each family's exponents follow from its update rule -----------------------------------------

def test_the_sgd_column_follows_the_sgd_symmetry():
    """SGD's abc symmetry is (a + t, b - t, c - 2t): c + 2a is the same for presets that share a + b (the init
    scale, which no symmetry moves): NTK with SP's per-layer row, MFP and both muP forms with each other."""
    def c_plus_2a(preset: str, cls: str) -> tuple[float, float]:
        row, sgd = PRESETS[preset], OPTIMIZER_LR["sgd"][preset][cls]
        a = getattr(row, cls).a
        return sgd[0] + 2 * a, (sgd[1] if sgd[1] is not None else sgd[0]) + 2 * a

    for family in (("sp_perlayer", "ntk"), ("mup_everett", "mup", "mfp")):
        for cls in "EHR":
            assert len({c_plus_2a(p, cls) for p in family}) == 1, (family, cls)
    for preset, row in OPTIMIZER_LR["sgd"].items():  # V: a vector with a = b = 0, as E where E has a = b = 0
        E = PRESETS[preset].E
        if E.a == 0 and E.b == 0:
            assert row["V"] == row["E"], preset
    assert set(OPTIMIZER_LR["sgd"]["sp"].values()) == {(0, None)}  # sp: one global LR, no rule


def test_the_adafactor_column_is_adams_less_b_and_muons_undoes_the_multiplier():
    """Adafactor moves a parameter by lr x its RMS (~ m^-b): c = Adam's c - b. Muon: c_H = -a_H."""
    for preset, row in OPTIMIZER_LR["adafactor"].items():
        for cls in "EHR":
            adam = getattr(PRESETS[preset], cls)
            c, c_none = row[cls]
            if preset == "sp":
                assert (c, c_none) == (0, None)
                continue
            assert c == adam.c - adam.b, (preset, cls)
            assert (c if c_none is None else c_none) == (adam.c if adam.c_none is None else adam.c_none) - adam.b
    for preset in OPTIMIZER_PRESETS["muon"]:
        muon = for_optimizer(preset, "muon")
        assert muon.H.c == -PRESETS[preset].H.a and muon.E == PRESETS[preset].E and muon.R == PRESETS[preset].R
    assert for_optimizer("completep", "lion") == PRESETS["completep"]  # Lion: Adam's row, depth included


@pytest.mark.parametrize("optimizer", ["sgd", "adafactor", "lion", "muon", "adamw"])
def test_specs_carry_an_epsilon_only_where_the_optimizer_has_one(optimizer):
    specs = param_specs(compose_run(["param=mup", f"optim={optimizer}", "model.width=128", *BASE]))
    for name, s in specs.items():
        assert (s.eps is not None) == (s.cls in EPS_CLASSES[optimizer]), name


# --- microsoft/mup's MuSGD as an oracle ----------------------------------------------------------------------

@pytest.mark.parametrize("mult", [1, 2, 4])
def test_mup_sgd_matches_microsoft_musgd(mult):
    """Per tensor: LR, weight decay (scaled mode = MuSGD's lam / m on vector-like, lam x shape ratio on matrices)
    and init equal what microsoft/mup gives with MuSGD. Deliberate differences, as for MuAdamW (test_param.py):
    MuSGD decays every tensor, we never decay V nor, by default, E; the readout's 1/m sits in fwd_mult."""
    mup = pytest.importorskip("mup")
    lam, sigma, lr = 0.1, 0.02, 0.1
    cfg = compose_run(["param=mup", "optim=sgd", f"optim.lr={lr}", f"model.width={64 * mult}", "model.n_layers=2",
                       f"optim.weight_decay={lam}", "optim.wd_mode=scaled", "model.pos=learned", *BASE])
    ours, specs, theirs = built_with_mup(mup, cfg, sigma)

    opt = mup.MuSGD(theirs.parameters(), lr=lr, weight_decay=lam, momentum=0.9)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    worst = 0.0
    for name, p in theirs.named_parameters():
        g, s = by_param[id(p)], specs[name]
        worst = max(worst, abs(s.lr - g["lr"]) / g["lr"])
        if s.cls in "HR":
            assert math.isclose(s.weight_decay, g["weight_decay"]), name
        else:
            assert s.weight_decay == 0.0, name
    assert worst < 1e-12, worst
    classes = {s.cls: s.lr / lr for s in specs.values()}
    assert classes == {"E": mult, "H": 1.0, "R": mult, "V": mult}  # vector-like x fan-out, hidden flat


# --- the update rules -----------------------------------------------------------------------------------------

def test_lion_step_by_hand():
    """Two steps on two coordinates, worked out by hand from the paper's algorithm (lr 0.1, wd 0.1, betas
    0.9, 0.99): c = 0.9 m + 0.1 g; p -= 0.1 (sign(c) + 0.1 p); m = 0.99 m + 0.01 g."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.1)
    p.grad = torch.tensor([0.5, -0.1], dtype=torch.float64)  # c = [0.05, -0.01]: sign [1, -1]
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.89, -1.88], dtype=torch.float64))
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.005, -0.001], dtype=torch.float64))
    p.grad = torch.tensor([-1.0, 0.0], dtype=torch.float64)  # c = [-0.0955, -0.0009]: sign [-1, -1]
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9811, -1.7612], dtype=torch.float64))


def test_lion_matches_the_formula_and_decays_decoupled():
    torch.manual_seed(0)
    p0, grads = torch.randn(5, 3, dtype=torch.float64), [torch.randn(5, 3, dtype=torch.float64) for _ in range(3)]
    p = torch.nn.Parameter(p0.clone())
    lr, wd, b1, b2 = 0.01, 0.3, 0.9, 0.99
    opt = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    m, expect = torch.zeros_like(p0), p0.clone()
    for g in grads:
        p.grad = g.clone()
        opt.step()
        expect = expect - lr * (torch.sign(b1 * m + (1 - b1) * g) + wd * expect)
        m = b2 * m + (1 - b2) * g
        torch.testing.assert_close(p.detach(), expect, rtol=1e-12, atol=1e-12)
    # Decoupled: a zero gradient (and zero momentum) leaves only the decay, lr x wd x p, independent of any scale.
    q = torch.nn.Parameter(p0.clone())
    lone = Lion([q], lr=lr, weight_decay=wd)
    q.grad = torch.zeros_like(p0)
    lone.step()
    torch.testing.assert_close(q.detach(), p0 * (1 - lr * wd), rtol=1e-12, atol=1e-12)


def test_sgd_decay_is_decoupled_as_adamws():
    """SGDW: p -= lr wd p, then torch's momentum step on the bare gradient (no L2 for the momentum to amplify)."""
    torch.manual_seed(0)
    p0, grads = torch.randn(4, 2, dtype=torch.float64), [torch.randn(4, 2, dtype=torch.float64) for _ in range(2)]
    p = torch.nn.Parameter(p0.clone())
    lr, wd, mu = 0.1, 0.5, 0.9
    opt = SGDW([p], lr=lr, momentum=mu, weight_decay=wd)
    buf, expect = None, p0.clone()
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf = g if buf is None else mu * buf + g
        expect = expect * (1 - lr * wd) - lr * buf
        torch.testing.assert_close(p.detach(), expect, rtol=1e-12, atol=1e-12)
    assert opt.param_groups[0]["weight_decay"] == wd  # restored after torch's step: dist.verify reads it


def test_muon_trains_hidden_matrices_and_adamw_the_rest():
    cfg = compose_run(["param=mup", "optim=muon", "model.width=64", *BASE])
    torch.manual_seed(0)
    model, specs = build(cfg)
    opt = build_optimizer(model, specs, cfg)
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    x = torch.randint(0, cfg.data.vocab_size, (2, 16))
    logits = model(x)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    opt.step()
    for p, state in opt.state.items():
        cls = specs[names[id(p)]].cls
        assert ("momentum_buffer" in state) == (cls == "H") and ("exp_avg" in state) == (cls != "H"), names[id(p)]
    assert len(opt.state) == len(names)
    muon_groups = [g for g in opt.param_groups if g["muon"]]
    assert {g["cls"] for g in muon_groups} == {"H"} and {g["cls"] for g in opt.param_groups} == set("EHRV")
    assert all(g["adjust_lr_fn"] == "original" for g in muon_groups)
    # A checkpoint round trip keeps both parts working (load_state_dict replaces the group dicts).
    again = build_optimizer(model, specs, cfg)
    again.load_state_dict(opt.state_dict())
    again.step()
    assert len(again.state) == len(names)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adafactor", 0.01), ("lion", 0.001), ("muon", 0.004)])
def test_each_family_trains_and_the_loss_falls(tmp_path, optimizer, lr):
    run = tmp_path / optimizer
    proc = cli("train", *TINY, "param=mup", f"optim={optimizer}", f"optim.lr={lr}", "train.log_every=1",
               "optim.weight_decay=0.01", "--run-dir", str(run), "-q")
    assert proc.returncode == 0, proc.stderr
    losses = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(ln)]
    assert len(losses) == 20 and all(map(math.isfinite, losses))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.05, losses


def test_params_shows_each_optimizers_learning_rates():
    common = ["param=mup", "model.width=256", "model.n_layers=1", *BASE]
    rates = {}
    for optimizer in ("adamw", "sgd", "adafactor", "muon"):
        proc = cli("params", *common, f"optim={optimizer}", "optim.lr=0.01", "--json")
        assert proc.returncode == 0, proc.stderr
        rates[optimizer] = {s["name"]: s["lr"] for s in json.loads(proc.stdout)}
    q, emb, head, gain = "blocks.0.attn.q.weight", "tok_emb.weight", "lm_head.weight", "norm_f.weight"
    assert rates["adamw"][q] == pytest.approx(0.01 / 4) and rates["sgd"][q] == pytest.approx(0.01)
    assert rates["sgd"][emb] == rates["sgd"][head] == rates["sgd"][gain] == pytest.approx(0.04)
    assert rates["adafactor"][q] == pytest.approx(0.01 / 2) and rates["muon"][q] == pytest.approx(0.01)
    table = cli("params", *common, "optim=sgd")
    assert "mup with optim=sgd" in table.stdout and " V " in table.stdout


# --- errors before anything trains ----------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["param=completep", "optim=sgd"], "optim.name"),
    (["param=sp_emb", "optim=adafactor"], "param=sp_emb"),
    (["param=depth_mup", "optim=muon"], "no published width rule"),
    (["optim=sgd", "optim.momentum=1.5"], "optim.momentum"),
    (["optim.name=rmsprop"], "optim.name"),
    (["optim=muon", "train.parallel=fsdp"], "train.parallel"),
])
def test_an_unsupported_pair_or_bad_value_is_a_one_line_error(tmp_path, args, needle):
    assert_one_line_error(cli("train", *TINY, *args, "--run-dir", str(tmp_path / "r"), "-q"), needle)
    assert not (tmp_path / "r").exists()


# --- the coordinate check under each family -------------------------------------------------------------------

WIDE = [64, 128, 256, 512]  # from a base of 64: at 32 (4 heads of 8) SGD's backward signal is not yet 1/m
CHECK = ["param.base_width=64"]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["param=mup", "optim=sgd", "optim.lr=0.1"],
    ["param=mfp", "optim=sgd", "optim.lr=0.1"],  # muP moved by the SGD symmetry
    ["param=mup", "optim=adafactor", "optim.lr=0.01"],
    ["param=mup", "optim=lion", "optim.lr=0.0003"],
    ["param=mup", "optim=muon", "optim.lr=0.004"],
], ids=lambda o: " ".join(o))
def test_mup_passes_the_coordinate_check_under_each_family(overrides):
    result = coord_check([*CHECK, *overrides], scales=WIDE, seeds=1, steps=4)
    assert result.passed, result.failures()


@pytest.mark.slow
def test_the_check_fails_sp_under_sgd_at_a_large_lr():
    """SP's one global SGD LR: hidden features grow with width (slope ~ +1 per doubling by step 4)."""
    result = coord_check([*CHECK, "param=sp", "optim=sgd", "optim.lr=0.5"], scales=WIDE, seeds=1, steps=4)
    assert not result.passed
    assert result.row("blocks.0.mlp", "change").slopes[-1] > 0.5


@pytest.mark.slow
def test_the_check_fails_adams_exponents_under_adafactor():
    """Adafactor's relative step already carries the init's m^-1/2: Adam's hidden c = 1 shrinks H's updates."""
    result = coord_check([*CHECK, "param=mup", "optim=adafactor", "param.exponents.H.c=1"], scales=WIDE, seeds=1,
                         steps=4)
    assert not result.passed
