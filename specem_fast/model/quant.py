"""Quantized checkpoints: dequantized at load into the compute dtype, or refused.

A ``quantization_config`` in config.json is never ignored. The native runtime
honours three formats by dequantizing every quantized linear weight once, while
the checkpoint loads, into an ordinary float tensor (the model then runs in its
compute dtype exactly as an unquantized one would with those weights):

- **GPTQ** (``quant_method: "gptq"``, 4 or 8 bits, checkpoint format ``gptq``
  (v1) or ``gptq_v2``): per linear module ``qweight`` (int32, ``32/bits`` values
  per word packed along the input dimension, lowest bits first), ``qzeros``
  (int32, packed the same way along the output dimension; v1 stores each zero
  point minus one), ``scales`` (one row per group) and ``g_idx`` (the group of
  every input channel; with ``desc_act`` it is a permutation, without it
  ``i // group_size``). ``W[o, i] = scales[g, o] * (q[i, o] - zero[g, o])`` with
  ``g = g_idx[i]``.
- **AWQ** (``quant_method: "awq"``, GEMM layout, 4 or 8 bits): ``qweight``
  (int32, packed along the output dimension in AWQ's interleaved order: the
  word's slot ``k`` holds output ``order[k]`` of its pack, ``order`` =
  [0, 2, 4, 6, 1, 3, 5, 7] for 4 bits and [0, 2, 1, 3] for 8), ``qzeros``
  (packed the same way), ``scales``; ``W[o, i] = (q[i, o] - zero[i // gs, o]) *
  scales[i // gs, o]``.
- **block-scaled fp8** (``quant_method: "fp8"``, DeepSeek-V3 / Qwen3-FP8 style):
  ``weight`` in ``float8_e4m3fn`` and ``weight_scale_inv`` with one factor per
  ``weight_block_size`` block (128 x 128 by default; the last blocks may be
  partial): ``W = weight * weight_scale_inv[block]``. Activation scales of the
  static scheme are dropped: activations stay in the compute dtype.

Every other method (bitsandbytes, compressed-tensors, torchao, ...) is refused by
:func:`quantization_refusal` in one line naming the folder, the method and what
to do. A config that declares quantization over a checkpoint holding only plain
float tensors is refused too (one of the two is wrong, and guessing could run a
model with the wrong weights).
"""

from __future__ import annotations

import importlib.util

from dataclasses import dataclass, field
from pathlib import Path
import torch

from specem_fast.errors import SpecEMError

NATIVE_METHODS = ("gptq", "awq", "fp8")
AWQ_ORDER = {4: (0, 2, 4, 6, 1, 3, 5, 7), 8: (0, 2, 1, 3)}
_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                if hasattr(torch, n))
_FP8_WEIGHT_DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors' names of the float8 weight dtypes
_INT_PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}


def ways_out(what: str = "") -> str:
    """What a user can do with a checkpoint the native runtime cannot read."""
    need = f" (with {what} installed)" if what else ""
    return ("load it with the transformers backend" + need + ", serve it with vLLM and join it as a "
            "vllm:URL#FOLDER member, or use a dequantized copy (a float16/bfloat16 save_pretrained of it)")


# The package each refused method needs in transformers, for the message.
_QUANTIZER_PACKAGE = {
    "bitsandbytes": "bitsandbytes", "compressed-tensors": "compressed-tensors", "torchao": "torchao",
    "hqq": "hqq", "quanto": "optimum-quanto", "eetq": "eetq", "aqlm": "aqlm", "vptq": "vptq",
    "fbgemm_fp8": "fbgemm-gpu", "higgs": "flute-kernel", "quark": "amd-quark", "auto-round": "auto-round",
    "mxfp4": "triton kernels", "spqr": "spqr_quant", "fp_quant": "fp_quant", "bitnet": "",
}


# The module transformers' quantizer imports for each method (a variant the native runtime
# refuses, e.g. 2-bit GPTQ, goes there too when its library is installed).
_QUANTIZER_MODULE = {
    "bitsandbytes": "bitsandbytes", "compressed-tensors": "compressed_tensors", "torchao": "torchao", "hqq": "hqq",
    "quanto": "optimum.quanto", "eetq": "eetq", "aqlm": "aqlm", "vptq": "vptq", "fbgemm_fp8": "fbgemm_gpu",
    "higgs": "flute", "quark": "quark", "auto-round": "auto_round", "spqr": "spqr_quant", "fp_quant": "fp_quant",
    "gptq": "gptqmodel", "awq": "awq",
}


def quantizer_installed(cfg: dict) -> bool:
    """Whether the library transformers needs for this checkpoint's quantization is importable."""
    q = quantization_config(cfg)
    module = _QUANTIZER_MODULE.get(str(q.get("quant_method") or "").lower()) if isinstance(q, dict) else None
    if not module:
        return False
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing
        return False


@dataclass(frozen=True)
class QuantSpec:
    """A quantization_config the native runtime honours."""

    method: str  # gptq | awq | fp8
    bits: int = 0
    group_size: int = -1
    desc_act: bool = False
    v1_zeros: bool = True  # gptq: zero points stored minus one
    block: tuple[int, int] | None = (128, 128)  # fp8: (rows, cols) per scale; None: one scale per tensor
    raw: dict = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        if self.method == "fp8":
            return f"fp8 (block {self.block[0]}x{self.block[1]})" if self.block else "fp8 (per-tensor scale)"
        group = "per-channel" if self.group_size == -1 else f"group {self.group_size}"
        return f"{self.method.upper()} {self.bits}-bit ({group}{', desc_act' if self.desc_act else ''})"


def quantization_config(cfg: dict) -> dict | None:
    """The checkpoint's quantization_config (top level, or a multimodal config's text part)."""
    q = cfg.get("quantization_config")
    if q is None and isinstance(cfg.get("text_config"), dict):
        q = cfg["text_config"].get("quantization_config")
    return q


def read_quant_spec(folder: Path | str, cfg: dict) -> QuantSpec | None:
    """The quantization this folder's config declares, checked; None for a plain checkpoint.

    Raises SpecEMError (naming the folder, the method and a way out) for anything the
    native runtime cannot dequantize exactly.
    """
    q = quantization_config(cfg)
    if q is None:
        return None
    if not isinstance(q, dict):
        raise SpecEMError(f"{folder}: config.json's quantization_config is a {type(q).__name__}, not an object; "
                          "fix config.json (or remove quantization_config if the weights are plain float)")
    method = str(q.get("quant_method") or "").lower()
    if method not in NATIVE_METHODS:
        if not method:
            raise SpecEMError(f"{folder}: config.json has a quantization_config without quant_method; the native "
                              f"runtime cannot tell how the weights are stored: {ways_out()}")
        pkg = _QUANTIZER_PACKAGE.get(method, method)
        raise SpecEMError(f"{folder} is quantized with {method!r}, which the native runtime does not dequantize "
                          f"(it reads GPTQ, AWQ and block fp8); {ways_out(pkg)}")
    if method == "fp8":
        return _fp8_spec(folder, q)
    return _int_spec(folder, method, q)


def quantization_refusal(folder: Path | str, cfg: dict) -> str | None:
    """The refusal message of :func:`read_quant_spec`, or None when the native runtime reads the checkpoint."""
    try:
        read_quant_spec(folder, cfg)
    except SpecEMError as exc:
        return str(exc)
    return None


def _refuse(folder, spec_text: str, why: str) -> SpecEMError:
    return SpecEMError(f"{folder} is quantized with {spec_text}, which the native runtime does not dequantize "
                       f"({why}); {ways_out()}")


def _int_spec(folder, method: str, q: dict) -> QuantSpec:
    bits = q.get("bits", q.get("w_bit"))
    group = q.get("group_size", q.get("q_group_size", 128))  # transformers' default for both
    name = f"{method.upper()} {bits}-bit"
    if bits not in (4, 8) or isinstance(bits, bool):
        raise _refuse(folder, name, "only 4- and 8-bit GPTQ/AWQ are read natively")
    if isinstance(group, bool) or not isinstance(group, int) or (group != -1 and group < 1):
        raise SpecEMError(f"{folder}: quantization_config.group_size is {group!r}, not a positive integer or -1; "
                          "fix config.json to match the weights")
    if method == "gptq":
        fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise _refuse(folder, f"{name} in the {fmt!r} layout", "only the gptq and gptq_v2 layouts are read natively")
        return QuantSpec("gptq", bits, group, bool(q.get("desc_act", False)), fmt == "gptq", None, dict(q))
    fmt = str(q.get("version") or q.get("format") or "gemm").lower()
    if fmt != "gemm":
        raise _refuse(folder, f"{name} in the {fmt!r} layout", "only AWQ's GEMM layout is read natively")
    if q.get("zero_point", True) is False:
        raise _refuse(folder, f"{name} without zero points", "AWQ is read natively with zero points only")
    return QuantSpec("awq", bits, group, False, False, None, dict(q))


def _fp8_spec(folder, q: dict) -> QuantSpec:
    fmt = str(q.get("fmt") or "e4m3").lower()
    if fmt not in ("e4m3", "e5m2"):
        raise _refuse(folder, f"fp8 ({fmt})", "only float8 e4m3/e5m2 weights are read natively")
    if str(q.get("expert_dtype") or "fp8").lower() != "fp8":
        raise _refuse(folder, f"fp8 with {q.get('expert_dtype')} experts", "fp4-packed experts are not read natively")
    block = q.get("weight_block_size", [128, 128])
    if block is not None:
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block)):
            raise SpecEMError(f"{folder}: quantization_config.weight_block_size is {block!r}, not two positive "
                              "integers; fix config.json to match the weights")
        block = (int(block[0]), int(block[1]))
    return QuantSpec("fp8", 8, -1, False, False, block, dict(q))


# --------------------------------------------------------------------- unpacking


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] holding ``32/bits`` values per word along dim 0 -> int32 [R * 32/bits, C]."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    vals = (packed.to(torch.int32)[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
    return vals.reshape(packed.shape[0] * per, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [R, C] holding ``32/bits`` values per word along dim 1 -> int32 [R, C * 32/bits].

    ``order``: slot ``k`` of a word holds value ``order[k]`` of its pack (AWQ); None: slot k holds value k.
    """
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    vals = (packed.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)  # [R, C, slot]
    if order is not None:
        vals = vals[:, :, torch.tensor(order).argsort()]  # slot -> value position
    return vals.reshape(packed.shape[0], packed.shape[1] * per)


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int, v1_zeros: bool = True) -> torch.Tensor:
    """GPTQ tensors of one linear -> float32 weight [out, in]."""
    q = unpack_rows(qweight, bits)  # [in, out]
    out = q.shape[1]
    zeros = unpack_cols(qzeros, bits)[:, :out]  # [groups, out]
    if v1_zeros:
        zeros = (zeros + 1) & ((1 << bits) - 1)
    g = g_idx.long()
    w = scales.float()[g] * (q - zeros[g]).float()  # [in, out]
    return w.t().contiguous()


def dequantize_awq(qweight, qzeros, scales, bits: int, group_size: int) -> torch.Tensor:
    """AWQ (GEMM layout) tensors of one linear -> float32 weight [out, in]."""
    order = AWQ_ORDER[bits]
    q = unpack_cols(qweight, bits, order)  # [in, out]
    zeros = unpack_cols(qzeros, bits, order)[:, : q.shape[1]]
    g = torch.arange(q.shape[0]) // (group_size if group_size > 0 else q.shape[0])
    w = (q - zeros[g]).float() * scales.float()[g]
    return w.t().contiguous()


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """float8 weight [..., N, K] times its per-block scales [..., ceil(N/bn), ceil(K/bk)] -> float32."""
    w = weight.float()
    s = scale_inv.float()
    if block is None or s.numel() == 1:
        return w * s.reshape(-1)[0] if s.numel() == 1 else w * s
    n, k = w.shape[-2:]
    s = s.repeat_interleave(block[0], dim=-2)[..., :n, :].repeat_interleave(block[1], dim=-1)[..., :k]
    return w * s


# ----------------------------------------------------------------- at load time


class Dequantizer:
    """Collects one checkpoint's quantized tensors as the loader reads them and hands back
    each linear's float32 weight once all of its parts were seen.

    ``expected``: the model's parameter names and shapes (the loader's). The loader asks
    :meth:`claims` for every tensor, passes the claimed ones to :meth:`add`, and calls
    :meth:`finish` after the last file (which refuses incomplete or absent quantized storage).
    """

    def __init__(self, spec: QuantSpec, folder: Path, expected: dict[str, tuple[int, ...]], fix: str,
                 accepts=None):
        """``accepts(name)``: whether a weight the model does not hold under ``name`` still has a
        taker (one MoE expert's projection, stacked by the loader, which checks its shape)."""
        self.spec, self.folder, self.expected, self.fix = spec, folder, expected, fix
        self.accepts = accepts
        self.parts = _INT_PARTS.get(spec.method, ("weight", "weight_scale_inv"))
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self.done: set[str] = set()  # module prefixes dequantized
        self.dropped: list[str] = []

    def claims(self, name: str, dtype: str) -> bool:
        """Whether the tensor ``name`` (safetensors dtype string ``dtype``) is quantized storage."""
        prefix, _, part = name.rpartition(".")
        if self.spec.method == "fp8":
            if part == "weight":
                return dtype in _FP8_WEIGHT_DTYPES
            return part in ("weight_scale_inv", "weight_scale", "activation_scale", "input_scale")
        if part in self.parts:
            return True
        # a zero bias some GPTQ/AWQ writers save for linears that have none
        return part == "bias" and name not in self.expected and f"{prefix}.weight" in self.expected

    def add(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        prefix, _, part = name.rpartition(".")
        if part in ("activation_scale", "input_scale"):
            self.dropped.append(name)
            return []
        if part == "bias":
            if bool((tensor.float() != 0).any()):
                raise SpecEMError(f"{self.folder}: tensor {name} is a non-zero bias that config.json does not "
                                  f"describe (attention_bias/mlp_bias); fix config.json to match the weights")
            self.dropped.append(name)
            return []
        if part == "weight_scale":  # compressed-tensors' name: not this format
            raise SpecEMError(f"{self.folder}: tensor {name} is a weight_scale, which block fp8 (quant_method "
                              f"'fp8') names weight_scale_inv: config.json does not describe these weights; "
                              f"{ways_out()}")
        target = f"{prefix}.weight"
        if target not in self.expected and not (self.accepts is not None and self.accepts(target)):
            raise SpecEMError(f"{self.folder}: the weights hold {name}, a {self.spec.method.upper()} tensor of {prefix}, "
                              "which the native model has no linear layer for (e.g. AWQ's scaled activations, a "
                              f"quantized tied head); {ways_out()}")
        have = self._pending.setdefault(prefix, {})
        have[part] = tensor
        needed = self._needed()
        if not all(p in have for p in needed):
            return []
        del self._pending[prefix]
        self.done.add(prefix)
        return [(target, self._dequantize(prefix, have, self.expected.get(target)))]

    def _needed(self) -> tuple[str, ...]:
        if self.spec.method == "gptq" and not self.spec.desc_act:
            return ("qweight", "qzeros", "scales")  # g_idx optional: i // group_size
        return self.parts

    def finish(self) -> None:
        """After the last file: every quantized module complete, and at least one of them."""
        for prefix, have in self._pending.items():
            if self.spec.method == "gptq" and set(have) == {"g_idx"}:
                continue  # a g_idx left over from a module stored plain: nothing to dequantize
            missing = [p for p in self._needed() if p not in have]
            raise SpecEMError(
                f"{self.folder}: {prefix} has {', '.join(sorted(have))} but no {', '.join(missing)}: the "
                f"{self.spec.describe()} checkpoint is incomplete or config.json does not describe it; {self.fix}")
        if not self.done:
            raise SpecEMError(
                f"{self.folder}: config.json declares {self.spec.describe()} quantization but the weights hold no "
                f"quantized tensors ({'/'.join(self.parts)}): if they are plain float weights, remove "
                "quantization_config from config.json; otherwise the files are not the quantized checkpoint")

    # -- the formats -----------------------------------------------------------------
    def _dequantize(self, prefix: str, t: dict[str, torch.Tensor], shape: tuple[int, ...] | None) -> torch.Tensor:
        """``shape``: the weight's [out, in] in the model; None: read from the tensors (the taker checks it)."""
        spec = self.spec
        where = f"{self.folder}: {prefix} ({spec.describe()})"
        if shape is None:
            shape = _stored_shape(spec, t)
        if spec.method == "fp8":
            w, s = t["weight"], t["weight_scale_inv"]
            if tuple(w.shape) != shape:
                raise SpecEMError(f"{where}: weight has shape {list(w.shape)} but config.json implies "
                                  f"{list(shape)}; config.json does not belong to these weights ({self.fix})")
            want = _fp8_scale_shape(w.shape, spec.block)
            if tuple(s.shape) != want and s.numel() != 1:
                raise SpecEMError(f"{where}: weight_scale_inv has shape {list(s.shape)}, expected {list(want)} "
                                  f"for {spec.block} blocks; weight_block_size in config.json does not match "
                                  f"the weights ({self.fix})")
            _check_scales(s, where, self.fix)
            return dequantize_fp8(w, s, spec.block)
        for part in ("qweight", "qzeros"):
            if t[part].dtype != torch.int32:
                raise SpecEMError(f"{where}: {part} holds {t[part].dtype}, not int32 packed values; {self.fix}")
        out, inp = shape
        per = 32 // spec.bits
        groups = 1 if spec.group_size == -1 else -(-inp // spec.group_size)
        if spec.method == "gptq":
            words = inp // per if inp % per == 0 else -1
            want = {"qweight": (words, out), "qzeros": (groups, -(-out // per)), "scales": (groups, out)}
        else:
            words = out // per if out % per == 0 else -1
            want = {"qweight": (inp, words), "qzeros": (groups, words), "scales": (groups, out)}
        for part, dims in want.items():
            got = tuple(t[part].shape)
            if got != dims:
                raise SpecEMError(
                    f"{where}: {part} has shape {list(got)}, but a {out}x{inp} linear at {spec.bits} bits in groups "
                    f"of {spec.group_size} needs {list(dims)}; bits/group_size in config.json do not match the "
                    f"weights ({self.fix})")
        _check_scales(t["scales"], where, self.fix)
        if spec.method == "awq":
            return dequantize_awq(t["qweight"], t["qzeros"], t["scales"], spec.bits, spec.group_size)
        n_groups = groups
        g_idx = t.get("g_idx")
        if g_idx is None:
            g_idx = torch.arange(inp) // (spec.group_size if spec.group_size > 0 else inp)
        if tuple(g_idx.shape) != (inp,) or g_idx.is_floating_point():
            raise SpecEMError(f"{where}: g_idx has shape {list(g_idx.shape)} ({g_idx.dtype}), expected [{inp}] "
                              f"integers; {self.fix}")
        if inp and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
            raise SpecEMError(f"{where}: g_idx names groups {int(g_idx.min())}..{int(g_idx.max())}, but there are "
                              f"{n_groups} (scales rows); group_size or desc_act in config.json does not match "
                              f"the weights ({self.fix})")
        return dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx, spec.bits, spec.v1_zeros)


def _stored_shape(spec: QuantSpec, t: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The [out, in] a module's quantized tensors stand for."""
    if spec.method == "fp8":
        return tuple(t["weight"].shape)
    q, per = t["qweight"], 32 // spec.bits
    if q.dim() != 2:
        return tuple(q.shape)  # refused by the shape checks
    return (q.shape[1], q.shape[0] * per) if spec.method == "gptq" else (q.shape[1] * per, q.shape[0])


def _fp8_scale_shape(shape, block) -> tuple[int, ...]:
    if block is None:
        return ()
    *lead, n, k = shape
    return (*lead, -(-n // block[0]), -(-k // block[1]))


def _check_scales(s: torch.Tensor, where: str, fix: str) -> None:
    if not (s.is_floating_point()):
        raise SpecEMError(f"{where}: its scales hold {s.dtype}, not floating point numbers; {fix}")
    f = s.float()
    if not bool(torch.isfinite(f).all()):
        raise SpecEMError(f"{where}: its scales hold NaN/inf values: the weights are damaged; {fix}")


def is_float8(dtype: torch.dtype) -> bool:
    return dtype in _FLOAT8 or "float8" in str(dtype)


def dense_params(name: str, shape: list[int], spec: QuantSpec | None) -> int:
    """How many compute-dtype parameters a checkpoint tensor becomes once loaded (for memory
    estimates from safetensors headers): a packed ``qweight`` stands for ``32/bits`` weights
    per int32; zero points, scales, ``g_idx`` and activation scales are not kept."""
    count = 1
    for d in shape:
        count *= d
    if spec is None:
        return count
    part = name.rpartition(".")[2]
    if spec.method in ("gptq", "awq"):
        if part == "qweight":
            return count * (32 // spec.bits)
        if part in ("qzeros", "scales", "g_idx"):
            return 0
    elif part in ("weight_scale_inv", "activation_scale", "input_scale"):
        return 0
    return count
