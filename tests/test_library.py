"""hptransfer as a library: `parameterize` and `describe` on a model hptransfer did not build.

The model is examples/custom_lm (fused q/k/v, biases, LayerNorm, a raw learned position table, a
tied readout, a fixed number of heads). microsoft/mup is the oracle for `mup`; the built-in GPT's
`hpt params` for the rules; a 2-process FSDP2 run for the optimizer groups of a sharded model.
"""

import json
import math
import os
import socket
import subprocess
import sys
import warnings
from types import ModuleType

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from hptransfer.config.compose import compose_run
from hptransfer.errors import HptError
from hptransfer.files import exit_process
from hptransfer.train.model import GPT, build, dims_of
from hptransfer.train.parameterization import Parameterization, describe, parameterize
from tests.conftest import REPO, cli

sys.path.insert(0, str(REPO / "examples" / "custom_lm"))  # the example project, as its user would have it
from custom_lm import CustomLM  # noqa: E402 - importable once its folder is on the path

VOCAB, BASE_WIDTH = 64, 32


def base_of(width: int = BASE_WIDTH, n_layers: int = 2, tie: bool = True) -> CustomLM:
    with torch.device("meta"):  # the base is only read for its shapes
        return CustomLM(VOCAB, width, n_layers, tie=tie)


def tokens(batch: int = 4, length: int = 17, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


class Tagger(nn.Module):
    """Unlike CustomLM: an input projection of fixed fan-in, one hidden layer, an untied readout with a bias."""

    def __init__(self, width: int, features: int = 3, heads: int = 1):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, width)
        self.inp = nn.Linear(features, width)  # fan-in `features` at every width
        self.hidden = nn.Linear(width, width)
        self.heads = nn.ModuleList(nn.Linear(width, VOCAB) for _ in range(heads))

    def forward(self, idx: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self.heads[0](F.gelu(self.hidden(self.emb(idx) + self.inp(feats))))


# --- microsoft/mup as the oracle -----------------------------------------------------------------------

def mup_model(mup: ModuleType, width: int, tie: bool) -> CustomLM:
    """CustomLM with the readout microsoft/mup prescribes: MuSharedReadout when tied, else MuReadout."""
    model = CustomLM(VOCAB, width, 2, tie=tie)
    if tie:
        model.lm_head = mup.MuSharedReadout(model.wte.weight, bias=False)
    else:
        model.lm_head = mup.MuReadout(width, VOCAB, bias=False)
    return model


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("mult", [1, 2, 4])
def test_mup_matches_microsoft_mup(mult, tie):
    """Per tensor: LR, weight decay (scaled mode = MuAdamW's coupled lam*m), init std and the logits equal
    what microsoft/mup gives (set_base_shapes with base and delta, Mu(Shared)Readout, mup.init.normal_, MuAdamW).

    Deliberate differences, asserted here: MuAdamW decays every tensor, we never decay V (biases, norm gains)
    nor E (embeddings, the position table, a tied readout); mup's readout divides its input by m in its
    forward, ours in a forward pre-hook on the user's nn.Linear. nn.Linear biases are zero in both (mup.init
    is applied to matrices, the biases zeroed, as its Transformer example does); norms keep the constructor's.
    """
    mup = pytest.importorskip("mup")
    lam, lr, sigma, width = 0.1, 0.01, 0.02, BASE_WIDTH * mult
    torch.manual_seed(0)
    ours = CustomLM(VOCAB, width, 2, tie=tie).double()
    torch.manual_seed(0)  # the same constructor draws: biases and norms equal
    theirs = mup_model(mup, width, tie).double()
    mup.set_base_shapes(theirs, mup_model(mup, BASE_WIDTH, tie), delta=mup_model(mup, 2 * BASE_WIDTH, tie),
                        rescale_params=False)
    torch.manual_seed(1)
    p = parameterize(ours, base_of(tie=tie), "mup", lr=lr, weight_decay=lam, wd_mode="scaled", init_std=sigma)
    torch.manual_seed(1)
    with torch.no_grad():
        for q in theirs.parameters():
            if q.ndim >= 2:
                mup.init.normal_(q, std=sigma)
        for m in theirs.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
    opt = mup.MuAdamW(theirs.parameters(), lr=lr, weight_decay=lam)
    group_of = {id(q): g for g in opt.param_groups for q in g["params"]}
    for (name, mine), (their_name, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        s, g = p.specs[name], group_of[id(q)]
        assert name == their_name
        assert math.isclose(s.lr, g["lr"], rel_tol=1e-12, abs_tol=0), name
        if s.cls in "HR":
            assert math.isclose(s.weight_decay, g["weight_decay"], rel_tol=1e-12, abs_tol=0), name
        else:
            assert s.weight_decay == 0.0 and g["weight_decay"] == lam, name
        torch.testing.assert_close(mine, q, rtol=1e-12, atol=0, msg=name)  # same draws: equal init stds
    assert p.specs["wte.weight"].cls == "E" and p.specs["blocks.0.qkv.weight"].cls == "H"  # fused q/k/v: H
    assert p.specs["blocks.0.qkv.weight"].width_mult == mult
    assert p.description.multipliers == ({} if mult == 1 else {"lm_head": 1 / mult})
    idx = tokens()
    torch.testing.assert_close(ours(idx), theirs(idx), rtol=1e-12, atol=1e-15)  # MuReadout's x / m, hooked


def test_classes_are_the_same_at_every_width_including_the_base():
    seen = {}
    for width in (BASE_WIDTH, 4 * BASE_WIDTH):
        d = describe(CustomLM(VOCAB, width, 2), base_of(), lr=0.01)
        seen[width] = {r.name: (r.cls, r.how) for r in d.rows}
    assert seen[BASE_WIDTH] == seen[4 * BASE_WIDTH]
    assert seen[BASE_WIDTH]["pos"] == ("E", "raw parameter of CustomLM")
    assert seen[BASE_WIDTH]["wte.weight"] == ("E", "tied to readout lm_head")
    assert seen[BASE_WIDTH]["blocks.1.proj.bias"][0] == seen[BASE_WIDTH]["ln_f.weight"][0] == "V"


def test_init_zeroes_linear_biases_and_keeps_norms():
    """torch's default bias init, U(+-1/sqrt(fan_in)), shrinks with width (the coordinate check fails it)."""
    model = CustomLM(VOCAB, 2 * BASE_WIDTH, 2)
    parameterize(model, base_of(), "mup", lr=0.01)
    assert all(not m.bias.detach().any() for m in model.modules() if isinstance(m, nn.Linear) and
               m.bias is not None)
    assert all(bool((m.weight == 1).all()) for m in model.modules() if isinstance(m, nn.LayerNorm))


# --- forward multipliers ------------------------------------------------------------------------------

def test_hooks_divide_the_readout_input_by_m_under_mup_and_remove_restores():
    torch.manual_seed(0)
    model = CustomLM(VOCAB, 4 * BASE_WIDTH, 1)
    p = parameterize(model, base_of(n_layers=1), "mup", lr=0.01)
    idx = tokens()
    hooked = model(idx)
    p.remove()
    plain = model(idx)
    torch.testing.assert_close(hooked, plain / 4, rtol=1e-6, atol=0)  # the readout has no bias: logits / m
    assert not torch.equal(hooked, plain)


def test_embedding_output_and_hidden_input_multipliers():
    """mup_everett: the embedding's output x m^1/2 and the readout's input x m^-1/2; ntk: a hidden Linear's
    input x m^-1/2, its bias unscaled. A Linear of fixed fan-in is H with m = 1, or E when named so."""
    torch.manual_seed(0)
    model, base = Tagger(128), Tagger(32)
    idx, x = tokens(), torch.randn(4, 17, 128)
    p = parameterize(model, base, "mup_everett", lr=0.01)
    assert p.description.multipliers == {"emb": 2.0, "heads.0": 0.5}
    torch.testing.assert_close(model.emb(idx), model.emb.weight[idx] * 2.0, rtol=0, atol=0)
    head = model.heads[0]
    torch.testing.assert_close(head(x), F.linear(x * 0.5, head.weight, head.bias), rtol=0, atol=0)
    assert p.specs["heads.0.bias"].cls == "V"
    inp = p.specs["inp.weight"]
    assert (inp.cls, inp.width_mult, inp.lr, inp.fwd_mult) == ("H", 1.0, 0.01, 1.0)
    p.remove()
    named = parameterize(model, base, "mup_everett", lr=0.01, classes={"inp": "E"})
    assert named.specs["inp.weight"].width_mult == 4 and named.description.multipliers["inp"] == 2.0
    assert named.specs["inp.bias"].cls == "V"  # a module's pattern classifies its matrices, not its bias
    named.remove()
    p = parameterize(model, base, "ntk", lr=0.01)
    torch.testing.assert_close(model.hidden(x), F.linear(x * 0.5, model.hidden.weight, model.hidden.bias),
                               rtol=0, atol=0)
    p.remove()


def test_a_raw_parameter_that_needs_a_multiplier_is_an_error_describe_shows():
    model = CustomLM(VOCAB, 4 * BASE_WIDTH, 1)
    d = describe(model, base_of(n_layers=1), "mup_everett", lr=0.01)
    assert dict(d.unhooked) == {"pos": 2.0} and "multiply in your forward: pos x 2" in str(d)
    with pytest.raises(HptError, match="'pos' needs a forward multiplier of 2 under mup_everett") as err:
        parameterize(model, base_of(n_layers=1), "mup_everett", lr=0.01)
    assert "\n" not in str(err.value)


def test_a_tied_readout_warns_where_e_and_r_differ():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parameterize(CustomLM(VOCAB, 64, 1), base_of(n_layers=1), "mup", lr=0.01)  # mup: both b = c = 0
    with pytest.warns(UserWarning, match="tied to the readout lm_head: under sp it takes E's init"):
        d = describe(CustomLM(VOCAB, 64, 1), base_of(n_layers=1), "sp", lr=0.01)
    assert "E (tied to readout lm_head)" in str(d)


# --- depth, exponents, attention ------------------------------------------------------------------------

def test_depth_scaling_compares_deeper_blocks_with_block_0():
    d = describe(CustomLM(VOCAB, 64, 8), base_of(), "depth_mup", lr=0.01, depth=8, base_depth=2)
    rows = {r.name: r for r in d.rows}
    assert d.residual_mult == 0.5  # mL^-1/2, mL = 4
    assert rows["blocks.7.qkv.weight"].base_shape == (96, 32)
    assert math.isclose(rows["blocks.7.qkv.weight"].lr, 0.01 / 2 * 0.5)  # lr / m x mL^(alpha - 1)
    assert math.isclose(rows["blocks.7.ln1.weight"].lr, 0.01 * 0.5) and rows["ln_f.weight"].lr == 0.01


def test_exponent_overrides_and_the_attention_scale():
    untied = describe(CustomLM(VOCAB, 128, 1, tie=False), base_of(n_layers=1, tie=False), "mup", lr=0.01,
                      exponents={"R": {"c": 1.0}})
    assert {r.name: r.lr for r in untied.rows}["lm_head.weight"] == 0.01 / 4
    p = parameterize(CustomLM(VOCAB, 128, 1), base_of(n_layers=1), "mup", lr=0.01, init=False)
    assert p.attn_scale(32, 8) == math.sqrt(8) / 32  # 4 heads at every width: the head grows
    sp = parameterize(CustomLM(VOCAB, 128, 1, tie=False), base_of(n_layers=1, tie=False), "sp", lr=0.01, init=False)
    assert sp.attn_scale(32, 8) == 1 / math.sqrt(32)
    cfg = compose_run(["param=mup", "model.width=128", "model.n_heads=4", "model.head_dim=null",
                       "param.base_width=32", "model.n_layers=1"])
    model, _ = build(cfg)
    assert model.blocks[0].attn.scale == p.attn_scale(32, 8)  # the built-in GPT's rule, the same number


# --- errors -------------------------------------------------------------------------------------------

ERRORS = [
    ("no readout", lambda: describe(nn.Sequential(nn.Linear(3, 64), nn.Linear(64, 5)),
                                    nn.Sequential(nn.Linear(3, 32), nn.Linear(32, 5)), lr=0.01),
     "no tensor is classified as the readout (R): name it, e.g. classes={'head': 'R'}"),
    ("ambiguous readout", lambda: describe(Tagger(64, heads=2), Tagger(32, heads=2), lr=0.01),
     "several tensors could be the readout (R), in heads.0, heads.1: name one"),
    ("base shape", lambda: describe(CustomLM(VOCAB, 64, 1), {**shapes(base_of(n_layers=1)), "pos": (64, 32)},
                                    lr=0.01),
     "shape of 'pos' (1x64x64) does not match the base's (64x32): the base must be the same model"),
    ("base missing a tensor", lambda: describe(CustomLM(VOCAB, 64, 1), {k: v for k, v in shapes(base_of(
        n_layers=1)).items() if k != "ln_f.bias"}, lr=0.01), "base model has no tensor 'ln_f.bias'"),
    ("unknown preset", lambda: describe(CustomLM(VOCAB, 64, 1), base_of(n_layers=1), "mupp", lr=0.01),
     "unknown preset 'mupp': choose one of sp, sp_emb, sp_perlayer, ntk, mfp, mup_everett, mup, completep"),
    ("unknown class", lambda: describe(CustomLM(VOCAB, 64, 1), base_of(n_layers=1), lr=0.01,
                                       classes={"pos": "X"}), "unknown class 'X' for 'pos' in classes: use E"),
    ("depth preset without depth", lambda: describe(CustomLM(VOCAB, 64, 1), base_of(n_layers=1), "completep",
                                                    lr=0.01), "preset 'completep' scales with depth: give depth="),
    ("unknown exponent", lambda: describe(CustomLM(VOCAB, 64, 1), base_of(n_layers=1), lr=0.01,
                                          exponents={"R": {"x": 1}}), "unknown exponent 'x' in exponents['R']"),
]


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("call,needle", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_input_is_one_line(call, needle):
    with pytest.raises(HptError) as err:
        call()
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_named_readout_settles_an_ambiguous_one():
    d = describe(Tagger(64, heads=2), Tagger(32, heads=2), lr=0.01, classes={r"heads\.1": "R"})
    assert d.readout == "heads.1" and {r.name: r.cls for r in d.rows}["heads.0.weight"] == "H"


# --- optimizer groups, wrapped models, the package top ---------------------------------------------------

def test_groups_match_wrapped_names_and_feed_adamw():
    model = CustomLM(VOCAB, 64, 1)
    p = parameterize(model, base_of(n_layers=1), "mup", lr=0.01, weight_decay=0.1)
    wrapper = nn.Module()
    wrapper.module = model  # DDP's naming: module.<name>
    for wrapped in (wrapper, torch.compile(model)):
        groups = p.param_groups(wrapped)
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = torch.optim.AdamW(p)
    for g in opt.param_groups:
        for name in g["names"]:
            s = p.specs[name]
            assert (g["lr"], g["base_lr"], g["cls"], g["eps"]) == (s.lr, s.lr, s.cls, s.eps)
            assert g["weight_decay"] == s.weight_decay / s.lr  # independent: AdamW's lr x decay is lam
    with pytest.raises(HptError, match="'other.weight' that parameterize did not see"):
        p.param_groups(nn.ModuleDict({"other": nn.Linear(2, 2)}))


def test_the_package_top_exports_the_library_lazily():
    probe = "import sys, hptransfer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False"]
    import hptransfer  # here: after the probe above, which needs a fresh interpreter
    from hptransfer.train import coord, parameterization

    assert hptransfer.parameterize is parameterize and hptransfer.describe is describe
    assert hptransfer.Parameterization is Parameterization is parameterization.Parameterization
    assert hptransfer.coord_check is coord.check_model


# --- the built-in GPT: describe agrees with `hpt params` -------------------------------------------------

def test_describe_on_the_builtin_gpt_agrees_with_hpt_params():
    overrides = ["param=completep", "model.width=128", "model.n_layers=4", "param.base_width=64",
                 "param.base_depth=2", "model.head_dim=16", "optim.weight_decay=0.1", "optim.wd_mode=scaled"]
    cfg = compose_run(overrides)
    model, _ = build(cfg)
    with torch.device("meta"):
        base = GPT(dims_of(cfg, width=64, n_layers=2))
    d = describe(model, base, "completep", lr=cfg.optim.lr, weight_decay=0.1, wd_mode="scaled", eps=cfg.optim.eps,
                 init_std=cfg.init.std, classes={r"blocks\.\d+\.(attn|mlp)\.\w+": "H", "lm_head": "R"},
                 depth=4, base_depth=2)
    proc = cli("params", *overrides, "--json")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    fields = list(printed[0])
    assert [{f: list(v) if f == "shape" else v for f, v in vars(r).items() if f in fields} for r in d.rows] == printed
    assert d.residual_mult == model.blocks[0].res_mult == 0.5


# --- FSDP2: parameterize before sharding, groups from the sharded model -----------------------------------

FSDP_LR, FSDP_WD = 0.01, 0.1


def fsdp_setup() -> tuple[CustomLM, Parameterization]:
    torch.manual_seed(0)
    model = CustomLM(VOCAB, 64, 2).double()
    return model, parameterize(model, base_of(), "mup", lr=FSDP_LR, weight_decay=FSDP_WD, wd_mode="scaled")


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor, steps: int = 3) -> None:
    for _ in range(steps):
        logits = model(batch[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()


def fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    """One of the sharded run's processes: half the batch each, FSDP2 averages the gradients."""
    from torch.distributed.fsdp import fully_shard  # here: the spawned processes need it, the others do not

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, p = fsdp_setup()  # parameterize (init, hooks) on the full model, then shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        opt = torch.optim.AdamW(p.param_groups(model))
        half = tokens(8).shape[0] // world
        train_steps(model, opt, tokens(8)[rank * half:(rank + 1) * half])
        full = {n: t.full_tensor() for n, t in model.named_parameters()}
        groups = [{k: g[k] for k in ("names", "lr", "weight_decay")} for g in opt.param_groups]
        if rank == 0:
            torch.save({"params": full, "groups": groups}, out)
    finally:
        dist.destroy_process_group()
    exit_process(0)  # as a job's rank does: gloo's threads can abort the interpreter's teardown (files.py)


def test_fsdp2_training_equals_one_process(tmp_path):
    """gloo on CPU, 2 processes, float64: parameterize before fully_shard, AdamW from p.param_groups(sharded)
    after; 3 steps on a fixed batch (each rank half of it) end where one process on the whole batch ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "sharded.pt"
    mp.spawn(fsdp_worker, args=(2, port, str(out)), nprocs=2, join=True)
    sharded = torch.load(out)

    model, p = fsdp_setup()
    train_steps(model, torch.optim.AdamW(p), tokens(8))
    for name, value in model.named_parameters():
        torch.testing.assert_close(sharded["params"][name], value.detach(), rtol=1e-6, atol=1e-9, msg=name)
    assert sum(len(g["names"]) for g in sharded["groups"]) == len(p.specs)
    for g in sharded["groups"]:
        for name in g["names"]:
            assert (g["lr"], g["weight_decay"]) == (p.specs[name].lr, p.specs[name].weight_decay), name
    assert {p.specs[n].lr for g in sharded["groups"] for n in g["names"]} == {FSDP_LR, FSDP_LR / 2}
