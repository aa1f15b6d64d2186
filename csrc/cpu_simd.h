// gradops: SIMD helpers shared by the CPU kernels (gram_cpu.cpp, combine_cpu.cpp).
// The target list is the smallest these helpers need (avx2 + f16c, no fma), so they inline into
// callers compiled for avx2 + f16c with or without fma.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "gram_kernels.h"  // DType

namespace gradops::simd {

// The instruction-set variants of the CPU kernels (gram_cpu.cpp, combine_cpu.cpp).
enum class CpuIsa { Portable, Avx2, Avx512 };

// The best variant this CPU runs: Avx2 needs AVX2, FMA and F16C; Avx512 also AVX-512 F, BW, VL
// and DQ. GRADOPS_CPU_ISA=portable or avx2 selects a lesser one (tests, comparisons); it is read
// on every call (a getenv), so a test can switch it inside one process.
inline CpuIsa cpu_isa() {
  static const CpuIsa best = [] {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
          __builtin_cpu_supports("f16c")))
      return CpuIsa::Portable;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return CpuIsa::Avx512;
    return CpuIsa::Avx2;
  }();
  const char* cap = std::getenv("GRADOPS_CPU_ISA");
  if (cap == nullptr) return best;
  if (std::strcmp(cap, "portable") == 0) return CpuIsa::Portable;
  if (std::strcmp(cap, "avx2") == 0 && best == CpuIsa::Avx512) return CpuIsa::Avx2;
  return best;
}

// Elements [k, k+8) of a J row (`row` = the row's first byte) as fp32: fp32 as is, bf16 as
// `bits << 16`, fp16 through F16C. Unaligned loads.
template <DType D>
__attribute__((target("avx2,f16c"), always_inline)) inline __m256 load8(const char* row,
                                                                           int64_t k) {
  if constexpr (D == DType::F32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k));
    if constexpr (D == DType::F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

}  // namespace gradops::simd
