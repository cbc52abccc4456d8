"""The documentation (mkdocs.yml, docs/, README.md) builds, and what it tells a user to type exists.

- `mkdocs build --strict` (what `./dev docs` runs): no broken link or anchor, no page missing from the
  nav or the nav naming a missing page; the configuration reference is generated from the schema.
- Every `kesi ...` line in a fenced block of the getting-started page (and of every other page and the
  README) parses with the real parser (`kesi_dist.cli.build_parser`, bare KEY=VALUE words as `kesi`
  takes them) and, where it names a config of the repository, that config loads with its overrides;
  every `./dev X` line names a command of the dev script (`./dev bench NAME`: a bench/NAME.py).
- Every file path (`tests/core/test_docs.py`, `methods/ekg/search.py`) and dotted name
  (`kesi_dist.models.build_model`) the pages and the README give exists in the repository.
- Nothing links outside the repository: no /work path, no ../shared.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from kesi_dist.cli import build_parser
from kesi_dist.config import load_config
from kesi_dist.methods import METHODS
from kesi_dist.schema import describe

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
GETTING_STARTED = DOCS / "getting-started.md"
OPERATORS = {"&&", "||", ";", "|", "&"}


def fenced_commands(text: str) -> list[list[str]]:
    """The shell commands of a Markdown text's fenced blocks, each as argv words: continuation lines
    joined, `# comments` dropped, `a && b; c | d` split into its commands."""
    commands, inside, pending = [], False, ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        try:
            words = shlex.split(pending + line, comments=True)
        except ValueError:  # not shell (a JSON or text block)
            words = []
        pending, current = "", []
        for w in [*words, ";"]:
            if w in OPERATORS:
                commands += [current] if current else []
                current = []
            else:
                current.append(w)
    return commands


def kesi_problem(argv: list[str]) -> str | None:
    """Why `kesi argv` would be refused before it runs (argparse, bare KEY=VALUE words as `kesi_dist.cli.main`
    takes them, then the config with its overrides), or None."""
    parser = build_parser()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # --version and --help exit 0 after printing
        return None if e.code == 0 else out.getvalue().strip().splitlines()[-1]
    sets = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in sets]
    if unknown or (sets and not hasattr(args, "overrides")):
        return f"unrecognized arguments: {' '.join(unknown or sets)}"
    config = getattr(args, "config", None)
    if config and config.startswith("configs/"):
        load_config(ROOT / config, [*args.overrides, *sets])  # a KesiError names the key
    return None


def dev_commands() -> set[str]:
    """The subcommands of the ./dev script's `case` (setup, test, ...)."""
    text = (ROOT / "dev").read_text()
    labels = re.findall(r"^  ([a-z|]+)\)", text[text.index('case "$cmd" in'):], flags=re.M)
    return {name for label in labels for name in label.split("|")}


def dev_problem(argv: list[str], known: set[str]) -> str | None:
    if not argv or argv[0] not in known:
        return f"./dev has no command {argv[:1]} (it has {sorted(known)})"
    if argv[0] == "bench" and not (ROOT / "bench" / f"{argv[1]}.py").is_file():
        return f"no bench/{argv[1]}.py"
    if argv[0] == "docs" and argv[1:2] not in ([], ["serve"]) and not argv[1].startswith("-"):
        return f"./dev docs takes `serve` or mkdocs flags, not {argv[1]!r}"
    return None


def check_commands(path: Path) -> tuple[list[str], int]:
    problems, seen, known = [], 0, dev_commands()
    for words in fenced_commands(path.read_text(encoding="utf-8")):
        if words[0] == "kesi":
            problem = kesi_problem(words[1:])
        elif words[0] == "./dev":
            problem = dev_problem(words[1:], known)
        else:
            continue
        seen += 1
        if problem:
            problems.append(f"{path.relative_to(ROOT)}: `{shlex.join(words)}`: {problem}")
    return problems, seen


def test_every_command_of_getting_started_is_a_real_command():
    problems, seen = check_commands(GETTING_STARTED)
    assert seen >= 15, f"{GETTING_STARTED.name}: only {seen} kesi/./dev commands found in its fenced blocks"
    assert not problems, "\n".join(problems)


@pytest.mark.slow  # configs of torchvision networks trace the network when they load: ~10 s
def test_every_command_of_every_page_and_the_readme_is_a_real_command():
    problems = [p for page in [*PAGES, ROOT / "README.md"] for p in check_commands(page)[0]]
    assert not problems, "\n".join(problems)


def test_the_command_check_catches_a_wrong_flag_key_and_script():
    assert kesi_problem(["run", "configs/kesi/quickstart.yaml", "--outptu", "x"])
    assert kesi_problem(["status"])  # its run argument is missing
    with pytest.raises(Exception, match="prune.iteratoins"):
        kesi_problem(["run", "configs/kesi/quickstart.yaml", "prune.iteratoins=3", "--output", "x"])
    assert kesi_problem(["run", "configs/kesi/quickstart.yaml", "prune.iterations=3", "--output", "x"]) is None
    assert dev_problem(["tset"], dev_commands()) and dev_problem(["bench", "nope"], dev_commands())
    assert fenced_commands("```bash\nkesi a \\\n  --b c  # d\nx && kesi e | f\n```\nkesi z\n") == \
        [["kesi", "a", "--b", "c"], ["x"], ["kesi", "e"], ["f"]]


def test_nothing_links_outside_the_repository():
    texts = {p: p.read_text(encoding="utf-8") for p in [*PAGES, *DOCS.rglob("*.py"), ROOT / "README.md",
                                                        ROOT / "mkdocs.yml"]}
    bad = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p, t in texts.items()
           for m in re.finditer(r"/work/\S*|\.\./shared\S*|\bshared/design\S*", t)]
    assert not bad, "the docs cite papers and public code, never files outside the repository:\n" + "\n".join(bad)
    readme = texts[ROOT / "README.md"]
    links = [m.group(1) for m in re.finditer(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", readme) if "://" not in m.group(1)]
    assert links, "README.md links into the docs"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


PATH = re.compile(r"[\w./<>{}-]*/[\w./<>{}-]*\.(?:py|yaml|yml|sh)\b")
DOTTED = re.compile(r"\bkesi_dist(?:\.\w+)+")


def missing_names(text: str) -> list[str]:
    """The repository paths and `kesi_dist.x.y` names of `text` that do not exist (placeholders such as
    `<run>/config.yaml` or `bench/NAME.py` left out). A path may be relative to the root or to kesi_dist/;
    a dotted name ends in a module, or in a name its module defines."""
    out = []
    for path in set(PATH.findall(text)):
        if re.search(r"[<>{}]|[A-Z]{3}|^/|^\.", path) or path.startswith(("site/", "runs/", "data/")):
            continue
        if not ((ROOT / path).exists() or (ROOT / "kesi_dist" / path).exists()):
            out.append(path)
    for name in set(DOTTED.findall(text)):
        parts, found = name.split("."), False
        for i in range(len(parts), 0, -1):
            base = ROOT.joinpath(*parts[:i])
            module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
            if module.is_file():
                rest = parts[i:]
                found = not rest or (len(rest) == 1 and re.search(
                    rf"^(?:def|class) {rest[0]}\b|^{rest[0]}\b.*=|\b{rest[0]}\b.*import|import.*\b{rest[0]}\b",
                    module.read_text(encoding="utf-8"), flags=re.M) is not None)
                break
        out += [] if found else [name]
    return sorted(out)


def test_every_path_and_module_the_docs_name_exists():
    bad = {str(p.relative_to(ROOT)): m for p in [*PAGES, ROOT / "README.md"]
           if (m := missing_names(p.read_text(encoding="utf-8")))}
    assert not bad, f"the docs name files or modules that do not exist (renamed?): {bad}"
    assert missing_names("`methods/ekg/nope.py`, kesi_dist.models.nope, tests/core/test_docs.py, "
                         "kesi_dist.models.build_model") == ["kesi_dist.models.nope", "methods/ekg/nope.py"]


def layout_problems(text: str) -> list[str]:
    """The files and folders of docs/layout.md's tree (its first fenced block) that do not exist: each
    entry where its indentation puts it, and each `name.py` its description names in the entry's folder."""
    problems, stack, folder = [], [], ROOT
    for line in text.split("```")[1].splitlines()[1:]:
        m = re.match(r"^( *)(\S+)(.*)$", line)
        if not m:
            continue
        indent, entry, rest = len(m.group(1)), m.group(2).rstrip(","), m.group(3)
        if indent < 16:  # an entry (a continuation line is indented to the descriptions' column)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            base = stack[-1][1] if stack else ROOT
            if "<" not in entry and not (base / entry).exists():
                problems.append(str((base / entry).relative_to(ROOT)))
            folder = base / entry if entry.endswith("/") else base
            if entry.endswith("/"):
                stack.append((indent, folder))
        else:
            rest = line
        problems += [str((folder / name).relative_to(ROOT)) for name in re.findall(r"\b\w+\.py\b", rest)
                     if not (folder / name).exists()]
    return problems


def test_the_layout_page_names_the_modules_as_they_are():
    text = (DOCS / "layout.md").read_text(encoding="utf-8")
    assert not layout_problems(text), f"docs/layout.md names what does not exist: {layout_problems(text)}"
    assert layout_problems("```\nkesi_dist/\n  nope.py    x\n  train/    loop.py, gone.py\n```") == \
        ["kesi_dist/nope.py", "kesi_dist/train/gone.py"]


def _hook():
    spec = importlib.util.spec_from_file_location("config_reference", DOCS / "hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_reference_is_the_describe_text():
    """Every line `kesi config --describe` prints, for every method, is on the page as printed."""
    hook = _hook()
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert hook.MARKER in page
    text = hook.on_page_markdown(page, None, None, None)
    for name in METHODS:
        lines = describe(load_config(None, [f"method.name={name}"])).splitlines()
        missing = [line for line in lines if f"\n{line}\n" not in text]
        assert not missing, f"method {name}: describe lines not on the page: {missing[:3]}"


@pytest.mark.slow  # mkdocs and the Material theme: ~4 s
def test_the_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    html = (site / "configuration" / "index.html").read_text(encoding="utf-8")
    assert "kesi config --describe --&gt;" not in html and "kesi config --describe -->" not in html
    assert all(f"method.name: {name}" in html for name in METHODS)
    assert (site / "getting-started" / "index.html").is_file() and (site / "methods" / "swp" / "index.html").is_file()
