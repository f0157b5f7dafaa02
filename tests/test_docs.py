"""The README and docs/: every relative link resolves to an existing file, every #anchor to a heading of the file it
points into (GitHub's heading slugs), and docs/usage.md documents every flag the entry scripts accept."""
import glob
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def prose_lines(path):
    """The lines of a markdown file outside fenced code blocks (a '# comment' in a bash block is no heading)."""
    lines, fenced = [], False
    with open(path) as f:
        for line in f:
            if line.startswith("```"):
                fenced = not fenced
            elif not fenced:
                lines.append(line.rstrip("\n"))
    return lines


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    """Every anchor a file's headings define; a repeated heading gets -1, -2, ... as on GitHub."""
    seen, result = Counter(), set()
    for line in prose_lines(path):
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = slug(match.group(1))
            result.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
            seen[base] += 1
    return result


def links(path):
    return [target for line in prose_lines(path) for target in LINK.findall(line)
            if not re.match(r"[a-z]+:", target)]  # http:, https:, mailto: are not checked here


def broken_links(path):
    """'target (why)' for every relative link of `path` that does not resolve."""
    broken = []
    for target in links(path):
        file_part, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(resolved):
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading with that anchor)")
    return broken


def test_docs_exist_and_link_to_each_other():
    names = {os.path.relpath(p, ROOT) for p in DOCS}
    assert {"README.md", "docs/usage.md", "docs/results.md", "docs/text-to-image.md", "docs/design.md",
            "docs/method.md"} <= names
    readme_targets = {t.partition("#")[0] for t in links(os.path.join(ROOT, "README.md"))}
    assert {"docs/usage.md", "docs/results.md", "docs/text-to-image.md", "docs/design.md",
            "docs/method.md"} <= readme_targets


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(path):
    assert links(path), f"{path} has no relative link at all: the link pattern is wrong"
    assert broken_links(path) == []


def test_checker_reports_a_broken_file_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## A heading, with `code`\n\n```bash\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading-with-code) [gone](missing.md) [bad](other.md#not-a-heading)\n"
                    "[self](#page) [web](https://example.com/x)\n\n# Page\n")
    assert broken_links(str(page)) == ["missing.md (no such file)",
                                       "other.md#not-a-heading (no heading with that anchor)"]


ENTRY_SCRIPTS = ("quantize.py", "sample.py", "evaluate.py")


def accepted_flags(help_text):
    """The long options an argparse --help lists (option lines are indented by two spaces: '  -q, --quiet')."""
    return set(re.findall(r"^  (?:-\w, )?(--[a-z][\w-]*)", help_text, flags=re.M)) - {"--help"}


def documented_flags(usage_text, script):
    """The flags in the first column of the tables under '## <script>' in docs/usage.md (up to the next '## ')."""
    section = re.split(rf"^## {re.escape(script)}$", usage_text, maxsplit=1, flags=re.M)[1]
    section = re.split(r"^## ", section, maxsplit=1, flags=re.M)[0]
    first_cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {flag for cell in first_cells for flag in re.findall(r"`(--[a-z][\w-]*)", cell)}


def test_usage_documents_every_flag_of_every_entry_script():
    # --help of the real scripts, so that a flag added anywhere in their argument plumbing is seen
    procs = {s: subprocess.Popen([sys.executable, s, "--help"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for s in ENTRY_SCRIPTS}
    with open(os.path.join(ROOT, "docs", "usage.md")) as f:
        usage = f.read()
    for script, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{script} --help failed"
        flags = accepted_flags(out)
        assert len(flags) >= 5, f"{script} --help: no options parsed from {out[:200]!r}"
        assert sorted(flags - documented_flags(usage, script)) == [], f"flags of {script} missing in docs/usage.md"


def test_flag_parsers_on_a_known_help_and_table():
    help_text = "usage: x\n\noptions:\n  -h, --help  show\n  --steps STEPS  sampler steps; see --other\n" \
                "  -q, --quiet  quiet\n                        --not-an-option, named in wrapped help\n"
    assert accepted_flags(help_text) == {"--steps", "--quiet"}
    usage = "## a.py\n\n| `--steps`, `--seed` | 50 | uses `--x` |\n\n## b.py\n\n| `--quiet` | | |\n"
    assert documented_flags(usage, "a.py") == {"--steps", "--seed"}


OUTSIDE_NOTES = "METHOD" + ".md"  # design notes kept outside the repository (spelled in two parts: not a mention here)
TEXT_SUFFIXES = (".md", ".py", ".yaml", ".yml", ".sh", ".toml", ".txt")


def repository_files():
    """The tracked files (git ls-files), or every file outside .git when this is not a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [os.path.join(ROOT, p) for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        found = []
        for directory, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d != ".git"]
            found += [os.path.join(directory, f) for f in files]
        return found


def outside_references(paths):
    """'path:line' for every line of the text files among `paths` that cites the outside design notes."""
    hits = []
    for path in paths:
        if not path.endswith(TEXT_SUFFIXES) or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            hits += [f"{os.path.relpath(path, ROOT)}:{n}" for n, line in enumerate(f, 1) if OUTSIDE_NOTES in line]
    return hits


def test_nothing_cites_notes_outside_the_repository():
    # a reader of the repository cannot open them: cite docs/method.md (by section title in code) instead
    assert outside_references(repository_files()) == []


def test_outside_reference_check_finds_a_mention(tmp_path):
    (tmp_path / "a.py").write_text(f"# see {OUTSIDE_NOTES} section 3\n")
    (tmp_path / "b.md").write_text("see [method](docs/method.md#calibration)\n")
    assert [h.rsplit(os.sep, 1)[-1] for h in outside_references([str(tmp_path / "a.py"), str(tmp_path / "b.md")])] \
        == ["a.py:1"]
