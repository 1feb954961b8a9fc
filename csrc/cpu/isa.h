// Runtime CPU dispatch of the C++ kernels: which instruction set the kernels run.
//
// Each kernel file (pooling, upsample, head epilogue, reduction) is compiled three times: its code, kept in
// <name>_kernels.h, is included by isa_variants.h once per instruction set, in the namespaces
// psp::cpu::avx512 (AVX-512 F/BW/VL/DQ with 256-bit vectors: the kernels' rows are short, where 512-bit
// loops measured up to 2x slower), psp::cpu::avx2 and psp::cpu::base (the x86-64 baseline, SSE2), under
// GCC's `#pragma GCC target`, after every header -- so only our own code is
// compiled for the wider instruction sets and no inline function of a library header gets two bodies (what
// the ISA-specific translation units of a naive "compile the file with -mavx512f" would risk). At load,
// PSP_CPU_IMPL registers the variant of the widest instruction set the CPU has (__builtin_cpu_supports), as
// ATen's CPU_CAPABILITY dispatch does. The extension is built with -ffp-contract=off (no FMA) and the loops'
// reduction orders are fixed by the code, not by the vector width, so all variants give the same bits
// (tests/test_cpu_isa.py compares them).
//
// PSP_KERNELS_CPU_ISA=avx2|baseline (read once, at load) lowers the choice (any other value: the widest);
// tests/test_cpu_isa.py uses it. The fixed-order GEMM (gemm.h) picks its vector width by the same rule.
#pragma once

#include <cstdlib>
#include <cstring>

// Where the wider variants exist: x86-64 with GCC's target pragmas and __builtin_cpu_supports (elsewhere only
// the baseline variant is compiled and registered).
#if defined(__x86_64__) && defined(__GNUC__)
#define PSP_CPU_X86_VARIANTS 1
#endif

namespace psp::cpu {

// The instruction set the kernels use, as the GEMM's vector bytes: 64 (AVX-512), 32 (AVX2) or 16 (baseline),
// at most what PSP_KERNELS_CPU_ISA allows.
inline int cpu_vector_bytes() {
  static const int bytes = [] {
#ifdef PSP_CPU_X86_VARIANTS
    int widest = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
                     ? 64
                     : __builtin_cpu_supports("avx2") ? 32 : 16;
#else
    int widest = 16;
#endif
    const char* cap = std::getenv("PSP_KERNELS_CPU_ISA");
    if (cap && std::strcmp(cap, "avx2") == 0 && widest > 32) widest = 32;
    if (cap && std::strcmp(cap, "baseline") == 0) widest = 16;
    return widest;
  }();
  return bytes;
}

}  // namespace psp::cpu

#ifdef PSP_CPU_X86_VARIANTS
// m.impl(name, the widest variant of psp::cpu::<isa>::fn the CPU runs).
#define PSP_CPU_IMPL(m, fn)                                                        \
  m.impl(#fn, ::psp::cpu::cpu_vector_bytes() == 64   ? &::psp::cpu::avx512::fn \
              : ::psp::cpu::cpu_vector_bytes() == 32 ? &::psp::cpu::avx2::fn   \
                                                     : &::psp::cpu::base::fn)
#else
#define PSP_CPU_IMPL(m, fn) m.impl(#fn, &::psp::cpu::base::fn)
#endif
