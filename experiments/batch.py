"""``python -m experiments.batch``: many mergetool commands in one process (``Run.mt_many``).

Each line of stdin is one command's arguments as a JSON list (what follows ``mergetool``). They run in order
through the CLI's own entry point (``mergetool.cli.main.run``: the same parsing, checks, atomic outputs and exit
codes as a separate ``mergetool`` process), so the interpreter's and the libraries' start-up (2-3 s a command
on the 2-core machine) is paid once. After each command that succeeds, its line number goes to stdout (the
caller's progress; the commands' own stdout goes to stderr, the caller's log); the first that fails ends the batch with its exit code, the commands before it done and
their outputs whole, the ones after it not started.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    import os

    from mergetool.cli.main import run

    progress = os.fdopen(os.dup(1), "w")  # the caller reads this; the commands' stdout goes to stderr
    sys.stdout.flush()
    os.dup2(2, 1)
    lines = sys.stdin.readlines()  # all of them first: a command that reads stdin finds it empty, not the batch
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    sys.stdin = open(os.devnull)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        argv = json.loads(line)
        code = run([str(a) for a in argv])
        if code:
            sys.stderr.write(f"experiments.batch: command {i + 1} failed with exit {code}: mergetool "
                             f"{' '.join(map(str, argv))}\n")
            return code
        progress.write(f"{i + 1}\n")
        progress.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
