"""The docs hold together: the formula-to-code map lands on its code, every relative link resolves,
and every reference from the code to a docs section names a heading that exists.

A reviewer audits the science by following docs/science.md's map to the lines it names; code
comments point readers to docs sections by anchor. A refactor that moves a formula, renames a
file or retitles a section must update the link, or these tests name the stale one.
"""

import contextlib
import io
import re
from pathlib import Path

from tests.conftest import REPO

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]

# Each link of science.md's formula-to-code map, in map order, and what the lines it points at hold.
EXPECTED = [
    ("hptransfer/train/param.py", "PRESETS"),
    ("hptransfer/train/param.py", "def shifted"),
    ("hptransfer/train/param.py", "_MUP_EVERETT.E.shifted(0.5)"),
    ("hptransfer/train/param.py", "m = shape[dim] / base[dim]"),
    ("hptransfer/train/param.py", 'alignment == "none" and abc.c_none'),
    ("hptransfer/train/param.py", "rules.constant_init else abc.b"),
    ("hptransfer/train/param.py", "p.zero_readout"),
    ("hptransfer/train/param.py", "lr * gamma * m ** (-lr_exponent("),
    ("hptransfer/train/param.py", "eps = rules.eps * m ** (-abc.g)"),
    ("hptransfer/train/param.py", "out *= m_depth ** (-depth_lr)"),
    ("hptransfer/train/param.py", "eps *= rules.m_depth ** (-rules.alpha)"),
    ("hptransfer/train/param.py", "m ** (-abc.a)"),
    ("hptransfer/train/model.py", "scaled(y, self.mult)"),
    ("hptransfer/train/model.py", "scaled(self.tok_emb(idx), self.emb_mult)"),
    ("hptransfer/train/param.py", "m_depth ** -exponent"),
    ("hptransfer/train/model.py", "scaled(self.attn(self.norm1(x), rope), self.res_mult)"),
    ("hptransfer/train/param.py", "math.sqrt(base_head_dim) / head_dim"),
    ("hptransfer/train/model.py", "attention_scale(uses_mup_attention(cfg)"),
    ("hptransfer/train/parameterization.py", "def attn_scale"),
    ("hptransfer/train/param.py", 'rules.wd_mode == "scaled"'),
    ("hptransfer/train/parameterization.py", 'return "E", f"raw parameter of'),
    ("hptransfer/train/parameterization.py", "register_forward_pre_hook"),
    ("hptransfer/train/parameterization.py", "mult = readout_mult if at_readout"),
    ("hptransfer/train/optim.py", 'wd_mode == "independent"'),
    ("hptransfer/train/optim.py", 'g["base_lr"] * factor'),
    ("hptransfer/train/optim.py", "torch.atan2(m_hat"),
    ("hptransfer/train/param.py", "OPTIMIZER_LR: dict["),
    ("hptransfer/train/optim.py", "torch.sign(m * beta1 + p.grad * (1 - beta1))"),
    ("hptransfer/train/optim.py", 'p.mul_(1 - g["lr"] * wd)'),
    ("hptransfer/train/optim.py", 'g["muon"] = g["cls"] == "H"'),
    ("hptransfer/train/rules.py", "def apply_rules"),
    ("hptransfer/train/rules.py", "def timescale_factor"),
    ("hptransfer/config/derived.py", "12 * n_layers * width * seq_len * tokens"),
    ("hptransfer/config/derived.py", "tokens = max(1, round(ratio * n))"),
]
MAP_SECTION = "## The formula-to-code map"
CODE_LINK = re.compile(r"\]\(\.\./(hptransfer/[\w/]+\.py)#L(\d+)(?:-L(\d+))?\)")
LINK = re.compile(r"\]\(([^()\s]+)\)")  # the target of [text](target) and ![alt](target)
LINE_ANCHOR = re.compile(r"L(\d+)(?:-L(\d+))?")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
# A reference from code to a docs page and, usually, one of its sections: docs/design.md#job-states
CODE_REF = re.compile(r"\bdocs/([\w-]+\.md)(?:#([\w-]+))?")
CODE_FILES = ["hptransfer/**/*.py", "hptransfer/**/*.yaml", "bench/*.py", "tests/*.py", "conf/*.yaml", "Makefile"]

SCIENCE_SECTIONS = ["Notation", "The abc table", "Depth", "Weight decay", "Optimizers",
                    "Batch size and duration rules", "The coordinate check", "Your own model",
                    "From a sweep to an answer", "The formula-to-code map", "Choices and disagreements", "Sources"]
ANSWER_SUBSECTIONS = ["Optimum at one scale", "Transfer laws", "Transfer metrics"]
DESIGN_SECTIONS = ["The pipeline", "Layers and imports", "Configuration", "The sweep folder", "result.json",
                   "results.parquet", "summary.json", "Backends", "Runners", "Job states"]


# ---- helpers -----------------------------------------------------------------------------------------


def prose(text: str) -> str:
    """Markdown without its fenced code blocks (a `# comment` in a bash block is no heading)."""
    return FENCE.sub("", text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped but - and _, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(text: str, level: int | None = None) -> list[str]:
    return [h for hashes, h in HEADING.findall(prose(text)) if level is None or len(hashes) == level]


def slugs(text: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for h in headings(text):
        slug = github_slug(h)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def link_problems(page: Path) -> list[str]:
    """Relative links of a markdown page that do not resolve: missing file, line range past the
    file's end, or a #section that is not a heading of the target page."""
    problems = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(REPO) if page.is_relative_to(REPO) else page}: ({target})"
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if not anchor:
            continue
        lines = LINE_ANCHOR.fullmatch(anchor)
        if lines:
            first, last = int(lines[1]), int(lines[2] or lines[1])
            n = len(dest.read_text().splitlines()) if dest.is_file() else 0
            if not 1 <= first <= last <= n:
                problems.append(f"{where}: lines {first}-{last} outside the file's {n}")
        elif dest.suffix != ".md" or anchor not in slugs(dest.read_text()):
            problems.append(f"{where}: no heading with the anchor #{anchor}")
    return problems


def map_problems(science: str, expected: list[tuple[str, str]]) -> list[str]:
    """The map's code links against `expected`: same files in the same order, and each link's
    lines holding its snippet."""
    start = science.index(MAP_SECTION)
    end = science.find("\n## ", start + 1)
    links = CODE_LINK.findall(science[start:end if end != -1 else None])
    if [f for f, *_ in links] != [f for f, _ in expected]:
        return [f"the map links {[f for f, *_ in links]}, EXPECTED says {[f for f, _ in expected]}: update EXPECTED"]
    problems = []
    for (path, first, last), (_, snippet) in zip(links, expected, strict=True):
        file = REPO / path
        lines = file.read_text().splitlines() if file.exists() else []
        a, b = int(first), int(last or first)
        if not (b <= len(lines) and snippet in "\n".join(lines[a - 1:b])):
            problems.append(f"{path}#L{a}-L{b} no longer holds {snippet!r}")
    return problems


def code_ref_problems(text: str, where: str) -> list[str]:
    """References such as docs/science.md#depth in code that name a missing page or section."""
    problems = []
    for page, anchor in CODE_REF.findall(text):
        dest = DOCS / page
        if not dest.exists():
            problems.append(f"{where}: docs/{page} does not exist")
        elif anchor and anchor not in slugs(dest.read_text()):
            problems.append(f"{where}: docs/{page} has no section #{anchor}")
    return problems


# ---- the docs ----------------------------------------------------------------------------------------


def test_every_formula_link_lands_on_its_code():
    assert map_problems((DOCS / "science.md").read_text(), EXPECTED) == []


def test_every_relative_link_resolves():
    assert len(PAGES) >= 3, PAGES
    assert [p for page in PAGES for p in link_problems(page)] == []


def test_every_docs_reference_in_the_code_names_a_section():
    files = sorted({f for pattern in CODE_FILES for f in REPO.glob(pattern) if f.is_file()})
    assert any(f.suffix == ".py" for f in files)
    problems = [p for f in files for p in code_ref_problems(f.read_text(), str(f.relative_to(REPO)))]
    assert problems == []


def test_science_and_design_keep_the_sections_code_links_to():
    science = (DOCS / "science.md").read_text()
    assert headings(science, 2) == SCIENCE_SECTIONS
    answer = science[science.index("## From a sweep to an answer"):science.index(MAP_SECTION)]
    assert headings(answer, 3) == ANSWER_SUBSECTIONS
    assert headings((DOCS / "design.md").read_text(), 2) == DESIGN_SECTIONS


def test_the_readme_is_a_first_page_with_the_two_setup_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 20_000
    setup = readme[readme.index("## Set up a fresh machine"):]
    block = setup[setup.index("```bash"):setup.index("```", setup.index("```bash") + 3)]
    commands = [line.split("#")[0].strip() for line in block.splitlines()[1:]]
    assert commands == ["make install && make demo", "make test"]


# ---- the checks themselves catch what they are for -------------------------------------------------


def test_slugs_are_githubs():
    assert github_slug("result.json") == "resultjson"
    assert github_slug("Batch size and duration rules") == "batch-size-and-duration-rules"
    assert github_slug("Sweeps: `hpt sweep`, `hpt status`") == "sweeps-hpt-sweep-hpt-status"
    assert github_slug("The formula-to-code map") == "the-formula-to-code-map"
    assert slugs("# A\n## A\n```\n# not a heading\n```\n## B_c\n") == {"a", "a-1", "b_c"}


def test_broken_links_are_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("a = 1\nb = 2\n")
    (tmp_path / "docs" / "other.md").write_text("# Other\n## Depth\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n"
        "[ok](other.md#depth) [ok](#page) [ok](../src/code.py#L1-L2) [web](https://x.org/a#b) [ok](other.md)\n"
        "[gone](nothing.md) [section](other.md#no-such-section) [self](#nope)\n"
        "[past](../src/code.py#L2-L3) [into code](../src/code.py#a) ![img](demo/missing.png)\n"
        "```\n[in a code block](not-checked.md)\n```\n"
    )
    problems = link_problems(page)
    assert len(problems) == 6, problems
    for needle in ("(nothing.md): no such file", "#no-such-section", "#nope", "lines 2-3 outside the file's 2",
                   "(../src/code.py#a): no heading", "demo/missing.png"):
        assert any(needle in p for p in problems), (needle, problems)


def test_stale_map_links_are_reported():
    science = (DOCS / "science.md").read_text()
    shifted = CODE_LINK.sub(lambda m: m[0].replace(f"#L{m[2]}", f"#L{int(m[2]) + 400}", 1), science, count=1)
    assert shifted != science
    assert any("no longer holds 'PRESETS'" in p for p in map_problems(shifted, EXPECTED))
    assert map_problems(science, EXPECTED[1:]) and "update EXPECTED" in map_problems(science, EXPECTED[1:])[0]


def test_stale_code_references_are_reported():
    page, good = "science" + ".md", "depth"  # built, not written out: the scan above would read it
    assert code_ref_problems(f"see docs/{page}#{good}", "x") == []
    assert code_ref_problems(f"see docs/{page}#not-a-section", "x") == [f"x: docs/{page} has no section #not-a-section"]
    missing = "nowhere" + ".md"
    assert code_ref_problems(f"see docs/{missing}#depth", "x") == [f"x: docs/{missing} does not exist"]


def refresh_map_anchors() -> list[str]:
    """Move each stale link of the map to where its snippet now is (keeping the range's length and the
    snippet's place in it, as HEAD had them); returns what moved. For maintainers, after moving code:
    `python -m tests.test_docs`. The test above still checks every link lands on its snippet."""
    page = DOCS / "science.md"
    text = page.read_text()
    start = text.index(MAP_SECTION)
    end = text.index("\n## ", start + 1)
    section, pieces, pos, moved = text[start:end], [], 0, []
    for m, (path, snippet) in zip(CODE_LINK.finditer(section), EXPECTED, strict=True):
        a, b = int(m.group(2)), int(m.group(3) or m.group(2))
        lines = (REPO / path).read_text().splitlines()
        na, nb = a, b
        if snippet not in "\n".join(lines[a - 1:b]):
            offset = _offset_in_history(path, a, b, snippet)
            hits = [i + 1 for i, line in enumerate(lines) if snippet in line]
            na = min(hits, key=lambda i: abs(i - offset - a)) - offset  # the occurrence nearest the old place
            nb = na + b - a
            moved.append(f"{path}: {snippet!r} L{a} -> L{na}")
        old_anchor, new_anchor = (f"L{a}-L{b}", f"L{na}-L{nb}") if m.group(3) else (f"L{a}", f"L{na}")
        label = section.rfind("[", 0, m.start())  # the visible label names the lines too
        pieces.append(section[pos:label] + section[label:m.start()].replace(old_anchor, new_anchor)
                      + f"](../{path}#{new_anchor})")
        pos = m.end()
    page.write_text(text[:start] + "".join(pieces) + section[pos:] + text[end:])
    return moved


def _offset_in_history(path: str, a: int, b: int, snippet: str) -> int:
    """Where in lines a..b the snippet stood, in the latest commit of `path` whose a..b held it (else 0)."""
    import subprocess  # here: only the maintainers' refresh runs git

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout

    for commit in git("rev-list", "-n", "30", "HEAD", "--", path).split():
        old = git("show", f"{commit}:{path}").splitlines()[a - 1:b]
        for i, line in enumerate(old):
            if snippet in line:
                return i
    return 0


if __name__ == "__main__":
    print("\n".join(refresh_map_anchors()) or "every link of the map lands on its snippet")


def test_the_readmes_library_example_runs(monkeypatch):
    """The README's ten lines of the library, run as written (on examples/custom_lm's model)."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("```python", readme.index("## Your model, your trainer"))
    code = readme[start + len("```python"):readme.index("```", start + 3)]
    monkeypatch.syspath_prepend(str(REPO / "examples" / "custom_lm"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example
    assert "lm_head" in out.getvalue() or "wte" in out.getvalue()
