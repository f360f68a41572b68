"""Docs are complete and generated from the app: help, man pages, completions, the method list."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_man_pages_and_completions_are_up_to_date():
    r = subprocess.run([sys.executable, "-m", "mergetool.cli.docs", "--check"], cwd=ROOT, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()


def test_every_command_has_summary_paragraph_and_pipeline_example():
    import typer

    from mergetool.cli import commands  # noqa: F401
    from mergetool.cli.main import app

    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        assert cmd.short_help and len(cmd.short_help) < 80, name
        text = cmd.help or ""
        assert len(text.split("\n\n")) >= 3, name
        assert "Examples:" in text and "|" in text.split("Examples:")[1], f"{name}: no pipeline example"
        assert (ROOT / "man" / f"mergetool-{name}.1").exists()
        assert f"mergetool {name}" in (ROOT / "README.md").read_text(), f"{name} missing from README"


def test_help_and_man_pages_name_only_commands_that_exist():
    """Every ``mergetool WORD`` in the help texts, the man pages and the README is a command of the app (or one of
    the few English phrases listed); a page that advertises a command before it exists fails here."""
    import typer

    from mergetool.cli import commands  # noqa: F401
    from mergetool.cli.main import app

    group = typer.main.get_command(app)
    prose = {"manual", "and", "fixes", "does", "is", "runs", "on", "reads", "writes", "has", "the", "command"}
    texts = {f"{n} --help": (c.help or "") for n, c in group.commands.items()}
    texts["--help"] = group.help or ""
    texts.update({p.name: p.read_text() for p in (ROOT / "man").iterdir()})
    texts["README.md"] = (ROOT / "README.md").read_text()
    for where, text in texts.items():
        text = text.replace("\\-", "-").replace("\\fB", "").replace("\\fR", "").replace("\\fI", "")  # roff
        for word in re.findall(r"\bmergetool(?:\\)? +([a-z][a-z-]*)", text):
            assert word in group.commands or word in prose, f"{where} names a command that does not exist: {word}"
    assert {"merge", "eval", "train-expert", "score", "diagnose", "weight"} <= set(group.commands)


def test_completion_method_names_match_the_registry():
    from mergetool.cli.merge import METHOD_NAMES
    from mergetool.methods import all_methods

    assert sorted(METHOD_NAMES) == sorted([*all_methods(), "auto"])  # auto searches over the registry


def test_tab_completion_lists_methods():
    import os

    env = dict(os.environ, _MERGETOOL_COMPLETE="complete_bash", COMP_WORDS="mergetool merge --method kn",
               COMP_CWORD="3")
    r = subprocess.run([sys.executable, "-m", "mergetool"], env=env, capture_output=True, text=True)
    assert r.stdout.split() == ["knots"]


def test_help_is_fast_and_imports_no_torch():
    code = "import sys; from mergetool.cli.main import run; run(['--help'])"
    r = subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True)
    assert "merge" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import mergetool.cli.commands, sys; print('torch' in sys.modules)"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "False"


def test_readme_pipeline_runs(adapters, tmp_path):
    """The README's pipeline block runs as written, on small adapters named as it names them."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- pipeline -->\n```bash\n(.*?)```", text, re.S).group(1)
    for i, name in enumerate(["a", "b", "c"]):
        (tmp_path / f"{name}.safetensors").write_bytes(adapters[i].read_bytes())
    script = block.replace("mergetool ", f"{sys.executable} -m mergetool ")
    r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(__import__("os").environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "abc.safetensors").exists()


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith(b"mergetool ")
