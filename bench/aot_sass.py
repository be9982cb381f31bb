"""Ahead-of-time sm_90 compile of the quantised expert kernels on a machine without a GPU, and the
instruction mix of their inner K loop: python bench/aot_sass.py --fmt fp4 --var 1 --bn 64 --bm 8 [--down]
[--align] [--maxnreg 128] (--var 5: the fp8_mma variant; --align: the sorted-block kernels that fp4 decode
and every prefill use, else the scan path's). It compiles with the triton it imports: put a triton 3.6
install first on PYTHONPATH to see what the H200 runs (3.9 gives these dots wgmma, 3.6 mma.sync).

Prints the dot ops of the TTGIR (wgmma operand placement: a `dot_op` tensor = registers, a `memdesc` =
shared memory) and the SASS of the innermost loop holding MMAs, with instructions per weight value per
thread (loop instructions / (matrices * BLOCK_N * BLOCK_K / threads)). Needs only triton's bundled ptxas."""
import argparse
import collections
import os
import re
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels  # noqa: E402

# ints the JIT sees as multiples of 16 at released sizes
DIV16 = ("stride_xt", "N", "D", "I", "slot_offset", "num_n", "x_part_q", "h_part_q")


def compile_scan(down, fmt, var, asm, BM, BN, BK, warps, stages, maxnreg=None, align=False):
    """The up or down scan kernel (align: the align path's kernel, sorted blocks) for sm_90 with
    released-size specialisation (fp16 activations; var bit 4 (fp8_mma): x and h split into e4m3 parts
    with fp32 scales, h written in fp32)."""
    w = "*u8" if fmt == "fp4" else "*fp8e4nv"
    act = "*fp8e4nv" if var & 4 else "*fp16"
    rows = dict(pairs_ptr="*i32", slot_ptr="*i32") if align else dict(ids_ptr="*i32")  # how a block finds its pairs
    if down:
        fn = kernels._moe_down_kernel if align else kernels._moe_down_scan_kernel
        sig = dict(h_ptr=act, hs_ptr="*fp32", h_part_q="i32", w2_ptr=w, s2_ptr="*u8", y_ptr="*fp32", **rows,
                   N="i32", D="i32", I="i32", **({} if align else dict(slot_offset="i32")), num_n="i32")
    else:
        fn = kernels._moe_up_kernel if align else kernels._moe_up_scan_kernel
        sig = dict(x_ptr=act, stride_xt="i32", xs_ptr="*fp32", x_part_q="i32", w1_ptr=w,
                   w3_ptr=w, s1_ptr="*u8", s3_ptr="*u8", h_ptr="*fp32" if var & 4 else "*fp16", rw_ptr="*fp32",
                   **rows, N="i32", D="i32", I="i32", top_k="i32", limit="fp32",
                   **({} if align else dict(slot_offset="i32")), num_n="i32")
    consts = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, EVEN_K=True, PRECISION="tf32",
                  FMT=kernels._FMT_CODE[fmt], ASM=asm, VAR=var, **({} if align else dict(NP=512)))
    sig.update({k: "constexpr" for k in consts})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n, t in sig.items() if t.startswith("*") or n in DIV16}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = dict(num_warps=warps, num_stages=stages, **({} if maxnreg is None else dict(maxnreg=maxnreg)))
    return triton.compile(src, target=GPUTarget("cuda", 90, 128), options=opts)


def resource_usage(cubin_path):
    """cuobjdump's per-kernel resource line: registers (REG), spill stack (STACK), shared memory."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    out = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", cubin_path],
                         capture_output=True, text=True, check=True).stdout
    return " ".join(m.group(0) for m in re.finditer(r"(REG|STACK|SHARED|LOCAL):\d+", out))


def inner_loop(cubin_path):
    """SASS instructions of the shortest backward-branch loop that holds an MMA."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", cubin_path],
                          capture_output=True, text=True, check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    best = None
    for addr, txt in ins:
        target = re.search(r"BRA.*?0x([0-9a-f]+)", txt)
        if target and int(target.group(1), 16) < addr:
            body = [t for a, t in ins if int(target.group(1), 16) <= a <= addr]
            if any("MMA" in t for t in body) and (best is None or len(body) < len(best)):
                best = body
    return best or []


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fmt", choices=("fp4", "fp8"), default="fp4")
    ap.add_argument("--var", type=int, default=0,
                    help="kernels._variant_code: 1 swap, 2 dot_scaled, 3 both, 5 fp8_mma (fp4 on the fp8 tensor cores)")
    ap.add_argument("--no-asm", action="store_true", help="fp4: plain-Triton dequantisation instead of the PTX")
    ap.add_argument("--down", action="store_true")
    ap.add_argument("--bm", type=int, default=16)
    ap.add_argument("--bn", type=int, default=64)
    ap.add_argument("--bk", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--maxnreg", type=int, default=None, help="cap registers per thread (ptx .maxnreg)")
    ap.add_argument("--align", action="store_true", help="the align path's kernels (sorted blocks), not the scan path's")
    ap.add_argument("--out", default="/tmp/aot_sass")
    a = ap.parse_args()
    k = compile_scan(a.down, a.fmt, a.var, not a.no_asm, a.bm, a.bn, a.bk, a.warps, a.stages, a.maxnreg, a.align)
    os.makedirs(a.out, exist_ok=True)
    tag = f"{a.fmt}_{'down' if a.down else 'up'}{'_align' if a.align else ''}_v{a.var}_m{a.bm}_n{a.bn}_k{a.bk}_w{a.warps}"
    for ext in ("ttgir", "ptx"):
        with open(os.path.join(a.out, f"{tag}.{ext}"), "w") as f:
            f.write(k.asm[ext])
    cubin = os.path.join(a.out, f"{tag}.cubin")
    with open(cubin, "wb") as f:
        f.write(k.asm["cubin"])
    for line in k.asm["ttgir"].splitlines():
        if re.search(r"(warp_group_dot|tt\.dot|dot_scaled) ", line):
            print("dot:", line.split(" : ", 1)[-1].split(" loc(")[0])
    body = inner_loop(cubin)
    per_thread = (1 if a.down else 2) * a.bn * a.bk / (32 * a.warps)  # weight values per thread per K step
    mix = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
    print(f"{tag}: inner loop {len(body)} SASS instructions, {len(body) / per_thread:.2f} per weight value per thread")
    print("  " + ", ".join(f"{op} {n}" for op, n in mix.most_common(16)))
    print("  " + resource_usage(cubin))


if __name__ == "__main__":
    main()
