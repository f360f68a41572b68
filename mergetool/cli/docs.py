"""Generate the man pages (``man/``) and shell completions (``completions/``) from the app itself.

    python -m mergetool.cli.docs            # rewrite man/ and completions/ in the current directory
    python -m mergetool.cli.docs --check    # exit 1 if they are out of date (the tests run this)
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

from .. import __version__

SHELLS = {"bash": "mergetool.bash", "zsh": "_mergetool", "fish": "mergetool.fish"}
DATE = datetime.date(2026, 11, 1).strftime("%B %Y")  # fixed: pages change only when the app changes


def _click_app():
    import typer

    from . import commands  # noqa: F401
    from .app import app

    return typer.main.get_command(app)


def _roff(text: str) -> str:
    out = []
    for line in text.replace("\\", "\\\\").splitlines():
        line = line.replace("\b", "")
        out.append(("\\&" + line) if line.startswith((".", "'")) else line)
    return "\n".join(out)


def _help_body(cmd) -> tuple[str, list[str]]:
    """The command's help split into description paragraphs and example lines."""
    text = (cmd.help or "").replace("\b\n", "")
    desc, _, examples = text.partition("Examples:")
    return desc.strip(), [e.strip() for e in examples.strip().splitlines() if e.strip()]


def man_page(name: str, cmd, ctx_parent=None) -> str:
    import typer

    try:
        from typer._click import Context
    except ImportError:  # pragma: no cover
        from click import Context
    ctx = Context(cmd, info_name=name, parent=ctx_parent)
    title = name.replace(" ", "-")
    desc, examples = _help_body(cmd)
    lines = [f'.TH "{title.upper()}" 1 "{DATE}" "mergetool {__version__}" "mergetool manual"',
             ".SH NAME", f"{title} \\- {_roff(cmd.get_short_help_str(200))}",
             ".SH SYNOPSIS", f".B {name}", _roff(" ".join(cmd.collect_usage_pieces(ctx))),
             ".SH DESCRIPTION"]
    for para in desc.split("\n\n"):
        lines += [".PP", _roff(" ".join(para.split()))]
    params = [p for p in cmd.get_params(ctx) if p.get_help_record(ctx)]
    if params:
        lines.append(".SH OPTIONS")
        for p in params:
            opts, help_ = p.get_help_record(ctx)
            lines += [".TP", f".B {_roff(opts)}", _roff(help_)]
    if isinstance(cmd, typer.core.TyperGroup) or hasattr(cmd, "list_commands"):
        subs = getattr(cmd, "list_commands", lambda c: [])(ctx)
        if subs:
            lines.append(".SH COMMANDS")
            for s in subs:
                lines += [".TP", f".B {s}", _roff(cmd.get_command(ctx, s).get_short_help_str(200)),
                          f"See \\fBmergetool-{s}\\fR(1)."]
    if examples:
        lines.append(".SH EXAMPLES")
        for e in examples:
            lines += [".PP", ".nf", _roff(e), ".fi"]
    lines += [".SH SEE ALSO", "mergetool(1)" if name != "mergetool" else
              ", ".join(f"mergetool-{s}(1)" for s in cmd.list_commands(ctx))]
    return "\n".join(lines) + "\n"


def render() -> dict[str, str]:
    """Every generated file: relative path -> contents."""
    group = _click_app()
    files = {"man/mergetool.1": man_page("mergetool", group)}
    try:
        from typer._click import Context
    except ImportError:  # pragma: no cover
        from click import Context
    root = Context(group, info_name="mergetool")
    for s in group.list_commands(root):
        files[f"man/mergetool-{s}.1"] = man_page(f"mergetool {s}", group.get_command(root, s), root)
    for shell, fname in SHELLS.items():
        out = subprocess.run([sys.executable, "-m", "mergetool", "--show-completion", shell],
                             capture_output=True, text=True, check=True,
                             env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1", "PATH": ""})
        files[f"completions/{fname}"] = out.stdout.replace("__main__.py", "mergetool").rstrip() + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    files = render()
    stale = [p for p, text in files.items() if not Path(p).exists() or Path(p).read_text() != text]
    if "--check" in argv:
        for p in stale:
            print(f"out of date: {p} (run python -m mergetool.cli.docs)", file=sys.stderr)
        return 1 if stale else 0
    for p, text in files.items():
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        Path(p).write_text(text)
    print(f"wrote {len(files)} files ({len(stale)} changed)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
