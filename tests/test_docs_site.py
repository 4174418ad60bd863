"""The documentation site: every public name in the API reference, every page in the nav, a strict build.

The API reference (``docs/api/``) documents each object once, on the page of the module that defines
it, with a ``::: module`` directive; a module that re-exports names (a package's ``__init__``) lists
them in a table of cross-references to those definitions. The checks here read the pages and
compare them with every module's ``__all__`` as Griffe (what mkdocstrings renders from) sees it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"
DOCS_EXTRA = "needs the docs extra: pip install -e '.[docs]' (part of '.[test]')"

_DIRECTIVE = re.compile(r"^::: ([\w.]+)[ \t]*$")
_CROSS_REF = re.compile(r"\]\[([\w.]+)\]")


@dataclass
class Directive:
    """One ``::: module`` block of an API page."""

    page: str
    module: str
    members: list[str] | bool | None


def _directives(text: str, page: str) -> list[Directive]:
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        match = _DIRECTIVE.match(line)
        if not match:
            continue
        block = []
        for following in lines[i + 1 :]:
            if following.strip() and not following.startswith(" "):
                break
            block.append(following)
        options = (yaml.safe_load(textwrap.dedent("\n".join(block))) or {}).get("options") or {}
        found.append(Directive(page, match.group(1), options.get("members")))
    return found


def _pages() -> dict[str, str]:
    return {path.relative_to(DOCS).as_posix(): path.read_text(encoding="utf-8") for path in sorted(API.rglob("*.md"))}


def _modules(package: Any) -> list[Any]:
    found = [package]
    for sub in package.modules.values():
        if not sub.is_alias:
            found.extend(_modules(sub))
    return found


def _load_package() -> Any:
    griffe = pytest.importorskip("griffe", reason=DOCS_EXTRA)
    return griffe.load("lightning_prune", search_paths=[str(ROOT)], resolve_aliases=True, resolve_external=False)


def _canonical(obj: Any) -> str:
    """Where an object is defined: its own path, or an imported name's target."""
    return obj.final_target.path if obj.is_alias else obj.path


def _public_paths(modules: list[Any]) -> set[str]:
    """The canonical path of every name in every module's ``__all__``."""
    return {_canonical(module.members[name]) for module in modules for name in module.exports or ()}


def _mkdocstrings_options() -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            return plugin["mkdocstrings"]["handlers"]["python"]["options"]
    raise AssertionError("mkdocs.yml has no mkdocstrings plugin")


def _nav_files(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [file for item in nav for file in _nav_files(item)]
    return [file for value in nav.values() for file in _nav_files(value)]


def test_api_reference_covers_every_public_name():
    package = _load_package()
    # What the check below assumes `::: module` renders: the documented names in `__all__`.
    options = _mkdocstrings_options()
    assert options["filters"] == "public" and not options.get("show_if_no_docstring", False)

    pages = _pages()
    directives = [d for page, text in pages.items() for d in _directives(text, page)]
    by_module: dict[str, list[Directive]] = {}
    for directive in directives:
        by_module.setdefault(directive.module, []).append(directive)
    modules = {module.path: module for module in _modules(package)}
    problems = [
        f"{d.page}: `::: {d.module}` is not a module of the package" for d in directives if d.module not in modules
    ]

    rendered: dict[str, set[str]] = {}  # module -> the names its directive renders
    for path, module in modules.items():
        found = by_module.get(path, [])
        if len(found) != 1:
            problems.append(
                f"{path}: documented by {len(found)} `::: {path}` directives (pages: "
                f"{[d.page for d in found]}); exactly one page under docs/api/ must have one"
            )
            continue
        exports = [name for name in module.exports or () if name in module.members]  # the rest: reported below
        aliases = [name for name in exports if module.members[name].is_alias]
        members = found[0].members
        if members is None:
            if aliases:
                problems.append(
                    f"{found[0].page}: `::: {path}` renders re-exported {aliases} a second time: list "
                    "its own names under `members:` and link the re-exported ones"
                )
            undocumented = [name for name in exports if not (name in aliases or module.members[name].has_docstrings)]
            if undocumented:
                problems.append(
                    f"{found[0].page}: `::: {path}` skips {undocumented}, which have no docstring: "
                    "document them or list the module's own names under `members:`"
                )
            rendered[path] = set(exports) - set(aliases) - set(undocumented)
        elif members is False:
            rendered[path] = set()
        else:
            for name in members:
                if name not in module.members or module.members[name].is_alias:
                    problems.append(f"{found[0].page}: `{name}` under `members:` is not defined in {path}")
            rendered[path] = set(members)
    rendered_paths = set(rendered) | {f"{module}.{name}" for module, names in rendered.items() for name in names}

    for path, module in modules.items():
        if path not in rendered:
            continue
        page = by_module[path][0].page
        links = set(_CROSS_REF.findall(pages[page]))
        for name in module.exports or ():
            if name not in module.members:
                problems.append(f"{path}: `__all__` names {name!r}, which the module does not define or import")
            elif not module.members[name].is_alias:
                if name not in rendered[path]:
                    problems.append(f"{page}: `{path}.{name}` is in `__all__` but not under `members:`")
            else:
                target = _canonical(module.members[name])
                if target not in rendered_paths:
                    problems.append(f"{path}.{name}: its definition {target} is rendered on no API page")
                if target not in links:
                    problems.append(f"{page}: re-exported `{path}.{name}` needs a link: [`{name}`][{target}]")
    assert not problems, "\n".join(problems)


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    in_nav = _nav_files(config["nav"])
    assert len(in_nav) == len(set(in_nav)), "a page is in the nav twice"
    on_disk = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))
    assert sorted(in_nav) == on_disk


def test_sphinx_roles_become_markdown():
    pytest.importorskip("griffe", reason=DOCS_EXTRA)
    spec = importlib.util.spec_from_file_location("griffe_sphinx_roles", ROOT / "tools" / "griffe_sphinx_roles.py")
    assert spec is not None and spec.loader is not None
    roles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roles)
    text = ":class:`~a.b.Pruner`, :meth:`.prune`, :func:`a.f`, :class:`the pruner <a.b.Pruner>`. Example::\n\n    x"
    assert roles.to_markdown(text) == "`Pruner`, `prune`, `a.f`, `the pruner`. Example:\n\n    x"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason=DOCS_EXTRA)
def test_site_builds_strict_with_every_public_name(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner, not about this site
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    anchors = {match for page in site.rglob("*.html") for match in re.findall(r'id="([\w.]+)"', page.read_text())}
    missing = sorted(_public_paths(_modules(_load_package())) - anchors)
    assert not missing, f"public names with no section on the site: {missing}"
