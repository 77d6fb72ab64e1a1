"""The coordinate check: mup and completep pass, sp at a large LR fails; what it measures is what the network uses."""

import json

import pytest
import torch
import torch.nn.functional as F

from hptransfer.train.coord import attention_logits, coord_check, coord_config
from hptransfer.train.model import build
from tests.conftest import assert_one_line_error, cli

# Small enough for seconds per check on one core; head_dim 8 gives the narrowest model 4 heads.
# Everything else is the check's defaults (lr 1e-3, no clipping or decay, 8 x 32 tokens, 2 seeds).
SMALL = ["model.n_layers=2", "model.head_dim=8", "param.base_width=32"]
WIDTHS = "32,64,128,256"


def failing(result) -> str:  # noqa: ANN001 - a CoordResult
    return ", ".join(f"{mod}@{step}: {slope}" for mod, step, slope in result.failures())


def test_mup_passes_and_the_cli_exits_0():
    proc = cli("coord-check", "param=mup", *SMALL, "--widths", WIDTHS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "blocks.1.mlp" in proc.stdout


def test_completep_passes_with_depth_scaling_active():
    result = coord_check(["param=completep", *SMALL, "model.n_layers=4", "param.base_depth=2"],
                         widths=[32, 64, 128, 256])
    assert result.passed, failing(result)
    assert "blocks.3.mlp" in result.modules


def test_sp_at_a_large_lr_fails_exits_1_and_writes_json_and_plot(tmp_path):
    plot = tmp_path / "coord.png"
    proc = cli("coord-check", "param=sp", *SMALL, "--widths", WIDTHS, "--json", "--plot", str(plot))
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["passed"] is False and out["widths"] == [32, 64, 128, 256] and len(out["seeds"]) == 2
    assert set(out["slopes"]) == set(out["modules"]) >= {"embedding", "blocks.0.attn", "blocks.1.mlp", "norm_f",
                                                        "lm_head"}
    assert all(len(row) == out["steps"] == 4 for row in out["slopes"].values())
    # Step 1 is before any update, where SP's fan-in init is flat too; after updates hidden outputs grow.
    assert abs(out["slopes"]["blocks.0.mlp"][0]) < 0.1
    assert out["slopes"]["blocks.1.mlp"][-1] > 0.4
    assert plot.stat().st_size > 10_000 and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("widths,needle", [
    ("32,abc", "not a comma-separated list of integers"),
    ("64", "at least two distinct positive widths"),
    ("0,32", "at least two distinct positive widths"),
    ("32,36", "not divisible by head_dim 8"),
])
def test_bad_widths_are_one_line_errors(widths, needle):
    assert_one_line_error(cli("coord-check", "param=mup", *SMALL, "--widths", widths), needle)


def test_bad_plot_file_fails_before_training(tmp_path):
    assert_one_line_error(cli("coord-check", *SMALL, "--plot", str(tmp_path / "c.txt")), "--plot")


def test_embedding_is_measured_with_its_multiplier():
    """mup_everett's embedding is m^-1/2 init times an m^1/2 multiplier: what the blocks see is flat."""
    result = coord_check(["param=mup_everett", *SMALL], widths=[32, 128], steps=2, seeds=1)
    assert abs(result.slopes["embedding"][0]) < 0.05


def test_zero_readout_logits_have_no_slope_at_step_1_and_are_held_two_sided_after():
    result = coord_check(["param=mup", "param.zero_readout=true", *SMALL], widths=[32, 64], steps=2, seeds=1)
    assert result.slopes["lm_head"][0] is None and result.ok["lm_head"][0]
    assert "lm_head" not in result.may_shrink and "lm_head" in coord_check(
        ["param=mup", *SMALL], widths=[32, 64], steps=2, seeds=1).may_shrink


def test_attention_logits_are_what_the_softmax_sees():
    """Rebuild the attention output from the measured logits (RoPE, scale, grouped kv heads included)."""
    cfg = coord_config(["param=mup", *SMALL, "model.width=64", "model.n_kv_heads=2"])
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
