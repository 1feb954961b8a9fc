// Compiles PSP_CPU_KERNELS (a <name>_kernels.h) once per instruction set; see isa.h. Included by a kernel
// file after all of its headers; no include guard by design.
#ifndef PSP_CPU_KERNELS
#error "define PSP_CPU_KERNELS (the kernel header to compile) before including isa_variants.h"
#endif

#include "isa.h"

#ifdef PSP_CPU_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=256")
namespace psp::cpu::avx512 {
#include PSP_CPU_KERNELS
}  // namespace psp::cpu::avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2")
namespace psp::cpu::avx2 {
#include PSP_CPU_KERNELS
}  // namespace psp::cpu::avx2
#pragma GCC pop_options
#endif

namespace psp::cpu::base {
#include PSP_CPU_KERNELS
}  // namespace psp::cpu::base
