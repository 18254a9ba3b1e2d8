"""One-shot GPU check of the verification kernels (< 5 minutes on an H100/H200).

Needs only torch + triton (+ numpy) on a CUDA machine: specem_fast need not be
installed, the kernels are imported from this checkout by path.

    python benchmarks/gpu_check.py              # correctness, then timing table
    python benchmarks/gpu_check.py --no-timing  # correctness only
    python benchmarks/gpu_check.py --sweep      # also try a few tile configs

1. Correctness: every kernel (segment_score, segment_score_grouped,
   branch_attention with and without key splits, LSE) against the fp64 torch
   reference, in bf16 / fp16 / fp32, over the GPU launch heuristics' code
   paths (every default tile config, split counts, GQA groups, head_dim
   64/128/256, sliding window, ragged prefixes); where flash-attn imports,
   also cascade_attention (flash-attn prefix + our branch kernel + merge).
   Gemma-2-style attention logit soft-capping (head_dim 256, GQA 2, sliding
   window 4096 and global layers) through branch_attention, cascade_attention
   and decode_attention, with scores large enough that the cap matters.
   Exits 1 on any failure.
2. Timing: copy bandwidth (-> LM-head read bound), then the issue's shapes,
   kernel vs eager torch, time and peak memory side by side (one table).
   With $OUT set, the table is also written to $OUT/gpu_check.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_kernels_bypath", HERE / "bench_kernels.py")
bk = importlib.util.module_from_spec(_spec)
sys.modules["bench_kernels_bypath"] = bk
_spec.loader.exec_module(bk)

FAILS: list[str] = []
LOG: list[str] = []
DEV = "cuda"
SMOKE = False  # --cpu-smoke: tiny shapes on the CPU interpreter, to test this script itself


def shrink(n=None, d=None, v=None, p=None):
    """Sizes as given on the GPU; tiny under --cpu-smoke."""
    if not SMOKE:
        return n, d, v, p
    return (None if n is None else min(n, 70), None if d is None else min(d, 64),
            None if v is None else min(v, 1500), None if p is None else [min(x, 90) for x in p])


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def say(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


def close(name, got, want, atol, rtol) -> bool:
    got = got.double()
    if torch.isnan(got).any():
        FAILS.append(f"{name}: NaN in output")
        say(f"  FAIL {name}: NaN in output")
        return False
    err = (got - want).abs()
    bad = err > atol + rtol * want.abs()
    if bad.any():
        FAILS.append(f"{name}: max err {err.max().item():.3e}")
        say(f"  FAIL {name}: max abs err {err.max().item():.3e} (atol {atol}, rtol {rtol})")
        return False
    return True


SCORE_ATOL = {torch.float32: 2e-4, torch.float16: 3e-3, torch.bfloat16: 3e-3}
ATTN_ATOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def check_score(K, ss_mod):
    say("segment_score / segment_score_grouped correctness")
    dev = DEV
    cases = [  # n, d, v, softcap: N spans every default tile config; real d and V
        (1, 64, 777, None), (20, 4096, 128_256, None), (30, 576, 49_152, 30.0), (64, 896, 151_936, None),
        (65, 640, 262_144, None), (300, 4096, 152_064, None), (1030, 200, 3001, 10.0),
    ]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n, d, v, cap in cases:
            if dtype != torch.bfloat16 and n not in (1, 20, 300):
                continue
            n, d, v, _ = shrink(n, d, v)
            h, w, t, o = bk.make_score_problem(n, d, v, dtype, dev, seg_len=7, seed=n)
            t[0] = v - 1
            out = tuple(torch.full((k,), float("nan"), device=dev) for k in (n, n, o.numel() - 1, o.numel() - 1))
            t0 = time.time()
            res = K.segment_score(h, w, t, o, cap, out=out)
            sync()
            ref = K.segment_score_reference(h.double(), w.double(), t, o, cap)
            name = f"score {str(dtype)[6:]} N={n} d={d} V={v}{' cap' if cap else ''}"
            ok = all([close(f"{name} {f}", a, b, SCORE_ATOL[dtype], 1e-4) for f, a, b in zip(ref._fields, res, ref)])
            say(f"  {'ok  ' if ok else 'FAIL'} {name} ({time.time() - t0:.1f}s incl. compile)")
    # forced split counts and small tiles
    n, d, v, _ = shrink(50, 256, 5000)
    h, w, t, o = bk.make_score_problem(n, d, v, torch.bfloat16, dev, seg_len=3)
    for cfg in (ss_mod.SegmentScoreConfig(16, 64, 32, num_splits=7), ss_mod.SegmentScoreConfig(64, 256, 64, 8, 3, 1)):
        res = K.segment_score(h, w, t, o, config=cfg)
        ref = K.segment_score_reference(h.double(), w.double(), t, o)
        for f, a, b in zip(ref._fields, res, ref):
            close(f"score cfg {cfg} {f}", a, b, 3e-3, 1e-4)
    # grouped: the three default models' shapes, caps mixed, plus a second dtype group
    probs = [bk.make_score_problem(*shrink(n, d, v)[:3], torch.bfloat16, dev, seed=i) + (cap,)
             for i, (n, d, v, cap) in enumerate([(40, 576, 49_152, None), (37, 896, 151_936, 30.0),
                                                 (45, 640, 262_144, None)])]
    probs.append(bk.make_score_problem(9, 64, 1000, torch.float32, dev, seed=9) + (None,))
    res = K.segment_score_grouped(probs)
    for i, (p, r) in enumerate(zip(probs, res)):
        ref = K.segment_score_reference(p[0].double(), p[1].double(), p[2], p[3], p[4])
        for f, a, b in zip(ref._fields, r, ref):
            close(f"grouped problem {i} {f}", a, b, SCORE_ATOL[p[0].dtype], 1e-4)
    say("  forced configs and grouped checked")


def check_attn(K, ba_mod):
    say("branch_attention correctness")
    dev = DEV
    cases = [  # prefixes, KW, Hq, Hkv, D, window
        ([700], 20, 32, 8, 128, 0), ([3000], 60, 32, 8, 128, 0), ([100, 1500, 40], 25, 14, 2, 64, 0),
        ([2000], 50, 4, 1, 256, 512), ([600, 50], 50, 4, 1, 256, 0), ([0], 33, 9, 3, 64, 0),
        ([257], 7, 8, 8, 64, 16),
    ]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for pre, kw, hq, hkv, hd, win in cases:
            if dtype != torch.bfloat16 and hd == 64 and len(pre) == 1:
                continue
            pre = shrink(p=pre)[3]
            kw = min(kw, 20) if SMOKE else kw
            q, kc, vc, slot, qpos, plen, bstart = bk.make_attn_problem(pre, kw, hq, hkv, hd, dtype, dev,
                                                                       k=min(5, kw), seed=sum(pre))
            out = torch.full_like(q, float("nan"))
            t0 = time.time()
            o, lse = K.branch_attention(q, kc, vc, slot, qpos, plen, bstart, hd**-0.5, win, out=out, return_lse=True)
            sync()
            ref = K.branch_attention_reference(q.double(), kc.double(), vc.double(), slot, qpos, plen, bstart,
                                               hd**-0.5, win)
            name = f"attn {str(dtype)[6:]} pre={pre} KW={kw} H={hq}/{hkv} D={hd} win={win}"
            ok = close(name, o, ref, ATTN_ATOL[dtype], 1e-2)
            ok &= close(name + " lse", lse, K.branch_attention_lse_reference(q, kc, slot, qpos, plen, bstart, hd**-0.5, win), 2e-3, 1e-4)
            say(f"  {'ok  ' if ok else 'FAIL'} {name} ({time.time() - t0:.1f}s incl. compile)")
    # forced split counts (incl. more splits than tiles) and shuffled token order
    q, kc, vc, slot, qpos, plen, bstart = bk.make_attn_problem(shrink(p=[900, 300])[3], 30, 8, 2, 128,
                                                               torch.bfloat16, dev)
    perm = torch.randperm(q.shape[0], device=dev)
    q, slot, qpos, plen, bstart = q[perm].contiguous(), slot[perm], qpos[perm], plen[perm], bstart[perm]
    ref = K.branch_attention_reference(q.double(), kc.double(), vc.double(), slot, qpos, plen, bstart, 0.1, 0)
    for ns in (1, 3, 64):
        cfg = ba_mod.BranchAttentionConfig(64, 64, num_warps=4, num_stages=2, num_splits=ns)
        close(f"attn splits={ns}", K.branch_attention(q, kc, vc, slot, qpos, plen, bstart, 0.1, config=cfg), ref,
              3e-2, 1e-2)
    say("  forced splits checked")
    check_cascade(K)


def check_cascade(K):
    """The flash-attn cascade path, only where flash-attn imports (the [gpu] extra)."""
    backend = K.prefix_backend()
    if backend is None:
        say("cascade_attention: flash-attn not installed here, cascade path NOT checked")
        return
    say(f"cascade_attention correctness ({backend.name} prefix + branch kernel + LSE merge)")
    cases = [  # prefixes, KW, Hq, Hkv, D: ragged, an empty prefix, GQA/MQA, head_dim 64/128/256
        ([700], 20, 32, 8, 128), ([3000, 0, 129], 60, 32, 8, 128), ([100, 1500, 40], 25, 14, 2, 64),
        ([2000], 50, 4, 1, 256), ([8192], 60, 32, 8, 128),
    ]
    for dtype in backend.dtypes:
        for pre, kw, hq, hkv, hd in cases:
            pre = shrink(p=pre)[3]
            q, kc, vc, slot, qpos, plen, bstart = bk.make_attn_problem(pre, kw, hq, hkv, hd, dtype, DEV,
                                                                       k=min(5, kw), seed=sum(pre) + 1)
            perm = torch.randperm(q.shape[0], device=q.device)  # token order must not matter
            q, slot, qpos, plen, bstart = q[perm].contiguous(), slot[perm], qpos[perm], plen[perm], bstart[perm]
            t0 = time.time()
            o, lse = K.cascade_attention(q, kc, vc, slot, qpos, plen, bstart, hd**-0.5, return_lse=True)
            sync()
            ref = K.branch_attention_reference(q.double(), kc.double(), vc.double(), slot, qpos, plen, bstart,
                                               hd**-0.5)
            name = f"cascade {str(dtype)[6:]} pre={pre} KW={kw} H={hq}/{hkv} D={hd}"
            ok = close(name, o, ref, ATTN_ATOL[dtype], 1e-2)
            ok &= close(name + " lse", lse, K.branch_attention_lse_reference(q, kc, slot, qpos, plen, bstart,
                                                                             hd**-0.5), 2e-3, 1e-4)
            say(f"  {'ok  ' if ok else 'FAIL'} {name} ({time.time() - t0:.1f}s incl. compile)")


def check_softcap(K, ba_mod):
    """Gemma-2-style attention soft-capping (``cap * tanh(scale * q.k / cap)``) in every attention path."""
    say("attention soft-capping (gemma2-style) correctness")
    cases = [  # prefixes, KW, Hq, Hkv, D, window, cap, config: Gemma-2-9B heads, local and global layers
        ([700, 90], 40, 16, 8, 256, 4096, 10.0, None), ([3000], 50, 16, 8, 256, 0, 10.0, None),
        ([5000], 30, 16, 8, 256, 4096, 50.0, None), ([1200], 20, 32, 16, 128, 0, 10.0, None),
        ([900, 300], 30, 16, 8, 256, 0, 10.0, ba_mod.BranchAttentionConfig(64, 32, 8, 2, num_splits=3)),
    ]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for pre, kw, hq, hkv, hd, win, cap, cfg in cases:
            if dtype != torch.bfloat16 and len(pre) == 1 and cfg is None:
                continue
            pre = shrink(p=pre)[3]
            kw = min(kw, 20) if SMOKE else kw
            win = min(win, 40) if SMOKE else win
            q, kc, vc, slot, qpos, plen, bstart = bk.make_attn_problem(pre, kw, hq, hkv, hd, dtype, DEV,
                                                                       k=min(5, kw), seed=sum(pre) + 2)
            q = (q.float() * 6).to(dtype)  # scores of a few times the cap: tanh bends them
            scale = hd**-0.5
            t0 = time.time()
            o, lse = K.branch_attention(q, kc, vc, slot, qpos, plen, bstart, scale, win, return_lse=True,
                                        config=cfg, softcap=cap)
            sync()
            args = (q.double(), kc.double(), vc.double(), slot, qpos, plen, bstart, scale, win)
            ref = K.branch_attention_reference(*args, softcap=cap)
            name = f"softcap attn {str(dtype)[6:]} pre={pre} KW={kw} H={hq}/{hkv} D={hd} win={win} cap={cap}"
            ok = close(name, o, ref, ATTN_ATOL[dtype], 1e-2)
            ok &= close(name + " lse", lse, K.branch_attention_lse_reference(q, kc, slot, qpos, plen, bstart, scale,
                                                                             win, softcap=cap), 2e-3, 1e-4)
            if (K.branch_attention_reference(*args) - ref).abs().max().item() < 0.05:
                FAILS.append(f"{name}: the cap does not change the reference (check not discriminating)")
                ok = False
            say(f"  {'ok  ' if ok else 'FAIL'} {name} ({time.time() - t0:.1f}s incl. compile)")
    # decode_attention (the compiled draft step's torch attention) with the cap
    b, hq, hkv, hd, lmax = 4, 16, 8, 256, shrink(p=[600])[3][0]
    g = torch.Generator(device=DEV).manual_seed(11)
    kc = torch.randn(b, hkv, lmax, hd, generator=g, device=DEV).to(torch.bfloat16)
    vc = torch.randn(b, hkv, lmax, hd, generator=g, device=DEV).to(torch.bfloat16)
    q = (torch.randn(b, hq, hd, generator=g, device=DEV) * 6).to(torch.bfloat16)
    slot = torch.arange(b, device=DEV).flip(0)
    pos = torch.tensor([lmax - 1, 3, lmax // 2, 17], device=DEV)
    for win in (0, 64):
        o = K.decode_attention(q, kc, vc, slot, pos, torch.arange(lmax, device=DEV), hd**-0.5, win, softcap=10.0)
        ref = K.branch_attention_reference(q.double(), kc.double(), vc.double(), slot, pos, pos, pos, hd**-0.5, win,
                                           softcap=10.0)
        ok = close(f"softcap decode bf16 win={win}", o, ref, ATTN_ATOL[torch.bfloat16], 1e-2)
        say(f"  {'ok  ' if ok else 'FAIL'} softcap decode bfloat16 B={b} H={hq}/{hkv} D={hd} win={win} cap=10.0")
    backend = K.prefix_backend()
    if backend is None:
        say("softcap cascade: flash-attn not installed here, NOT checked")
        return
    for dtype in backend.dtypes:
        for pre, kw, hq, hkv, hd in (([700, 0, 129], 30, 16, 8, 256), ([3000], 50, 32, 16, 128)):
            pre = shrink(p=pre)[3]
            q, kc, vc, slot, qpos, plen, bstart = bk.make_attn_problem(pre, kw, hq, hkv, hd, dtype, DEV,
                                                                       k=min(5, kw), seed=sum(pre) + 3)
            q = (q.float() * 6).to(dtype)
            scale = hd**-0.5
            try:
                o, lse = K.cascade_attention(q, kc, vc, slot, qpos, plen, bstart, scale, return_lse=True,
                                             softcap=10.0)
            except TypeError as e:  # a flash-attn build without the softcap argument (< 2.6)
                FAILS.append(f"softcap cascade: {backend.name} refuses softcap ({e})")
                say(f"  FAIL softcap cascade: {backend.name} refuses softcap ({e})")
                return
            sync()
            ref = K.branch_attention_reference(q.double(), kc.double(), vc.double(), slot, qpos, plen, bstart, scale,
                                               softcap=10.0)
            name = f"softcap cascade {str(dtype)[6:]} pre={pre} KW={kw} H={hq}/{hkv} D={hd} cap=10.0"
            ok = close(name, o, ref, ATTN_ATOL[dtype], 1e-2)
            ok &= close(name + " lse", lse, K.branch_attention_lse_reference(q, kc, slot, qpos, plen, bstart, scale,
                                                                             softcap=10.0), 2e-3, 1e-4)
            say(f"  {'ok  ' if ok else 'FAIL'} {name}")


def sweep(K, ss_mod, ba_mod):
    """A few tile configs for the two regimes (memory-bound small N, compute-bound large N)."""
    rows = []
    dev = "cuda"
    for n in (20, 1024):
        h, w, t, o = bk.make_score_problem(n, 4096, 128_256, torch.bfloat16, dev)
        for cfg in [ss_mod.SegmentScoreConfig(*c) for c in (
                (16, 128, 64, 4, 4), (32, 128, 64, 8, 4), (32, 256, 64, 8, 3), (16, 256, 128, 8, 3),
                (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4),
                (64, 256, 64, 8, 3))]:
            if n == 20 and cfg.block_n > 32 or n == 1024 and cfg.block_n < 64:
                continue
            try:
                tk = bk.bench_time(lambda: K.segment_score(h, w, t, o, config=cfg, check_values=False))
                rows.append(f"score N={n} {cfg}: {tk * 1e6:.1f} us")
            except Exception as e:  # noqa: BLE001
                rows.append(f"score N={n} {cfg}: FAILED {type(e).__name__}")
            say("  " + rows[-1])
    q, kc, vc, slot, qpos, plen, bstart = bk.make_attn_problem([8192], 60, 32, 8, 128, torch.bfloat16, dev)
    for c in ((64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 3)):
        for ns in (None, 4, 16):
            cfg = ba_mod.BranchAttentionConfig(*c, num_splits=ns)
            try:
                plan = K.plan_branch_attention(q, kc, slot, qpos, plen, bstart, block_r=cfg.block_r)
                tk = bk.bench_time(lambda: K.branch_attention(q, kc, vc, slot, qpos, plen, bstart, 0.1, plan=plan,
                                                              config=cfg))
                rows.append(f"attn pre=8192 KW=60 {cfg}: {tk * 1e6:.1f} us")
            except Exception as e:  # noqa: BLE001
                rows.append(f"attn {cfg}: FAILED {type(e).__name__}: {e}")
            say("  " + rows[-1])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time a few tile configs")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU interpreter (tests the script)")
    a = ap.parse_args(argv)
    global DEV, SMOKE
    if a.cpu_smoke:
        DEV, SMOKE = "cpu", True
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("gpu_check --cpu-smoke: run with TRITON_INTERPRET=1", file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    import triton

    t_start = time.time()
    say(f"# gpu_check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if SMOKE:
        say(f"device: cpu (Triton interpreter smoke run), torch {torch.__version__}, triton {triton.__version__}")
    else:
        props = torch.cuda.get_device_properties(0)
        say(f"device: {props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), "
            f"torch {torch.__version__}, triton {triton.__version__}")
    K = bk.load_kernels()
    ss_mod = sys.modules[K.__name__ + ".segment_score"]
    ba_mod = sys.modules[K.__name__ + ".branch_attention"]
    if SMOKE and K.prefix_backend() is None:  # exercise the cascade checks with the tests' fp64 flash-attn double
        spec = importlib.util.spec_from_file_location("flash_double", HERE.parent / "tests" / "flash_double.py")
        double = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(double)
        cascade = sys.modules[K.__name__ + ".cascade"]
        cascade._backend = cascade.PrefixBackend("fp64 double", double.flash_attn_with_kvcache_double,
                                                 (torch.float16, torch.bfloat16))
    for fn in (check_score, check_attn, check_softcap):
        try:
            fn(K, ss_mod if fn is check_score else ba_mod)
        except Exception as e:  # noqa: BLE001 - a crash is a failure, keep going
            import traceback

            traceback.print_exc()
            FAILS.append(f"{fn.__name__} crashed: {type(e).__name__}: {e}")
            say(f"  FAIL {fn.__name__} crashed: {type(e).__name__}: {e}")
    say(f"correctness: {'OK' if not FAILS else f'{len(FAILS)} FAILURES'} ({time.time() - t_start:.0f}s)")
    if not a.no_timing:
        bw = bk.copy_bandwidth()
        say(f"copy bandwidth: {bw / 1e12:.2f} TB/s (read+write); 'vs bound' = t kernel / (|W| / bandwidth)")
        dt = torch.float32 if SMOKE else torch.bfloat16
        rows = bk.bench_score(bk.SCORE_QUICK if SMOKE else bk.SCORE_FULL, dt, DEV, bandwidth=bw)
        rows += bk.bench_grouped(bk.GROUPED_QUICK if SMOKE else bk.GROUPED_FULL, dt, DEV)
        rows += bk.bench_attn(bk.ATTN_QUICK if SMOKE else bk.ATTN_FULL, dt, DEV)
        say(bk.table(rows))
        say("speedup = t torch / t kernel (torch: eager matmul+log_softmax+gather; SDPA with a dense bool mask; "
            "for the grouped row, one segment_score launch per verifier); mem ratio = mem kernel / mem torch")
    if a.sweep and not SMOKE:
        sweep(K, ss_mod, ba_mod)
    say(f"total {time.time() - t_start:.0f}s")
    if FAILS:
        say("FAILURES:\n" + "\n".join(FAILS))
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_check.md").write_text("\n".join(LOG) + "\n")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
