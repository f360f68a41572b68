"""Every form of adapter input, read into updates: ``.safetensors`` files (one or several blobs), ``-``
(a stream of blobs on stdin), PEFT adapter directories, full fine-tuned model directories (their task
vector against ``--base``, read tensor by tensor), and directories of adapters (a pool); and the check that
updates share one base model."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MergetoolError, UsageError
from .blobs import load_pickle_tensors, read_blobs
from .model import Base, task_vector
from .updates import Update, check_peft_config, from_blob, from_tensors

MAX_CONFIG = 16 << 20  # bytes of adapter_config.json; PEFT's are a few hundred


def _read_config(path: Path) -> dict:
    """adapter_config.json as a type-checked object: every failure is one line naming the file and the field."""
    f = path / "adapter_config.json"
    what = str(f)
    try:
        with open(f, "rb") as fh:
            raw = fh.read(MAX_CONFIG + 1)
    except OSError as e:
        raise MergetoolError(what, f"cannot read ({e.strerror or e.__class__.__name__})") from None
    if len(raw) > MAX_CONFIG:
        raise MergetoolError(what, f"is larger than {MAX_CONFIG} bytes", "pass a PEFT adapter_config.json")
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise MergetoolError(what, "is not valid UTF-8", "rewrite it as UTF-8 JSON") from None
    except (ValueError, RecursionError) as e:
        raise MergetoolError(what, f"is not valid JSON ({e.__class__.__name__})", "fix or re-export it") from None
    if not isinstance(cfg, dict):
        raise MergetoolError(what, f"is not a JSON object (got a {type(cfg).__name__})",
                             "pass a PEFT adapter_config.json")
    kind = cfg.get("peft_type", "LORA")
    if not isinstance(kind, str):
        raise MergetoolError(what, f"field 'peft_type' must be a string, got {json.dumps(kind)[:40]}",
                             "fix the LoRA config")
    if kind != "LORA":
        raise MergetoolError(str(path), f"peft_type {kind} is not supported", "only LoRA adapters merge")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise MergetoolError(what, f"field 'base_model_name_or_path' must be a string, got {json.dumps(base)[:40]}",
                             "fix the LoRA config")
    return check_peft_config(cfg, what, label="")


def _pickle_refused(src: str) -> MergetoolError:
    return MergetoolError(src, "pickle files are refused (unpickling can run code)",
                          "convert it to safetensors, or pass --allow-pickle if you trust the source "
                          "(tensors only, loaded with weights_only)")


def _peft_dir(path: Path, allow_pickle: bool = False) -> Update:
    cfg = _read_config(path)
    st = path / "adapter_model.safetensors"
    meta = {"base_model": cfg.get("base_model_name_or_path")}
    if not st.exists():
        pk = path / "adapter_model.bin"
        if not pk.exists():
            raise MergetoolError(str(path), "has no adapter_model.safetensors", "pass a complete PEFT directory")
        if not allow_pickle:
            raise _pickle_refused(str(pk))
        return from_tensors(load_pickle_tensors(pk), meta, path.name, str(path), peft_config=cfg)
    blobs = read_blobs(str(st))
    embedded = blobs[0].metadata.get("mergetool")
    if embedded:
        try:
            extra = json.loads(embedded)
        except (ValueError, RecursionError):
            extra = None
        if isinstance(extra, dict):
            meta.update(extra)
    return from_tensors(blobs[0].tensors, meta, path.name, str(path), peft_config=cfg)


def _is_model_dir(p: Path) -> bool:
    return (p / "config.json").exists() and not (p / "adapter_config.json").exists()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def load_inputs(paths: list[str], base: Base | None = None, allow_pickle: bool = False) -> list[Update]:
    """Load every input (file, ``-``, PEFT dir, full model dir, pool dir) into updates, in order. Pickles (a
    ``.bin``/``.pt`` adapter, a PEFT directory's adapter_model.bin, a full model's ``*.bin``) load only with
    ``allow_pickle``, as tensors (``torch.load(weights_only=True)``)."""
    if sum(p == "-" for p in paths) > 1:
        raise UsageError("inputs", "'-' given more than once", "stdin can be read once")
    out: list[Update] = []
    for src in paths:
        if src == "-":
            out += [from_blob(b, f"stdin-{i + 1}") for i, b in enumerate(read_blobs("-"))]
            continue
        p = Path(src)
        if not p.exists():
            raise MergetoolError(src, "no such file or directory", "check the path")
        if p.is_dir():
            if (p / "adapter_config.json").exists():
                out.append(_peft_dir(p, allow_pickle))
            elif _is_model_dir(p):
                out.append(task_vector(p, base, allow_pickle=allow_pickle))
            else:
                members = sorted(x for x in p.iterdir()
                                 if x.suffix == ".safetensors" or (x.is_dir() and (x / "adapter_config.json").exists()))
                if not members:
                    raise MergetoolError(src, "directory holds no adapters",
                                         "a pool holds .safetensors files or PEFT directories")
                out += load_inputs([str(m) for m in members], base, allow_pickle)
        elif p.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise _pickle_refused(src)
            out.append(from_tensors(load_pickle_tensors(p), {}, p.stem, src))
        else:
            blobs = read_blobs(src)
            stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.stem
            out += [from_blob(b, stem if len(blobs) == 1 else f"{stem}-{i + 1}") for i, b in enumerate(blobs)]
    return out


def check_compatible(updates: list[Update], base_fingerprint: str | None = None) -> None:
    """Refuse updates of different bases or incompatible shapes."""
    fps = {u.name: u.fingerprint for u in updates if u.fingerprint}
    if base_fingerprint:
        for n, fp in fps.items():
            if fp != base_fingerprint:
                raise MergetoolError(n, f"was trained on another base (fingerprint {fp}, --base is {base_fingerprint})",
                                     "merge adapters of the same base model")
    if len(set(fps.values())) > 1:
        a, b = list(fps.items())[0], next((x for x in fps.items() if x[1] != list(fps.values())[0]))
        raise MergetoolError(b[0], f"has base fingerprint {b[1]}, but {a[0]} has {a[1]}",
                             "merge adapters of the same base model")
    shapes: dict[str, tuple[str, tuple]] = {}
    for u in updates:
        for mod, m in u.modules.items():
            if mod in shapes and shapes[mod][1] != tuple(m.shape):
                raise MergetoolError(u.name, f"module {mod} has shape {tuple(m.shape)}, but {shapes[mod][0]} has "
                                     f"{shapes[mod][1]}", "merge adapters of the same base model")
            shapes.setdefault(mod, (u.name, tuple(m.shape)))


def check_unique_names(updates: list[Update], why: str) -> None:
    """Refuse two inputs of one name (the same adapter given twice, or two adapters named alike) where outputs are
    keyed by name: ``why`` says what could not be told apart."""
    seen: set[str] = set()
    for u in updates:
        if u.name in seen:
            raise MergetoolError(u.name, f"two inputs have this name (the same adapter given twice, or two named "
                                 f"alike), so {why}", "pass each adapter once, or rename one (metadata 'name')")
        seen.add(u.name)
