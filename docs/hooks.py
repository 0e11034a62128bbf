"""MkDocs hooks: pages that are generated from the code at build time, so they cannot drift from it.

Registered in `mkdocs.yml` under `hooks:`. A page asks for a generated block with an HTML comment on a line of its
own; the comment is replaced when the page's Markdown is read:

- `<!-- opd:config-fields -->`: every field `OPDConfig` adds over `trl.DistillationConfig` (name, type, default,
  allowed values, help), from `dataclasses.fields` and each field's `metadata["help"]`;
- `<!-- opd:config-overrides -->`: inherited fields whose default `OPDConfig` changes;
- `<!-- opd:error-index -->`: every `raise` of a bad-input error (`ValueError`, `TypeError`, `NonFiniteLossError`)
  in `trl_opd/`, found by parsing the source, with its module, function and message template.

It also turns the Hugging Face doc-builder cross-references some docstrings use, `[`OPDTrainer`]`, into links (or,
for unknown names, plain code) on the rendered pages, so they do not show as literal brackets.
"""

from __future__ import annotations

import ast
import dataclasses
import html
import re
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trl_opd"
TRL_CONFIG_URL = "https://huggingface.co/docs/trl/distillation_trainer"
ERROR_TYPES = ("ValueError", "TypeError", "NonFiniteLossError")
MARKERS = {
    "<!-- opd:config-fields -->": lambda: config_fields_table(),
    "<!-- opd:config-overrides -->": lambda: config_overrides_table(),
    "<!-- opd:error-index -->": lambda: error_index(),
}
CODE_SPAN = re.compile(r"`([^`]+)`")
HF_REFERENCE = re.compile(r"\[<code>([\w.~]+)</code>\]")
REFERENCE_TARGETS = {
    "OPDConfig": "api.md#trl_opd.OPDConfig",
    "OPDTrainer": "api.md#trl_opd.OPDTrainer",
    "trl.DistillationConfig": "https://huggingface.co/docs/trl/distillation_trainer",
    "trl.DistillationTrainer": "https://huggingface.co/docs/trl/distillation_trainer",
}


def inline(text: str) -> str:
    """Plain help text with `backtick` spans, as escaped HTML with <code> spans."""
    parts = CODE_SPAN.split(text)
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


def code(text: str) -> str:
    return f"<code>{html.escape(text)}</code>"


@lru_cache(maxsize=1)
def config_classes():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from trl import DistillationConfig

    from trl_opd.config import OPDConfig

    return OPDConfig, DistillationConfig


def added_fields() -> list[dataclasses.Field]:
    """The dataclass fields of `OPDConfig` that `DistillationConfig` does not have, in declaration order."""
    opd, distillation = config_classes()
    inherited = {f.name for f in dataclasses.fields(distillation)}
    return [f for f in dataclasses.fields(opd) if f.name not in inherited]


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _render_default(value: object) -> str:
    return "required" if value is dataclasses.MISSING else code(repr(value))


def _type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def config_fields_table() -> str:
    rows = []
    for f in added_fields():
        choices = f.metadata.get("choices")
        values = ", ".join(code(repr(c)) for c in choices) if choices else ""
        help_text = f.metadata.get("help")
        if not help_text:
            raise ValueError(f"OPDConfig.{f.name} has no metadata['help']: the config page would document nothing.")
        rows.append(
            f'<tr id="field-{f.name}"><td><a href="#field-{f.name}">{code(f.name)}</a></td>'
            f"<td>{code(_type_name(f))}</td><td>{_render_default(_default(f))}</td><td>{values}</td>"
            f"<td>{inline(help_text)}</td></tr>"
        )
    return (
        '<table class="opd-config">\n<thead><tr><th>field</th><th>type</th><th>default</th><th>values</th>'
        "<th>meaning</th></tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"
    )


def config_overrides_table() -> str:
    """Inherited fields that `OPDConfig` redeclares with another default."""
    opd, distillation = config_classes()
    parent = {f.name: f for f in dataclasses.fields(distillation)}
    own = set(vars(opd).get("__annotations__", {}))
    rows = []
    for f in dataclasses.fields(opd):
        if f.name not in parent:
            continue
        before, after = _default(parent[f.name]), _default(f)
        if f.name in own or before != after:
            rows.append(
                f'<tr id="field-{f.name}"><td>{code(f.name)}</td><td>{_render_default(before)}</td>'
                f"<td>{_render_default(after)}</td><td>{inline(f.metadata.get('help', ''))}</td></tr>"
            )
    if not rows:
        return "<p><code>OPDConfig</code> keeps every inherited default.</p>"
    return (
        '<table class="opd-config">\n<thead><tr><th>field</th><th>DistillationConfig default</th>'
        "<th>OPDConfig default</th><th>why</th></tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"
    )


# ------------------------------------------------------------------------------------------------ error index


def _message(node: ast.expr | None, source: str) -> str:
    """The message template of an exception constructor argument: f-string placeholders kept as `{expr}`."""
    if node is None:
        return ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        out = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                out.append(str(value.value))
            else:  # FormattedValue
                out.append("{" + (ast.get_source_segment(source, value.value) or "…") + "}")
        return "".join(out)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _message(node.left, source) + _message(node.right, source)
    return "{" + (ast.get_source_segment(source, node) or "…") + "}"


class _RaiseFinder(ast.NodeVisitor):
    def __init__(self, source: str) -> None:
        self.source = source
        self.scope: list[str] = []
        self.found: list[tuple[str, str, int, str]] = []

    def _visit_scope(self, node) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _visit_scope

    def visit_Raise(self, node: ast.Raise) -> None:
        exc = node.exc
        if isinstance(exc, ast.Call) and isinstance(exc.func, ast.Name) and exc.func.id in ERROR_TYPES:
            message = _message(exc.args[0] if exc.args else None, self.source)
            self.found.append((exc.func.id, ".".join(self.scope) or "<module>", node.lineno, message))
        self.generic_visit(node)


def raised_errors() -> list[tuple[str, str, str, int, str]]:
    """(module, exception, scope, line, message template) for every bad-input `raise` in `trl_opd/`."""
    errors = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        finder = _RaiseFinder(source)
        finder.visit(ast.parse(source))
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        errors.extend((module, exc, scope, line, message) for exc, scope, line, message in finder.found)
    return errors


def error_index() -> str:
    rows = [
        f"<tr><td>{code(exc)}</td><td>{code(module)}<br>{code(scope)}</td><td>{inline(message)}</td></tr>"
        for module, exc, scope, _, message in raised_errors()
    ]
    return (
        '<table class="opd-errors">\n<thead><tr><th>raises</th><th>where</th><th>message ({placeholders} are filled '
        "in at run time)</th></tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"
    )


# ------------------------------------------------------------------------------------------------ mkdocs events


def on_page_markdown(markdown: str, page, config, files) -> str:
    for marker, render in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown


def on_page_content(html_text: str, page, config, files) -> str:
    def link(match: re.Match) -> str:
        name = match.group(1).lstrip("~")
        target = REFERENCE_TARGETS.get(name.removeprefix("trl_opd."))
        if target is None:
            return f"<code>{name}</code>"
        if not target.startswith("http"):  # a page of this site, relative to the current page's URL
            page_path, anchor = target.split("#")
            here = page.file.src_uri
            target = ("" if here == page_path else "../" * page.url.count("/") + page_path[:-3] + "/") + "#" + anchor
        return f'<a href="{target}"><code>{name}</code></a>'

    return HF_REFERENCE.sub(link, html_text)
