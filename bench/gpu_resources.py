"""Resource table of the Triton kernels as a GPU launch compiles them: registers, spills, shared memory,
occupancy and tensor-core instructions, for sm_80 and sm_90, without a GPU.

    python bench/gpu_resources.py [--cc 80 90] [--workers 2] [--shapes 8:60] [--dtypes bf16] [--kernels _conv_fwd]
                                  [--out bench/results]

Every Triton launcher of ``psp_kernels.triton`` is driven at the benchmark shapes (PPM and head N=1/8/16 at
60x60 and 90x90, C=2048, R=512; the PSPNet-50 backbone's conv shapes at the same N and sizes; fp32, fp16,
bf16; NCHW and channels_last) on meta tensors with the kernels replaced by a recorder. Each recorded launch
is compiled the way Triton's JIT specialises a real one: pointers 16-byte aligned and ints that are
multiples of 16 marked ``tt.divisibility=16``, ints equal to 1 made constexprs. Each distinct
specialisation is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and
its PTX assembled with the ptxas Triton uses for that arch (``-v``) for registers and spill bytes.

Occupancy is the CUDA occupancy calculator's: resident warps per SM, limited by registers (allocated per
warp in units of 256), shared memory (plus 1 KiB reserved per block) and the 64-warp / 32-block limits,
over 64 warps. ``mma`` counts ``mma.sync`` and ``wgmma`` instructions in the PTX.

Writes ``<out>/gpu_resources_<date>.{json,md}``: one row per (kernel, config, specialisation, cc), with the
launches (dtype, layout, N, size) that use it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))  # this checkout's psp_kernels

from psp_kernels import triton as tri  # noqa: E402
from psp_kernels.triton import common as tcommon  # noqa: E402
from psp_kernels.triton import conv as tconv  # noqa: E402
from psp_kernels.triton import head as thead  # noqa: E402
from psp_kernels.triton import pooling as tpool  # noqa: E402
from psp_kernels.triton import reduction as treduction  # noqa: E402
from psp_kernels.triton import upsample as tup  # noqa: E402
from psp_kernels.triton.common import SIG_DTYPE  # noqa: E402

#: every Triton kernel, by the module that launches it
MODULE_KERNELS = {
    tpool: ("_pool_fwd_kernel", "_pool_bwd_kernel", "_pool_nested_fwd_kernel", "_pool_nested_bwd_kernel"),
    treduction: ("_reduction_fwd_kernel", "_reduction_bn_act_kernel", "_bn_bwd_kernel", "_dgrad_kernel",
                 "_wgrad_kernel"),
    tup: ("_upsample_fwd_kernel", "_upsample_bwd_kernel"),
    thead: ("_head_fwd_kernel", "_merge_tiles_kernel", "_head_norm_kernel", "_head_bwd_sums_kernel",
            "_sum_rows_kernel", "_head_bwd_kernel"),
    tcommon: ("_sum_rows_kernel", "_merge_tiles_kernel"),    # common.sum_rows / merge_tiles: head and convs
    tconv: ("_conv_fwd_kernel", "_merge_tiles_kernel", "_bn_act_kernel", "_bn_act_bwd_sums_kernel", "_sum_rows_kernel",
            "_bn_act_bwd_kernel"),
}

#: PSPNet-50's backbone convolutions: (C in, O, kernel, stride, dilation, residual, ReLU)
BACKBONE_CONVS = ((3, 64, 3, 2, 1, False, True), (128, 64, 1, 1, 1, False, True), (512, 256, 1, 1, 1, False, True),
                  (256, 256, 3, 1, 2, False, True), (512, 512, 3, 1, 4, False, True),
                  (512, 2048, 1, 1, 1, True, True), (1024, 2048, 1, 1, 1, False, False), (3, 64, 7, 2, 1, False, True))

#: the launches the table covers: (N, H = W)
SHAPES = ((1, 60), (8, 60), (16, 60), (1, 90), (8, 90), (16, 90))

#: the memory-bound kernels (streaming passes), for which occupancy matters most
MEMORY_BOUND = ("_pool_", "_upsample_", "_bn_bwd_", "_head_norm_", "_head_bwd_", "_bn_act_", "_merge_", "_sum_rows_")

#: constexprs a launch chooses at run time (the interpreter's upcast, the fp32 dots' TF32 policy): a config
#: matches a launch whatever their values, and the launch's values are compiled
LAUNCH_CHOSEN = ("DOT_UPCAST", "DOT_PRECISION")

SM = {80: dict(regs=65536, smem=164 * 1024, warps=64, blocks=32),
      90: dict(regs=65536, smem=228 * 1024, warps=64, blocks=32)}


# --------------------------------------------------------------------------------------------------
# Recording launches
# --------------------------------------------------------------------------------------------------

class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` appends the launch."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((self.name, grid, args, kw))


@contextlib.contextmanager
def recording():
    """Within the block every Triton kernel is a recorder; yields the list of (name, grid, args, kwargs)."""
    calls, saved = [], []
    for module, names in MODULE_KERNELS.items():
        for name in names:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, _Recorder(name, calls))
    try:
        yield calls
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def drive_launchers(dtype: torch.dtype, n: int, hw: int, channels_last: bool) -> None:
    """Call every Triton launcher once at N, C=2048, R=512, H=W=hw (meta tensors): the PPM ops, the head
    epilogue (train, eval, with and without the BN input kept) and every backbone conv (eval and training,
    forward and backward)."""
    c, r, bins = 2048, 512, (1, 2, 3, 6)
    meta = dict(device="meta", dtype=dtype)
    acc = dict(device="meta", dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(n, c, hw, hw, **meta).contiguous(memory_format=fmt)
    pooled = torch.empty(n, c, 50, **meta)
    ws = [torch.empty(r, c, 1, 1, **meta) for _ in bins]
    vs = [torch.empty(r, **meta) for _ in bins]
    tri.multibin_avg_pool(x, bins)
    tri.multibin_avg_pool_backward(pooled, bins, hw, hw, channels_last)
    _, concat = tri.multibin_avg_pool_with_concat(x, bins, c + 4 * r)
    tri.multibin_avg_pool_backward_add(pooled, bins, concat[:, :c], channels_last)
    tri.upsample_into(concat, torch.empty(n, r, 50, **meta), bins, c)
    for training in (True, False):
        tri.reduction_conv_bn_relu(pooled, ws, vs, vs, vs, vs, bins, training, 1e-5)
        tri.reduction_conv_bn_relu_backward(torch.empty(n, r, 50, **meta), pooled, torch.empty(n, r, 50, **acc), ws,
                                            vs, vs, torch.empty(4, r, **acc), torch.empty(4, r, **acc), bins, training,
                                            1e-5)
    up = tri.upsample_concat(x, torch.empty(n, r, 50, **meta), bins)
    tri.upsample_concat_backward(up, bins, c)
    y = torch.empty(n, r, hw, hw, **meta).contiguous(memory_format=fmt)   # the concat-free head's epilogue
    u, bw, o_vec = torch.empty(n, r, hw, 36, **acc), torch.empty(hw, 36, **acc), torch.empty(r, **acc)
    for training in (True, False):
        _, z, _, _ = tri.add_branch_bn_relu(y, u, bw, o_vec, o_vec, o_vec, o_vec, training, 1e-5, True)
        tri.add_branch_bn_relu_backward(torch.empty(n, r, hw, hw, **meta), z, bw, o_vec, o_vec, o_vec, o_vec,
                                        training, 1e-5)
    tri.add_branch_bn_relu(y, u, bw, o_vec, o_vec, o_vec, o_vec, False, 1e-5, False)
    for c_in, o, k, stride, dil, has_res, relu in BACKBONE_CONVS:
        xc = torch.empty(n, c_in, hw, hw, **meta).contiguous(memory_format=fmt)
        res = torch.empty(n, o, hw, hw, **meta) if has_res else None
        wc = torch.empty(o, c_in, k, k, **meta).contiguous(memory_format=fmt)
        s = 1 if has_res else stride
        tri.folded_conv(xc, wc, torch.empty(o, **acc), res, s, dil * (k // 2), dil, relu)
        vec = torch.empty(o, **acc)
        out, y_conv, mean, var = tri.training_conv(xc, wc, vec, vec, res, s, dil * (k // 2), dil, relu, 1e-5)
        tri.training_conv_bn_backward(torch.empty_like(out), y_conv, out, vec, vec, mean, var, relu, 1e-5, has_res)


def launch_config(entry, args, kw):
    """The registered config of ``entry`` a launch uses: the same constexprs, num_warps, register cap and pointer
    dtypes; None if there is none."""
    for cfg in entry.configs:
        sig = list(cfg.signature.values())
        ptr_ok = all(sig[i] == "*" + SIG_DTYPE[a.dtype] for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        consts = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages", "maxnreg", *LAUNCH_CHOSEN)}
        if (ptr_ok and cfg.num_warps == kw["num_warps"] and cfg.num_stages == kw.get("num_stages", cfg.num_stages)
                and cfg.options.get("maxnreg") == kw.get("maxnreg")
                and all(cfg.constexprs.get(k) == v for k, v in consts.items())):
            return cfg
    return None


def specialisation(cfg, args) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch as Triton's JIT specialises it: a pointer whose address is a
    multiple of 16 bytes and an int that is a multiple of 16 get ``tt.divisibility=16``; an int equal to 1
    becomes a constexpr. Meta tensors have address 0: their alignment is their storage offset's."""
    signature, constexprs, attrs = dict(cfg.signature), dict(cfg.constexprs), {}
    names = list(cfg.signature)
    for i, value in enumerate(args):
        name = names[i]
        if isinstance(value, torch.Tensor):
            if (value.data_ptr() + value.storage_offset() * value.element_size()) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, int):
            continue
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        elif value % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def collect(shapes=SHAPES, dtypes=(torch.float32, torch.float16, torch.bfloat16)) -> list[dict]:
    """Every distinct specialisation launched at ``shapes`` x ``dtypes`` x both layouts, with its launches."""
    entries = {e.name: e for e in tri.KERNELS}
    found: dict[str, dict] = {}
    for dtype in dtypes:
        for n, hw in shapes:
            for channels_last in (False, True):
                with recording() as calls:
                    drive_launchers(dtype, n, hw, channels_last)
                for name, _grid, args, kw in calls:
                    cfg = launch_config(entries[name], args, kw)
                    if cfg is None:
                        raise RuntimeError(f"{name}: a launch with no registered config: {kw}")
                    signature, constexprs, attrs = specialisation(cfg, args)
                    constexprs.update({k: kw[k] for k in LAUNCH_CHOSEN if k in constexprs and k in kw})
                    key = json.dumps([name, cfg.name, signature, constexprs, sorted(map(str, attrs.items()))],
                                     default=str)
                    spec = found.setdefault(key, dict(kernel=name, config=cfg.name, signature=signature,
                                                      constexprs=constexprs, attrs=attrs, launches=[]))
                    spec["launches"].append(f"{SIG_DTYPE[dtype]} {'cl' if channels_last else 'nchw'} N{n} {hw}")
    return list(found.values())


# --------------------------------------------------------------------------------------------------
# Compiling and reading resources
# --------------------------------------------------------------------------------------------------

def bundled_ptxas(cc: int) -> str:
    """The ptxas Triton itself assembles ``cc``'s PTX with (it bundles two: sm_90 and later take the newer)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(cc).path


def ptxas_usage(ptx: str, cc: int) -> dict:
    """Registers and spill bytes from the bundled ``ptxas -v`` of ``ptx``, run as Triton's ``make_cubin`` runs
    it (the arch it targets, ``-lineinfo``, ``--regAllocOptLevel=2``), so the numbers are the binary's."""
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        log = subprocess.run([bundled_ptxas(cc), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                              str(path), "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True,
                             check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(registers=int(regs.group(1)) if regs else 0,
                spill_store_bytes=int(spills.group(1)) if spills else 0,
                spill_load_bytes=int(spills.group(2)) if spills else 0)


def occupancy(registers: int, shared: int, num_warps: int, cc: int) -> float:
    """Resident warps per SM over the maximum (the CUDA occupancy calculator's rules)."""
    sm = SM[cc]
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = sm["regs"] // (regs_per_warp * num_warps)
    by_smem = sm["smem"] // (shared + 1024) if shared else sm["blocks"]
    blocks = min(by_regs, by_smem, sm["warps"] // num_warps, sm["blocks"])
    return blocks * num_warps / sm["warps"]


def compile_config(entry, cfg, cc: int, spec: dict | None = None):
    """``triton.compile`` of config ``cfg`` of registry entry ``entry`` for ``cc``: with the specialisation
    ``spec`` of a recorded launch (from :func:`collect`), else generic (the config's own signature). Needs a
    process without ``TRITON_INTERPRET`` (the interpreter's kernels cannot be compiled)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature, constexprs, attrs = ((spec["signature"], spec["constexprs"], spec["attrs"]) if spec
                                    else (cfg.signature, cfg.constexprs, {}))
    return triton.compile(ASTSource(fn=entry.fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.options))


def compile_one(spec: dict, cc: int) -> dict:
    """Compile one specialisation for ``cc``; the row of the table (or the error)."""
    os.environ.pop("TRITON_INTERPRET", None)
    entry = next(e for e in tri.KERNELS if e.name == spec["kernel"])
    cfg = next(c for c in entry.configs if c.name == spec["config"])
    row = dict(kernel=spec["kernel"], config=spec["config"], cc=cc, num_warps=cfg.num_warps,
               divisible=sorted(i[0] for i in spec["attrs"]), launches=spec["launches"])
    try:
        k = compile_config(entry, cfg, cc, spec)
    except Exception as err:  # noqa: BLE001 - a failing compile is a row of the table
        return dict(row, error=f"{type(err).__name__}: {err}"[:500])
    ptx = k.asm["ptx"]
    row.update(ptxas_usage(ptx, cc), shared_bytes=int(k.metadata.shared),
               mma=len(re.findall(r"\bmma\.sync\b", ptx)), wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)))
    row["occupancy"] = round(occupancy(row["registers"], row["shared_bytes"], cfg.num_warps, cc), 4)
    row["memory_bound"] = any(s in spec["kernel"] for s in MEMORY_BOUND)
    row["tf32"] = spec["constexprs"].get("DOT_PRECISION") == "tf32"
    return row


def _compile_star(args):
    return compile_one(*args)


def summary(rows: list[dict]) -> list[str]:
    """Per (kernel, cc): specialisations, worst registers, spills and occupancy, and the fewest tensor-core
    instructions of its fp32 and its bf16/fp16 specialisations."""
    lines = ["| kernel | cc | specialisations | max regs | max spill B | min occupancy % | min mma+wgmma fp32 | "
             "min mma+wgmma bf16/fp16 |", "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["kernel"], r["cc"]), []).append(r)
    for (kernel, cc), rs in sorted(groups.items()):
        def fewest(dtypes):
            counts = [r["mma"] + r["wgmma"] for r in rs if any(f"/{d}/" in r["config"] + "/" for d in dtypes)]
            return str(min(counts)) if counts else "-"
        lines.append(f"| {kernel} | {cc} | {len(rs)} | {max(r['registers'] for r in rs)} | "
                     f"{max(r['spill_store_bytes'] for r in rs)} | {100 * min(r['occupancy'] for r in rs):.1f} | "
                     f"{fewest(['fp32'])} | {fewest(['bf16', 'fp16'])} |")
    return lines


def markdown(rows: list[dict], env: dict) -> str:
    lines = ["Summary per kernel:", "", *summary(rows), "", "Every specialisation:", "",
             "| kernel | config | cc | warps | regs | spill st/ld B | shared KiB | occupancy % | mma | wgmma | "
             "launches |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["config"], r["cc"], str(r["divisible"]))):
        launches = f"{len(r['launches'])}: {r['launches'][0]}" + (" ..." if len(r["launches"]) > 1 else "")
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['config']} | {r['cc']} | {r['num_warps']} | error: "
                         f"{r['error'][:120]} | | | | | | {launches} |")
            continue
        lines.append(f"| {r['kernel']} | {r['config']} | {r['cc']} | {r['num_warps']} | {r['registers']} | "
                     f"{r['spill_store_bytes']}/{r['spill_load_bytes']} | {r['shared_bytes'] / 1024:.1f} | "
                     f"{100 * r['occupancy']:.1f} | {r['mma']} | {r['wgmma']} | {launches} |")
    ok = [r for r in rows if "error" not in r]
    spilling = sorted({(r["kernel"], r["config"]) for r in ok if r["spill_store_bytes"]})
    low = sorted({(r["kernel"], r["config"]) for r in ok if r["memory_bound"] and r["occupancy"] < 0.25})
    lines += ["", f"{len(rows)} rows; {len(rows) - len(ok)} compile errors; {len(spilling)} (kernel, config) pairs "
              f"spill; {len(low)} memory-bound (kernel, config) pairs under 25 % occupancy.", "",
              ", ".join(f"{k} {v}" for k, v in env.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cc", type=int, nargs="+", default=[80, 90], choices=sorted(SM))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--shapes", default=None, help="N:H pairs, e.g. 1:13,2:12 (default: the benchmark shapes)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "bf16"], choices=["fp32", "fp16", "bf16"])
    p.add_argument("--kernels", nargs="+", default=None,
                   help="compile only the kernels whose name contains one of these (default: all)")
    p.add_argument("--out", default=str(BENCH / "results"))
    args = p.parse_args(argv)
    shapes = (tuple(tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")) if args.shapes
              else SHAPES)
    by_name = {v: k for k, v in SIG_DTYPE.items()}
    specs = [s for s in collect(shapes, tuple(by_name[d] for d in args.dtypes))
             if not args.kernels or any(k in s["kernel"] for k in args.kernels)]
    jobs = [(spec, cc) for spec in specs for cc in args.cc]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = list(pool.map(_compile_star, jobs))
    import triton
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               triton=triton.__version__, torch=torch.__version__, shapes=[f"N{n} {hw}x{hw}" for n, hw in shapes])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu_resources_{env['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(rows, env))
    print("\n".join(summary(rows)))
    print(f"wrote {stem}.json/.md ({len(rows)} rows)")
    return stem.with_suffix(".json")


if __name__ == "__main__":
    main()
