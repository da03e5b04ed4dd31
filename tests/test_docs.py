"""The documentation stays true: generated pages are current, relative links resolve."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def markdown_files() -> list[Path]:
    return [REPO / "README.md"] + sorted((REPO / "docs").rglob("*.md"))


def prose(text: str) -> str:
    """The text outside fenced code blocks (inline code kept: links never sit in it)."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(line)
    return "\n".join(lines)


def strip_inline_code(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def relative_links(path: Path) -> list[str]:
    text = strip_inline_code(prose(path.read_text(encoding="utf-8")))
    return [
        target for target in LINK.findall(text)
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.relative_to(REPO)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
    return problems


def test_relative_links_resolve():
    problems = [p for path in markdown_files() for p in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_broken_link_is_caught(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## 1. The idea\n")
    page.write_text(
        "# Page\n\n[ok](other.md) [ok](other.md#1-the-idea) [self](#page)\n"
        "[missing](nowhere.md) [bad anchor](other.md#no-such)\n"
        "```\n[in code](ignored.md)\n```\n[web](https://example.com)\n"
    )
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        problems = broken_links(page)
    finally:
        REPO = saved
    assert problems == [
        "page.md: nowhere.md (no such file)",
        "page.md: other.md#no-such (no such heading)",
    ]


def test_no_mention_of_design_md():
    """docs/method.md replaces the out-of-repo DESIGN.md: no page may name it, except as
    the target of a link that resolves."""
    offenders = []
    for path in markdown_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for target in LINK.findall(line):
                file_part = target.partition("#")[0]
                if file_part and (path.parent / file_part).exists():
                    line = line.replace(f"({target})", "()")
            if "DESIGN.md" in line:
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "cite docs/method.md instead:\n" + "\n".join(offenders)


def test_config_reference_is_current():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "plugins")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "config_reference.py"), "--check"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.strip() or proc.stdout.strip()
