"""Benchmark the verification kernels against eager torch: time and peak memory.

    python benchmarks/bench_kernels.py            # GPU: the issue's shapes
    python benchmarks/bench_kernels.py --quick    # small shapes (CPU: Triton interpreter)

Segment scoring: fused kernel vs eager ``hidden @ W.T -> float -> log_softmax
-> gather`` (+ segment means), and the one-launch grouped kernel vs one launch
per verifier. Branch attention: kernel vs SDPA with a dense boolean mask (the
mask and the kernel's plan are built once outside the timed region, as an
engine does once per forward for all layers); where flash-attn is installed,
the cascade path (flash-attn prefix + branch kernel + merge) gets a row too. On a GPU it also measures the
device copy bandwidth and reports the LM-head read bound: ``|W| / bandwidth``,
the least time any scorer needs when N is small.

Peak memory is the extra memory allocated during one call: CUDA
``max_memory_allocated``; on CPU the peak of live tensors created by torch ops
(the Triton interpreter's own numpy buffers are not counted).

No third-party imports beyond torch/triton/numpy: ``benchmarks/gpu_check.py``
imports this file by path on a machine where specem_fast is not installed.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import os
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

if not torch.cuda.is_available():  # CPU: the kernels run in the Triton interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


def load_kernels():
    """specem_fast.kernels if installed, else kernels/ imported by path."""
    try:
        return importlib.import_module("specem_fast.kernels")
    except ImportError:
        pass
    name = "specem_fast_kernels_bypath"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


# --------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------


class _PeakTensorMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of live tensors created by torch ops inside the mode (CPU)."""

    def __init__(self):
        super().__init__()
        self.cur = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.cur -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, nbytes = st.data_ptr(), st.nbytes()
                if nbytes and key not in self._seen:
                    self._seen.add(key)
                    self.cur += nbytes
                    self.peak = max(self.peak, self.cur)
                    weakref.finalize(t, self._free, key, nbytes)
        return out


def peak_memory(fn) -> int:
    """Extra bytes allocated at peak during one call of ``fn``."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        res = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del res
        return peak
    with _PeakTensorMemory() as m:
        res = fn()
        del res
    return m.peak


def bench_time(fn, reps: int = 5) -> float:
    """Median seconds per call."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3
    fn()  # warm-up (interpreter compiles nothing, but first calls allocate)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device copy bandwidth in bytes/s, counting read + write (2 GiB buffers: far beyond L2)."""
    if not torch.cuda.is_available():
        nbytes = min(nbytes, 64 << 20)
    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda" if torch.cuda.is_available() else "cpu")
    dst = torch.empty_like(src)
    t = bench_time(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / t


# --------------------------------------------------------------------------
# segment scoring
# --------------------------------------------------------------------------


def eager_score(hidden, weight, targets, offsets):
    """What a plain torch engine does: full logits, fp32 log_softmax, gather."""
    z = (hidden @ weight.T).float()
    lp = torch.log_softmax(z, dim=-1)
    t = targets.long().unsqueeze(1)
    tok_lp = lp.gather(1, t).squeeze(1)
    tok_logit = z.gather(1, t).squeeze(1)
    c = offsets.shape[0] - 1
    lengths = (offsets[1:] - offsets[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(c, device=hidden.device), lengths, output_size=hidden.shape[0])
    mean_lp = torch.zeros(c, device=hidden.device).index_add_(0, seg, tok_lp) / lengths
    mean_lg = torch.zeros(c, device=hidden.device).index_add_(0, seg, tok_logit) / lengths
    return tok_lp, tok_logit, mean_lp, mean_lg


_W_CACHE: dict = {}


def make_score_problem(n, d, v, dtype, device, seg_len=10, seed=0):
    """Random problem generated on the device (fast for GiB-sized LM heads); W cached per shape."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, device=device).to(dtype)
    key = (d, v, dtype, str(device), seed)
    if key not in _W_CACHE:
        _W_CACHE.clear()
        _W_CACHE[key] = (torch.randn(v, d, generator=g, device=device) * d**-0.5).to(dtype)
    weight = _W_CACHE[key]
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    cuts = list(range(0, n, seg_len)) + [n]
    return hidden, weight, targets, torch.tensor(cuts, device=device)


def bench_score(cases, dtype, device, bandwidth=None, check_values=False):
    K = load_kernels()
    rows = []
    for n, d, v in cases:
        h, w, t, o = make_score_problem(n, d, v, dtype, device)
        kern = lambda: K.segment_score(h, w, t, o, check_values=check_values)  # noqa: E731
        eager = lambda: eager_score(h, w, t, o)  # noqa: E731
        got, want = kern(), eager()
        err = (got.token_logprob - want[0]).abs().max().item()
        tk, te = bench_time(kern), bench_time(eager)
        mk, me = peak_memory(kern), peak_memory(eager)
        row = dict(kernel="segment_score", shape=f"N={n} d={d} V={v}", dtype=str(dtype).split(".")[-1],
                   t_kernel=tk, t_torch=te, mem_kernel=mk, mem_torch=me, max_err=err)
        if bandwidth:
            bound = w.numel() * w.element_size() / bandwidth
            row["bound"] = bound
        rows.append(row)
        del h, w, t, o, got, want
    _W_CACHE.clear()
    return rows


def bench_grouped(problem_shapes, dtype, device, check_values=False):
    """One grouped launch vs one launch per verifier, same problems."""
    K = load_kernels()
    probs = [make_score_problem(n, d, v, dtype, device, seed=i) for i, (n, d, v) in enumerate(problem_shapes)]
    grouped = lambda: K.segment_score_grouped(probs, check_values=check_values)  # noqa: E731
    single = lambda: [K.segment_score(*p, check_values=check_values) for p in probs]  # noqa: E731
    a, b = grouped(), single()
    err = max((x.token_logprob - y.token_logprob).abs().max().item() for x, y in zip(a, b))
    shape = " + ".join(f"({n},{d},{v})" for n, d, v in problem_shapes)
    return [dict(kernel="score grouped vs per-verifier", shape=shape, dtype=str(dtype).split(".")[-1],
                 t_kernel=bench_time(grouped), t_torch=bench_time(single),
                 mem_kernel=peak_memory(grouped), mem_torch=peak_memory(single), max_err=err)]


# --------------------------------------------------------------------------
# branch attention
# --------------------------------------------------------------------------


def make_attn_problem(prefixes, kw, hq, hkv, hd, dtype, device, k=5, seed=0):
    """Slots with the given prefix lengths, each followed by k candidates totalling kw tokens."""
    g = torch.Generator(device=device).manual_seed(seed)
    lmax = max(prefixes) + kw + 16
    s = len(prefixes)
    kc = torch.randn(s, hkv, lmax, hd, generator=g, device=device).to(dtype)
    vc = torch.randn(s, hkv, lmax, hd, generator=g, device=device).to(dtype)
    slot, qpos, plen, bstart = [], [], [], []
    lens = [kw // k + (1 if i < kw % k else 0) for i in range(k)]
    for si, p in enumerate(prefixes):
        pos = p
        for ln in lens:
            for i in range(ln):
                slot.append(si)
                qpos.append(pos + i)
                plen.append(p)
                bstart.append(pos)
            pos += ln
    q = torch.randn(len(slot), hq, hd, generator=g, device=device).to(dtype)
    idx = [torch.tensor(x, device=device, dtype=torch.int32) for x in (slot, qpos, plen, bstart)]
    return (q, kc, vc, *idx)


def sdpa_dense(q, kc, vc, slot, masks, rows_per_slot, scale, out):
    """SDPA with a dense bool mask per slot (masks/rows precomputed)."""
    hq, hkv = q.shape[1], kc.shape[1]
    for s, (rows, mask) in enumerate(zip(rows_per_slot, masks)):
        nk = mask.shape[1]
        o = torch.nn.functional.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0), kc[s, :, :nk].unsqueeze(0), vc[s, :, :nk].unsqueeze(0),
            attn_mask=mask, scale=scale, enable_gqa=hq != hkv)
        out[rows] = o.squeeze(0).transpose(0, 1)
    return out


def bench_attn(cases, dtype, device):
    K = load_kernels()
    rows = []
    for name, prefixes, kw, hq, hkv, hd, window in cases:
        q, kc, vc, slot, qpos, plen, bstart = make_attn_problem(prefixes, kw, hq, hkv, hd, dtype, device)
        scale = hd**-0.5
        plan = K.plan_branch_attention(q, kc, slot, qpos, plen, bstart)
        rps, masks = [], []
        for s in range(len(prefixes)):
            r = (slot == s).nonzero().squeeze(1)
            nk = int(qpos[r].max()) + 1
            rps.append(r)
            masks.append(K.visibility_mask(qpos[r].long(), plen[r].long(), bstart[r].long(), nk, window))
        out_t = torch.empty_like(q)
        kern = lambda: K.branch_attention(q, kc, vc, slot, qpos, plen, bstart, scale, window, plan=plan)  # noqa: E731
        torch_fn = lambda: sdpa_dense(q, kc, vc, slot, masks, rps, scale, out_t)  # noqa: E731
        want = torch_fn()
        t_torch, mem_torch = bench_time(torch_fn), peak_memory(torch_fn)
        shape = f"{name} pre={'/'.join(map(str, prefixes))} KW={kw} H={hq}/{hkv} D={hd}" + (
            f" win={window}" if window else "")
        fns = {"branch_attention": kern}
        backend = K.prefix_backend()
        if backend is not None and window == 0 and dtype in backend.dtypes:
            cplan = K.plan_cascade_attention(q, kc, slot, qpos, plen, bstart)
            fns[f"cascade ({backend.name} prefix)"] = lambda: K.cascade_attention(  # noqa: E731
                q, kc, vc, slot, qpos, plen, bstart, scale, plan=cplan)
        for label, fn in fns.items():
            err = (fn().float() - want.float()).abs().max().item()
            rows.append(dict(kernel=label, shape=shape, dtype=str(dtype).split(".")[-1], t_kernel=bench_time(fn),
                             t_torch=t_torch, mem_kernel=peak_memory(fn), mem_torch=mem_torch, max_err=err))
        del q, kc, vc
    return rows


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------


def _fmt_t(s):
    return f"{s * 1e6:9.1f}us" if s < 1e-2 else f"{s * 1e3:9.2f}ms"


def _fmt_b(b):
    return f"{b / 2**20:9.2f}MiB" if b < 2**30 else f"{b / 2**30:9.2f}GiB"


def table(rows) -> str:
    """Markdown table: time and peak memory, kernel vs torch, side by side and as ratios."""
    cols = ["kernel", "shape", "dtype", "t kernel", "t torch", "speedup", "mem kernel", "mem torch", "mem ratio",
            "vs bound", "max err"]
    body = []
    for r in rows:
        ratio = r["mem_kernel"] / r["mem_torch"] if r["mem_torch"] else float("nan")
        body.append([
            r["kernel"], r["shape"], r["dtype"], _fmt_t(r["t_kernel"]).strip(), _fmt_t(r["t_torch"]).strip(),
            f"{r['t_torch'] / r['t_kernel']:.2f}x", _fmt_b(r["mem_kernel"]).strip(), _fmt_b(r["mem_torch"]).strip(),
            f"{ratio:.4f}", f"{r['t_kernel'] / r['bound']:.2f}x" if r.get("bound") else "",
            f"{r['max_err']:.1e}",
        ])
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(b) for b in body])


SCORE_FULL = [(n, 4096, v) for v in (128_256, 152_064) for n in (20, 30, 64, 256, 1024, 4096)]
SCORE_QUICK = [(20, 64, 1000), (64, 96, 2003)]
GROUPED_FULL = [(40, 576, 49_152), (40, 896, 151_936), (40, 640, 262_144)]  # the three default models
GROUPED_QUICK = [(20, 64, 700), (15, 96, 1000)]
ATTN_FULL = (
    [("llama8b", [p], kw, 32, 8, 128, 0) for p in (512, 2048, 8192) for kw in (20, 60)]
    + [("qwen0.5b", [2048], 50, 14, 2, 64, 0), ("gemma270m", [8192], 50, 4, 1, 256, 512),
       ("gemma270m-global", [8192], 50, 4, 1, 256, 0), ("llama8b 4 req", [512, 1024, 2048, 8192], 40, 32, 8, 128, 0)]
)
ATTN_QUICK = [("tiny", [96], 20, 4, 2, 64, 0), ("tiny 2 req win", [64, 120], 12, 4, 1, 64, 32)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (default on CPU)")
    ap.add_argument("--only", choices=["score", "grouped", "attn"], action="append", help="run only these")
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) / float32 (CPU default) / float16")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    quick = a.quick or not cuda
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(1)  # the interpreter is single-threaded; shared CPUs make thread pools noisy
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if cuda else torch.float32)
    only = set(a.only or ["score", "grouped", "attn"])
    print(f"device={torch.cuda.get_device_name() if cuda else 'cpu (Triton interpreter)'} torch={torch.__version__} "
          f"dtype={dtype} {'quick' if quick else 'full'}")
    bw = None
    if cuda:
        bw = copy_bandwidth()
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read+write); 'vs bound' = kernel time / (|W| / bandwidth)")
    rows = []
    if "score" in only:
        rows += bench_score(SCORE_QUICK if quick else SCORE_FULL, dtype, device, bandwidth=bw)
    if "grouped" in only:
        rows += bench_grouped(GROUPED_QUICK if quick else GROUPED_FULL, dtype, device)
    if "attn" in only:
        rows += bench_attn(ATTN_QUICK if quick else ATTN_FULL, dtype, device)
    print(table(rows))
    print("speedup = t torch / t kernel; mem ratio = mem kernel / mem torch; for the grouped row 'torch' is "
          "one kernel launch per verifier")
    if not cuda:
        print("CPU: the kernels run in the Triton interpreter (~1000x slower than torch, and its copies of the "
              "arguments count as kernel memory); these rows only show that the benchmark runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
