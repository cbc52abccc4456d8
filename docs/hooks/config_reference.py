"""MkDocs hook: the configuration reference is `kesi config --describe`, generated when the site is built.

A page holding the marker line gets, in its place, the text `kesi_dist.schema.describe` prints for every
method's defaults (`kesi config --describe --set method.name=NAME`): the common sections once, then each
method's own keys. Grouped under one heading per section so the page's table of contents finds a key;
every line is the command's line, unchanged, so the page cannot drift from the schema.
"""

from __future__ import annotations

from kesi_dist.config import load_config
from kesi_dist.methods import METHODS
from kesi_dist.schema import describe

MARKER = "<!-- kesi config --describe -->"


def _sections(text: str, depth: int) -> dict[str, list[str]]:
    """Lines of `describe` output grouped by the first `depth` parts of their dotted key, in order; a key
    with no more parts than that (a scalar such as `seed` or `method.target_macs_ratio`) goes to its parent."""
    groups: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split(":", 1)[0].split(".")
        groups.setdefault(".".join(parts[:depth] if len(parts) > depth else parts[:depth - 1]), []).append(line)
    return groups


def _block(lines: list[str]) -> str:
    return "```yaml\n" + "\n".join(lines) + "\n```\n"


def reference() -> str:
    """The generated Markdown: common sections, then one part per registered method."""
    out = ["## Common sections\n", "`kesi config --describe` (the defaults of `method.name: kesi`; these keys "
           "are the same for every method).\n"]
    described = {name: describe(load_config(None, [f"method.name={name}"])) for name in METHODS}
    for section, lines in _sections(described[next(iter(METHODS))], 1).items():
        if section != "method":
            out += [f"### `{section}`\n" if section else "### Top-level keys\n", _block(lines)]
    for name, text in described.items():
        summary = METHODS[name].summary
        out += [f"## `method.name: {name}`\n", f"{summary[:1].upper()}{summary[1:]}. "
                f"`kesi config --describe --set method.name={name}`, the method's own keys:\n"]
        for section, lines in _sections(text, 2).items():
            if section.startswith("method"):
                out += [f"### `{section}` ({name})\n", _block(lines)]
    return '<div class="config-reference" markdown>\n\n' + "\n".join(out) + "\n</div>\n"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs' hook signature)
    return markdown.replace(MARKER, reference()) if MARKER in markdown else markdown
