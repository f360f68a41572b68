"""The package's layout shows its data flow: no import cycle inside ``mergetool`` (function-level imports
included), and no module imports one from a later stage of the flow."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mergetool"

# The flow, first to last: formats and streams -> updates -> inputs and models -> methods -> applying updates
# -> scoring -> evaluation -> the commands' libraries -> the CLI. A module may import from its own stage or
# an earlier one.
STAGES = [
    ["mergetool", "mergetool.errors", "mergetool.device", "mergetool.zoo"],
    ["mergetool.streams"],
    ["mergetool.blobs", "mergetool.jsonl", "mergetool.outputs"],
    ["mergetool.updates"],
    ["mergetool.model", "mergetool.weights"],
    ["mergetool.inputs", "mergetool.methods.base", "mergetool.methods.primitives"],
    ["mergetool.methods.families", "mergetool.methods.knots", "mergetool.methods.subspace"],
    ["mergetool.methods.mergekit_methods", "mergetool.methods.dataaware"],
    ["mergetool.methods.registry"],
    ["mergetool.methods.engine", "mergetool.methods"],
    ["mergetool.adapters", "mergetool.examples"],
    ["mergetool.scoring"],
    ["mergetool.evaluate"],
    ["mergetool.stats", "mergetool.plots"],
    ["mergetool.train", "mergetool.diagnose", "mergetool.diagnose.weightspace", "mergetool.diagnose.spectral",
     "mergetool.diagnose.resample", "mergetool.diagnose.forecast", "mergetool.diagnose.compare", "mergetool.diagnose.records",
     "mergetool.diagnose.tables", "mergetool.diagnose.figures", "mergetool.diagnose.representation",
     "mergetool.diagnose.predict", "mergetool.diagnose.analysis", "mergetool.diagnose.gradients", "mergetool.score",
     "mergetool.score_run", "mergetool.score_summary", "mergetool.eval_run", "mergetool.train_run",
     "mergetool.diagnose.core", "mergetool.diagnose.run", "mergetool.distributed"],
    ["mergetool.merging.data", "mergetool.merging.forward"],
    ["mergetool.merging.grams", "mergetool.merging.fisher", "mergetool.merging.adamerging",
     "mergetool.merging.candidates"],
    ["mergetool.merging.lorahub", "mergetool.merging.auto"],
    ["mergetool.merging.core"],
    ["mergetool.merging"],
    ["mergetool.merge_run"],
    ["mergetool.cli", "mergetool.cli.app", "mergetool.cli.common"],
    ["mergetool.cli.merge", "mergetool.cli.eval", "mergetool.cli.train_expert", "mergetool.cli.score",
     "mergetool.cli.diagnose", "mergetool.cli.weight"],
    ["mergetool.cli.commands"],
    ["mergetool.cli.main", "mergetool.cli.docs", "mergetool.__main__"],
]
STAGE = {m: i for i, ms in enumerate(STAGES) for m in ms}


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every mergetool module ``name`` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import x` imports the module x
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_stage():
    assert sorted(set(modules()) - set(STAGE)) == []


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_no_import_runs_back_up_the_flow():
    bad = [f"{m} (stage {STAGE[m]}) imports {n} (stage {STAGE[n]})"
           for m, ns in graph().items() for n in ns if STAGE[n] > STAGE[m]]
    assert bad == []


def test_the_cycle_check_notices_a_cycle(tmp_path, monkeypatch):
    """The check itself can fail: a planted circle is found."""
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    import pytest

    monkeypatch.setattr(__import__(__name__), "graph", lambda: g)
    with pytest.raises(AssertionError, match="a -> b -> c -> a"):
        test_no_import_cycle()


PAGE = 60  # body lines of a command: parse and check its options, call the library, print or write the results


def command_bodies(cli: Path = PKG / "cli") -> dict[str, int]:
    """The lines of each command's body (a function of ``cli/`` registered with ``@command``)."""
    out = {}
    for p in sorted(cli.glob("*.py")):
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(d, ast.Call) and getattr(d.func, "id", None) == "command" for d in node.decorator_list):
                out[f"{p.name}:{node.name}"] = node.end_lineno - node.body[0].lineno + 1
    return out


def test_every_command_reads_as_a_page():
    """A command parses and checks its options, calls the library and prints: the work (plans, resume state,
    records, loops over inputs, summaries) lives in the library, where Python callers and tests reach it."""
    bodies = command_bodies()
    assert sorted(bodies) == ["diagnose.py:diagnose_cmd", "eval.py:eval_cmd", "merge.py:merge_cmd",
                              "score.py:score_cmd", "train_expert.py:train_cmd", "weight.py:weight_cmd"]
    assert {c: n for c, n in bodies.items() if n > PAGE} == {}


def test_the_page_check_notices_a_long_command(tmp_path):
    """The check itself can fail: a command of PAGE + 1 body lines is found."""
    body = "".join(f"    x{i} = {i}\n" for i in range(PAGE + 1))
    (tmp_path / "long.py").write_text(f'@command("long")\ndef long_cmd():\n{body}\n\ndef helper():\n{body}')
    assert command_bodies(tmp_path) == {"long.py:long_cmd": PAGE + 1}
