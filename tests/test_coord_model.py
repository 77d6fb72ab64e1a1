"""check_model: the coordinate check on a model hptransfer did not build (examples/custom_lm's CustomLM,
written the usual PyTorch way), trained on the built-in Shakespeare corpus, bytes.

The same detector as tests/test_coord.py: muP passes; SP, a missing readout multiplier and a missing
attention scale fail. The model has one head, so its head size is the width (32-512) and the attention
scale matters most, and batches of 2 x 16 tokens, so the aligned part of q.k, the part a
1/sqrt(head_dim) scale makes grow, shows within the check's 5 steps (check_model's docstring).
"""

import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch

from hptransfer.errors import HptError
from hptransfer.train.coord import (
    AttentionLogits,
    CoordResult,
    attention_logits,
    causal_mask,
    check_model,
    coord_config,
)
from hptransfer.train.data import Batches, shakespeare_bytes
from hptransfer.train.model import build
from hptransfer.train.param import attention_scale
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "examples" / "custom_lm"))
from custom_lm import CustomLM  # noqa: E402 - found on the path set just above

BASE, WIDTHS = 32, [32, 64, 128, 256, 512]
BATCH, SEQ = 2, 16
# CustomLM's readout is tied to its embedding: under sp, parameterize warns that it takes E's init.
TIED_UNDER_SP = "ignore:.*is tied to the readout"


def shakespeare(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's fixed batch: BATCH windows of SEQ + 1 bytes of the built-in corpus."""
    stream = np.frombuffer(shakespeare_bytes(), dtype=np.uint8)
    return Batches(stream, stream[:0], BATCH, SEQ, seed).train_batch(0, torch.device("cpu"))


def custom_lm(mup_scale: bool = True) -> Callable[[int], CustomLM]:
    """make_model for check_model: CustomLM at a width, with muP's attention scale (1/head_dim, as
    sqrt(base head_dim) / head_dim) or SP's 1/sqrt(head_dim)."""

    def make(width: int) -> CustomLM:  # one head: head_dim = width
        return CustomLM(256, width, 2, n_heads=1, max_len=SEQ, attn_scale=attention_scale(mup_scale, width, BASE))

    return make


def check(make: Callable[[int], CustomLM], **kwargs: object) -> CoordResult:
    return check_model(make, shakespeare, WIDTHS, base_width=BASE, **kwargs)


def failed_rows(result: CoordResult) -> set[str]:
    return {name for name, _, _ in result.failures()}


def test_mup_passes_and_every_kind_of_row_is_measured():
    result = check(custom_lm())
    assert result.passed, result.failures()
    assert {"wte", "blocks.0.qkv", "blocks.0.logits", "blocks.1.down", "blocks.1", "lm_head"} <= set(result.modules)
    assert result.row("lm_head", "update").two_sided and not result.row("blocks.0.logits", "change").two_sided
    assert "(output)" not in result.modules  # the model's output is the readout's: no second row


@pytest.mark.filterwarnings(TIED_UNDER_SP)
def test_sp_fails_as_its_hidden_changes_grow_with_width():
    result = check(custom_lm(mup_scale=False), preset="sp")
    assert not result.passed
    assert result.row("blocks.1.up", "change").slopes[-1] > 0.3


def test_a_missing_attention_scale_is_caught_in_the_attention_logits():
    """mup with 1/sqrt(head_dim): every other row holds; the attention logits' change grows with width."""
    result = check(custom_lm(mup_scale=False))
    assert failed_rows(result) and all(".logits" in name for name in failed_rows(result)), result.failures()
    assert result.row("blocks.0.logits", "change").slopes[1] > 0.25


def test_a_missing_readout_multiplier_is_caught_in_the_readouts_update():
    result = check(custom_lm(), parameterize_kwargs={"exponents": {"R": {"a": 0.0}}})
    assert "lm_head update" in failed_rows(result)
    assert result.row("lm_head", "update").slopes[1] > 0.8  # its update grows as m: no 1/m multiplier


def test_sdpa_logits_are_the_built_in_checks():
    """What AttentionLogits takes from F.scaled_dot_product_attention (scale, grouped kv heads, causal mask,
    after RoPE) is what the built-in check computes from the q and k projections."""
    cfg = coord_config(["param=mup", "model.width=64", "model.n_kv_heads=2"])
    torch.manual_seed(0)
    model, _ = build(cfg)
    attn, seen, qk = model.blocks[1].attn, {}, {}
    for name in ("q", "k"):
        getattr(attn, name).register_forward_hook(lambda _m, _a, out, name=name: qk.update({name: out}))
    with torch.no_grad():
        with AttentionLogits(seen, ["blocks.1.attn"]):  # block 1 runs last: its logits stay
            model(torch.randint(0, cfg.data.vocab_size, (2, 16)))
        logits = attention_logits(attn, qk["q"], qk["k"], model)
    torch.testing.assert_close(seen["blocks.1.attn.logits"], logits[..., causal_mask(logits)].flatten())


def test_softmax_logits_leave_the_masked_entries_out():
    torch.manual_seed(0)
    block, seen = custom_lm()(64).blocks[0], {}
    x = torch.randn(2, SEQ, 64)
    with torch.no_grad(), AttentionLogits(seen, ["blocks.0"]):
        block(x)
        q, k, _ = block.qkv(block.ln1(x)).split(64, dim=-1)
    logits = (q @ k.transpose(-2, -1)) * block.attn_scale
    torch.testing.assert_close(seen["blocks.0.logits"], logits[..., causal_mask(logits)].flatten())


@pytest.mark.parametrize("kwargs,needle", [
    ({"widths": [64]}, "widths: need at least two distinct positive values"),
    ({"steps": 1}, "steps: need at least 2"),
    ({"parameterize_kwargs": {"lr": 0.1}}, "parameterize_kwargs: lr is set by check_model"),
])
def test_bad_arguments_are_one_line_errors(kwargs, needle):
    args = {"widths": WIDTHS, **kwargs}
    with pytest.raises(HptError, match=needle):
        check_model(custom_lm(), shakespeare, args.pop("widths"), base_width=BASE, **args)
