"""MkDocs hook: pages generated at build time from the code itself, so that they cannot drift from it.

`index.md` is the README (its links into docs/ made relative).
`reference/command-line.md` lists every absl flag that `autorad_jax/cli.py` defines (with its default and help);
`reference/configs.md` every key of `configs/autorad_lung.py`'s `get_config` for both variants, described by the
comments beside the key in that file. New flags and keys appear without editing a page.
"""

from __future__ import annotations

import ast
import io
import os
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILE = ROOT / "configs" / "autorad_lung.py"
VARIANTS = ("tiny", "large")


def _import_root() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'data.batch_size': 32, ...}: the leaves of a nested dict, by dotted key."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_keys() -> dict[str, dict[str, object]]:
    """variant -> {dotted key: default} of configs/autorad_lung.py."""
    _import_root()
    from configs import autorad_lung
    return {variant: flatten(autorad_lung.get_config(variant).to_dict()) for variant in VARIANTS}


def config_comments(path: Path = CONFIG_FILE) -> dict[str, str]:
    """{'group.key': text} from the comment at the end of a key's line in a `config.<group> = ConfigDict(dict(...))`,
    or the comment lines just above the key."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)
                and isinstance(node.value, ast.Call) and node.value.args and isinstance(node.value.args[0], ast.Call)):
            continue
        group = node.targets[0].attr
        for keyword in node.value.args[0].keywords:
            above, line = [], keyword.lineno - 1
            while line in comments and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            trailing = comments.get(keyword.value.end_lineno)
            text = " ".join(above + ([trailing] if trailing else []))
            if text:
                out[f"{group}.{keyword.arg}"] = text
    return out


def _escape(text: str) -> str:
    """`text` as one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _cell(value: object) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return "`" + _escape(text) + "`"


def configs_page() -> str:
    keys = config_keys()
    comments = config_comments()
    rows = []
    for key in keys[VARIANTS[0]]:
        group_key = ".".join(key.split(".")[:2])
        description = comments.get(group_key, "")
        rows.append(f"| `{key}` | {_cell(keys['tiny'][key])} | {_cell(keys['large'].get(key, ''))} | "
                    f"{_escape(description)} |")
    return "\n".join([
        "# Configs reference",
        "",
        "Generated from `configs/autorad_lung.py` when this site is built. A config is chosen as "
        "`--config configs/autorad_lung.py:tiny` (or `:large`); any key is overridden on the command line, e.g. "
        "`--config.optim.learning_rate=1e-3 --config.model.trainable=full`. The config is locked: a misspelt key is "
        "an error that names it. Descriptions are the comments beside each key in the file.",
        "",
        "| key | tiny | large | what it is |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
    ])


def cli_flags() -> list[tuple[str, object, str]]:
    """(name, default, help) of every flag autorad_jax/cli.py defines, in name order."""
    _import_root()
    from absl import flags
    from autorad_jax import cli
    return sorted((f.name, f.default, f.help) for f in flags.FLAGS.get_flags_for_module(cli.__name__))


def command_line_page() -> str:
    _import_root()
    from autorad_jax import cli
    rows = [f"| `--{name}` | {_cell(default) if default not in (None, '') else ''} | {_escape(help_text)} |"
            for name, default, help_text in cli_flags() if name != "config"]
    usage = cli.__doc__.strip()
    return "\n".join([
        "# Command-line reference",
        "",
        "Generated from `autorad_jax/cli.py` when this site is built. `autorad` is the installed command; in a "
        "checkout, `python run.py` is the same command line.",
        "",
        "```text",
        usage,
        "```",
        "",
        "`--config FILE:VARIANT` and `--config.<key>=<value>` choose and override the experiment config "
        "([Configs reference](configs.md)). Absl's own flags work too: `--verbosity=0` shows INFO logs, "
        "`--helpfull` lists every flag of every library.",
        "",
        "| flag | default | what it does |",
        "| --- | --- | --- |",
        *rows,
        "",
    ])


def home_page() -> str:
    """The README, the site's home page, with its links into docs/ made relative to the site."""
    return (ROOT / "README.md").read_text(encoding="utf-8").replace("](docs/", "](")


PAGES = {"index.md": home_page, "reference/configs.md": configs_page, "reference/command-line.md": command_line_page}


def on_files(files, config):
    """Adds the generated pages to the site's files (MkDocs hook)."""
    from mkdocs.structure.files import File
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for uri, page in PAGES.items():
        files.append(File.generated(config, uri, content=page()))
    return files
