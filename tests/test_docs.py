"""The documentation: every Python snippet runs, the site builds strictly, the reference is true.

Snippets are the ```python blocks of the README and of every page under docs/ (illustrative code
that needs data is written as ```text, or keeps its ``fit`` call commented out).
"""

from __future__ import annotations

import ast
import html.parser
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import lightning_fls
from lightning_fls import FLSPruningCallback, parse_pattern
from lightning_fls.callback import DEFAULT_TARGET_SPARSITY

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SNIPPETS = [
    pytest.param(code, id=f"{path.relative_to(ROOT)}:{i}")
    for path in DOCS
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))
]


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), re.S)


@pytest.mark.parametrize("code", SNIPPETS)
def test_snippet_runs(code: str) -> None:
    # dont_inherit: a snippet runs as a user runs it, without this module's __future__ imports.
    exec(compile(code, "<snippet>", "exec", dont_inherit=True), {"__name__": "__snippet__"})


def test_there_are_snippets() -> None:
    assert SNIPPETS
    pages = {param.id.split(":")[0] for param in SNIPPETS}
    assert {"docs/index.md", "docs/configuration.md"} <= pages


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documentation site, built once for this module with ``mkdocs build --strict``."""
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    # --strict turns every warning (bad link or anchor, docstring problem) into a failure.
    assert result.returncode == 0, result.stdout + result.stderr
    return site_dir


def test_docs_site_builds_strict(site: Path) -> None:
    for page in ("index.html", "api/index.html", "results/index.html"):
        assert (site / page).is_file(), page


class _Resources(html.parser.HTMLParser):
    """The scripts and stylesheets an HTML page loads (``<script src>``, ``<link href>``)."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str] = []
        self.stylesheets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "script" and attributes.get("src"):
            self.scripts.append(attributes["src"] or "")
        if tag == "link" and "stylesheet" in (attributes.get("rel") or "").split():
            self.stylesheets.append(attributes.get("href") or "")


def test_built_site_loads_nothing_remote(site: Path) -> None:
    # Formulas and code must render with no network: every script and stylesheet is bundled.
    pages = sorted(site.rglob("*.html"))
    assert pages
    for page in pages:
        resources = _Resources()
        resources.feed(page.read_text())
        for url in resources.scripts + resources.stylesheets:
            assert not re.match(r"(https?:)?//", url), f"{page.relative_to(site)} loads {url}"
            # Each names a file of the site (404.html's URLs are absolute, from the site's root).
            path = url.split("?")[0]
            target = site / path.lstrip("/") if path.startswith("/") else page.parent / path
            assert target.resolve().is_file(), f"{page.relative_to(site)} loads {url}"
    for bundled in (
        "vendor/katex/katex.min.js",
        "vendor/katex/katex.min.css",
        "vendor/katex/fonts/KaTeX_Main-Regular.woff2",
        "vendor/highlight.js/highlight.min.js",
        "javascripts/math.js",
    ):
        assert (site / bundled).is_file(), bundled
    maths = site / "how-it-works" / "index.html"
    resources = _Resources()
    resources.feed(maths.read_text())
    assert "arithmatex" in maths.read_text()
    assert "../vendor/katex/katex.min.js" in resources.scripts
    assert "../javascripts/math.js" in resources.scripts


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


@pytest.mark.slow
@pytest.mark.parametrize("page", ["how-it-works/index.html", "api/index.html", "index.html"])
def test_built_site_renders_offline_in_a_browser(site: Path, page: str) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium or chrome binary (apt-get install chromium)")
    command = [
        browser,
        "--headless",
        "--disable-gpu",
        # No network: every host name fails to resolve.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=10000",
        "--dump-dom",
        (site / page).as_uri(),
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    dom = result.stdout
    source = (site / page).read_text()
    formulas = source.count('class="arithmatex"')
    # Every formula was typeset by KaTeX, none failed, no TeX delimiter is left in the text (KaTeX
    # keeps each formula's source, undelimited, in a MathML annotation).
    assert dom.count('class="arithmatex"') == formulas
    assert dom.count('class="katex"') == formulas
    assert "katex-error" not in dom
    text = re.sub(r"<annotation\b.*?</annotation>", "", dom, flags=re.S)
    assert "\\(" not in text
    assert "\\[" not in text
    if "<pre" in source:  # code blocks were highlighted
        assert re.search(r'<code class="[^"]*\bhljs\b', dom), "highlight.js did not run"


def test_api_reference_covers_the_public_api() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^::: lightning_fls\.(\w+)", text, re.M))
    export_members = re.search(r"::: lightning_fls\.export\n.*?members: \[(.*?)\]", text, re.S)
    assert export_members is not None
    documented |= {name.strip() for name in export_members.group(1).split(",")}
    missing = set(lightning_fls.__all__) - documented - {"__version__"}
    assert not missing, f"docs/api.md lacks {sorted(missing)}"
    assert {"data", "models", "export"} <= documented


def reference_table() -> dict[str, dict[str, str]]:
    """The argument table of docs/configuration.md: {argument: {type, default, values}}."""
    rows = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = {"type": cells[1], "default": cells[2], "values": cells[3]}
    return rows


def test_configuration_table_matches_the_signature() -> None:
    table = reference_table()
    parameters = dict(inspect.signature(FLSPruningCallback.__init__).parameters)
    parameters.pop("self")
    assert list(table) == list(parameters)
    for name, parameter in parameters.items():
        documented = ast.literal_eval(table[name]["default"].strip("`"))
        assert documented == parameter.default, name
        assert type(documented) is type(parameter.default), name


def callback_init_args(config: dict[str, Any]) -> dict[str, Any]:
    [callback] = config["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_fls.FLSPruningCallback"
    init_args: dict[str, Any] = callback["init_args"]
    return init_args


@pytest.mark.parametrize(
    "block",
    [b for b in blocks(ROOT / "docs" / "configuration.md", "yaml") if "FLSPruningCallback" in b],
)
def test_configuration_yaml_builds_the_callback(block: str, tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    from tests.callback_models import TinyClassifier

    init_args = callback_init_args(yaml.safe_load(block))
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "seed_everything": 0,
                "trainer": {
                    "logger": False,
                    "enable_checkpointing": False,
                    "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path),
                    "callbacks": [
                        {"class_path": "lightning_fls.FLSPruningCallback", "init_args": init_args}
                    ],
                },
            }
        )
    )
    cli = LightningCLI(TinyClassifier, args=["--config", str(config)], run=False)
    [pruning] = [c for c in cli.trainer.callbacks if isinstance(c, FLSPruningCallback)]
    parsed = callback_init_args(cli.config.as_dict())
    for key, value in init_args.items():
        if isinstance(value, dict):
            assert {k: parsed[key][k] for k in value} == value, key
        else:
            assert parsed[key] == value, key
    expected = parsed["target_sparsity"]
    if expected is None:  # the default: 0.9, or N/M with a pattern
        nm = parse_pattern(parsed.get("pattern"))
        expected = DEFAULT_TARGET_SPARSITY if nm is None else nm.sparsity
    assert pruning.schedule.target == expected


def test_configuration_yaml_extends_the_example_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_fls.cli import main

    example = yaml.safe_load((ROOT / "examples" / "configs" / "autoencoder.yaml").read_text())
    [full] = [
        b for b in blocks(ROOT / "docs" / "configuration.md", "yaml") if "seed_everything" in b
    ]

    def contains(big: Any, small: Any) -> bool:
        if isinstance(small, dict):
            return isinstance(big, dict) and all(contains(big.get(k), v) for k, v in small.items())
        if isinstance(small, list):
            return len(big) == len(small) and all(map(contains, big, small))
        return bool(big == small)

    assert contains(yaml.safe_load(full), example)
    # The whole block parses with the `fls` command (nothing is instantiated, no data needed).
    config = tmp_path / "config.yaml"
    config.write_text(full)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert callback_init_args(printed)["samples_per_step"] == 1024


def test_every_builtin_method_is_on_every_page_that_lists_the_methods() -> None:
    """Pages that enumerate the methods name each built-in one (docs lagging the code fail)."""
    from lightning_fls.methods import BUILTIN_METHODS, method_class

    pages = {
        "README.md": ROOT / "README.md",
        **{
            name: ROOT / "docs" / name for name in ("pruning.md", "configuration.md", "callback.md")
        },
    }
    for page, path in pages.items():
        text = path.read_text()
        missing = [
            name for name in BUILTIN_METHODS if f'"{name}"' not in text and f"`{name}`" not in text
        ]
        assert missing == [], f"{page} does not list {missing}"
    comparison = (ROOT / "docs" / "comparison.md").read_text()
    # The comparison page names methods as their papers do: the class name, or the label below.
    for name in BUILTIN_METHODS:
        label = {"diag_fisher": "diagonal Fisher", "kfac": "K-FAC", "mfac": "M-FAC"}.get(
            name, method_class(name).__name__
        )
        assert label.lower() in comparison.lower(), f"comparison.md does not mention {label}"
