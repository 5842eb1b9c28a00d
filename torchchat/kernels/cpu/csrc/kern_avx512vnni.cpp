// The x86 kernels compiled for avx512vnni. The target is set here, per file, rather than by compiler
// flags, because torch.utils.cpp_extension.load passes one set of flags to every source.
// ops.cpp calls into this file only after checking at run time that the CPU and OS support it.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#endif
#define TCC_NS avx512vnni
#define TCC_TABLE avx512vnni_table
#define TCC_NAME "avx512vnni"
#define TCC_VNNI 1
#define TCC_MR 4  // activation rows per tile: AVX-512 has 32 vector registers, AVX2 16
#define TCC_512 1  // two 32-value blocks per 512-bit register
#include "kern_x86.inc"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
