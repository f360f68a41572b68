"""--ray: score (its control and off-target included), eval and per-example training on a local Ray instance and
on a two-node cluster give the records of the single-process run; a worker killed mid-run changes nothing;
without --ray, Ray is never imported."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import default_sigint, lora_blob, random_lora, run_cli, signal_at

pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]


def capitals(n):
    rows = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    return [r for r in rows if r["task"] == "country-capital"][:n]


@pytest.fixture
def pool(tmp_path):
    rows = capitals(12)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = tmp_path / "pool"
    d.mkdir()
    for i, r in enumerate(rows):
        u = random_lora(i, rank=8, targets={"up_proj": (128, 64)}, layers=[1], name=r["id"])
        u.meta["training"] = {"example": r["id"]}
        for m in u.modules.values():
            m.B *= 30
        (d / f"{r['id']}.safetensors").write_bytes(lora_blob(u))
    return data, d


def same_records(a: list[dict], b: list[dict], key):
    assert [key(x) for x in a] == [key(x) for x in b]  # the same records, in the same order
    for x, y in zip(a, b):
        for k, v in x.items():
            if isinstance(v, float) or (isinstance(v, list) and v and all(isinstance(z, float) for z in v)):
                # fp32 sums in another order (the chunks, hence the batches, differ between the two paths)
                assert y[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
            elif k not in ("params",):
                assert y[k] == v, k


def records(b: bytes) -> list[dict]:
    return [json.loads(x) for x in b.decode().splitlines()]


def test_score_eval_and_training_on_local_ray_equal_one_process(tiny_lm, pool, tmp_path):
    data, d = pool
    args = ["score", "--base", str(tiny_lm), "--data", str(data), "-M", "3", "-N", "2", "--merge-chunk", "2", str(d)]
    one = records(run_cli(*args, check=True).stdout)
    assert all(r["control_trials"] == 2 and len(r["control_merges"]) == 2 and "off_target" in r for r in one)
    p2 = run_cli(*args, "--ray", "--workers", "2", check=True)
    assert b"lowered priority" not in p2.stderr  # a local instance runs its workers at the driver's priority
    same_records(one, records(p2.stdout), lambda r: r["adapter"])
    e1 = records(run_cli("eval", "--base", str(tiny_lm), "--adapter", str(d), str(data), check=True).stdout)
    # --ray local starts its own instance even where RAY_ADDRESS and Ray's record of the last cluster started
    # (RAY_TMPDIR/ray/ray_current_cluster) point at another (here a dead address: joining it would fail)
    tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths live below it
    (tmp / "ray").mkdir()
    (tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    try:
        p = run_cli("eval", "--base", str(tiny_lm), "--adapter", str(d), str(data), "--ray", "local", "--workers",
                    "2", check=True, env={"RAY_ADDRESS": "127.0.0.1:1", "RAY_TMPDIR": str(tmp)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    same_records(e1, records(p.stdout), lambda r: (r["adapter"], r["id"]))
    # Ray's own notes (token authentication, connection warnings) stay off the command's stderr
    assert all(x.startswith("mergetool eval: ") for x in p.stderr.decode().splitlines()), p.stderr.decode()
    t = ["train-expert", "--base", str(tiny_lm), "--per-example", "--rank", "4", "--epochs", "3", "--batch-size", "4",
         "--keep-if-correct", str(data)]
    local = run_cli(*t, "--out-dir", str(tmp_path / "one"), check=True)
    remote = run_cli(*t, "--out-dir", str(tmp_path / "two"), "--ray", "--workers", "2", check=True)
    a = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert a == sorted(p.name for p in (tmp_path / "two").iterdir()) and a, (local.stderr, remote.stderr)
    from mergetool.blobs import read_blobs
    from mergetool.updates import from_blob

    for name in a:
        x = from_blob(read_blobs(str(tmp_path / "one" / name))[0], "x")
        y = from_blob(read_blobs(str(tmp_path / "two" / name))[0], "y")
        for k in x.modules:
            assert (x.modules[k].delta() - y.modules[k].delta()).abs().max() < 1e-5


def score_args(tiny_lm, pool) -> list[str]:
    data, d = pool
    return ["score", "--base", str(tiny_lm), "--data", str(data), "-M", "3", "-N", "6", "--merge-chunk", "1", str(d)]


# Imported by every Python process started with its directory first on PYTHONPATH (a Ray worker too): the worker
# that begins its NTH score job first kills itself with SIGKILL (an event, not a moment: the kill always hits a
# job in flight, however busy the machine is); MARK, made once, keeps the others (and its restart) alive.
_KILL_A_WORKER = """
import functools, importlib.util, os, signal, sys

MARK, NTH = os.environ["MERGETOOL_TEST_KILL_MARK"], int(os.environ["MERGETOOL_TEST_KILL_NTH"])


class Hook:
    def find_spec(self, name, path=None, target=None):
        if name != "mergetool.distributed":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        spec.loader.exec_module = lambda m: (run(m), arm(m.Worker))
        return spec


def arm(cls):
    f, calls = cls.score_groups, [0]

    @functools.wraps(f)
    def score_groups(*a, **k):
        calls[0] += 1
        if calls[0] == NTH:
            try:
                os.close(os.open(MARK, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return f(*a, **k)

    cls.score_groups = score_groups


sys.meta_path.insert(0, Hook())
"""


def test_a_killed_worker_changes_nothing(tiny_lm, pool, tmp_path):
    """Two workers, one killed (SIGKILL) as its second job begins: that job goes to the other (or to its
    restart), and the records are those of the single-process run."""
    args = score_args(tiny_lm, pool)
    one = records(run_cli(*args, check=True).stdout)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_KILL_A_WORKER)
    mark = tmp_path / "killed"
    r = run_cli(*args, "--ray", "--workers", "2", env={
        "PYTHONPATH": os.pathsep.join(x for x in (str(hook), os.environ.get("PYTHONPATH")) if x),
        "MERGETOOL_TEST_KILL_MARK": str(mark), "MERGETOOL_TEST_KILL_NTH": "2"}, check=True)
    assert mark.exists(), "no worker reached its second job"
    assert b"a worker died; its job goes to another" in r.stderr, r.stderr.decode()
    same_records(one, records(r.stdout), lambda r: r["adapter"])


def test_a_stopped_driver_resumes_unordered_to_the_same_records(tiny_lm, pool, tmp_path):
    """The driver stopped mid-run (SIGTERM, as its 4th group's results are counted: exit 143), then --resume on the
    cluster with --unordered: the records of the single-process run, none twice (in another order, as they
    arrived)."""
    args = score_args(tiny_lm, pool)
    one = records(run_cli(*args, check=True).stdout)
    out, side = tmp_path / "s.jsonl", tmp_path / "s.jsonl.trials"
    stopped = signal_at("mergetool.score_run:Collector.add#4", signal.SIGTERM, *args, "--ray", "--workers", "2",
                        "-o", str(out))
    err = stopped.stderr
    assert stopped.returncode == 143, err.decode()
    assert err.decode().strip().splitlines()[-1].endswith("error: terminated") and b"SIGTERM received" not in err
    assert sum('"group"' in x for x in side.read_text().splitlines()) == 4  # something to resume
    r = run_cli(*args, "--ray", "--workers", "2", "--unordered", "-o", str(out), "--resume", check=True)
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(got) == len({x["adapter"] for x in got})  # nothing written twice
    same_records(sorted(one, key=lambda x: x["adapter"]), sorted(got, key=lambda x: x["adapter"]),
                 lambda x: x["adapter"])
    assert not side.exists(), r.stderr.decode()


def ip() -> str:
    """This machine's address as Ray sees it (the address a head announces)."""
    import ray._private.services as services

    return services.get_node_ip_address()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_cluster_on_one_machine(tiny_lm, pool, tmp_path):
    """A head and a worker node started with `ray start` on separate ports run a score to the same records."""
    data, d = pool
    ray = Path(sys.executable).parent / "ray"
    port = free_port()
    # a throwaway cluster inside the test: without token authentication (a real cluster keeps Ray's default)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    head = subprocess.run([str(ray), "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                           "--disable-usage-stats"], capture_output=True, env=env)
    assert head.returncode == 0, head.stderr.decode()
    try:
        node = subprocess.run([str(ray), "start", f"--address={ip()}:{port}", "--num-cpus=1",
                               f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                               "--disable-usage-stats"], capture_output=True, env=env)
        assert node.returncode == 0, node.stderr.decode()
        args = ["score", "--base", str(tiny_lm), "--data", str(data), "-M", "3", "-N", "2", str(d)]
        one = records(run_cli(*args, check=True).stdout)
        two = subprocess.run([sys.executable, "-m", "mergetool", *args, "--ray", f"{ip()}:{port}", "--workers", "2"],
                             capture_output=True, env=env)
        assert two.returncode == 0, two.stderr.decode()
        # nodes started as Ray starts them run workers at niceness 15: said once, with the fix
        assert b"RAY_worker_niceness=0" in two.stderr, two.stderr.decode()
        same_records(one, records(two.stdout), lambda r: r["adapter"])
    finally:
        subprocess.run([str(ray), "stop", "--force"], capture_output=True, env=env)


def test_a_node_with_another_model_refuses(tiny_lm, pool, tmp_path):
    """--base is checked by fingerprint on every worker: a worker whose --base is another model refuses."""
    import shutil

    data, d = pool
    other = tmp_path / "other"
    shutil.copytree(tiny_lm, other)
    cfg = json.loads((other / "config.json").read_text())
    code = ("import sys, mergetool.distributed as dist\n"
            "c = dist.connect('local', 1, sys.argv[1], None, sys.argv[2], 'cpu', None)\n")
    cfg["num_hidden_layers"] = 1
    (other / "config.json").write_text(json.dumps(cfg))
    from mergetool.model import fingerprint, resolve_base

    r = subprocess.run([sys.executable, "-c", code, str(other), fingerprint(resolve_base(str(tiny_lm)))],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "another model" in r.stderr


def test_a_node_with_other_weights_of_the_same_shapes_refuses(tiny_lm, tmp_path):
    """The fingerprint fixes shapes only; the content digest tells a fine-tune (or the instruct variant) of the
    same shapes from the driver's model, and agrees for the same weights sharded otherwise."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mergetool.distributed import Worker
    from mergetool.errors import MergetoolError
    from mergetool.model import content_digest, fingerprint, resolve_base

    base = resolve_base(str(tiny_lm))
    want, fp = content_digest(base), fingerprint(base)
    sd = load_file(str(tiny_lm / "model.safetensors"))
    resharded = tmp_path / "resharded"  # the same weights in two shards with an index
    shutil.copytree(tiny_lm, resharded)
    (resharded / "model.safetensors").unlink()
    keys = sorted(sd)
    half = {k: sd[k] for k in keys[::2]}, {k: sd[k] for k in keys[1::2]}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for part, n in zip(half, names):
        save_file(part, str(resharded / n), metadata={"format": "pt"})
    (resharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: names[i % 2] for i, k in enumerate(keys)}}))
    assert content_digest(resolve_base(str(resharded))) == want
    tuned = tmp_path / "tuned"  # one layer's weights moved: the same shapes, another model
    shutil.copytree(tiny_lm, tuned)
    k = "model.layers.1.mlp.down_proj.weight"
    sd[k] = sd[k] + 1e-3
    save_file(sd, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    assert fingerprint(resolve_base(str(tuned))) == fp and content_digest(resolve_base(str(tuned))) != want
    w = Worker(str(tuned), None, fp, "cpu", None, 1, want)
    with pytest.raises(MergetoolError, match="other weights"):
        w.ready()
    assert Worker(str(resharded), None, fp, "cpu", None, 1, want).ready()["pid"] == os.getpid()


def test_without_ray_nothing_imports_it(tiny_lm, pool, tmp_path):
    data, d = pool
    code = ("import sys\nfrom mergetool.cli.main import run\n"
            f"run(['score', '--base', {str(tiny_lm)!r}, '--data', {str(data)!r}, '-M', '2', '-N', '1', {str(d)!r},"
            f" '-o', {str(tmp_path / 's.jsonl')!r}, '-q'])\n"
            "print('ray' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("False"), r.stderr


def test_bad_ray_address_is_one_line(tiny_lm, pool, capsys):
    from mergetool.cli.main import _ray_alone, run

    data, d = pool
    for address, word in (("not an address", "is not a Ray address"), ("nothere/", "is not a Ray address"),
                          ("127.0.0.1:99999", "port 99999 is outside 1-65535"), ("ray://h:0", "port 0 is outside")):
        rc = run(["score", "--base", str(tiny_lm), "--data", str(data), "--ray", address, str(d)])
        err = capsys.readouterr().err
        assert rc == 2 and word in err and len(err.strip().splitlines()) == 1, (address, err)
    # an existing path after --ray is a positional (the pool), not an address: --ray alone means local
    assert _ray_alone(["score", "--ray", str(d), "-q"]) == ["score", "--ray", "local", str(d), "-q"]
    assert _ray_alone(["score", "--ray", "h:1", str(d)]) == ["score", "--ray", "h:1", str(d)]


def test_an_address_without_a_cluster_is_one_line_at_once(tiny_lm, pool):
    """--ray 127.0.0.1:1 (nothing listens) once hung past 200 s, deaf to Ctrl-C, printing Ray's retries, and then
    read "check the disk and the path": the address is probed first and named in the one line."""
    data, d = pool
    r = run_cli("eval", "--base", str(tiny_lm), str(data), "--ray", "127.0.0.1:1")
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 1 and err[-1].startswith("mergetool eval: error: --ray 127.0.0.1:1: cannot reach a Ray "
                                                    "cluster there (Connection refused)"), err
    assert all(x.startswith("mergetool eval: ") for x in err), err


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_ends_a_connection_that_waits(sig, code, word, tiny_lm, pool):
    """An address that answers but is no Ray head: Ray waits on it in its core, where a signal's handler never
    runs; the wait happens in a helper thread, so Ctrl-C and SIGTERM end it (and it ends after CONNECT_SECONDS).
    The signal is sent once Ray itself has connected (the second connection: the first is the probe's)."""
    data, d = pool
    srv = socket.create_server(("", 0))  # every interface: Ray dials this machine's address for 127.0.0.1
    port = srv.getsockname()[1]
    accepted, held = threading.Semaphore(0), []

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            held.append(c)
            accepted.release()

    threading.Thread(target=serve, daemon=True).start()
    p = subprocess.Popen([sys.executable, "-m", "mergetool", "eval", "--base", str(tiny_lm), str(data), "--ray",
                          f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=default_sigint)
    try:
        for _ in range(2):  # the probe's connection, then Ray's own: ray.init is waiting
            while not accepted.acquire(timeout=1):
                assert p.poll() is None, p.communicate()[1].decode()  # the command ended without connecting
        p.send_signal(sig)
        _, err = p.communicate()
    finally:
        p.kill()
        srv.close()
        for c in held:
            c.close()
    assert p.returncode == code and err.decode().strip().splitlines()[-1] == f"mergetool eval: error: {word}", err
