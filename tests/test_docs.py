"""The docs site builds with warnings as errors, and what it shows is the code's: config fields, errors, recipes."""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import load_example

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLE = "examples/opd_math.py"
DOCS_PACKAGES = {"mkdocs": "mkdocs", "material": "mkdocs-material", "mkdocstrings": "mkdocstrings[python]"}


def _load_hooks():
    spec = importlib.util.spec_from_file_location("opd_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    missing = [pip for module, pip in DOCS_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if importlib.util.find_spec("mkdocstrings_handlers") is None:
        missing.append("mkdocstrings-python")
    if missing:
        pytest.skip(f"the docs toolchain is not installed ({', '.join(missing)}): `pip install -e '.[dev]'`")
    out = tmp_path_factory.mktemp("site")
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert completed.returncode == 0, (
        f"mkdocs build --strict failed:\n{completed.stdout[-3000:]}{completed.stderr[-6000:]}"
    )
    return out


def test_config_page_lists_every_field_opdconfig_adds(site):
    from trl import DistillationConfig

    from trl_opd import OPDConfig

    page = (site / "config" / "index.html").read_text()
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", "", page)).split())
    inherited = {f.name for f in dataclasses.fields(DistillationConfig)}
    added = [f for f in dataclasses.fields(OPDConfig) if f.name not in inherited]
    assert added, "OPDConfig adds no field over DistillationConfig?"
    for f in added:
        assert f'id="field-{f.name}"' in page, f"docs/config.md does not list OPDConfig.{f.name}"
        help_text = " ".join(f.metadata["help"].replace("`", "").split())
        assert help_text in text, f"the help text of OPDConfig.{f.name} is missing from the config page"


def test_troubleshooting_indexes_every_raise(site):
    page = (site / "troubleshooting" / "index.html").read_text()
    table = re.search(r'<table class="opd-errors">.*?</table>', page, flags=re.S)
    assert table, "the generated error index is missing from the troubleshooting page"
    assert table.group(0).count("<tr>") - 1 == len(_load_hooks().raised_errors())


def test_api_page_documents_the_public_modules(site):
    page = (site / "api" / "index.html").read_text()
    import trl_opd.callbacks

    names = ["trl_opd.OPDConfig", "trl_opd.OPDTrainer", "trl_opd.losses", "trl_opd.chunked", "trl_opd.prefixes"]
    names += [f"trl_opd.callbacks.{name}" for name in trl_opd.callbacks.__all__]
    for name in names:
        assert f'id="{name}"' in page, f"{name} is missing from the API reference"


# ---------------------------------------------------------------------------------------- recipes stay runnable


def _code_blocks(language: str) -> list[tuple[str, str]]:
    """(page, code) of every fenced block of `language` in docs/*.md, indented ones (tabs) included."""
    fence = re.compile(rf"^( *)```{language}[^\n]*\n(.*?)^\1```", flags=re.M | re.S)
    blocks = []
    for path in sorted(DOCS.glob("*.md")):
        blocks += [(path.name, textwrap.dedent(m.group(2))) for m in fence.finditer(path.read_text())]
    return blocks


def _example_commands() -> list[tuple[str, list[str]]]:
    """(page, arguments after the script) of every documented `examples/opd_math.py` command, each `$BASE` expanded
    to every value the docs assign to `BASE`."""
    bases, commands = [], []
    for page, block in _code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            bases += [token[len("BASE=") :] for token in tokens if token.startswith("BASE=")]
            if EXAMPLE in tokens:
                commands.append((page, tokens[tokens.index(EXAMPLE) + 1 :]))
    expanded = []
    for page, arguments in commands:
        if "$BASE" not in arguments:
            expanded.append((page, arguments))
            continue
        i = arguments.index("$BASE")
        expanded += [(page, arguments[:i] + shlex.split(base) + arguments[i + 1 :]) for base in bases]
    return expanded


def test_documented_example_commands_parse(monkeypatch):
    """Every documented command line of the example script parses with the script's own parser and presets, and the
    resulting `OPDConfig` passes validation (`--use_cpu` only so that bf16 configs build on a CPU)."""
    example = load_example(monkeypatch)
    commands = _example_commands()
    assert len(commands) >= 15, "the docs lost their example command lines"
    failures = []
    for page, arguments in commands:
        try:
            example.parse([*arguments, "--use_cpu", "true"])
        except (SystemExit, ValueError, TypeError) as error:
            failures.append(f"{page}: {' '.join(arguments)}\n    {type(error).__name__}: {error}")
    assert not failures, "documented example commands that do not parse or validate:\n" + "\n".join(failures)


def test_recipe_configs_build(monkeypatch):
    """Every Python block of recipes.md that does not need models (no `OPDTrainer(...)`) runs as written."""
    import trl_opd

    real = trl_opd.OPDConfig
    # The recipes target GPUs (bf16 by default); building them on a CPU needs `use_cpu`, which changes nothing else.
    monkeypatch.setattr(trl_opd, "OPDConfig", lambda *args, **kwargs: real(*args, **{"use_cpu": True, **kwargs}))
    blocks = [code for page, code in _code_blocks("python") if page == "recipes.md"]
    runnable = [code for code in blocks if not re.search(r"^[^#\n]*OPDTrainer\(", code, flags=re.M)]
    assert len(runnable) >= 8, "recipes.md lost its configurations"
    for code in runnable:
        namespace: dict = {}
        exec(compile(code, "recipes.md", "exec"), namespace)
        configs = [value for value in namespace.values() if isinstance(value, real)]
        callbacks = [value for value in namespace.values() if isinstance(value, trl_opd.OPDCallback)]
        assert configs or callbacks, f"a recipe block builds neither an OPDConfig nor a callback:\n{code}"


def test_quickstart_offline_snippet_is_the_tested_readme_snippet():
    readme = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)[0]
    assert readme in [code for page, code in _code_blocks("python") if page == "quickstart.md"], (
        "docs/quickstart.md's offline snippet differs from README.md's (which tests/test_readme.py runs): copy it over"
    )
