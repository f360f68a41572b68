"""The command-line edge: one module per subcommand; only this package prints or exits.

A Ctrl-C (or SIGTERM) while the commands are still being imported ends at once with
exit 130 (143) and one line naming the signal, instead of a traceback from the middle of an import; ``main.run`` restores Python's
own handling as soon as it starts.
"""

import os as _os
import signal as _signal
import sys as _sys


def _interrupted_while_starting(signum, frame):  # pragma: no cover - timing-dependent, tested by subprocess
    _sys.stderr.write("mergetool: error: %s\n" % ("interrupted" if signum == _signal.SIGINT else "terminated"))
    _sys.stderr.flush()
    _os._exit(130 if signum == _signal.SIGINT else 143)


if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:  # an ignored Ctrl-C (a background job) stays so
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)
if _signal.getsignal(_signal.SIGTERM) is _signal.SIG_DFL:
    _signal.signal(_signal.SIGTERM, _interrupted_while_starting)
