"""Compile every Triton kernel for a GPU target offline -- no GPU needed.

Triton's Linux wheel ships the NVIDIA backend with ptxas, so the kernels can be
lowered all the way to a cubin for sm_90 (H100/H200) on a CPU-only machine.
This catches what the CPU interpreter cannot (GPU-only compile errors, layout
or shared-memory limits) and prints each variant's registers, spills, shared
memory and whether Hopper wgmma tensor-core instructions were used.

    python benchmarks/compile_check.py [--arch 90] [--quick]

Exit status 1 if any variant fails to compile or spills registers.
Run it WITHOUT TRITON_INTERPRET (it removes the variable for itself).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # must happen before the kernels are defined

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """Import kernels/<name>.py by path (works with or without the package installed)."""
    pkg = "specem_fast_kernels_cc"
    if pkg not in sys.modules:
        spec = importlib.util.spec_from_file_location(pkg, ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[pkg] = mod
        spec.loader.exec_module(mod)
    return sys.modules[f"{pkg}.{name}"]


_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}


def compile_variant(fn, args: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    """``args``: name -> torch.dtype (pointer), int (i32 scalar) or float (fp32 scalar)."""
    sig, attrs = {}, {}
    dns = set(getattr(fn, "do_not_specialize", []) or [])
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        a = args[name]
        if isinstance(a, torch.dtype):
            sig[name] = "*" + _TY[a]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(a, bool) or not isinstance(a, (int, float)):
            raise TypeError(f"{name}: {a!r}")
        elif isinstance(a, int):
            sig[name] = "i32" if -(2**31) <= a < 2**31 else "i64"
            if a % 16 == 0 and name not in dns and i not in dns:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    src = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps,
                                                                                 num_stages=num_stages))


def resource_usage(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        txt = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    out = {}
    for key in ("REG", "STACK", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", txt)
        out[key] = int(m.group(1)) if m else -1
    return out


def variants(quick: bool):
    ss = _load("segment_score")
    ba = _load("branch_attention")
    cas = _load("cascade")
    bf16, f16, f32, i32, i64 = torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.int64

    def score(dt, cfg, d=4096, v=128256, cap=False, prec="tf32"):
        args = dict(h_ptr=dt, w_ptr=dt, tgt_ptr=i64, logit_ptr=f32, pm_ptr=f32, ps_ptr=f32, N=1000, D=d, V=v,
                    stride_hn=d, stride_wv=d, softcap=0.0, num_n_blocks=7, v_tiles_per_split=9)
        cx = dict(HAS_CAP=cap, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                  EVEN_D=d % cfg.block_d == 0, UPCAST=False, PRECISION=prec)
        name = f"score {_TY[dt]} n{cfg.block_n} v{cfg.block_v} d{cfg.block_d} D={d}{' cap' if cap else ''}"
        return name, ss._score_kernel, args, cx, cfg.num_warps, cfg.num_stages

    cuda = torch.device("cuda")
    cfgs = [ss._default_config(n, 4096, cuda) for n in (16, 32, 64, 1024)]
    out = [score(bf16, c) for c in cfgs]
    if not quick:
        f32cfg = [ss._default_config(n, 4096, cuda, f32) for n in (16, 32, 1024)]
        out += [score(f16, cfgs[0]), score(bf16, cfgs[1], d=576, v=49152, cap=True),
                score(bf16, cfgs[2], d=640, v=262144, cap=True),
                score(bf16, ss._default_config(1024, 200, cuda), d=200, v=1000)]
        out += [score(f32, c, prec="ieee") for c in f32cfg]
    out.append((
        "score merge", ss._merge_kernel,
        dict(pm_ptr=f32, ps_ptr=f32, logit_ptr=f32, lp_ptr=f32, mean_lp_ptr=f32, mean_lg_ptr=f32, off_ptr=i64,
             N=100, num_splits=200), dict(BLOCK_T=16, BLOCK_S=32), 4, 1))
    def grouped(dt, c, cap=True):
        return (
            f"score grouped {_TY[dt]} n{c.block_n}{' cap' if cap else ''}", ss._score_grouped_kernel,
            dict(tab_ptr=i64, cap_ptr=f32, starts_ptr=i32, h_dtype_ptr=dt, tgt_dtype_ptr=i64, G=3),
            dict(HAS_CAP=cap, NF=ss._GROUP_FIELDS, BLOCK_G=4, BLOCK_N=c.block_n, BLOCK_V=c.block_v,
                 BLOCK_D=c.block_d, EVEN_D=True, ALIGNED=True, UPCAST=False,
                 PRECISION="ieee" if dt == f32 else "tf32"), c.num_warps, c.num_stages)

    out.append(grouped(bf16, cfgs[3]))
    if not quick:
        out += [grouped(bf16, c) for c in cfgs[:3]] + [grouped(bf16, cfgs[3], cap=False)]
    if not quick:
        out.append((
            "score grouped merge", ss._merge_grouped_kernel,
            dict(tab_ptr=i64, seg_starts_ptr=i32, off_dtype_ptr=i64, G=3),
            dict(NF=ss._GROUP_FIELDS, BLOCK_G=4, BLOCK_T=16, BLOCK_S=32), 4, 1))

    def attn(dt, d, group, split, window, lse=True, cap=False):
        cfg = ba._default_config(d, torch.device("cuda"), dt)
        args = dict(q_ptr=dt, k_ptr=dt, v_ptr=dt, o_ptr=dt, lse_ptr=f32, po_ptr=f32, pm_ptr=f32, pl_ptr=f32,
                    order_ptr=i32, bstart_ptr=i32, bcount_ptr=i32, slot_ptr=i64, qpos_ptr=i64, plen_ptr=i64,
                    bst_ptr=i64, qk_scale=0.1, softcap=50.0, window=512, T=60, Hq=8 * group, Lmax=8192, D=d, num_splits=4,
                    stride_qt=8 * group * d, stride_qh=d, stride_ks=8 * 8192 * d, stride_kh=8192 * d, stride_kl=d,
                    stride_vs=8 * 8192 * d, stride_vh=8192 * d, stride_vl=d, stride_ot=8 * group * d, stride_oh=d)
        cx = dict(GROUP=group, BLOCK_R=max(cfg.block_r, 16, triton.next_power_of_2(group)), BLOCK_N=cfg.block_n, BLOCK_D=max(16, d),
                  HAS_WINDOW=window, HAS_SOFTCAP=cap, SPLIT=split, RETURN_LSE=lse, UPCAST=False,
                  PRECISION="ieee" if dt == f32 else "tf32")
        name = (f"attn {_TY[dt]} D={d} G={group}{' split' if split else ''}{' window' if window else ''}"
                f"{' softcap' if cap else ''}")
        return name, ba._branch_attn_kernel, args, cx, cfg.num_warps, cfg.num_stages

    out += [attn(bf16, 128, 4, True, False), attn(bf16, 256, 4, False, True),
            attn(bf16, 256, 2, True, True, cap=True)]  # Gemma-2: soft-capping, sliding window
    if not quick:
        out += [attn(bf16, 64, 3, False, False), attn(bf16, 64, 7, True, False), attn(bf16, 128, 4, False, False),
                attn(bf16, 256, 4, True, True), attn(f16, 128, 4, True, False), attn(bf16, 64, 16, True, True),
                attn(f32, 64, 4, True, False), attn(f32, 128, 4, False, False), attn(f32, 256, 4, True, True),
                attn(bf16, 256, 2, False, False, cap=True), attn(bf16, 128, 2, True, False, cap=True),
                attn(f16, 256, 2, False, True, cap=True), attn(f32, 256, 2, True, True, cap=True)]
    out.append((
        "attn merge D=128", ba._branch_merge_kernel,
        dict(po_ptr=f32, pm_ptr=f32, pl_ptr=f32, o_ptr=bf16, lse_ptr=f32, T=60, Hq=32, D=128, num_splits=8,
             stride_ot=4096, stride_oh=128), dict(RETURN_LSE=True, BLOCK_H=16, BLOCK_D=128), 4, 1))
    for dt, d in ((bf16, 128), (f16, 256)):
        out.append((
            f"cascade merge {_TY[dt]} D={d}", cas._cascade_merge_kernel,
            dict(op_ptr=dt, lp_ptr=f32, o_ptr=dt, lb_ptr=f32, scatter_ptr=i64, plen_ptr=i64, Hq=32, D=d, q_max=60,
                 stride_op_r=32 * d, stride_op_h=d, stride_lp_b=32 * 60, stride_lp_h=60, stride_lp_q=1,
                 stride_o_t=32 * d, stride_o_h=d),
            dict(RETURN_LSE=True, BLOCK_H=max(1, min(32, 2048 // d)), BLOCK_D=d), 4, 1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    ap.add_argument("--quick", action="store_true", help="one variant per kernel family")
    a = ap.parse_args(argv)
    print(f"triton {triton.__version__}, target sm_{a.arch}")
    print(f"{'variant':44s} {'regs':>5s} {'spill':>6s} {'smem KiB':>9s} {'wgmma':>6s} {'s':>5s}")
    bad = 0
    for name, fn, args, cx, warps, stages in variants(a.quick):
        t0 = time.time()
        try:
            k = compile_variant(fn, args, cx, a.arch, warps, stages)
        except Exception as e:  # noqa: BLE001 - report and continue
            bad += 1
            print(f"{name:44s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            continue
        ru = resource_usage(k.asm["cubin"])
        spill = ru["LOCAL"] + ru["STACK"]
        wg = k.asm["ptx"].count("wgmma.mma_async")
        smem = getattr(k.metadata, "shared", 0) / 1024
        print(f"{name:44s} {ru['REG']:5d} {spill:6d} {smem:9.1f} {wg:6d} {time.time() - t0:5.1f}")
        if spill > 0:
            bad += 1
    print("OK" if not bad else f"{bad} variant(s) failed or spilled")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
