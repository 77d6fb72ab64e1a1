"""The parameterization table against docs/science.md#the-abc-table, microsoft/mup, and the abc symmetry."""

import json
import math
import re
import subprocess
import sys
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from hptransfer.config.compose import compose_run
from hptransfer.config.derived import param_counts
from hptransfer.config.schema import MUP_FAMILY
from hptransfer.errors import HptError
from hptransfer.train.model import GPT, build, dims_of, param_specs
from hptransfer.train.param import PRESETS
from tests.conftest import TINY, assert_one_line_error, cli

# The abc table (docs/science.md#the-abc-table), transcribed apart from param.py: per class (a, b, c_full, c_none),
# and g per class. c_none = c_full where the table gives one value.
SCIENCE = {
    "sp": {"E": (0, 0, 0, 0), "H": (0, 0.5, 0, 0), "R": (0, 0.5, 0, 0), "g": (0.5, 0.5, 0)},
    "sp_emb": {"E": (0, 0, -1, -1), "H": (0, 0.5, 0, 0), "R": (0, 0.5, 0, 0), "g": (0.5, 0.5, 0)},
    "sp_perlayer": {"E": (0, 0, 0, 0), "H": (0, 0.5, 1, 0.5), "R": (0, 0.5, 1, 0.5), "g": (0.5, 0.5, 0)},
    "ntk": {"E": (0, 0, 0, 0), "H": (0.5, 0, 0.5, 0), "R": (0.5, 0, 0.5, 0), "g": (0.5, 1, 0.5)},
    "mfp": {"E": (0, 0, 0, 0), "H": (0.5, 0, 0.5, 0), "R": (1, 0, 0, -0.5), "g": (1, 1.5, 1)},
    "mup_everett": {"E": (-0.5, 0.5, 0.5, 0.5), "H": (0, 0.5, 1, 0.5), "R": (0.5, 0.5, 0.5, 0), "g": (0.5, 1, 0.5)},
    "mup": {"E": (0, 0, 0, 0), "H": (0, 0.5, 1, 0.5), "R": (1, 0, 0, -0.5), "g": (1, 1, 1)},
}
SCIENCE["completep"] = SCIENCE["depth_mup"] = SCIENCE["mup"]

BASE = ["param.base_width=64", "param.base_depth=2", "model.head_dim=16"]


def test_every_preset_of_science_md_is_in_the_table():
    assert set(PRESETS) == set(SCIENCE)


def test_at_base_width_and_depth_every_preset_prints_the_same_params_table():
    tables = {}
    for preset in PRESETS:
        proc = cli("params", f"param={preset}", "model.width=64", "model.n_layers=2", *BASE,
                   "optim.eps_scaling=per_layer", "optim.weight_decay=0.1", "optim.wd_mode=scaled", "--json")
        assert proc.returncode == 0, proc.stderr
        tables[preset] = json.loads(proc.stdout)
    assert len(tables["sp"]) == 2 * 8 + 3  # 2 blocks x (2 norms, q k v o, up down) + emb, norm_f, lm_head
    for preset, table in tables.items():
        assert table == tables["sp"], preset


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_at_base_size_every_preset_is_the_same_network(preset):
    """Same seed, base width and depth: identical weights and identical logits (attention scale included)."""
    x = torch.randint(0, 256, (2, 16))
    outs = []
    for name in ("sp", preset):
        torch.manual_seed(0)
        model, _ = build(compose_run([f"param={name}", "model.width=64", "model.n_layers=2", *BASE]))
        outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("alignment", ["full", "none"])
@pytest.mark.parametrize("preset", sorted(SCIENCE))
def test_exponents_follow_science_md(preset, alignment):
    m = 4.0
    cfg = compose_run([f"param={preset}", "model.width=256", f"param.alignment={alignment}",
                       "optim.eps_scaling=per_layer", "model.n_layers=2", *BASE])
    specs = param_specs(cfg)
    sigma, eta, eps = cfg.init.std, cfg.optim.lr, cfg.optim.eps
    rows = SCIENCE[preset]
    for name, s in specs.items():
        if s.cls == "V":
            assert (s.width_mult, s.fwd_mult, s.lr, s.init_std) == (1.0, 1.0, eta, None), name
            assert math.isclose(s.eps, eps * m ** -rows["g"][1]), (name, s.eps)  # gains: H's epsilon exponent
            continue
        a, b, c_full, c_none = rows[s.cls]
        c = c_full if alignment == "full" else c_none
        g = rows["g"]["EHR".index(s.cls)]
        assert s.width_mult == m, name
        assert math.isclose(s.fwd_mult, m ** -a), (name, s.fwd_mult)
        assert math.isclose(s.init_std, sigma * m ** -b), (name, s.init_std)
        assert math.isclose(s.lr, eta * m ** -c), (name, s.lr)
        assert math.isclose(s.eps, eps * m ** -g), (name, s.eps)


def test_mlp_down_projection_uses_its_own_fan_in_ratio():
    cfg = compose_run(["param=mup", "model.width=128", "model.mlp_ratio=4", "model.n_layers=2", *BASE])
    down = param_specs(cfg)["blocks.0.mlp.down.weight"]
    assert down.shape == (128, 512) and down.width_mult == 2.0 and down.lr == cfg.optim.lr / 2


def test_constant_init_scheme_and_zero_inits():
    cfg = compose_run(["param=sp", "model.width=256", "init.scheme=constant", "param.zero_readout=true",
                       "param.zero_query=true", "model.n_layers=2", *BASE])
    specs = param_specs(cfg)
    assert specs["blocks.0.attn.k.weight"].init_std == cfg.init.std  # GPT-2 style: 0.02 at every width
    assert specs["blocks.0.attn.q.weight"].init_std == 0.0
    assert specs["lm_head.weight"].init_std == 0.0


@pytest.mark.parametrize("preset,alpha", [("completep", 1.0), ("depth_mup", 0.5), ("sp", 0.0)])
def test_depth_scaling(preset, alpha):
    """Residual branches x mL^-alpha; hidden LRs x mL^(alpha-1); H eps x mL^-alpha; alpha 0 changes nothing."""
    mL = 4
    cfg = compose_run([f"param={preset}", "model.width=64", "model.n_layers=8", "optim.eps_scaling=per_layer", *BASE])
    base = compose_run([f"param={preset}", "model.width=64", "model.n_layers=2", "optim.eps_scaling=per_layer", *BASE])
    deep, shallow = param_specs(cfg), param_specs(base)
    torch.manual_seed(0)
    model, _ = build(cfg)
    assert all(math.isclose(b.res_mult, mL ** -alpha) for b in model.blocks)
    lr_factor = mL ** (alpha - 1) if alpha else 1.0
    for name in ("blocks.0.attn.q.weight", "blocks.0.norm1.weight"):
        assert math.isclose(deep[name].lr, shallow[name].lr * lr_factor), name
    assert math.isclose(deep["blocks.0.mlp.up.weight"].eps, shallow["blocks.0.mlp.up.weight"].eps * mL ** -alpha)
    for name in ("tok_emb.weight", "lm_head.weight", "norm_f.weight"):  # not hidden: untouched by depth
        assert deep[name].lr == shallow[name].lr, name


def test_weight_decay_modes():
    common = ["param=mup", "model.width=256", "optim.weight_decay=0.1", "model.n_layers=2", *BASE]
    for mode, h_decay in (("independent", 0.1), ("coupled", 0.1), ("scaled", 0.4)):
        specs = param_specs(compose_run([*common, f"optim.wd_mode={mode}"]))
        assert math.isclose(specs["blocks.0.attn.q.weight"].weight_decay, h_decay), mode
        assert specs["norm_f.weight"].weight_decay == 0.0  # never on V
        assert specs["tok_emb.weight"].weight_decay == 0.0  # E only if asked
    specs = param_specs(compose_run([*common, "optim.wd_on_embeddings=true"]))
    assert specs["tok_emb.weight"].weight_decay == 0.1


# --- microsoft/mup as an oracle -------------------------------------------------------------------------

def built_with_mup(mup: Any, cfg: Any, sigma: float) -> tuple[GPT, dict, GPT]:
    """Our model of `cfg` and microsoft/mup's twin (base width 64, delta 128, mup's init), both from seed 123;
    their initial weights asserted bit-identical. Returns (ours, our specs, theirs)."""
    torch.manual_seed(123)
    ours, specs = build(cfg)
    base, delta = GPT(dims_of(cfg, width=64)), GPT(dims_of(cfg, width=128))
    torch.manual_seed(123)
    theirs = GPT(dims_of(cfg))  # same constructor, same RNG use, then mup's init below
    mup.set_base_shapes(theirs, base, delta=delta, rescale_params=False)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                mup.init.normal_(p, std=sigma)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    return ours, specs, theirs


@pytest.mark.parametrize("mult", [2, 4])
def test_mup_matches_microsoft_mup(mult):
    """LR, weight decay (scaled mode = MuAdamW's coupled lam*m) and init equal what microsoft/mup gives.

    Deliberate differences, asserted here: mup's MuAdamW decays every tensor, we never decay V
    (norm gains) nor, by default, E; mup puts the readout's 1/m in MuReadout's forward, we in fwd_mult.
    """
    mup = pytest.importorskip("mup")
    lam, sigma = 0.1, 0.02
    overrides = ["param=mup", f"model.width={64 * mult}", "model.n_layers=2", "optim.weight_decay=0.1",
                 "optim.wd_mode=scaled", *BASE]
    cfg = compose_run(overrides)
    ours, specs, theirs = built_with_mup(mup, cfg, sigma)

    opt = mup.MuAdamW(theirs.parameters(), lr=cfg.optim.lr, weight_decay=lam)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in theirs.named_parameters():
        g, s = by_param[id(p)], specs[name]
        assert math.isclose(s.lr, g["lr"]), name
        if s.cls in "HR":
            assert math.isclose(s.weight_decay, g["weight_decay"]), name
        else:
            assert s.weight_decay == 0.0 and g["weight_decay"] == lam, name
        if s.cls == "R":
            assert math.isclose(s.fwd_mult, 1 / p.infshape.width_mult())  # MuReadout's x / width_mult
        else:
            assert s.fwd_mult == 1.0, name


# --- the abc symmetry: mup and mup_everett train identically ------------------------------------------

def test_mup_and_mup_everett_train_identically_with_adam_atan2(tmp_path):
    losses = {}
    for preset in ("mup", "mup_everett"):
        run = tmp_path / preset
        proc = cli("train", *TINY, f"param={preset}", "model.width=64", "train.steps=10", "train.log_every=1",
                   "optim=adam_atan2", "optim.grad_clip=0", "optim.weight_decay=0", "train.dtype=float64",
                   "optim.lr=0.01", "--run-dir", str(run), "-q")
        assert proc.returncode == 0, proc.stderr
        losses[preset] = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()
                          if "loss" in json.loads(ln)]
    assert len(losses["mup"]) == 10
    assert losses["mup"][-1] < losses["mup"][0] - 0.3  # it trained: the comparison is not vacuous
    for a, b in zip(losses["mup"], losses["mup_everett"], strict=True):
        assert abs(a - b) < 1e-6


@pytest.mark.parametrize("overrides", [[], ["model.mlp=swiglu", "model.mlp_ratio=2.5"], ["model.pos=learned"],
                                       ["model.norm_gains=false", "model.n_kv_heads=1", "model.n_layers=3"],
                                       ["model.n_heads=4", "model.head_dim=null"],
                                       ["model.q_per_kv=2", "model.head_dim=16", "model.width=128"]])
def test_parameter_counts_without_torch_match_the_built_model(overrides):
    """The dry run's FLOPs use config.derived's arithmetic count: it must be the model's own count."""
    cfg = compose_run(["model.width=64", *overrides])
    model, specs = build(cfg)
    total = sum(p.numel() for p in model.parameters())
    embeddings = sum(p.numel() for n, p in model.named_parameters() if specs[n].cls == "E")
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert param_counts(plain["model"], plain["data"]["vocab_size"]) == (total, total - embeddings)


# --- weight decay x depth, gains' epsilon, GQA at a fixed ratio, constant init ---------------------------

@pytest.mark.parametrize("preset,overrides", [("depth_mup", []), ("completep", []), ("mup", []), ("sp_perlayer", []),
                                              ("depth_mup", ["param.exponents.depth.lr=0.25"])])
def test_scaled_decay_holds_lr_times_decay_across_width_and_depth(preset, overrides):
    """`scaled`: each decayed tensor's lr x decay is the base model's, whatever the width and depth."""
    common = [f"param={preset}", "optim.wd_mode=scaled", "optim.weight_decay=0.1", "optim.wd_on_embeddings=true",
              *overrides, *BASE]
    base = param_specs(compose_run([*common, "model.width=64", "model.n_layers=2"]))
    big = param_specs(compose_run([*common, "model.width=256", "model.n_layers=8"]))
    for name, s in big.items():
        b = base[re.sub(r"^blocks\.\d+\.", "blocks.0.", name)]
        assert math.isclose(s.lr * s.weight_decay, b.lr * b.weight_decay), name
    if preset == "depth_mup" and not overrides:  # by hand: m = 4, mL = 4, alpha = 1/2, c_H = 1
        q = big["blocks.3.attn.q.weight"]
        assert math.isclose(q.lr, 0.004 / 4 * 4**-0.5) and math.isclose(q.weight_decay, 0.1 * 4 * 4**0.5)


@pytest.mark.parametrize("preset,alpha,g_h", [("completep", 1.0, 1.0), ("depth_mup", 0.5, 1.0), ("sp", 0.0, 0.5)])
def test_gain_epsilon_follows_completeps_reference(preset, alpha, g_h):
    """per_layer: gains in blocks eps m^-g_H mL^-alpha (as H), the final norm's eps m^-g_H (as nanoGPT-mup)."""
    eps, m, mL = 1e-8, 4, 4
    specs = param_specs(compose_run([f"param={preset}", "optim.eps_scaling=per_layer", "model.width=256",
                                     "model.n_layers=8", *BASE]))
    hidden = eps * m**-g_h * (mL**-alpha if alpha else 1.0)
    for name in ("blocks.0.norm1.weight", "blocks.7.norm2.weight", "blocks.2.mlp.up.weight"):
        assert math.isclose(specs[name].eps, hidden), name
    assert math.isclose(specs["norm_f.weight"].eps, eps * m**-g_h)
    plain = param_specs(compose_run([f"param={preset}", "model.width=256", "model.n_layers=8", *BASE]))
    assert {s.eps for s in plain.values()} == {eps}  # eps_scaling=none: one epsilon


def test_q_per_kv_holds_the_ratio_as_heads_grow():
    for width, heads, kv in ((64, 4, 2), (256, 16, 8)):
        d = dims_of(compose_run([f"model.width={width}", "model.head_dim=16", "model.q_per_kv=2"]))
        assert (d.n_heads, d.n_kv_heads) == (heads, kv)
    fixed = [dims_of(compose_run([f"model.width={w}", "model.head_dim=16", "model.n_kv_heads=2"])) for w in (64, 256)]
    assert [d.n_heads // d.n_kv_heads for d in fixed] == [2, 8]  # a fixed count: the ratio moves with width
    torch.manual_seed(0)
    model, _ = build(compose_run(["model.width=64", "model.head_dim=16", "model.q_per_kv=4", "model.n_layers=1"]))
    assert model.blocks[0].attn.k.weight.shape == (16, 64) and model(torch.randint(0, 256, (1, 8))).shape == (1, 8, 256)
    for args, needle in [(["model.q_per_kv=3"], "not divisible by q_per_kv 3"),
                         (["model.q_per_kv=2", "model.n_kv_heads=1"], "at most one"),
                         (["model.q_per_kv=0"], "model.q_per_kv")]:
        with pytest.raises(HptError, match=needle):
            compose_run(["model.width=64", "model.head_dim=16", *args])


@pytest.mark.parametrize("preset", sorted(MUP_FAMILY))
def test_constant_init_with_a_mup_family_preset_is_an_error(preset, tmp_path):
    assert_one_line_error(cli("train", *TINY, f"param={preset}", "init.scheme=constant", "--run-dir",
                              str(tmp_path / "x")), "init.scheme")
    assert not (tmp_path / "x").exists()
    compose_run(["param=sp", "init.scheme=constant"])  # GPT-2's constant init is SP's


def test_the_schemas_mup_family_is_the_tables():
    assert set(MUP_FAMILY) == {n for n, p in PRESETS.items() if p.mup_attention}
    code = ("import hptransfer.config.schema as s; s.MUP_FAMILY = ('mup',); import hptransfer.train.param")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "MUP_FAMILY" in proc.stderr  # a schema list that drifts fails at import


def test_hpt_params_shows_an_overridden_exponent_and_what_it_does():
    """`hpt params` prints the exponents in force, the overridden one marked, and the tensors they drive."""
    plain = cli("params", "param=mup", "model.width=256", "param.base_width=128")
    moved = cli("params", "param=mup", "model.width=256", "param.base_width=128", "param.exponents.R.c=1")
    assert plain.returncode == moved.returncode == 0, moved.stderr
    readout = [ln.split() for ln in moved.stdout.splitlines() if ln.strip().startswith("R ")]
    assert readout == [["R", "1", "0", "1*", "1"]] and "1*" not in plain.stdout
    lr_of = {out: next(ln.split()[7] for ln in out.splitlines() if ln.strip().startswith("lm_head.weight"))
             for out in (plain.stdout, moved.stdout)}
    assert float(lr_of[moved.stdout]) == pytest.approx(float(lr_of[plain.stdout]) / 2)  # m = 2: lr / m
