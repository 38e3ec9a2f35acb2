"""The documentation: every public name in the API reference, and the code on the pages runs."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

import pytest

import scao_fx as sf

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def test_every_public_name_is_in_the_api_reference():
    listed = set(re.findall(r"^::: scao_fx\.(\w+)", API.read_text(), flags=re.MULTILINE))
    missing = sorted(set(sf.__all__) - listed)
    assert not missing, f"add '::: scao_fx.<name>' entries to docs/api.md for: {missing}"
    unknown = sorted(listed - set(sf.__all__))
    assert not unknown, f"docs/api.md documents names that scao_fx does not export: {unknown}"


@pytest.mark.parametrize("name", sf.__all__)
def test_public_name_has_a_summary_line(name):
    doc = inspect.getdoc(getattr(sf, name))
    assert doc and doc.splitlines()[0].strip(), f"scao_fx.{name} needs a docstring with a one-line summary"


@pytest.mark.parametrize("page", ["README.md", "docs/functional-loop.md", "docs/protocol.md", "docs/muon.md"])
def test_code_on_the_page_runs(page):
    blocks = python_blocks(ROOT / page)
    assert blocks, f"no python code blocks found in {page}"
    namespace: dict = {"__name__": f"docs_{Path(page).stem}"}
    for block in blocks:  # the blocks of a page build on each other, in order
        exec(compile(block, page, "exec"), namespace)


def test_readme_loop_is_short():
    loop = python_blocks(ROOT / "README.md")[0]
    code_lines = [line for line in loop.splitlines() if line.strip()]
    assert len(code_lines) <= 16, f"the README loop has {len(code_lines)} lines"


def load_extension():
    spec = importlib.util.spec_from_file_location("rst_to_markdown", ROOT / "docs" / "_ext" / "rst_to_markdown.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docstring_conversion_for_the_docs_build():
    convert = load_extension().convert
    text = (
        "Summary with :math:`\\eta` and :func:`~scao_fx.adam`.\n\n"
        "    .. math::\n        a = b\\\\\n        c = d\n\n    after\n\n"
        "Example:\n    >>> 1 + 1\n    2\n"
    )
    out = convert(text)
    assert "$\\eta$" in out and "`scao_fx.adam`" in out
    assert "    $$\n    a = b\\\\\n    c = d\n    $$\n" in out
    assert "Examples:\n    >>> 1 + 1" in out and "Example:\n" not in out
    assert "after" in out


def test_table_defaults_are_rendered_as_values():
    resolve = load_extension().resolve_default
    from scao_fx.presets import SCAO_DEFAULTS

    assert resolve('SCAO_DEFAULTS["rho"]', "scao_fx.alias") == repr(SCAO_DEFAULTS["rho"])
    assert resolve("_NotGiven(SCAO_DEFAULTS['epsilon_sparse'])", "scao_fx.presets") == repr(SCAO_DEFAULTS["epsilon_sparse"])
    assert resolve("SCAO_DEFAULTS['betas']", "scao_fx.optim.scao") == repr(SCAO_DEFAULTS["betas"])
    assert resolve("SCAO_DEFAULTS['k_max']", "scao_fx.optim.scao") == "None"
    assert resolve("'mean_tail'", "scao_fx.alias") == "'mean_tail'"  # a literal stays as written


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Tests", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", section, flags=re.DOTALL).group(1).strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f".ci/run must run the README's test command verbatim: {command!r}"


def test_grouped_argument_entries_are_split_so_defaults_show():
    convert = load_extension().convert
    text = (
        "Summary, a, b: not an argument.\n\n"
        "    Args:\n"
        "        params: the parameters.\n"
        "        k_min, k_max: clamp of the adaptive rank,\n"
        "            over two lines.\n\n"
        "        beta1, beta2 (float): decays.\n\n"
        "    Returns:\n"
        "        x, y: a pair, not arguments.\n"
    )
    out = convert(text)
    assert "        k_min: clamp of the adaptive rank,\n            over two lines.\n" in out
    assert "        k_max: clamp of the adaptive rank,\n            over two lines.\n" in out
    assert "        beta1 (float): decays.\n        beta2 (float): decays.\n" in out
    assert "Summary, a, b: not an argument." in out and "        x, y: a pair, not arguments." in out


def test_an_import_shadowing_a_submodule_is_what_the_reference_renders():
    """``scao_fx.scale`` is the function (``from .scale import scale`` in scao_fx.transforms),
    not the module scao_fx/transforms/scale.py that griffe would give the name to."""
    griffe = pytest.importorskip("griffe")
    ext = load_extension()
    pkg = griffe.load("scao_fx", search_paths=[str(ROOT)], resolve_aliases=False)
    assert pkg["scale"].target_path == "scao_fx.transforms.scale"  # griffe's own reading
    changed = ext.retarget_shadowed_aliases(pkg)
    assert changed.get("scao_fx.scale") == "scao_fx.transforms.scale.scale"
    assert pkg["scale"].target_path == "scao_fx.transforms.scale.scale"
    assert list(changed) == ["scao_fx.scale"]  # nothing else is shadowed


# ------------------------------------------------------------------------------------------
# Math is converted to MathML when the site is built: no script, no CDN


CDN = re.compile(r"https?://|//(?:unpkg|cdn|jsdelivr|cdnjs|polyfill)", re.IGNORECASE)


def test_docs_math_needs_no_network():
    import tomllib
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assets = [str(s) for key in ("extra_javascript", "extra_css") for s in config.get(key, [])]
    assert not [s for s in assets if CDN.search(s)], f"loaded from the network: {assets}"
    assert "docs/_ext/mathml.py" in config.get("hooks", []), "the MathML hook is not listed in mkdocs.yml"
    arithmatex = [e for e in config["markdown_extensions"] if isinstance(e, dict) and "pymdownx.arithmatex" in e]
    assert arithmatex and arithmatex[0]["pymdownx.arithmatex"].get("generic") is True
    assert config["theme"].get("font") is False, "the theme would load its fonts from a CDN"
    for path in [*(ROOT / "docs").glob("javascripts/**/*"), *(ROOT / "docs" / "_ext").glob("*.py")]:
        if path.is_file():
            code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
            assert "mathjax" not in code.lower() and not CDN.search(code), f"{path} loads from the network"
    docs_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["docs"]
    assert any(req.startswith("latex2mathml") for req in docs_extra)


def test_math_is_converted_to_mathml():
    pytest.importorskip("latex2mathml", reason="latex2mathml comes with the docs extra (the docs build converts every formula)")
    pytest.importorskip("pymdownx", reason="pymdown-extensions comes with the docs extra (mkdocs-material)")
    import markdown

    spec = importlib.util.spec_from_file_location("docs_mathml", ROOT / "docs" / "_ext" / "mathml.py")
    mathml = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mathml)
    md = markdown.Markdown(extensions=[mathml.MathMLExtension()])
    html = md.convert(
        "Inline \\(L^{-1/4} G R^{-1/4}\\) and $a < b$.\n\n"
        "$$\n\\max(\\text{warmup\\_steps}, 1)\n$$\n\n"
        "$$\ng &= b\\,P + (1-b)\\,G \\\\\nm &\\leftarrow \\beta_1 m\n$$\n"
    )
    assert html.count("<math ") == 4 and 'display="block"' in html and 'display="inline"' in html
    assert "\\(" not in html and "\\[" not in html and "$" not in html  # no TeX left for a script
    assert "<msup><mi>L</mi>" in html and "<mo>&#x0003C;</mo>" in html
    assert "<mtext>warmup_steps</mtext>" in html  # \_ in \text is an underscore
    assert "<mtable" in html and "<mi>&</mi>" not in html and "<mi>&amp;</mi>" not in html  # rows: a table
