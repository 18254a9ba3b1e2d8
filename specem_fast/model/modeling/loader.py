"""Load a Hugging Face folder (config.json + safetensors) into our Transformer.

The folder is untrusted input: every safetensors header is checked before the
library reads it, every tensor must have the shape config.json implies, the
checkpoint may hold no layer or tensor the config does not describe, and every
weight must be finite. Each problem is a SpecEMError naming the file and the fix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from specem_fast.errors import SpecEMError
from specem_fast.model.modeling.args import ModelArgs
from specem_fast.model.modeling.moe import Experts, ExpertStacker, moe_key
from specem_fast.model.modeling.transformer import Norm, Transformer
from specem_fast.model.quant import Dequantizer, is_float8, read_quant_spec

_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")
_MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header
_MARKER = "specem_fast.json"  # written by `models fetch` (see fetch.py)
_INDEX = "model.safetensors.index.json"  # a sharded checkpoint's tensor -> file map
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def fix_hint(folder: Path) -> str:
    """How to repair a broken folder: fetch again if we converted it, else re-save it."""
    marker = folder / _MARKER
    if marker.is_file():
        try:
            name = json.loads(marker.read_text(encoding="utf-8")).get("name") or folder.name
        except (OSError, ValueError, AttributeError):
            name = folder.name
        return f"run `specem-fast models fetch --force {name}` to convert it again"
    return "re-save the model with save_pretrained(..., safe_serialization=True)"


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise SpecEMError(f"{folder} has no config.json; point to a Hugging Face model folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecEMError(f"{path} is not valid JSON ({exc}); {fix_hint(folder)}") from None
    if not isinstance(cfg, dict):
        raise SpecEMError(
            f"{path} holds a JSON {type(cfg).__name__}, not an object of settings; {fix_hint(folder)}"
        )
    return cfg


def check_safetensors(path: Path, fix: str) -> dict:
    """Check a safetensors file's framing and return its header; never trust the library with a bad one."""
    size = path.stat().st_size
    if size < 8:
        raise SpecEMError(f"{path} is truncated ({size} bytes, too short for a safetensors header); {fix}")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > _MAX_HEADER:
            raise SpecEMError(
                f"{path} declares a {n}-byte header, more than safetensors allows ({_MAX_HEADER}): "
                f"the file is damaged or not safetensors; {fix}"
            )
        if 8 + n > size:
            raise SpecEMError(f"{path} is truncated: its header needs {8 + n} bytes, the file has {size}; {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SpecEMError(f"{path} has a damaged header (not JSON): the file is damaged or not safetensors; {fix}") from None
    if not isinstance(header, dict):
        raise SpecEMError(f"{path} has a damaged header (not a JSON object); {fix}")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise SpecEMError(f"{path} has a damaged header entry for {key!r}; {fix}")
        end = max(end, offsets[1])
    data = size - 8 - n
    if data != end:
        what = "truncated" if data < end else "longer than its header describes"
        raise SpecEMError(f"{path} is {what}: its tensors need {end} bytes after the header, it has {data}; {fix}")
    return header


def load_transformer(folder: Path, device: torch.device, dtype: torch.dtype, cfg: dict | None = None) -> Transformer:
    cfg = cfg if cfg is not None else read_config(folder)
    args = model_args(folder, cfg)
    quant = read_quant_spec(folder, cfg)  # a quantization_config is honoured or refused, never ignored
    files = weight_files(folder)
    if not files:
        raise SpecEMError(f"{folder} has no *.safetensors weights; save the model with safetensors")
    fix = fix_hint(folder)
    with torch.device("meta"):
        model = _in_folder_terms(folder, Transformer, args)  # rope kinds are read here
    state = _StateDict(folder, args, quant, {k: tuple(v.shape) for k, v in model.state_dict().items()}, dtype,
                       files, fix)
    for f in files:
        check_safetensors(f, fix)
        try:
            sf_ctx = safe_open(str(f), framework="pt", device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise SpecEMError(f"{f} cannot be read as safetensors ({exc}); {fix}") from None
        with sf_ctx as sf:
            for key in sf.keys():
                state.read(sf, key)
    model.load_state_dict(state.finish(), assign=True, strict=True)
    model.to(device)
    model.inv_freqs = [(inv.to(device), scaling) for inv, scaling in model.inv_freqs]
    return model.eval().requires_grad_(False)


class _StateDict:
    """Our state dict, built one checkpoint tensor at a time: each tensor is checked, and
    dequantized, stacked (MoE experts) or split (fused projections) into the tensors the
    model holds."""

    def __init__(self, folder: Path, args: ModelArgs, quant, expected: dict, dtype: torch.dtype,
                 files: list[Path], fix: str):
        self.folder, self.args, self.expected, self.dtype, self.files, self.fix = folder, args, expected, dtype, files, fix
        self.state: dict[str, torch.Tensor] = {}
        self.experts = ExpertStacker(expected, folder, fix) if args.moe is not None else None
        self.dq = Dequantizer(quant, folder, expected, fix, self._taken) if quant is not None else None

    def _taken(self, n: str) -> bool:  # a dequantized weight the model holds in another form (stacked, split)
        return (self.experts is not None and self.experts.claims(n)) or bool(self.args.fused_parts(n))

    def _finite(self, t: torch.Tensor, name: str) -> torch.Tensor:
        return _finite(t, name, self.folder, self.dtype, self.fix)

    def _put(self, name: str, t: torch.Tensor) -> None:
        _put(self.state, name, t, self.folder)

    def read(self, sf, key: str) -> None:
        folder, fix, expected = self.folder, self.fix, self.expected
        name = _normalise(key)
        if name is None:
            return  # a multimodal checkpoint's vision tower
        if self.experts is not None:
            name = moe_key(name)  # Mixtral's block_sparse_moe.* is our mlp.*
        if self.dq is not None and self.dq.claims(name, sf.get_slice(key).get_dtype()):
            for wname, w in self.dq.add(name, _read(sf, key, folder, fix)):  # quant.py: dequantized weights
                self._place(wname, self._finite(w, wname))
            return
        if self.experts is not None and self.experts.claims(name):  # one expert's projection: stacked per layer (moe.py)
            for sname, t in self.experts.add(name, self._finite(_read(sf, key, folder, fix), key)):
                self._put(sname, t)
            return
        parts = self.args.fused_parts(name) if name not in expected else None
        if parts:  # one tensor holding several of ours (phi3 qkv_proj, gate_up_proj)
            for pname, piece in _split_fused(sf, key, parts, expected, folder, fix):
                self._put(pname, self._finite(piece, key))
            return
        if name not in expected:
            _unexpected(folder, key, name, self.args, self.files)
            return
        shape = tuple(sf.get_slice(key).get_shape())
        if shape != expected[name]:
            raise SpecEMError(
                f"{folder}: tensor {key} has shape {list(shape)} but config.json implies "
                f"{list(expected[name])}; config.json does not belong to these weights ({fix})"
            )
        self._put(name, self._finite(_read(sf, key, folder, fix), key))

    def _place(self, wname: str, w: torch.Tensor) -> None:
        """A dequantized weight: an expert's projection, part of a fused one, or one of ours."""
        if self.experts is not None and self.experts.claims(wname):
            for sname, t in self.experts.add(wname, w):
                self._put(sname, t)
        elif wname not in self.expected and (fused := self.args.fused_parts(wname)):
            for pname, piece in _cut_rows(w, wname, fused, self.expected, self.folder, self.fix):
                self._put(pname, piece)
        else:
            self._put(wname, w)

    def finish(self) -> dict[str, torch.Tensor]:
        if self.dq is not None:
            self.dq.finish()
        if self.experts is not None:
            self.experts.finish()
        missing = sorted(set(self.expected) - set(self.state))
        if missing:
            raise SpecEMError(
                f"{self.folder}: weights are missing {len(missing)} tensors (first: {missing[0]}): the checkpoint is "
                f"incomplete (a shard missing?) or config.json describes another model; {self.fix}"
            )
        return self.state


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files that hold the model: the shards model.safetensors.index.json names
    where it exists (as transformers reads them: a repo may also carry other exports, such as
    Mistral's consolidated.safetensors), else every *.safetensors in the folder."""
    index = folder / _INDEX
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) and v and Path(v).name == v and v.endswith(".safetensors") for v in weight_map.values()):
        raise SpecEMError(f"{index} is damaged (it needs a weight_map from tensor names to .safetensors files in "
                          f"the folder); {fix_hint(folder)}")
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise SpecEMError(f"{folder}: {_INDEX} names {len(missing)} shard(s) the folder lacks (first: {missing[0]}): "
                          f"the checkpoint is incomplete; download all of its shards, or {fix_hint(folder)}")
    return [folder / n for n in names]


def model_args(folder: Path, cfg: dict) -> ModelArgs:
    """ModelArgs.from_hf_config, its refusals naming the folder (several members load at once)."""
    return _in_folder_terms(folder, ModelArgs.from_hf_config, cfg)


def _in_folder_terms(folder: Path, fn, *a):
    """fn(*a), a SpecEMError from it naming the folder, and the way out where a feature is missing."""
    try:
        return fn(*a)
    except SpecEMError as exc:
        msg = str(exc)
        if str(folder) in msg:
            raise
        if "unsupported" in msg or "not supported" in msg:
            msg += ("; the native runtime lacks this feature: load the model with the transformers backend, "
                    "or serve it with vLLM and join it as a vllm:URL#FOLDER member")
        raise type(exc)(f"{folder}: {msg}") from None


def _split_fused(sf, key: str, parts: list[tuple[str, int]], expected: dict, folder: Path, fix: str):
    """A fused tensor cut along dim 0 into our tensors (names and row counts from the family)."""
    want = [sum(n for _, n in parts), *expected[parts[0][0]][1:]]
    shape = list(sf.get_slice(key).get_shape())
    if shape != want:
        raise SpecEMError(f"{folder}: tensor {key} has shape {shape} but config.json implies {want}; "
                          f"config.json does not belong to these weights ({fix})")
    pieces = _read(sf, key, folder, fix).split([n for _, n in parts], dim=0)
    return [(name, piece.contiguous()) for (name, _), piece in zip(parts, pieces)]


def _cut_rows(t: torch.Tensor, name: str, parts: list[tuple[str, int]], expected: dict, folder: Path, fix: str):
    """A fused weight already in memory (a dequantized qkv_proj/gate_up_proj) cut along dim 0 into ours."""
    want = [sum(n for _, n in parts), *expected[parts[0][0]][1:]]
    if list(t.shape) != want:
        raise SpecEMError(f"{folder}: {name} has shape {list(t.shape)} but config.json implies {want}; "
                          f"config.json does not belong to these weights ({fix})")
    return [(n, piece.contiguous()) for (n, _), piece in zip(parts, t.split([k for _, k in parts], dim=0))]


def _read(sf, key: str, folder: Path, fix: str) -> torch.Tensor:
    """One tensor; a dtype this torch cannot represent is a SpecEMError, not a raw library error."""
    try:
        return sf.get_tensor(key)
    except Exception as exc:  # noqa: BLE001 - safetensors/torch raise their own types
        raise SpecEMError(f"{folder}: tensor {key} cannot be read ({type(exc).__name__}: {exc}); {fix}") from None


def _put(state: dict, name: str, t: torch.Tensor, folder: Path) -> None:
    if name in state:
        raise SpecEMError(f"{folder}: the weights hold {name} twice (as plain and quantized tensors, or in two "
                          "shards); the checkpoint is inconsistent: re-save it")
    state[name] = t


def random_transformer(args: ModelArgs, device: torch.device | str, dtype: torch.dtype, seed: int = 0,
                       std: float = 0.02) -> Transformer:
    """A model of ``args``'s shapes with random weights made on ``device`` in ``dtype``.

    For speed measurements at real shapes, where the weights do not matter: no file
    is read and no float32 copy is made (the skeleton is built on the meta device,
    cast there, then filled in place). Linear and embedding weights are N(0, std),
    biases 0, norms the identity.
    """
    with torch.device("meta"):
        model = Transformer(args)
    model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, Norm):
                mod.weight.fill_(0.0 if mod.offset else 1.0)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, Experts):  # stacked expert weights (moe.py)
                for p in mod.parameters():
                    p.normal_(0.0, std, generator=gen)
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                mod.weight.normal_(0.0, std, generator=gen)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
    model.inv_freqs = [(inv.to(device), scaling) for inv, scaling in model.inv_freqs]
    return model.eval().requires_grad_(False)


def _unexpected(folder: Path, key: str, name: str, args: ModelArgs, files: list[Path]) -> None:
    """A checkpoint tensor our model has no place for: allowed only where it is a known redundancy."""
    if name == "lm_head.weight" and args.tie_embeddings:
        return  # a tied checkpoint that also saved the head
    if name.endswith("rotary_emb.inv_freq"):
        return  # a buffer older transformers saved; we compute it
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= args.num_layers:
        layers = 1 + max(
            int(x.group(1))
            for f in files
            for x in map(_LAYER.match, _keys(f))
            if x
        )
        raise SpecEMError(
            f"{folder}: the weights have {layers} layers but config.json says num_hidden_layers="
            f"{args.num_layers}; loading would silently drop layers: fix num_hidden_layers in config.json"
        )
    if name.rpartition(".")[2] in ("qweight", "qzeros", "g_idx", "weight_scale_inv"):
        raise SpecEMError(
            f"{folder}: the weights hold {key}, a quantized tensor, but config.json declares no quantization_config; "
            "put the checkpoint's quantization_config (quant_method gptq, awq or fp8, its bits and group_size) back "
            "into config.json")
    raise SpecEMError(
        f"{folder}: the weights hold {key}, which config.json does not describe (e.g. attention_bias, "
        "tie_word_embeddings or the model type disagree with the checkpoint); fix config.json to match the weights"
    )


def _keys(f: Path) -> list[str]:
    with safe_open(str(f), framework="pt", device="cpu") as sf:
        return [k for k in (_normalise(k) for k in sf.keys()) if k]


def _finite(t: torch.Tensor, key: str, folder: Path, dtype: torch.dtype, fix: str) -> torch.Tensor:
    """The tensor in ``dtype``; NaN/inf in the file, or values ``dtype`` cannot hold, are refused."""
    if not t.is_floating_point():
        raise SpecEMError(f"{folder}: tensor {key} holds {t.dtype} values, not floating point weights; {fix}")
    if is_float8(t.dtype):  # float8 has no isfinite on the CPU; without scales its values mean nothing
        raise SpecEMError(
            f"{folder}: tensor {key} holds {str(t.dtype)[6:]} values, but config.json declares no fp8 "
            "quantization_config (quant_method 'fp8' with weight_block_size) to scale them: add the checkpoint's "
            "quantization_config to config.json, or use a float16/bfloat16/float32 copy of the weights")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise SpecEMError(f"{folder}: tensor {key} holds {t.dtype} values, which are not plain float weights; {fix}")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise SpecEMError(f"{folder}: tensor {key} holds {bad} NaN/inf values: the weights are damaged; {fix}")
    out = t.to(dtype)
    if out.dtype != t.dtype and not bool(torch.isfinite(out).all()):
        raise SpecEMError(
            f"{folder}: tensor {key} has values beyond the range of {str(dtype)[6:]}; load the model in "
            "bfloat16 or float32 (--dtype / dtype=)"
        )
    return out


def _normalise(key: str) -> str | None:
    for p in _PREFIXES:
        if key.startswith(p):
            key = "model." + key[len(p) :]
            break
    if key.startswith(("model.vision", "model.multi_modal", "vision_tower", "multi_modal_projector")):
        return None
    return key
