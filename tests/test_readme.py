"""The README tells the truth: its commands, flags, files, recipe block, plan table and timings."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CODE_SPANS = re.findall(r"```(?:bash|text|yaml|python)?\n(.*?)```", README, re.S) + re.findall(r"`([^`\n]+)`", README)
COMMAND = re.compile(r"(?:python -m|-m) (multimodal_lora(?:\.\w+)*)([^\n&;#|]*)|python (demo/app\.py)([^\n&;#]*)")
TOP_DIRS = ("multimodal_lora/", "recipes/", "bench/", "docs/", "demo/", "examples/", "tests/")


def commands() -> list[tuple[str, str]]:
    """(module, the rest of its command line) for every command the README shows."""
    found = []
    for span in CODE_SPANS:
        for m in COMMAND.finditer(span):
            module = m.group(1) or "multimodal_lora.demo"
            found.append((module, (m.group(2) if m.group(1) else m.group(4)) or ""))
    return found


def help_text(module: str, sub: str | None) -> str:
    # `python -m multimodal_lora.X` runs the command multimodal_lora.commands.X
    main = importlib.import_module("multimodal_lora.commands." + module.removeprefix("multimodal_lora.")).main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*([sub] if sub else []), "--help"])
    return out.getvalue()


def test_readme_fits_a_page():
    assert len(README.splitlines()) <= 420


def test_every_command_is_a_module_and_its_flags_exist():
    seen = commands()
    assert len({m for m, _ in seen}) >= 8, seen
    for module, rest in seen:
        spec = importlib.util.find_spec(module)
        assert spec is not None, module
        if spec.submodule_search_locations:  # a package runs through its __main__
            assert importlib.util.find_spec(module + ".__main__") is not None, module
        flags = re.findall(r"(?<![\w-])--[a-z][\w-]*", rest)
        if not flags:
            continue
        words = rest.split()
        sub = words[0] if module in ("multimodal_lora.cache", "multimodal_lora.data") and words and not words[0].startswith("-") else None
        accepted = set(re.findall(r"--[a-z][\w-]*", help_text(module, sub)))
        for flag in flags:
            assert flag in accepted, f"{module} {sub or ''}: {flag} is not accepted"


def test_every_repository_path_exists_and_docs_links_resolve():
    paths = {s.strip() for s in re.findall(r"`([^`\s]+)`", README) if s.startswith(TOP_DIRS) and not re.search(r"[A-Z]{3,}", s)}  # NAME: a placeholder
    paths |= set(re.findall(r"\]\(((?:docs|demo)/[^)#]+)", README))
    paths |= set(re.findall(r"python ((?:bench|demo)/[\w/]+\.py)", README))  # scripts it says to run
    assert any(p.startswith("docs/") for p in paths) and {"demo/screenshot.png", "demo/make_screenshot.py"} <= paths
    for path in paths:
        assert (REPO / path.rstrip("/")).exists(), path
    for doc in ("performance", "serving", "training", "data", "adapters"):
        assert f"](docs/{doc}.md)" in README, doc


def test_the_recipe_block_is_recipes_tiny_yaml():
    blocks = re.findall(r"```yaml\n(.*?)```", README, re.S)
    shown = [yaml.safe_load(b) for b in blocks if b.startswith("output_dir: runs/tiny ")]
    assert shown == [yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())]


def test_the_football_plan_table_is_what_plan_prints(capsys):
    from multimodal_lora.commands.train import main

    main([str(REPO / "recipes" / "football.yaml"), "--plan"])
    printed = capsys.readouterr().out
    table = re.search(r"```text\n(memory .*?)```", README, re.S).group(1).strip()
    assert table in printed, printed


def test_every_timing_comes_from_a_named_dated_bench_result():
    timing = re.compile(r"\b\d[\d,]*(?:\.\d+)? ?(?:s|ms|CPU s|seconds|minutes|min)\b(?!\w)")
    checked = 0
    for paragraph in README.split("\n\n"):
        if paragraph.startswith("```"):
            continue
        # A stated target is not a measurement ("target: under 5 minutes").
        numbers = [m for m in timing.finditer(paragraph) if "target:" not in paragraph[max(0, m.start() - 20): m.start()]]
        if not numbers:
            continue
        names = re.findall(r"bench/results/(\w+)\.json", paragraph)
        assert names, f"a timing without its bench result file: {paragraph[:200]}"
        data = json.loads((REPO / "bench" / "results" / f"{names[0]}.json").read_text())
        assert data["date"] in paragraph, f"the result's date {data['date']} is not stated: {paragraph[:200]}"
        values = set(re.findall(r"\d+(?:\.\d+)?", json.dumps(data)))
        for m in numbers:
            value = re.match(r"[\d,.]+", m.group()).group().replace(",", "")
            assert value in values or value.rstrip("0").rstrip(".") in values, f"{m.group()} is not in {names[0]}.json"
            checked += 1
    assert checked >= 4


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", markdown, re.M)}


def test_links_between_the_readme_and_docs_resolve_to_files_and_headings():
    checked = 0
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: link to {target}: no such file"
            if anchor:
                assert anchor in _anchors(file.read_text()), f"{page.name}: link to {target}: no such heading"
            checked += 1
    assert checked >= 10
