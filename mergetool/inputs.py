"""Every form of adapter input, read into updates: ``.safetensors`` files (one or several blobs), ``-``
(a stream of blobs on stdin), PEFT adapter directories, full fine-tuned model directories (their task
vector against ``--base``, read tensor by tensor), and directories of adapters (a pool); and the check that
updates share one base model."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MergetoolError, UsageError
from .io import read_blobs
from .model import Base, task_vector
from .updates import Update, from_blob, from_tensors


def _peft_dir(path: Path) -> Update:
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MergetoolError(str(path), f"unreadable adapter_config.json ({e.__class__.__name__})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MergetoolError(str(path), f"peft_type {cfg.get('peft_type')} is not supported", "only LoRA adapters merge")
    st = path / "adapter_model.safetensors"
    if not st.exists():
        if (path / "adapter_model.bin").exists():
            raise MergetoolError(str(path), "holds adapter_model.bin (pickle) only",
                                 "convert it to safetensors; mergetool never unpickles")
        raise MergetoolError(str(path), "has no adapter_model.safetensors", "pass a complete PEFT directory")
    blobs = read_blobs(str(st))
    meta = {"base_model": cfg.get("base_model_name_or_path")}
    embedded = blobs[0].metadata.get("mergetool")
    if embedded:
        try:
            meta.update(json.loads(embedded))
        except json.JSONDecodeError:
            pass
    return from_tensors(blobs[0].tensors, meta, path.name, str(path), peft_config=cfg)


def _is_model_dir(p: Path) -> bool:
    return (p / "config.json").exists() and not (p / "adapter_config.json").exists()


def load_inputs(paths: list[str], base: Base | None = None, allow_pickle: bool = False) -> list[Update]:
    """Load every input (file, ``-``, PEFT dir, full model dir, pool dir) into updates, in order."""
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
                out.append(_peft_dir(p))
            elif _is_model_dir(p):
                out.append(task_vector(p, base, allow_pickle=allow_pickle))
            else:
                members = sorted(x for x in p.iterdir()
                                 if x.suffix == ".safetensors" or (x.is_dir() and (x / "adapter_config.json").exists()))
                if not members:
                    raise MergetoolError(src, "directory holds no adapters",
                                         "a pool holds .safetensors files or PEFT directories")
                out += load_inputs([str(m) for m in members], base, allow_pickle)
        elif p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
            raise MergetoolError(src, "pickle files are refused", "convert it to safetensors")
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
