"""The documentation: the generated reference pages hold every command-line flag and config key, and the README is a
short front door whose links reach pages of the site."""

import importlib.util
import os
import re

import pytest

from fault_checks import ROOT

spec = importlib.util.spec_from_file_location("docs_reference", os.path.join(ROOT, "docs", "hooks", "reference.py"))
reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference)


def _leaves(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("variant", ["tiny", "large"])
def test_configs_reference_lists_every_key(variant):
    from configs import autorad_lung
    page = reference.configs_page()
    keys = list(_leaves(autorad_lung.get_config(variant)))
    assert len(keys) > 50
    assert [k for k in keys if f"| `{k}` |" not in page] == []


def test_configs_reference_describes_keys_by_their_comments():
    page = reference.configs_page()
    row = next(line for line in page.splitlines() if line.startswith("| `data.min_readers` |"))
    assert row.endswith("| leave out nodules with fewer valid malignancy ratings |")
    row = next(line for line in page.splitlines() if line.startswith("| `model.remat` |"))
    assert "`'none'`" in row and "recompute each block in the backward pass" in row


def test_command_line_reference_lists_every_flag_of_the_cli():
    with open(os.path.join(ROOT, "autorad_jax", "cli.py"), encoding="utf-8") as f:
        source = f.read()
    defined = re.findall(r"\bflags\.DEFINE_\w+\(\s*\"(\w+)\"", source)
    assert {"workdir", "ct", "version", "distributed"} <= set(defined)
    page = reference.command_line_page()
    assert [name for name in defined if f"| `--{name}` |" not in page] == []
    assert "--config" in page and "predict" in page


def test_readme_is_short_and_its_links_reach_the_site():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert len(readme.encode()) <= 12 * 1024
    assert readme.count("```bash") == 2  # the two quick-start commands
    assert "bash install.sh && .venv/bin/python run.py" in readme
    assert "bash install.sh && .venv/bin/python -m pytest" in readme
    targets = re.findall(r"\]\(docs/([^)#]+)", readme)
    assert targets
    generated = set(reference.PAGES)
    assert [t for t in targets if t not in generated and not os.path.isfile(os.path.join(ROOT, "docs", t))] == []
