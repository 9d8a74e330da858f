"""The docs stay true: README.md is short, every launch/train.py flag that README.md and docs/*.md
name exists, and every relative link (and its #anchor, for Markdown targets) resolves."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*DOCS, ROOT / "benchmarks" / "RESULTS.md"]  # links are checked here too; flags only in DOCS

# Flags of the launchers that appear in bare `--flag` mentions beside launch/train.py's own.
LAUNCHER_FLAGS = {"--num_gpus", "--num_nodes", "--bind_cores_to_rank", "--master_port", "--master_addr", "--hostfile",
                  "--no_ssh", "--node_rank", "--nnodes", "--nproc_per_node", "--allow-run-as-root", "--oversubscribe"}
ENTRY = re.compile(r"launch/train\.py|dsee-train")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w.-]*")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
SPAN = re.compile(r"`([^`]+)`")


def flags_in(text: str) -> set[str]:
    return {f.rstrip(".-") for f in FLAG.findall(text)}


def train_flags_named(markdown: str) -> set[str]:
    """The flags a Markdown text gives launch/train.py: on command lines that run it (fenced or
    inline, continuation lines joined, comments dropped) the flags after it; in prose, bare
    `--flag ...` spans, less the launchers' flags."""
    named = set()
    for block in FENCE.finditer(markdown):
        for line in block.group(0).replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line)
            if entry := list(ENTRY.finditer(line)):
                named |= flags_in(line[entry[-1].end():])
    for span in SPAN.findall(FENCE.sub("", markdown)):
        span = " ".join(span.split())
        if entry := list(ENTRY.finditer(span)):
            named |= flags_in(span[entry[-1].end():])
        elif span.startswith("--"):
            named |= flags_in(span) - LAUNCHER_FLAGS
    return named


@pytest.fixture(scope="module")
def train_options() -> set[str]:
    from dsee_scale.config import config_parser

    return {option for action in config_parser()._actions for option in action.option_strings}


def test_readme_is_short_and_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"
    assert lines[2:6] == ["```bash", "make demo   # set up (first time only), then the built-in offline DSEE run on 2 ZeRO-3 ranks",
                          "make test   # set up (first time only), then the whole test suite", "```"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_train_flag_named_exists(doc, train_options):
    unknown = sorted(train_flags_named(doc.read_text()) - train_options)
    assert not unknown, f"{doc.name} names launch/train.py flags that do not exist: {unknown}"


def test_the_flag_check_sees_commands_continuations_and_bare_flags(train_options):
    text = ("```bash\ndeepspeed --num_gpus 2 launch/train.py --config r.yaml \\\n    --dsee.rank 4 --no_such_flag 1  # --in_a_comment\n"
            "python other.py --other_tool_flag\n```\n"
            "Prose: `--prune.bogus 0.5`, `deepspeed --num_gpus 2 --bind_cores_to_rank`, `bench_glue.py --jobs 2`,\n"
            "`torchrun launch/train.py --not_a\n  --real_flag`.\n")
    assert train_flags_named(text) == {"--config", "--dsee.rank", "--no_such_flag", "--prune.bogus", "--not_a", "--real_flag"}
    assert train_flags_named(text) - train_options == {"--no_such_flag", "--prune.bogus", "--not_a", "--real_flag"}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path):
    """The anchors of a Markdown file's headings (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", FENCE.sub("", path.read_text()), re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        yield base if count == 0 else f"{base}-{count}"


@pytest.mark.parametrize("doc", LINKED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(doc):
    prose = SPAN.sub("", FENCE.sub("", doc.read_text()))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in set(anchors(file)):
            broken.append(f"{target} (no such heading in {file.name})")
    assert not broken, f"{doc.name}: broken links: {broken}"
