"""Past one machine: ``score``, ``eval`` over many adapters and ``train-expert --per-example`` on a Ray cluster.

The work of these commands is many independent jobs against one base model: a chunk of trial groups merged
and evaluated, a chunk of adapters evaluated on a chunk of examples, a batch of experts trained. One actor
per GPU (or ``--workers`` actors on CPUs) loads the base model from ``--base`` on its own node, checks its
shapes' fingerprint and its weights' content digest against the driver's (a node with another model, or
other weights of the same shapes, refuses), and keeps it resident with the
caches of the single-process run (the pool, the lower layers' states). Jobs carry the adapters through
Ray's object store (put once, cached by the workers), so nodes need no shared filesystem. The driver draws
the plan exactly as the single-process run does, hands out jobs, and receives results; in order by default
(so the records are written in the single-process order) or as they arrive (``--unordered``).

Faults: a job whose worker dies (its process killed, its node lost) is given to another worker (the dead
one is restarted by Ray, reloading the model); each job's result is delivered once, by its index, so
nothing is lost or counted twice. A driver that dies is resumed with ``--resume``, as without Ray.

Ray is imported only here, and only with ``--ray``: ``pip install 'mergetool[ray]'``.
"""

from __future__ import annotations

import collections
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from .errors import MergetoolError, UsageError

log = logging.getLogger("mergetool")
_ADDRESS = re.compile(r"^(?:local|auto|(?:ray://)?(?:[\w.\-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,10}))$")
RETRIES = 3
PROBE_SECONDS = 10.0  # a TCP connection to a cluster's address: refused at once, unanswered after this
CONNECT_SECONDS = 120.0  # Ray's own connection to a reachable address (it retries without end on its own)


def is_address(text: str) -> bool:
    """Whether ``text`` has the form of a Ray address (``check_address`` says what is wrong with one that has)."""
    return bool(_ADDRESS.match(text))


def check_address(address: str) -> str:
    """``local`` (start a Ray instance here), ``auto`` (the cluster this machine belongs to), ``ray://host:port``
    (a Ray client connection) or ``host:port`` (a head node's GCS address), the port in 1-65535."""
    m = _ADDRESS.match(address)
    if not m:
        raise UsageError("--ray", f"{address!r} is not a Ray address",
                         "pass local, auto, ray://HOST:PORT or HOST:PORT (--ray alone means local)")
    if m.group("port") is not None and not 1 <= int(m.group("port")) <= 65535:
        raise UsageError("--ray", f"{address!r}: port {m.group('port')} is outside 1-65535",
                         "pass the head node's port (6379 unless the cluster was started with another)")
    return address


def _messages_to_stderr() -> None:
    """Ray prints its cluster's error messages ("a worker died ...") on the driver's stdout, which carries the
    command's data: they go to stderr instead, with the rest of the notes."""
    try:
        import ray._private.worker as rw
    except ImportError:  # pragma: no cover - another Ray layout: its messages keep their own stream
        return
    if getattr(rw.print_to_stdstream, "_mergetool", False):
        return
    original = rw.print_to_stdstream

    def to_stderr(data, ignore_prefix):
        original({**data, "is_err": True}, ignore_prefix)

    to_stderr._mergetool = True
    rw.print_to_stdstream = to_stderr


def _quiet_ray(started: bool = False) -> None:
    """Ray's own notes (its Python loggers: token authentication, "SIGTERM handler is not set") stay off the
    command's stderr: they go to mergetool's log, at debug level (seen with --debug), errors as warnings. Ray's
    logger drops what is below ERROR (unless --debug) until ``ray.init`` has run, which clears its handlers
    (``started``: then ours is put back). Its core's C++ warnings come only from a failing connection, which
    ``_probe`` refuses first."""
    ray_log = logging.getLogger("ray")
    ray_log.setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR)
    ray_log.handlers = [_ToLog()]
    ray_log.propagate = False
    if started:
        ray_log.setLevel(logging.DEBUG)


class _ToLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log.log(logging.WARNING if record.levelno >= logging.ERROR else logging.DEBUG, "ray: %s", record.getMessage())


def _target(ray, address: str) -> str:
    """What ``ray.init`` is given: ``local`` (a new instance here, whatever ``RAY_ADDRESS`` or Ray's record of the
    last cluster started on this machine say), the address itself, or for ``auto`` the cluster Ray finds
    (``RAY_ADDRESS``, else the last cluster started here), refused in one line when there is none."""
    if address != "auto":
        return address
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return env
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found = canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError):
        found = None
    if not found:
        raise MergetoolError("--ray auto", "no Ray cluster runs on this machine (RAY_ADDRESS is not set and none was "
                             "started with ray start)", "start one (ray start --head), or pass --ray local")
    return found


def _probe(address: str, target: str) -> None:
    """A TCP connection to the cluster's address, in this thread (a signal ends it), bounded by PROBE_SECONDS: Ray
    itself retries a refused or unanswered address without end, deaf to Ctrl-C."""
    import socket

    hostport = target.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except (OSError, ValueError) as e:
        why = f"no answer in {PROBE_SECONDS:g} s" if isinstance(e, TimeoutError) else \
            (getattr(e, "strerror", None) or str(e) or e.__class__.__name__)
        shown = address if address == target else f"{address} ({target})"
        raise MergetoolError(f"--ray {shown}", f"cannot reach a Ray cluster there ({why})",
                             "start the cluster (ray start --head) or check the host and port") from None


def _init(ray, address: str, target: str, **kw) -> None:
    """``ray.init``; a failure is one line naming the address. A local instance starts in this thread (Ray ties
    the processes it starts to the thread that started them); a connection to a cluster is made in a helper
    thread while this one waits, so that the wait is bounded (CONNECT_SECONDS) and Ctrl-C or SIGTERM end it, as
    they end any other moment of the command (Ray, blocked in its core, would not see them)."""
    import threading

    shown = address if address == target else f"{address} ({target})"
    if target == "local":
        try:
            ray.init(address="local", **kw)
        except Exception as e:
            raise _failed(shown, e) from None
        return
    done: dict = {}

    def go():
        try:
            ray.init(address=target, **kw)
        except BaseException as e:  # noqa: BLE001 - carried to the waiting thread, which decides
            done["error"] = e
        done["end"] = True

    t = threading.Thread(target=go, name="ray-init", daemon=True)
    t.start()
    t.join(CONNECT_SECONDS)
    if "end" not in done:
        raise MergetoolError(f"--ray {shown}", f"no Ray cluster answered in {CONNECT_SECONDS:g} s (the address "
                             "answers, but not as a Ray head)", "pass the head node's address and port "
                             "(ray status on the head shows it)")
    if isinstance(done.get("error"), Exception):
        raise _failed(shown, done["error"])
    if done.get("error") is not None:  # a signal's exception in the helper thread: carried as it is
        raise done["error"]


def _failed(shown: str, e: Exception) -> MergetoolError:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return MergetoolError(f"--ray {shown}", f"cannot start or reach Ray ({e.__class__.__name__}: {first})",
                          "check the address, and that the cluster runs this version of Ray")


def _ray():
    try:
        import ray
    except ImportError:
        raise MergetoolError("--ray", "Ray is not installed", "pip install 'mergetool[ray]'") from None
    return ray


# ----------------------------------------------------------------------------- the worker


class Worker:
    """Runs on a Ray node: the base model resident, and the single-process code on the jobs it is given."""

    def __init__(self, base: str, gguf_file: str | None, expected: str, device: str, dtype: str | None,
                 threads: int | None, expected_weights: str | None = None):
        import torch

        from .device import pick_device
        from .model import content_digest, fingerprint, load_model, resolve_base

        if threads:
            torch.set_num_threads(threads)
        b = resolve_base(base, gguf_file)
        self.fp = fingerprint(b)
        self.refused = None
        if self.fp != expected:
            self.refused = f"node {os.uname().nodename} has another model at {base} (fingerprint {self.fp}, " \
                           f"the driver's is {expected})"
            return
        digest = content_digest(b)
        if expected_weights and digest != expected_weights:
            self.refused = f"node {os.uname().nodename} has other weights at {base} (the same shapes, content " \
                           f"digest {digest}, the driver's is {expected_weights})"
            return
        self.dev = pick_device(device)
        self.model, self.tok = load_model(b, self.dev, getattr(torch, dtype) if dtype else None)
        self.cache: dict[str, Any] = {}

    def ready(self) -> dict:
        if self.refused:
            raise MergetoolError("--base", self.refused, "install the same base model on every node")
        return {"pid": os.getpid(), "node": os.uname().nodename, "niceness": os.nice(0)}

    def _cached(self, key: str, build: Callable[[], Any]):
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def _examples(self, spec: dict):
        from .examples import check_examples

        def build():
            exs = check_examples(spec["rows"], "examples")
            for e, c in zip(exs, spec["contexts"]):
                e.context = c
            return exs

        return self._cached(f"examples:{spec['key']}", build)

    def _updates(self, key: str, ref: list):
        import ray

        return self._cached(f"updates:{key}", lambda: ray.get(ref[0]))

    # -- score

    def _scorer(self, spec: dict, pool_ref: list):
        from .methods import get
        from .score import Scorer

        def build():
            pool = self._updates(spec["key"], pool_ref)
            return Scorer(self.model, self.tok, pool, self._examples(spec), spec["data_of"], get(spec["method"]),
                          spec["params"], self.dev, spec["norm"], spec["batch_tokens"], spec["merge_chunk"],
                          spec["level"], spec["off_target"], spec["seed"])

        return self._cached(f"scorer:{spec['key']}", build)

    def score_groups(self, spec: dict, pool_ref: list, groups: list, ids: list[int]) -> dict[int, dict]:
        out: dict[int, dict] = {}
        self._scorer(spec, pool_ref).run_groups(groups, ids, lambda g, res: out.__setitem__(g, res))
        return out

    def explain(self, spec: dict, pool_ref: list, which: list[int], texts: list) -> dict:
        return self._scorer(spec, pool_ref).explain(which, texts)

    # -- eval

    def evaluate(self, spec: dict, updates_ref: list, which: list[int], example_ids: list[int]) -> list[list[dict]]:
        from . import evaluate as ev
        from .adapters import RowAdapters

        exs = self._examples(spec)
        ups = self._updates(spec["key"], updates_ref) if updates_ref else []
        chunk = [exs[i] for i in example_ids]
        mine = [ups[i] for i in which] if ups else []
        with RowAdapters(self.model, mine) as ad:
            return ev.evaluate(self.model, self.tok, chunk, spec["norm"], spec["max_new_tokens"], spec["batch_tokens"],
                               None, ad, [(k, range(len(chunk))) for k in (range(len(mine)) or [-1])])

    # -- train-expert --per-example

    def known(self, spec: dict, example_ids: list[int]) -> list[bool]:
        from . import evaluate as ev

        exs = self._examples(spec)
        return [bool(r["correct"]) for r in ev.evaluate(self.model, self.tok, [exs[i] for i in example_ids])[0]]

    def train(self, spec: dict, example_ids: list[int]) -> list[tuple[str, bytes | None, float]]:
        """Train the experts of these examples together; each as (id, its blob or None when dropped, loss)."""
        from . import train as tr

        exs = [self._examples(spec)[i] for i in example_ids]
        lspec = tr.LoraSpec(**spec["lora"])
        names = tr.target_modules(self.model, lspec, default_middle=True)
        return tr.train_examples(self.model, self.tok, exs, lspec, names, spec["meta"], spec["keep_if_correct"])

    def pid(self) -> int:
        return os.getpid()


# ----------------------------------------------------------------------------- the driver


@dataclass
class Cluster:
    """The actors, and the loop that hands them jobs and receives results."""

    ray: Any
    actors: list
    make: Callable[[], Any]

    def put(self, value) -> list:
        """An object for every job, sent once (wrapped in a list so that Ray does not fetch it eagerly)."""
        return [self.ray.put(value)]

    def put_updates(self, updates) -> list:
        """Updates for the workers, their tensors in memory (a full model's task vector is read here, on the
        driver, so nodes need not see its files; DoRA and full-tensor modules travel as they are and take the
        base's tensors on the worker)."""
        from .updates import Dense, Update

        return self.put([Update(u.name, {k: Dense(m.delta()) if type(m) is Dense else m
                                         for k, m in u.modules.items()}, u.meta, u.dtype, u.copies) for u in updates])

    def run(self, method: str, jobs: list[tuple], deliver: Callable[[int, Any], None], ordered: bool = True) -> None:
        """Run ``actor.method(*job)`` for every job, at most two in flight per actor; ``deliver(index, result)`` once
        per job, in job order (or as they arrive). A job whose actor died is given to another, up to RETRIES."""
        ray = self.ray
        from ray.exceptions import RayActorError, RayTaskError

        queue = collections.deque(range(len(jobs)))
        pending: dict = {}
        tries = collections.Counter()
        waiting: dict[int, Any] = {}
        next_out = 0
        turn = 0
        while queue or pending:
            while queue and len(pending) < 2 * len(self.actors):
                j = queue.popleft()
                actor = self.actors[turn % len(self.actors)]
                turn += 1
                pending[getattr(actor, method).remote(*jobs[j])] = (j, actor)
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                j, actor = pending.pop(ref)
                try:
                    res = ray.get(ref)
                except RayTaskError as e:
                    cause = e.as_instanceof_cause()
                    if isinstance(cause, MergetoolError):
                        raise MergetoolError(cause.what, cause.why, cause.fix) from None
                    raise MergetoolError("ray worker", f"{e.cause.__class__.__name__}: {str(e.cause)[:300]}",
                                         "rerun with --debug") from None
                except RayActorError:
                    tries[j] += 1
                    if tries[j] > RETRIES:
                        raise MergetoolError("ray", f"job {j} failed on {RETRIES + 1} workers", "check the cluster") from None
                    log.warning("a worker died; its job goes to another")
                    self._revive(actor)
                    queue.appendleft(j)
                    continue
                if not ordered:
                    deliver(j, res)
                    continue
                waiting[j] = res
                while next_out in waiting:
                    deliver(next_out, waiting.pop(next_out))
                    next_out += 1

    def _revive(self, actor) -> None:
        """Ray restarts a dead actor itself (max_restarts, reloading the model); one that is gone for good (its
        restarts spent, its node lost) is replaced by a new one."""
        if actor not in self.actors:
            return  # already replaced, for another of its jobs
        try:
            self.ray.get(actor.pid.remote(), timeout=600)
        except Exception:  # noqa: BLE001 - whatever the reason, this actor no longer serves
            if actor in self.actors:
                self.actors[self.actors.index(actor)] = self.make()

    def pids(self) -> list[int]:
        return self.ray.get([a.pid.remote() for a in self.actors])


def connect(address: str, workers: int | None, base: str, gguf_file: str | None, fp: str, device: str,
            dtype: str | None) -> Cluster:
    """Start or join Ray and one resident model per worker (one per GPU when the cluster has GPUs, else
    ``workers`` on CPUs, default one per node), each checked against the driver's base fingerprint and weights digest."""
    from .model import content_digest, resolve_base

    ray = _ray()
    check_address(address)
    weights = content_digest(resolve_base(base, gguf_file))
    _messages_to_stderr()
    _quiet_ray()
    if not ray.is_initialized():
        # Ray starts its workers at niceness 15 (behind every other process of the node); here the workers do
        # the command's work, so a local instance runs them at the driver's priority. On a cluster, the nodes'
        # own setting holds (start them with RAY_worker_niceness=0, README).
        if address == "local":
            os.environ.setdefault("RAY_worker_niceness", "0")
        target = _target(ray, address)
        if target != "local":
            _probe(address, target)
        kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False,
                  runtime_env={"env_vars": {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}})
        import signal

        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        _init(ray, address, target, **kw)
        _quiet_ray(started=True)
        # Ray's core worker may install its own SIGTERM handler in the driver (a stack dump, exit 15): the
        # command's handlers come back, so Ctrl-C and SIGTERM end a --ray run as any other (exit 130/143, one line).
        for sig, h in handlers.items():
            if h is not None:
                signal.signal(sig, h)
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if device == "cpu":
        gpus = 0
    n = workers or gpus or max(1, len([x for x in ray.nodes() if x.get("Alive")]))
    if gpus and n > gpus:
        raise UsageError("--workers", f"{n} workers need a GPU each; the cluster has {gpus}",
                         f"pass --workers {gpus} or fewer (or --device cpu)")
    cpus = max(1, int(res.get("CPU", 1)) // n)
    actor_cls = ray.remote(Worker)

    def make():
        opts = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": cpus}
        return actor_cls.options(max_restarts=RETRIES, max_task_retries=0, **opts).remote(
            base, gguf_file, fp, "cuda" if gpus else "cpu", dtype, None if gpus else cpus, weights)

    actors = [make() for _ in range(n)]
    cluster = Cluster(ray, actors, make)
    try:
        lowered = sorted({f"{r['node']} ({r['niceness']})" for r in ray.get([a.ready.remote() for a in actors])
                          if r["niceness"] > os.nice(0)})
    except ray.exceptions.RayTaskError as e:
        cause = e.as_instanceof_cause()
        if isinstance(cause, MergetoolError):
            raise MergetoolError(cause.what, cause.why, cause.fix) from None
        raise MergetoolError("--ray", f"a worker failed to start ({e.cause.__class__.__name__}: {str(e.cause)[:200]})",
                             "check that every node has mergetool and the base model") from None
    if lowered:
        log.warning("ray: workers run at a lowered priority on %s: other processes of those nodes come first; "
                    "start the nodes with RAY_worker_niceness=0", ", ".join(lowered))
    log.info("ray: %d worker%s (%s)", n, "s" if n > 1 else "", "one GPU each" if gpus else f"{cpus} CPUs each")
    return cluster


# ----------------------------------------------------------------------------- the commands' jobs


def examples_spec(examples, key: str, **extra) -> dict:
    """The examples (records and the contexts the driver rendered) for the workers, cached under ``key``."""
    return {"rows": [e.rec for e in examples], "contexts": [e.context for e in examples], "key": key, **extra}


class RayScorer:
    """``score.Scorer``'s two calls, run by the cluster's workers: the same chunks of groups, delivered in the
    same order (or as they arrive, ``ordered=False``)."""

    def __init__(self, cluster: Cluster, spec: dict, pool_ref: list, merge_chunk: int, ordered: bool = True):
        self.cluster, self.spec, self.pool_ref, self.chunk, self.ordered = cluster, spec, pool_ref, merge_chunk, ordered
        self.seconds = {"merge": None, "evaluate": None}

    def run_groups(self, groups, ids, done, progress=None) -> None:
        jobs = [(self.spec, self.pool_ref, groups, ids[s:s + self.chunk]) for s in range(0, len(ids), self.chunk)]

        def deliver(j, res):
            for g in jobs[j][3]:
                done(g, res[g])
            if progress:
                progress(len(jobs[j][3]))

        self.cluster.run("score_groups", jobs, deliver, self.ordered)

    def explain(self, which: list[int], texts: list) -> dict:
        out: dict = {}
        step = 64
        jobs = [(self.spec, self.pool_ref, which[s:s + step], texts[s:s + step]) for s in range(0, len(which), step)]
        self.cluster.run("explain", jobs, lambda j, res: out.update(res), True)
        return out
