"""The README's map from SCIENCE.md's formulas to code: every link must land on the line it names.

A reviewer audits the science by following these links; a refactor that moves a formula must move
its link too, or this test names the stale one.
"""

import re

from tests.conftest import REPO

# Each link of the map, in README order, and what the lines it points at must contain.
EXPECTED = [
    ("hptransfer/train/param.py", "PRESETS"),
    ("hptransfer/train/param.py", "def shifted"),
    ("hptransfer/train/param.py", "_MUP_EVERETT.E.shifted(0.5)"),
    ("hptransfer/train/param.py", "m = shape[1] / base[1]"),
    ("hptransfer/train/param.py", 'p.alignment == "none"'),
    ("hptransfer/train/param.py", 'cfg.init.scheme == "constant"'),
    ("hptransfer/train/param.py", "p.zero_readout"),
    ("hptransfer/train/param.py", "lr = o.lr * p.lr_mult[cls] * m ** (-c)"),
    ("hptransfer/train/param.py", "eps = o.eps * m ** (-abc.g)"),
    ("hptransfer/train/param.py", "lr *= m_depth ** (alpha - 1)"),
    ("hptransfer/train/param.py", "m ** (-abc.a)"),
    ("hptransfer/train/model.py", "y * self.mult"),
    ("hptransfer/train/model.py", "self.tok_emb(idx) * self.emb_mult"),
    ("hptransfer/train/param.py", "** -depth_alpha(cfg)"),
    ("hptransfer/train/model.py", "self.res_mult * self.attn"),
    ("hptransfer/train/model.py", "math.sqrt(base.head_dim) / d.head_dim"),
    ("hptransfer/train/param.py", 'o.wd_mode == "scaled"'),
    ("hptransfer/train/optim.py", 'wd_mode == "independent"'),
    ("hptransfer/train/optim.py", 'g["base_lr"] * factor'),
    ("hptransfer/train/optim.py", "torch.atan2(m_hat"),
    ("hptransfer/train/rules.py", "o.lr *= r**d.lr_exponent"),
    ("hptransfer/train/loop.py", "12 * n_layers * width * seq_len * tokens"),
]
LINK = re.compile(r"\]\((hptransfer/[\w/]+\.py)#L(\d+)(?:-L(\d+))?\)")


def test_every_formula_link_lands_on_its_code():
    text = (REPO / "README.md").read_text()
    start = text.index("## The science, mapped to the code")
    links = LINK.findall(text[start:text.index("\n## ", start + 1)])
    assert [f for f, *_ in links] == [f for f, _ in EXPECTED], "the map's links changed: update EXPECTED"
    for (path, first, last), (_, snippet) in zip(links, EXPECTED, strict=True):
        lines = (REPO / path).read_text().splitlines()
        a, b = int(first), int(last or first)
        assert b <= len(lines) and snippet in "\n".join(lines[a - 1:b]), f"{path}#L{a}-L{b} no longer holds {snippet!r}"
