"""The coordinate check is a detector: it fails a wrong exponent of every class, passes the right
presets and their abc-symmetric shifts, and what it measures is what the network uses.

The mutation list is the point of the file: each entry is one exponent moved outside the abc
symmetry class (a+t, b-t, c-t under Adam), which changes the training dynamics with width, and the
check must fail it. Run at the check's own defaults (widths 32-512, lr 1e-3, 2 seeds, 5 steps)
except where a test says otherwise.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from hptransfer.train.coord import attention_logits, coord_check, coord_config
from hptransfer.train.model import build
from tests.conftest import assert_one_line_error, cli

MUP = ["param=mup"]


def exponents(**moved: float) -> list[str]:
    """`R_c=1` -> param.exponents.R.c=1."""
    return [f"param.exponents.{k.replace('_', '.')}={v}" for k, v in moved.items()]


def failing(result) -> str:  # noqa: ANN001 - a CoordResult
    return ", ".join(f"{name}@{step}: {slope}" for name, step, slope in result.failures())


# (what, overrides, the row that must fail): a wrong LR exponent and a wrong multiplier exponent per class.
MUTATIONS = [
    ("E: embedding LR / m (Kalra & Barkeshli's SP bottleneck)", exponents(E_c=1), "embedding change"),
    ("E: embedding multiplier m^-1/2", exponents(E_a=0.5), "embedding change"),
    ("E: embedding multiplier m^+1/2", exponents(E_a=-0.5), "embedding change"),
    ("H: hidden LR / sqrt(m) instead of / m", exponents(H_c=0.5), "blocks.0.mlp change"),
    ("H: hidden LR / m^1.5", exponents(H_c=1.5), "blocks.0.mlp change"),
    ("H: hidden multiplier m^-1/2", exponents(H_a=0.5), "blocks.0.mlp change"),
    ("R: readout LR / m", exponents(R_c=1), "lm_head update"),
    ("R: readout multiplier m^-1.5 instead of m^-1", exponents(R_a=1.5), "lm_head update"),
    ("R: readout multiplier m^-1/2", exponents(R_a=0.5), "lm_head update"),
    ("H: init std not scaled (b = 0)", exponents(H_b=0), "blocks.0.mlp"),
]
# Presets and abc-symmetric shifts of mup (a+t, b-t, c-t; Adam's eps is negligible at 1e-8): all pass.
CORRECT = [
    ("mup", MUP),
    ("mup_everett", ["param=mup_everett"]),
    ("completep", ["param=completep", "model.n_layers=4"]),
    ("mup, E shifted by t = 1/2", MUP + exponents(E_a=0.5, E_b=-0.5, E_c=-0.5)),
    ("mup, H shifted by t = 1/2", MUP + exponents(H_a=0.5, H_b=0, H_c=0.5)),
    ("mup, R shifted by t = 1/2", MUP + exponents(R_a=1.5, R_b=-0.5, R_c=-0.5)),
]


@pytest.mark.slow
@pytest.mark.parametrize("what,moved,row", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_a_wrong_exponent_fails_the_check(what, moved, row):
    result = coord_check(MUP + moved)
    assert not result.passed, f"{what} passed"
    assert any(name == row for name, _, _ in result.failures()), f"{what}: {row} held; failed: {failing(result)}"


@pytest.mark.slow
@pytest.mark.parametrize("what,overrides", CORRECT, ids=[c[0] for c in CORRECT])
def test_correct_parameterizations_pass(what, overrides):
    result = coord_check(overrides)
    assert result.passed, f"{what}: {failing(result)}"


@pytest.mark.slow
@pytest.mark.parametrize("what,overrides,passes", [
    ("completep", ["param=completep"], True),
    ("completep without its residual multiplier", ["param=completep", *exponents(depth_residual=0)], False),
    ("completep with depth-muP's LR factor mL^-1/2", ["param=completep", *exponents(depth_lr=0.5)], False),
    ("completep with an LR factor mL^+1/2", ["param=completep", *exponents(depth_lr=-0.5)], False),
    ("mup (no depth scaling)", MUP, False),
])
def test_the_depth_check_passes_completep_and_fails_its_mutations(what, overrides, passes):
    result = coord_check(overrides, axis="depth")
    assert result.scales == [2, 4, 8, 16] and "blocks.last.mlp" in result.modules
    assert result.passed is passes, f"{what}: {failing(result) or 'passed'}"


def test_depth_mup_fails_along_depth_because_its_blocks_learn_less_as_they_multiply():
    """depth-muP keeps the residual stream and the logits flat in depth, but each block's own change
    shrinks as mL^-1/2 (the lazy blocks CompleteP removes): the check says so, in those rows."""
    result = coord_check(["param=depth_mup"], axis="depth", seeds=1, steps=3)
    failed = {name for name, _, _ in result.failures()}
    assert "blocks.first.mlp change" in failed and result.row("blocks.first.mlp", "change").slopes[-1] < -0.3
    assert not failed & {"residual change", "lm_head update", "norm_f change"}


def test_mup_passes_and_the_cli_exits_0_with_every_row():
    proc = cli("coord-check", "param=mup")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout
    for row in ("blocks.1.mlp change", "lm_head update", "residual", "blocks.0.attn.logits change"):
        assert row in proc.stdout


def test_sp_fails_exits_1_and_writes_json_and_plot(tmp_path):
    plot = tmp_path / "coord.png"
    proc = cli("coord-check", "param=sp", "--widths", "32,64,128,256", "--json", "--plot", str(plot))
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["passed"] is False and out["scales"] == [32, 64, 128, 256] and len(out["seeds"]) == 2
    rows = {(r["module"], r["kind"]): r for r in out["rows"]}
    assert {("embedding", "size"), ("blocks.1.mlp", "change"), ("lm_head", "update"), ("residual", "change")} \
        <= set(rows)
    assert all(len(r["slopes"]) == out["steps"] == 5 for r in rows.values())
    # Step 1 is before any update, where SP's fan-in init is flat; after updates hidden changes grow with width.
    assert abs(rows["blocks.0.mlp", "size"]["slopes"][0]) < 0.1
    assert rows["blocks.1.mlp", "change"]["slopes"][-1] > 0.5
    assert plot.stat().st_size > 10_000 and not list(tmp_path.glob(".*.tmp"))


def test_the_readout_update_row_is_the_readouts_own_share_of_the_logits_change():
    """logits_t - logits_1 = (W_t - W_1) x_t m + W_1 (x_t - x_1) m: the update row is the first term, so
    with the rest of the network frozen (hidden and embedding LR 0) it is the whole change."""
    frozen = ["param=mup", "param.lr_mult.E=0", "param.lr_mult.H=0", "param.lr_mult.V=0"]
    result = coord_check(frozen, scales=[32, 64], seeds=1, steps=3)
    change, update = result.row("lm_head", "change"), result.row("lm_head", "update")
    for step in (1, 2):
        assert update.values[step] == pytest.approx(change.values[step], rel=1e-6)
    assert result.row("norm_f", "change").values[2] == [0.0, 0.0]  # nothing below the readout moved


@pytest.mark.parametrize("args,needle", [
    (["--widths", "32,abc"], "not a comma-separated list of integers"),
    (["--widths", "64"], "at least two distinct positive values"),
    (["--widths", "0,32"], "at least two distinct positive values"),
    (["--widths", "32,36"], "not divisible by head_dim 8"),
    (["--axis", "height"], "'height' is not one of width, depth"),
    (["--axis", "depth", "--widths", "32,64"], "--widths goes with --axis width"),
    (["--steps", "1"], "need at least 2"),
])
def test_bad_options_are_one_line_errors(args, needle):
    assert_one_line_error(cli("coord-check", "param=mup", *args), needle)


def test_bad_plot_file_fails_before_training(tmp_path):
    assert_one_line_error(cli("coord-check", "--plot", str(tmp_path / "c.txt")), "--plot")


def test_exponent_overrides_are_validated_like_any_key():
    assert_one_line_error(cli("coord-check", "param.exponents.R.x=1"), "exponents")
    assert_one_line_error(cli("coord-check", "param.exponents.R.c=abc"), "param.exponents.R.c")


def test_embedding_is_measured_with_its_multiplier():
    """mup_everett's embedding is m^-1/2 init times an m^1/2 multiplier: what the blocks see is flat."""
    result = coord_check(["param=mup_everett"], scales=[32, 128], steps=2, seeds=1)
    assert abs(result.row("embedding").slopes[0]) < 0.05


def test_zero_readout_logits_have_no_slope_at_step_1():
    result = coord_check(["param=mup", "param.zero_readout=true"], scales=[32, 64], steps=2, seeds=1)
    assert result.row("lm_head").slopes[0] is None and result.row("lm_head").ok[0]


def test_attention_logits_are_what_the_softmax_sees():
    """Rebuild the attention output from the measured logits (RoPE, scale, grouped kv heads included)."""
    cfg = coord_config(["param=mup", "model.width=64", "model.n_kv_heads=2"])
    torch.manual_seed(0)
    model, _ = build(cfg)
    attn, seen = model.blocks[1].attn, {}
    for name in ("q", "k", "v", "o"):
        getattr(attn, name).register_forward_hook(
            lambda _m, args, out, name=name: seen.update({name: out, f"{name}_in": args[0]}))
    x = torch.randint(0, cfg.data.vocab_size, (2, 16))
    with torch.no_grad():
        model(x)
        logits = attention_logits(attn, seen["q"], seen["k"], model)
        B, T, H, D = 2, 16, attn.n_head, attn.head_dim
        v = seen["v"].view(B, T, attn.n_kv, D).transpose(1, 2).repeat_interleave(H // attn.n_kv, dim=1)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        y = F.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1) @ v  # (B, H, T, D)
    torch.testing.assert_close(y.transpose(1, 2).reshape(B, T, H * D), seen["o_in"])
