"""The batch-size and duration rules against hand computations (docs/science.md#batch-size-and-duration-rules).

The decay rules are checked the way they are meant: AdamW's timescale, computed here from the values
training uses (per tensor, from the parameterization's specs), is the same at the base point and at
the moved one, under every weight-decay mode, unit and LR rule.
"""

import math

import pytest
from omegaconf import OmegaConf

from hptransfer.config.compose import compose_run
from hptransfer.config.derived import param_counts, steps_of
from hptransfer.errors import HptError
from hptransfer.train.model import param_specs
from hptransfer.train.rules import apply_rules
from tests.conftest import TINY, assert_one_line_error, cli

MODES = ("independent", "coupled", "scaled")
UNITS = ("fraction", "tokens", "iterations")
# A muP model off its base width, so per-tensor learning rates differ (coupled decay sees them).
MODEL = ["param=mup", "model.width=64", "model.head_dim=16", "param.base_width=32", "model.n_layers=2",
         "train.seq_len=32", "optim.lr=0.004", "optim.weight_decay=0.1"]


def tau(cfg, unit: str) -> float:
    """The timescale of `cfg`'s base-rate tensor, by hand: 1 / per-step decay, in `unit`."""
    eff, _ = apply_rules(cfg)
    o, t = eff.optim, eff.train
    per_step = o.weight_decay * (1.0 if o.wd_mode == "independent" else o.lr)
    return {"iterations": 1 / per_step, "tokens": t.batch_size * t.seq_len / per_step,
            "fraction": 1 / (per_step * steps_of(t))}[unit]


def tensor_taus(cfg, unit: str) -> dict[str, float]:
    """Every decayed tensor's timescale as the optimizer applies its decay (optim.py): per step, the spec's
    decay (independent: lr_t x lam / lr) or lr x decay (coupled, scaled)."""
    eff, _ = apply_rules(cfg)
    t = eff.train
    out = {}
    for name, s in param_specs(eff).items():
        if s.weight_decay:
            per_step = s.weight_decay if eff.optim.wd_mode == "independent" else s.lr * s.weight_decay
            out[name] = {"iterations": 1 / per_step, "tokens": t.batch_size * t.seq_len / per_step,
                         "fraction": 1 / (per_step * steps_of(t))}[unit]
    return out


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("mode", MODES)
def test_batch_timescale_rule_holds_tau(mode, unit):
    common = [*MODEL, f"optim.wd_mode={mode}", "train.tokens=65536", "scaling.batch.base=8",
              "scaling.batch.lr_rule=sqrt", "scaling.batch.wd_rule=timescale", f"scaling.timescale.unit={unit}"]
    base, big = compose_run([*common, "train.batch_size=8"]), compose_run([*common, "train.batch_size=32"])
    eff, record = apply_rules(big)
    # By hand: k = 4, the LR x 2; lam x k (x 1 in iterations), / 2 when the decay is coupled to the LR.
    want = 0.1 * (4 if unit != "iterations" else 1) / (1 if mode == "independent" else 2)
    assert math.isclose(eff.optim.weight_decay, want) and math.isclose(record["batch_rule"]["wd_factor"], want / 0.1)
    assert math.isclose(tau(big, unit), tau(base, unit))
    for name, t in tensor_taus(big, unit).items():
        assert math.isclose(t, tensor_taus(base, unit)[name]), name
    assert math.isclose(record["wd_timescale"][unit], tau(big, unit))  # what result.json records
    off = compose_run([*common, "train.batch_size=32", "scaling.batch.wd_rule=none"])
    if unit != "iterations" or mode != "independent":  # without the rule tau moves: the check is not vacuous
        assert not math.isclose(tau(off, unit), tau(base, unit))


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("mode", MODES)
def test_duration_timescale_rule_holds_tau(mode, unit):
    common = [*MODEL, f"optim.wd_mode={mode}", "train.batch_size=8", "scaling.duration.base_tokens=16384",
              "scaling.duration.lr_rule=power", "scaling.duration.lr_exponent=-0.5",
              "scaling.duration.wd_rule=timescale", f"scaling.timescale.unit={unit}"]
    base, long = compose_run([*common, "train.tokens=16384"]), compose_run([*common, "train.tokens=65536"])
    eff, record = apply_rules(long)
    # By hand: r = 4, the LR x 1/2; lam / r in fractions (x 1 otherwise), x 2 when the decay is coupled.
    want = 0.1 / (4 if unit == "fraction" else 1) * (1 if mode == "independent" else 2)
    assert math.isclose(eff.optim.weight_decay, want) and math.isclose(eff.optim.lr, 0.002)
    assert record["duration_rule"]["wd_rule"] == "timescale"
    assert math.isclose(tau(long, unit), tau(base, unit))
    for name, t in tensor_taus(long, unit).items():
        assert math.isclose(t, tensor_taus(base, unit)[name]), name


@pytest.mark.parametrize("mode", MODES)
def test_both_axes_at_once_hold_tau_from_the_base_point(mode):
    rules = [*MODEL, f"optim.wd_mode={mode}", "scaling.batch.base=8", "scaling.batch.lr_rule=linear",
             "scaling.batch.wd_rule=timescale", "scaling.duration.base_tokens=16384",
             "scaling.duration.lr_rule=power", "scaling.duration.wd_rule=timescale"]
    base = compose_run([*rules, "train.batch_size=8", "train.tokens=16384"])
    moved = compose_run([*rules, "train.batch_size=16", "train.tokens=131072"])
    assert math.isclose(tau(moved, "fraction"), tau(base, "fraction"))


def test_the_existing_duration_rule_now_compensates_coupled_decay():
    """`scaling.duration.wd_rule=timescale` divided lam by r whatever the mode; under coupled decay it now also
    divides by the duration LR factor, so the timescale stays a fixed fraction of the run."""
    cfg = compose_run(["train.tokens=409600", "scaling.duration.base_tokens=102400", "scaling.duration.lr_rule=power",
                       "scaling.duration.wd_rule=timescale", "optim.weight_decay=0.1", "optim.lr=0.001",
                       "optim.wd_mode=coupled"])
    eff, _ = apply_rules(cfg)
    assert math.isclose(eff.optim.weight_decay, 0.1 / 4 / 4**-0.3)
    independent, _ = apply_rules(compose_run(["train.tokens=409600", "scaling.duration.base_tokens=102400",
                                              "scaling.duration.wd_rule=timescale", "optim.weight_decay=0.1"]))
    assert math.isclose(independent.optim.weight_decay, 0.025)  # independent decay: lam / r, as before


@pytest.mark.parametrize("mode", MODES)
def test_power_rule_sets_tau_from_tokens_per_parameter(mode):
    c, p = 0.5, -0.5
    common = [*MODEL, "optim.weight_decay=0", f"optim.wd_mode={mode}", "train.batch_size=16", "train.tokens=262144",
              "scaling.batch.base=8", "scaling.batch.lr_rule=sqrt", f"scaling.timescale.c={c}",
              f"scaling.timescale.p={p}"]
    cfg = compose_run([*common, "scaling.duration.wd_rule=power"])
    eff, record = apply_rules(cfg)
    n = param_counts(OmegaConf.to_container(cfg.model), cfg.data.vocab_size)[1]  # non-embedding parameters
    tau_star = c * (262144 / n) ** p
    steps = 262144 // (16 * 32)
    lr = 0.004 * 2**0.5  # after the batch LR rule
    want = 1 / (tau_star * steps) if mode == "independent" else 1 / (lr * tau_star * steps)
    assert math.isclose(eff.optim.weight_decay, want)
    assert math.isclose(tau(cfg, "fraction"), tau_star) and math.isclose(record["wd_power"]["tau"], tau_star)
    assert math.isclose(record["wd_power"]["tokens_per_param"], 262144 / n)
    batch, _ = apply_rules(compose_run([*common, "scaling.batch.wd_rule=power"]))
    assert math.isclose(batch.optim.weight_decay, want)  # either axis's key: the same law


@pytest.mark.parametrize("args,needle", [
    (["scaling.duration.wd_rule=power"], "scaling.timescale.c"),
    (["scaling.duration.wd_rule=power", "scaling.timescale.c=0.5"], "scaling.timescale.p"),
    (["scaling.duration.wd_rule=power", "scaling.timescale.c=-1", "scaling.timescale.p=-0.5"], "must be positive"),
    (["scaling.batch.wd_rule=power", "scaling.timescale.c=0.5", "scaling.timescale.p=-0.5",
      "optim.weight_decay=0.1"], "optim.weight_decay"),
    (["scaling.batch.wd_rule=power", "scaling.duration.wd_rule=timescale", "scaling.timescale.c=0.5",
      "scaling.timescale.p=-0.5"], "scaling.duration.wd_rule"),
    (["scaling.timescale.unit=epochs"], "scaling.timescale.unit"),
    (["scaling.batch.wd_rule=sometimes"], "scaling.batch.wd_rule"),
])
def test_bad_decay_rules_are_one_line_errors(tmp_path, args, needle):
    with pytest.raises(HptError, match=needle.replace(".", r"\.")):
        compose_run(args)
    assert_one_line_error(cli("train", *TINY, *args, "--run-dir", str(tmp_path / "x")), needle)


@pytest.mark.parametrize("k", [0.5, 4, 16, 64, 1000])
def test_sde_beta_rule_is_beta_to_the_k_and_stays_in_the_unit_interval(k):
    cfg = compose_run([f"train.batch_size={int(8 * k) if k >= 1 else 4}", "scaling.batch.base=8",
                       "scaling.batch.adam_rule=sde", "optim.beta1=0.9", "optim.beta2=0.99", "optim.eps=1e-8"])
    eff, record = apply_rules(cfg)
    k = record["batch_rule"]["k"]
    assert eff.optim.beta1 == pytest.approx(0.9**k) and eff.optim.beta2 == pytest.approx(0.99**k)
    assert 0 < eff.optim.beta1 < 1 and 0 < eff.optim.beta2 < 1  # Malladi's 1 - k(1 - beta) is <= 0 from k = 10
    assert eff.optim.eps == pytest.approx(1e-8 / k**0.5)
    # Equal to Malladi et al.'s first-order form for beta near 1.
    assert 0.9999**k == pytest.approx(1 - k * (1 - 0.9999), abs=(k * 1e-4) ** 2)


def test_without_decay_there_is_no_timescale():
    _, record = apply_rules(compose_run(["optim.weight_decay=0"]))
    assert record["wd_timescale"] is None and record["wd_power"] is None
