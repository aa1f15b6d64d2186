// gradops CPU kernels: weighted combination and GradDrop, each one pass over J. Interface and math:
// combine_kernels.h.
//
//   combine  (docs/methods.md#combine, the second pass of every Gram-weighted method):
//       out[k] = sum_t w[l(k), t] * J[t, k]
//   graddrop (docs/methods.md#graddrop; Z. Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with
//       Gradient Sign Dropout", NeurIPS 2020; the parameter-gradient variant of TorchJD / CAGrad):
//       S_k = sum_t J[t,k], A_k = sum_t |J[t,k]|, p_k = 0.5 (1 + S_k / ((1 + eps) A_k)) (0.5 where
//       A_k = 0; eps relative, so p is scale-free), one uniform U_k
//       per column, M[t,k] = [p_k > U_k][J[t,k] > 0] + [p_k < U_k][J[t,k] < 0],
//       out[k] = sum_t (leak[t] + (1 - leak[t]) M[t,k]) J[t,k].
//
// Decomposition. Columns are cut into blocks of a fixed width; OpenMP threads take contiguous runs
// of blocks (schedule(static)). A block is swept row by row, rows in groups (of eight in combine
// and in the AVX-512 GradDrop, of four elsewhere), into fp32 buffers that stay in L1, so every
// element of J comes from memory once and `out` is written once, converted, after the last row.
// GradDrop sweeps its narrow block twice (S and A, then the masked sum, which finds the block in
// L1/L2) and draws the block's uniforms in between; these three loops share the prefetching of the
// next block's rows in proportion to their running time, so that memory keeps streaming through
// the compute-heavy ones (Philox, the masked sum). combine's sweeps do almost nothing but load, and
// the hardware prefetchers keep up with them best alone: only groups of one or two rows (T <= 2)
// prefetch, kPrefetchBytes ahead. When a call streams more than kStreamBytes, `out` (and the mask)
// are written with non-temporal stores: they would leave the cache before use anyway, and this
// saves reading their lines before writing them.
//
// Arithmetic (fp32 whatever the dtypes). Each column is reduced on its own, in the order
// t = 0..T-1, from +0: acc = ((0 + c_0 x_0) + c_1 x_1) + ..., every product rounded to fp32 before
// its add (no FMA); S and A likewise, and p_k is evaluated as written above. A column's result
// depends on nothing but its inputs: not on the block width, the thread count, or whether it falls
// in a vector lane or a scalar tail, and both instruction-set variants agree bit for bit (up to
// NaN payloads). Every term is multiplied and added even when its coefficient is 0, so NaN/Inf in
// J reach `out` (a NaN or an Inf in a column also makes p_k NaN: both comparisons fail, M = 0,
// and 0 * NaN is NaN).
// GradDrop evaluates the formula through two exact identities:
//  - with s_k = +1 if p_k > U_k, -1 if p_k < U_k, 0 otherwise (NaN p_k: 0), M[t,k] = [s_k x > 0]
//    (x * (+-1) is exact; x * 0 is +-0 or NaN, never > 0);
//  - for M in {0, 1} and leak in [0, 1], fp32 leak + (1 - leak) * M is exactly leak (M = 0) or
//    exactly 1 (M = 1: 1 - leak is exact for leak >= 0.5 and otherwise within 2^-25 of it, so the
//    sum rounds to 1), so the coefficient is a select between leak and 1.
//
// Uniforms: U_k = philox_uniform(seed, k): Philox4x32-10 (J. Salmon et al., "Parallel Random
// Numbers: As Easy as 1, 2, 3", SC 2011) at counter (j_lo, j_hi, 0, 0) with j = k / 4, key
// (seed_lo, seed_hi); output word k % 4, read as int32 x, maps to float(x < 0 ? ~x : x) *
// 4.6566127342e-10f (conversion rounded to nearest, fp32 product). One Philox call serves four
// consecutive columns, bit-identical to Triton 3.x `tl.rand4x(seed, j)` (int64 seed and j).
//
// Conversions. bf16 -> fp32 is `bits << 16`, fp16 -> fp32 is exact (F16C or software); fp32 ->
// bf16/fp16 rounds to nearest even, overflows to Inf and keeps NaN a (quiet) NaN.
//
// Instruction sets: an AVX-512 (F, BW, VL, DQ) variant, an AVX2+F16C variant (function-level
// target attributes, chosen at run time with __builtin_cpu_supports) and a portable scalar
// variant. The AVX-512 variant has its own GradDrop (16-column vectors, mask registers, Philox on
// 16 counters per vector) and the AVX2 variant's combine, which is bound by memory. GCC contracts
// a * b + c into an FMA by default (-ffp-contract=fast, also with -std=c++17), which would round
// differently from the portable variant, and avx512f implies fma: contraction is turned off for
// this file (the pragma below), and the AVX2 target leaves out FMA as well. The scalar helpers are
// shared: they are the portable variant's loops and the vector variants' column tails. The
// environment variable GRADOPS_CPU_ISA (portable, avx2 or avx512; read once) caps the variant
// that these two kernels use, for tests and comparisons; by default the best the CPU has.
// GCC 12 warns, wrongly, that the AVX-512 intrinsics' deliberately undefined pass-through operands
// may be used uninitialized (GCC bug 105593): silenced for that header alone.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "combine_kernels.h"
#include "cpu_simd.h"

// No FMA contraction anywhere in this file (see the top comment).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#define GRADOPS_AVX2 __attribute__((target("avx2,f16c")))
#define GRADOPS_INLINE inline __attribute__((always_inline))
#define GRADOPS_AVX2_LAMBDA __attribute__((target("avx2,f16c"), always_inline))
#define GRADOPS_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c"
#define GRADOPS_AVX512 __attribute__((target(GRADOPS_AVX512_TARGET)))
#define GRADOPS_AVX512_LAMBDA __attribute__((target(GRADOPS_AVX512_TARGET), always_inline))

namespace gradops {
namespace {

// Block widths in columns (multiples of 32). combine: the fp32 accumulator (8 KiB) stays in L1.
// GradDrop (graddrop_plan): 256 columns while the T x 256 block of J fits in kGradDropL1Bytes
// (four fp32 buffers of 1 KiB and the block stay in L1), else up to kGradDropBlock columns, as
// many as keep the block within kGradDropBlockBytes (re-read from L2, the next one prefetched
// beside it).
constexpr int64_t kCombineBlock = 2048;
constexpr int64_t kGradDropBlock = 2048;
constexpr int64_t kGradDropL1Bytes = 6 << 10;
constexpr int64_t kGradDropBlockBytes = 512 << 10;
// Rows per group in combine's sweeps (AVX2) and in the AVX-512 GradDrop's.
constexpr int kCombineRows = 8;
constexpr int kGradDropRows512 = 8;
// Software prefetch distance along a row of J in combine's sweeps of one or two rows, in bytes.
// (Measured on a 2-core AMD EPYC Zen 4 VM: 4096 ahead is best for T = 2; for T >= 3 and groups of
// eight rows, prefetching at any distance from 1 to 8 KiB is 10-30% slower than none.)
constexpr int kPrefetchRows = 2;
constexpr int64_t kPrefetchBytes = 4096;
// Calls that move more bytes than this (J and out) write out / the mask with non-temporal
// stores: more than a last-level cache, so the output would not stay cached for its consumer.
constexpr int64_t kStreamBytes = int64_t{32} << 20;

// Philox4x32 constants (Triton's names).
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;
constexpr float kUniformScale = 4.6566127342e-10f;

// ---------------------------------------------------------------------------------------------
// Scalar conversions.

GRADOPS_INLINE uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

GRADOPS_INLINE float float_of(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// Exact IEEE binary16 -> binary32 (subnormals, Inf, NaN).
GRADOPS_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return float_of(sign | 0x7f800000u | (man << 13));      // Inf / NaN
  if (exp != 0) return float_of(sign | ((exp + 112) << 23) | (man << 13));  // rebias 15 -> 127
  return float_of(bits_of(static_cast<float>(man) * 0x1p-24f) | sign);      // zero / subnormal
}

GRADOPS_INLINE float bf16_to_float(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

// binary32 -> bfloat16, round to nearest even; NaN -> quiet NaN (same sign and top payload).
GRADOPS_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t b = bits_of(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// binary32 -> binary16, round to nearest even, as F16C's vcvtps2ph in that mode: NaN -> quiet NaN
// keeping the top payload bits, |f| >= 65520 -> Inf, subnormal results rounded exactly.
GRADOPS_INLINE uint16_t float_to_half(float f) {
  const uint32_t b = bits_of(f);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t ab = b & 0x7fffffffu;
  uint32_t h;
  if (ab > 0x7f800000u) {
    h = 0x7e00u | ((ab >> 13) & 0x3ffu);  // NaN
  } else if (ab >= 0x477ff000u) {
    h = 0x7c00u;  // 65520 (halfway between 65504 and 2^16) and above round to Inf
  } else if (ab >= 0x38800000u) {
    // Normal: rebias 127 -> 15 (subtract 112 << 23), round the 13 dropped bits to nearest even;
    // a carry out of the mantissa correctly bumps the exponent.
    h = (ab - 0x38000000u + 0xfffu + ((ab >> 13) & 1u)) >> 13;
  } else {
    // |f| < 2^-14: the half is round(|f| * 2^24) (subnormal, or 0x400 = 2^-14). Adding 0.5f
    // (ulp 2^-24) performs exactly that rounding, to nearest even.
    h = bits_of(float_of(ab) + 0.5f) - 0x3f000000u;
  }
  return static_cast<uint16_t>(sign | h);
}

template <DType D>
constexpr int64_t esize() {
  return D == DType::F32 ? 4 : 2;
}

// Element k of a J row (`row`: the address of the row's first column in the block), as fp32.
template <DType D>
GRADOPS_INLINE float load1(const char* row, int64_t k) {
  if constexpr (D == DType::F32) {
    return reinterpret_cast<const float*>(row)[k];
  } else {
    const uint16_t h = reinterpret_cast<const uint16_t*>(row)[k];
    return D == DType::F16 ? half_to_float(h) : bf16_to_float(h);
  }
}

// The uniform of column `column`: word column % 4 of Philox4x32-10 at counter column / 4.
float philox_scalar(uint64_t seed, uint64_t column) {
  const uint64_t counter = column >> 2;
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint64_t pb = static_cast<uint64_t>(kPhiloxRoundB) * c2;  // of the old c2
    const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * c0;  // of the old c0
    c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const uint32_t words[4] = {c0, c1, c2, c3};
  int32_t x;
  std::memcpy(&x, &words[column & 3], 4);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * kUniformScale;
}

// Whether non-temporal stores are used for an output of `bytes_out` bytes at `dst` (`align`:
// the alignment the vector stores need) in a call moving `bytes_total` bytes.
bool use_stream(int64_t bytes_total, const void* dst, uintptr_t align) {
  return bytes_total > kStreamBytes && reinterpret_cast<uintptr_t>(dst) % align == 0;
}

// ---------------------------------------------------------------------------------------------
// Scalar helpers over columns [k0, k1) of a block or part. Rows are p, p + rsb, ... (rsb: row
// stride in bytes). `first`: this row group starts the reduction (from +0) instead of adding to
// the buffers.

// acc[k] (+)= sum_{i < R} w[i] * x_i[k].
template <DType D>
GRADOPS_INLINE void rows_scalar(const char* p, int64_t rsb, const float* w, int R, bool first,
                                int64_t k0, int64_t k1, float* acc) {
  for (int64_t k = k0; k < k1; ++k) {
    float s = first ? 0.0f : acc[k];
    for (int i = 0; i < R; ++i) s = s + w[i] * load1<D>(p + i * rsb, k);
    acc[k] = s;
  }
}

// S[k] (+)= sum_i x_i[k], A[k] (+)= sum_i |x_i[k]|.
template <DType D>
GRADOPS_INLINE void sums_scalar(const char* p, int64_t rsb, int R, bool first, int64_t k0,
                                int64_t k1, float* S, float* A) {
  for (int64_t k = k0; k < k1; ++k) {
    float s = first ? 0.0f : S[k], a = first ? 0.0f : A[k];
    for (int i = 0; i < R; ++i) {
      const float x = load1<D>(p + i * rsb, k);
      s = s + x;
      a = a + float_of(bits_of(x) & 0x7fffffffu);
    }
    S[k] = s;
    A[k] = a;
  }
}

// Per column: p = 0.5 (1 + S / ((1 + eps) A)) (eps relative: scale-free; p = 0.5 where A = 0,
// a column of zeros), U = noise[k] or Philox (counter off0 + k), and the kept sign
// sgn = +1 (p > U), -1 (p < U) or 0.
GRADOPS_INLINE void sign_scalar(const float* S, const float* A, float eps, const float* noise,
                                uint64_t seed, uint64_t off0, int64_t k0, int64_t k1, float* sgn) {
  const float shrink = 1.0f / (1.0f + eps);
  for (int64_t k = k0; k < k1; ++k) {
    const float p = 0.5f * (1.0f + (A[k] == 0.0f ? 0.0f : S[k] / A[k]) * shrink);
    const float u = noise != nullptr ? noise[k] : philox_scalar(seed, off0 + k);
    sgn[k] = p > u ? 1.0f : (p < u ? -1.0f : 0.0f);
  }
}

// acc[k] (+)= sum_{i < R} (M_i[k] ? 1 : leak[i]) * x_i[k] with M_i[k] = [sgn[k] * x_i[k] > 0];
// M also stored to mask[i * mstride + k] when mask != nullptr.
template <DType D>
GRADOPS_INLINE void drop_scalar(const char* p, int64_t rsb, const float* leak, int R, bool first,
                                int64_t k0, int64_t k1, const float* sgn, float* acc, bool* mask,
                                int64_t mstride) {
  for (int64_t k = k0; k < k1; ++k) {
    float s = first ? 0.0f : acc[k];
    for (int i = 0; i < R; ++i) {
      const float x = load1<D>(p + i * rsb, k);
      const bool m = sgn[k] * x > 0.0f;
      s = s + (m ? 1.0f : leak[i]) * x;
      if (mask != nullptr) mask[i * mstride + k] = m;
    }
    acc[k] = s;
  }
}

// out[c0 + k] = acc[k] converted, k in [k0, k1).
GRADOPS_INLINE void store_scalar(const float* acc, int64_t k0, int64_t k1, void* out, int64_t c0,
                                 DType od) {
  if (od == DType::F32) {
    float* o = static_cast<float*>(out) + c0;
    for (int64_t k = k0; k < k1; ++k) o[k] = acc[k];
  } else {
    uint16_t* o = static_cast<uint16_t*>(out) + c0;
    for (int64_t k = k0; k < k1; ++k)
      o[k] = od == DType::F16 ? float_to_half(acc[k]) : float_to_bf16(acc[k]);
  }
}

// f(std::integral_constant<int, r>()) for a run-time r in [R, G].
template <int G, int R = 1, class F>
GRADOPS_INLINE void with_rows(int64_t r, F&& f) {
  if constexpr (R <= G) {
    if (r == R)
      f(std::integral_constant<int, R>());
    else
      with_rows<G, R + 1>(r, f);
  }
}

// Calls f(t, R, First) for the row groups [t, t + R) that cover 0..T-1 (T >= 1) in order: R = G,
// then the remainder. R and First (t == 0: the group that starts the reductions) are
// std::integral_constants.
template <int G = 4, class F>
GRADOPS_INLINE void for_row_groups(int64_t T, F f) {
  using First = std::true_type;
  using Next = std::false_type;
  if (T <= G) {
    with_rows<G>(T, [&](auto R) { f(0, R, First()); });
    return;
  }
  f(0, std::integral_constant<int, G>(), First());
  int64_t t = G;
  for (; t + G <= T; t += G) f(t, std::integral_constant<int, G>(), Next());
  if (t < T) with_rows<G>(T - t, [&](auto R) { f(t, R, Next()); });
}

// How GradDrop cuts J into blocks and prefetches the next block's rows while it works on one.
// Line j of each row (64-byte lines) is prefetched by the loop (the S/A sweeps, the signs, the
// masked-sum sweeps) whose 16-bit mask has bit j % 16 set. Few rows (T x 256 columns within
// kGradDropL1Bytes): the work is mostly Philox, and the sign loop prefetches the whole next block
// into L1 (where it sits next to the current one). More rows: the block is made wider (longer runs
// along each row), prefetched into L2, and its lines are spread over the loops in proportion to
// their running time (estimated from instruction counts per 8 columns: ~40 for the Philox, ~15
// with given noise, ~10 T + 30 for the two sweeps), so that memory streams through the whole block
// rather than in bursts. (Measured on a 2-core AMD EPYC Zen 4 VM, fp32, AVX-512 variant, time
// over one read of J: the first rule is 5-10% faster for T = 2..6, the second for T >= 8: 1.3x
// rather than 1.35-1.4x at T = 8, 1.2x rather than 1.3x at T = 16, 1.15x rather than 1.85x at T =
// 40, where the AVX2 variant gains as much, 1.35x rather than 1.8x.)
struct GradDropPlan {
  int64_t width;              // block width in columns: a multiple of 128, <= kGradDropBlock
  uint32_t sums, sign, drop;  // the loops' lines
  bool l2;                    // prefetch into L2 (PREFETCHT1) rather than L1
};

GradDropPlan graddrop_plan(int64_t T, int64_t elem_bytes, bool noise) {
  const int64_t col_bytes = T * elem_bytes;
  if (col_bytes * 256 <= kGradDropL1Bytes) return {256, 0, 0xFFFFu, 0, false};
  int64_t width = kGradDropBlock;
  while (width > 256 && width * col_bytes > kGradDropBlockBytes) width /= 2;
  const int64_t sign_cost = noise ? 15 : 40, sweep_cost = 10 * T + 30;
  const int64_t s16 = (16 * sign_cost + (sign_cost + sweep_cost) / 2) / (sign_cost + sweep_cost);
  const uint32_t sign = (1u << s16) - 1;
  return {width, 0x5555u & ~sign, sign, 0xAAAAu & ~sign, true};
}

// ---------------------------------------------------------------------------------------------
// Portable variant: the scalar helpers over whole blocks / parts (plain stores only).

struct Portable {
  template <DType OD>
  static constexpr uintptr_t stream_align() { return 8 * esize<OD>(); }  // (plain stores only)

  // acc[0, n) = sum_t w[t] * J[t, 0..n) (rows p + t * rsb).
  template <DType D>
  static void accumulate(const char* p, int64_t rsb, int64_t T, const float* w, int64_t n,
                         float* acc) {
    for_row_groups(T, [&](int64_t t, auto R, auto first) {
      rows_scalar<D>(p + t * rsb, rsb, w + t, R, first, 0, n, acc);
    });
  }

  template <DType OD>
  static void store(const float* acc, int64_t n, void* out, int64_t c0, bool /*stream*/) {
    store_scalar(acc, 0, n, out, c0, OD);
  }

  // GradDrop over columns [0, n) (n <= kGradDropBlock) of a block (rows p + t * rsb), out and
  // mask from column c0 on: S and A, the kept signs, the masked sum, through block buffers.
  template <DType D, DType OD>
  static void graddrop(const char* p, int64_t rsb, const GradDropArgs& a,
                       const GradDropPlan& /*pl*/, int64_t c0, int64_t n, bool /*stream_out*/,
                       bool /*stream_mask*/) {
    float S[kGradDropBlock], A[kGradDropBlock], sgn[kGradDropBlock], acc[kGradDropBlock];
    for_row_groups(a.T, [&](int64_t t, auto R, auto first) {
      sums_scalar<D>(p + t * rsb, rsb, R, first, 0, n, S, A);
    });
    sign_scalar(S, A, a.eps, a.noise != nullptr ? a.noise + c0 : nullptr, a.seed,
                static_cast<uint64_t>(c0), 0, n, sgn);
    bool* mask = a.mask != nullptr ? a.mask + c0 : nullptr;
    for_row_groups(a.T, [&](int64_t t, auto R, auto first) {
      drop_scalar<D>(p + t * rsb, rsb, a.leak + t, R, first, 0, n, sgn, acc,
                     mask != nullptr ? mask + t * a.P : nullptr, a.P);
    });
    store_scalar(acc, 0, n, a.out, c0, OD);
  }
};

// ---------------------------------------------------------------------------------------------
// AVX2 + F16C variant: 8 columns per vector, the scalar helpers for the last n % 8 columns.

using simd::load8;  // 8 elements of a J row as fp32 (cpu_simd.h)

// out[k .. k+8) = v converted to OD (as store_scalar); Stream: non-temporal (out + k aligned).
template <DType OD, bool Stream>
GRADOPS_AVX2 GRADOPS_INLINE void store8(void* out, int64_t k, __m256 v) {
  if constexpr (OD == DType::F32) {
    float* o = static_cast<float*>(out) + k;
    if constexpr (Stream) _mm256_stream_ps(o, v); else _mm256_storeu_ps(o, v);
  } else {
    __m128i h;
    if constexpr (OD == DType::F16) {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    } else {  // bf16, as float_to_bf16
      const __m256i b = _mm256_castps_si256(v);
      const __m256i top = _mm256_srli_epi32(b, 16);
      const __m256i rounded = _mm256_srli_epi32(
          _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                               _mm256_and_si256(top, _mm256_set1_epi32(1)))),
          16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      const __m256i h32 =
          _mm256_blendv_epi8(rounded, _mm256_or_si256(top, _mm256_set1_epi32(0x40)), nan);
      h = _mm_packus_epi32(_mm256_castsi256_si128(h32), _mm256_extracti128_si256(h32, 1));
    }
    __m128i* o = reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + k);
    if constexpr (Stream) _mm_stream_si128(o, h); else _mm_storeu_si128(o, h);
  }
}

GRADOPS_AVX2 GRADOPS_INLINE __m256i key(uint32_t k) {
  return _mm256_set1_epi32(static_cast<int>(k));
}

// Philox4x32-10 on the 8 * G counters base + 0 .. 8G-1 -> the uniforms of their 32 * G columns:
// u[4 g + v] holds columns 4 (base + 8 g) + 8 v .. + 7 (as philox_scalar: counter j gives columns
// 4j .. 4j+3, its four output words in order). G independent groups are interleaved for
// instruction-level parallelism. The counters are split into even and odd ones, each held in the
// low words of 64-bit lanes (the high words are ignored by _mm256_mul_epu32 and never reach the
// output), so one multiply gives both words of 4 products. Work that does not reach the output is
// skipped: round 1 has c2 = c3 = 0 (one product); when all the counters share their high word,
// round 2's A * c0 is one scalar product.
template <int G>
GRADOPS_AVX2 GRADOPS_INLINE void philox4(uint64_t seed, uint64_t base, __m256* u) {
  constexpr int H = 2 * G;  // halves: even and odd counters of each group
  const __m256i ma = _mm256_set1_epi64x(kPhiloxRoundA), mb = _mm256_set1_epi64x(kPhiloxRoundB);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t hi = static_cast<uint32_t>(base >> 32);
  __m256i c0[H], c1[H], c2[H], c3[H];
  for (int h = 0; h < H; ++h) {
    // Round 1: c0 = hi ^ k0, c1 = 0, c2 = hi(A lo) ^ k1, c3 = lo(A lo).
    const int64_t first = 8 * (h / 2) + (h % 2);
    const __m256i ctr = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(base)),
                                         _mm256_setr_epi64x(first, first + 2, first + 4, first + 6));
    const __m256i pa = _mm256_mul_epu32(ctr, ma);
    c0[h] = _mm256_xor_si256(_mm256_srli_epi64(ctr, 32), key(k0));
    c2[h] = _mm256_xor_si256(_mm256_srli_epi64(pa, 32), key(k1));
    c3[h] = pa;
  }
  // Round 2 (c1 = 0).
  const uint32_t k0_2 = k0 + kPhiloxKeyA, k1_2 = k1 + kPhiloxKeyB;
  if (static_cast<uint32_t>(base) <= 0xFFFFFFFFu - (8 * G - 1)) {  // c0 = hi ^ k0 in every lane
    const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * (hi ^ k0);
    for (int h = 0; h < H; ++h) {
      const __m256i pb = _mm256_mul_epu32(c2[h], mb);
      c0[h] = _mm256_xor_si256(_mm256_srli_epi64(pb, 32), key(k0_2));
      c2[h] = _mm256_xor_si256(c3[h], key(static_cast<uint32_t>(pa >> 32) ^ k1_2));
      c1[h] = pb;
      c3[h] = key(static_cast<uint32_t>(pa));
    }
  } else {
    for (int h = 0; h < H; ++h) {
      const __m256i pb = _mm256_mul_epu32(c2[h], mb), pa = _mm256_mul_epu32(c0[h], ma);
      c0[h] = _mm256_xor_si256(_mm256_srli_epi64(pb, 32), key(k0_2));
      c2[h] = _mm256_xor_si256(_mm256_srli_epi64(pa, 32), _mm256_xor_si256(c3[h], key(k1_2)));
      c1[h] = pb;
      c3[h] = pa;
    }
  }
  // Rounds 3 to 10 (the key is folded into c1 / c3 off the multiply chain).
  for (uint32_t r = 2; r < kPhiloxRounds; ++r) {
    const __m256i key0 = key(k0 + r * kPhiloxKeyA), key1 = key(k1 + r * kPhiloxKeyB);
    for (int h = 0; h < H; ++h) {
      const __m256i pb = _mm256_mul_epu32(c2[h], mb), pa = _mm256_mul_epu32(c0[h], ma);
      c0[h] = _mm256_xor_si256(_mm256_srli_epi64(pb, 32), _mm256_xor_si256(c1[h], key0));
      c2[h] = _mm256_xor_si256(_mm256_srli_epi64(pa, 32), _mm256_xor_si256(c3[h], key1));
      c1[h] = pb;
      c3[h] = pa;
    }
  }
  const __m256 scale = _mm256_set1_ps(kUniformScale);
  auto uniform = [&](__m256i x) GRADOPS_AVX2_LAMBDA {  // int32 x -> float(x < 0 ? ~x : x) * scale
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_xor_si256(x, _mm256_srai_epi32(x, 31))), scale);
  };
  for (int g = 0; g < G; ++g) {
    // Word w of counters 0..7 (even and odd counters interleaved back), then a 4 x 8 transpose
    // so that each vector holds 8 consecutive columns.
    auto words = [&](const __m256i* c) GRADOPS_AVX2_LAMBDA {
      return _mm256_blend_epi32(c[2 * g], _mm256_slli_epi64(c[2 * g + 1], 32), 0xAA);
    };
    const __m256i x0 = words(c0), x1 = words(c1), x2 = words(c2), x3 = words(c3);
    const __m256i t0 = _mm256_unpacklo_epi32(x0, x1), t1 = _mm256_unpackhi_epi32(x0, x1);
    const __m256i t2 = _mm256_unpacklo_epi32(x2, x3), t3 = _mm256_unpackhi_epi32(x2, x3);
    const __m256i a0 = _mm256_unpacklo_epi64(t0, t2);  // counters 0 | 4, words 0..3
    const __m256i a1 = _mm256_unpackhi_epi64(t0, t2);  // counters 1 | 5
    const __m256i a2 = _mm256_unpacklo_epi64(t1, t3);  // counters 2 | 6
    const __m256i a3 = _mm256_unpackhi_epi64(t1, t3);  // counters 3 | 7
    u[4 * g + 0] = uniform(_mm256_permute2x128_si256(a0, a1, 0x20));
    u[4 * g + 1] = uniform(_mm256_permute2x128_si256(a2, a3, 0x20));
    u[4 * g + 2] = uniform(_mm256_permute2x128_si256(a0, a1, 0x31));
    u[4 * g + 3] = uniform(_mm256_permute2x128_si256(a2, a3, 0x31));
  }
}

// Prefetches the line at p into L2 (l2) or L1.
GRADOPS_INLINE void prefetch_line(const char* p, bool l2) {
  if (l2)
    _mm_prefetch(p, _MM_HINT_T1);
  else
    _mm_prefetch(p, _MM_HINT_T0);
}

// Runs body(k) for k = 0, Step, .. < n (n a multiple of Step), and prefetch(k) at the start of
// each 64-byte line j (Line columns) whose bit j % 16 is set in `lines`. (A macro: the AVX2 and
// AVX-512 bodies need a sweep compiled for their own target.)
#define GRADOPS_DEFINE_SWEEP(NAME, TARGET)                                                 \
  template <int64_t Line, int64_t Step, class Prefetch, class Body>                       \
  TARGET GRADOPS_INLINE void NAME(int64_t n, uint32_t lines, Prefetch prefetch, Body body) { \
    int64_t k = 0;                                                                         \
    if (lines == 0) {                                                                      \
      for (; k < n; k += Step) body(k);                                                    \
      return;                                                                              \
    }                                                                                      \
    for (uint32_t j = 0; k + Line <= n; ++j, k += Line) {                                  \
      if ((lines >> (j & 15)) & 1) prefetch(k);                                            \
      for (int64_t v = 0; v < Line; v += Step) body(k + v);                                \
    }                                                                                      \
    for (; k < n; k += Step) body(k);                                                      \
  }
GRADOPS_DEFINE_SWEEP(sweep, GRADOPS_AVX2)
GRADOPS_DEFINE_SWEEP(sweep512, GRADOPS_AVX512)
#undef GRADOPS_DEFINE_SWEEP

struct Avx2 {
  // Alignment of `out` that the non-temporal vector stores of OD need.
  template <DType OD>
  static constexpr uintptr_t stream_align() { return 8 * esize<OD>(); }

  // acc[0, n) (+)= sum_{i < R} w[i] * x_i[0, n); groups of up to kPrefetchRows rows prefetch
  // kPrefetchBytes ahead (once per 64-byte line).
  template <DType D, int R, bool first>
  GRADOPS_AVX2 static void rows(const char* p, int64_t rsb, const float* w, int64_t n,
                                float* acc) {
    constexpr int64_t line = 64 / esize<D>();  // columns per line: 16 or 32
    __m256 wv[R];
    for (int i = 0; i < R; ++i) wv[i] = _mm256_set1_ps(w[i]);
    const int64_t n8 = n & ~int64_t{7};
    for (int64_t k = 0; k < n8; k += 8) {
      if (R <= kPrefetchRows && k % line == 0)
        for (int i = 0; i < R; ++i)
          _mm_prefetch(p + i * rsb + k * esize<D>() + kPrefetchBytes, _MM_HINT_T0);
      __m256 s = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + k);
      for (int i = 0; i < R; ++i)
        s = _mm256_add_ps(s, _mm256_mul_ps(wv[i], load8<D>(p + i * rsb, k)));
      _mm256_storeu_ps(acc + k, s);
    }
    rows_scalar<D>(p, rsb, w, R, first, n8, n, acc);
  }

  template <DType D>
  static void accumulate(const char* p, int64_t rsb, int64_t T, const float* w, int64_t n,
                         float* acc) {
    for_row_groups<kCombineRows>(T, [&](int64_t t, auto R, auto first) {
      rows<D, R, first>(p + t * rsb, rsb, w + t, n, acc);
    });
  }

  // out[c0 + k] = acc[k] converted, k in [0, n); acc 32-byte aligned.
  template <DType OD>
  GRADOPS_AVX2 static void store(const float* acc, int64_t n, void* out, int64_t c0,
                                 bool stream) {
    const int64_t n8 = n & ~int64_t{7};
    if (stream) {
      for (int64_t k = 0; k < n8; k += 8) store8<OD, true>(out, c0 + k, _mm256_load_ps(acc + k));
    } else {
      for (int64_t k = 0; k < n8; k += 8) store8<OD, false>(out, c0 + k, _mm256_load_ps(acc + k));
    }
    store_scalar(acc, n8, n, out, c0, OD);
  }

  // S[0, n) (+)= sum_i x_i, A[0, n) (+)= sum_i |x_i| over whole vectors (n a multiple of 8).
  template <DType D, int R, bool first>
  GRADOPS_AVX2 static void sums_rows(const char* p, int64_t rsb, int64_t n, float* S, float* A,
                                     const char* next, uint32_t lines, bool l2) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    sweep<64 / esize<D>(), 8>(
        n, lines,
        [&](int64_t k) GRADOPS_AVX2_LAMBDA {
          for (int i = 0; i < R; ++i) prefetch_line(next + i * rsb + k * esize<D>(), l2);
        },
        [&](int64_t k) GRADOPS_AVX2_LAMBDA {
          __m256 s = first ? _mm256_setzero_ps() : _mm256_load_ps(S + k);
          __m256 ab = first ? _mm256_setzero_ps() : _mm256_load_ps(A + k);
          for (int i = 0; i < R; ++i) {
            const __m256 x = load8<D>(p + i * rsb, k);
            s = _mm256_add_ps(s, x);
            ab = _mm256_add_ps(ab, _mm256_and_ps(x, abs_mask));
          }
          _mm256_store_ps(S + k, s);
          _mm256_store_ps(A + k, ab);
        });
  }

  // sgn[0, n) (n a multiple of 8) as sign_scalar, uniforms from noise or from Philox (64 columns
  // at a time). Prefetches its share `lines` of the T rows `next` (the next block).
  template <DType D>
  GRADOPS_AVX2 static void sign(const float* S, const float* A, float eps, const float* noise,
                                uint64_t seed, uint64_t off0, int64_t n, float* sgn,
                                const char* next, int64_t rsb, int64_t T, uint32_t lines,
                                bool l2) {
    constexpr int64_t line = 64 / esize<D>();
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    const __m256 minus_one = _mm256_set1_ps(-1.0f), shrink = _mm256_set1_ps(1.0f / (1.0f + eps));
    const __m256 zero = _mm256_setzero_ps();
    auto sign8 = [&](int64_t k, __m256 u) GRADOPS_AVX2_LAMBDA {
      if (k % line == 0 && ((lines >> ((k / line) & 15)) & 1) != 0) {
        const char* r = next + k * esize<D>();
        for (int64_t t = 0; t < T; ++t, r += rsb) prefetch_line(r, l2);
      }
      const __m256 a = _mm256_load_ps(A + k);
      const __m256 q = _mm256_andnot_ps(_mm256_cmp_ps(a, zero, _CMP_EQ_OQ),  // 0 / 0 -> 0
                                        _mm256_div_ps(_mm256_load_ps(S + k), a));
      const __m256 p = _mm256_mul_ps(half, _mm256_add_ps(one, _mm256_mul_ps(q, shrink)));
      _mm256_store_ps(sgn + k,
                      _mm256_or_ps(_mm256_and_ps(_mm256_cmp_ps(p, u, _CMP_GT_OQ), one),
                                   _mm256_and_ps(_mm256_cmp_ps(p, u, _CMP_LT_OQ), minus_one)));
    };
    int64_t k = 0;
    if (noise != nullptr) {
      for (; k < n; k += 8) sign8(k, _mm256_loadu_ps(noise + k));
      return;
    }
    for (; k + 64 <= n; k += 64) {  // off0 is a multiple of 4: counters (off0 + k) / 4 ..
      __m256 u[8];
      philox4<2>(seed, (off0 + k) >> 2, u);
      for (int v = 0; v < 8; ++v) sign8(k + 8 * v, u[v]);
    }
    for (; k < n; k += 32) {
      __m256 u[4];
      philox4<1>(seed, (off0 + k) >> 2, u);
      for (int v = 0; v < 4 && k + 8 * v < n; ++v) sign8(k + 8 * v, u[v]);
    }
  }

  // acc[0, n) (+)= the masked terms of R rows (as drop_scalar) over whole vectors. With
  // stream_mask (mask rows 32-byte aligned), the mask rows are gathered in L1 and written with
  // whole-line non-temporal stores.
  template <DType D, int R, bool first>
  GRADOPS_AVX2 static void drop_rows(const char* p, int64_t rsb, const float* leak, int64_t n,
                                     const float* sgn, float* acc, bool* mask, int64_t mstride,
                                     bool stream_mask, const char* next, uint32_t lines,
                                     bool l2) {
    __m256 lv[R];
    for (int i = 0; i < R; ++i) lv[i] = _mm256_set1_ps(leak[i]);
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    alignas(32) uint8_t mbuf[R][kGradDropBlock];
    sweep<64 / esize<D>(), 8>(
        n, lines,
        [&](int64_t k) GRADOPS_AVX2_LAMBDA {
          for (int i = 0; i < R; ++i) prefetch_line(next + i * rsb + k * esize<D>(), l2);
        },
        [&](int64_t k) GRADOPS_AVX2_LAMBDA {
          __m256 s = first ? zero : _mm256_load_ps(acc + k);
          const __m256 sg = _mm256_load_ps(sgn + k);
          for (int i = 0; i < R; ++i) {
            const __m256 x = load8<D>(p + i * rsb, k);
            const __m256 m = _mm256_cmp_ps(_mm256_mul_ps(sg, x), zero, _CMP_GT_OQ);
            s = _mm256_add_ps(s, _mm256_mul_ps(_mm256_blendv_ps(lv[i], one, m), x));
            if (mask != nullptr) {
              // lanes 0 / -1 -> bytes 0 / 1
              const __m256i m01 = _mm256_srli_epi32(_mm256_castps_si256(m), 31);
              const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(m01),
                                                _mm256_extracti128_si256(m01, 1));
              const __m128i b = _mm_packs_epi16(w, w);
              void* dst = stream_mask ? static_cast<void*>(mbuf[i] + k) : mask + i * mstride + k;
              _mm_storel_epi64(static_cast<__m128i*>(dst), b);
            }
          }
          _mm256_store_ps(acc + k, s);
        });
    if (stream_mask) {
      for (int i = 0; i < R; ++i) {
        bool* dst = mask + i * mstride;
        int64_t k = 0;
        for (; k + 32 <= n; k += 32)
          _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + k),
                              _mm256_load_si256(reinterpret_cast<const __m256i*>(mbuf[i] + k)));
        std::memcpy(dst + k, mbuf[i] + k, static_cast<size_t>(n - k));
      }
    }
  }

  // GradDrop over columns [0, n) (n <= kGradDropBlock) of a block (rows p + t * rsb), out and
  // mask from column c0 on: S and A (row sweeps into L1 buffers), the kept signs (Philox), the
  // masked sum (row sweeps again, the block now in L1/L2), prefetching the next block meanwhile.
  template <DType D, DType OD>
  GRADOPS_AVX2 static void graddrop(const char* p, int64_t rsb, const GradDropArgs& a,
                                    const GradDropPlan& pl, int64_t c0, int64_t n,
                                    bool stream_out, bool stream_mask) {
    alignas(32) float S[kGradDropBlock], A[kGradDropBlock], sgn[kGradDropBlock],
        acc[kGradDropBlock];
    const int64_t T = a.T, n8 = n & ~int64_t{7};
    bool* mask = a.mask != nullptr ? a.mask + c0 : nullptr;
    const char* next = p + pl.width * esize<D>();  // the next block
    for_row_groups(T, [&](int64_t t, auto R, auto first) {
      sums_rows<D, R, first>(p + t * rsb, rsb, n8, S, A, next + t * rsb, pl.sums, pl.l2);
    });
    sign<D>(S, A, a.eps, a.noise != nullptr ? a.noise + c0 : nullptr, a.seed,
            static_cast<uint64_t>(c0), n8, sgn, next, rsb, T, pl.sign, pl.l2);
    for_row_groups(T, [&](int64_t t, auto R, auto first) {
      drop_rows<D, R, first>(p + t * rsb, rsb, a.leak + t, n8, sgn, acc,
                             mask != nullptr ? mask + t * a.P : nullptr, a.P, stream_mask,
                             next + t * rsb, pl.drop, pl.l2);
    });
    store<OD>(acc, n8, a.out, c0, stream_out);
    if (n8 < n)  // the last n % 8 columns, as the portable variant
      Portable::graddrop<D, OD>(p + n8 * esize<D>(), rsb, a, pl, c0 + n8, n - n8, false, false);
  }
};

// ---------------------------------------------------------------------------------------------
// AVX-512 variant (F, BW, VL, DQ): GradDrop in 16-column vectors with mask registers, Philox on 16
// counters per vector; combine, which is bound by memory, is the AVX2 variant's.

// Elements [k, k+16) of a J row as fp32 (as load8).
template <DType D>
GRADOPS_AVX512 GRADOPS_INLINE __m512 load16(const char* row, int64_t k) {
  if constexpr (D == DType::F32) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + k);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * k));
    if constexpr (D == DType::F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// out[k .. k+16) = v converted to OD (as store8); Stream: non-temporal (out + k aligned to the
// vector's size).
template <DType OD, bool Stream>
GRADOPS_AVX512 GRADOPS_INLINE void store16(void* out, int64_t k, __m512 v) {
  if constexpr (OD == DType::F32) {
    float* o = static_cast<float*>(out) + k;
    if constexpr (Stream) _mm512_stream_ps(o, v); else _mm512_storeu_ps(o, v);
  } else {
    __m256i h;
    if constexpr (OD == DType::F16) {
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    } else {  // bf16, as float_to_bf16
      const __m512i b = _mm512_castps_si512(v);
      const __m512i top = _mm512_srli_epi32(b, 16);
      const __m512i rounded = _mm512_srli_epi32(
          _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                               _mm512_and_si512(top, _mm512_set1_epi32(1)))),
          16);
      const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      h = _mm512_cvtepi32_epi16(
          _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(top, _mm512_set1_epi32(0x40))));
    }
    __m256i* o = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + k);
    if constexpr (Stream) _mm256_stream_si256(o, h); else _mm256_storeu_si256(o, h);
  }
}

GRADOPS_AVX512 GRADOPS_INLINE __m512i key16(uint32_t k) {
  return _mm512_set1_epi32(static_cast<int>(k));
}

// Philox4x32-10 on the 16 * G counters base + 0 .. 16G-1 -> the uniforms of their 64 * G
// columns: u[4 g + v] holds columns 4 (base + 16 g) + 16 v .. + 15. The same scheme as philox4
// (even and odd counters in the low words of 64-bit lanes, round 1 and 2 shortcuts), with the
// three-way xors in one vpternlogd.
template <int G>
GRADOPS_AVX512 GRADOPS_INLINE void philox16(uint64_t seed, uint64_t base, __m512* u) {
  constexpr int H = 2 * G;
  const __m512i ma = _mm512_set1_epi64(kPhiloxRoundA), mb = _mm512_set1_epi64(kPhiloxRoundB);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t hi = static_cast<uint32_t>(base >> 32);
  __m512i c0[H], c1[H], c2[H], c3[H];
  for (int h = 0; h < H; ++h) {
    // Round 1: c0 = hi ^ k0, c1 = 0, c2 = hi(A lo) ^ k1, c3 = lo(A lo).
    const int64_t first = 16 * (h / 2) + (h % 2);
    const __m512i ctr = _mm512_add_epi64(
        _mm512_set1_epi64(static_cast<int64_t>(base)),
        _mm512_setr_epi64(first, first + 2, first + 4, first + 6, first + 8, first + 10,
                          first + 12, first + 14));
    const __m512i pa = _mm512_mul_epu32(ctr, ma);
    c0[h] = _mm512_xor_si512(_mm512_srli_epi64(ctr, 32), key16(k0));
    c2[h] = _mm512_xor_si512(_mm512_srli_epi64(pa, 32), key16(k1));
    c3[h] = pa;
  }
  // Round 2 (c1 = 0).
  const uint32_t k0_2 = k0 + kPhiloxKeyA, k1_2 = k1 + kPhiloxKeyB;
  if (static_cast<uint32_t>(base) <= 0xFFFFFFFFu - (16 * G - 1)) {  // c0 = hi ^ k0 everywhere
    const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * (hi ^ k0);
    for (int h = 0; h < H; ++h) {
      const __m512i pb = _mm512_mul_epu32(c2[h], mb);
      c0[h] = _mm512_xor_si512(_mm512_srli_epi64(pb, 32), key16(k0_2));
      c2[h] = _mm512_xor_si512(c3[h], key16(static_cast<uint32_t>(pa >> 32) ^ k1_2));
      c1[h] = pb;
      c3[h] = key16(static_cast<uint32_t>(pa));
    }
  } else {
    for (int h = 0; h < H; ++h) {
      const __m512i pb = _mm512_mul_epu32(c2[h], mb), pa = _mm512_mul_epu32(c0[h], ma);
      c0[h] = _mm512_xor_si512(_mm512_srli_epi64(pb, 32), key16(k0_2));
      c2[h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(pa, 32), c3[h], key16(k1_2), 0x96);
      c1[h] = pb;
      c3[h] = pa;
    }
  }
  // Rounds 3 to 10.
  for (uint32_t r = 2; r < kPhiloxRounds; ++r) {
    const __m512i key0 = key16(k0 + r * kPhiloxKeyA), key1 = key16(k1 + r * kPhiloxKeyB);
    for (int h = 0; h < H; ++h) {
      const __m512i pb = _mm512_mul_epu32(c2[h], mb), pa = _mm512_mul_epu32(c0[h], ma);
      c0[h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(pb, 32), c1[h], key0, 0x96);
      c2[h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(pa, 32), c3[h], key1, 0x96);
      c1[h] = pb;
      c3[h] = pa;
    }
  }
  const __m512 scale = _mm512_set1_ps(kUniformScale);
  auto uniform = [&](__m512i x) GRADOPS_AVX512_LAMBDA {  // as philox4's
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_xor_si512(x, _mm512_srai_epi32(x, 31))), scale);
  };
  for (int g = 0; g < G; ++g) {
    // Word w of counters 0..15, a 4 x 4 transpose within each 128-bit lane (lane l: counters
    // 4l .. 4l+3, each its words 0..3), then a 4 x 4 transpose of the lanes.
    auto words = [&](const __m512i* c) GRADOPS_AVX512_LAMBDA {
      return _mm512_mask_blend_epi32(0xAAAA, c[2 * g], _mm512_slli_epi64(c[2 * g + 1], 32));
    };
    const __m512i x0 = words(c0), x1 = words(c1), x2 = words(c2), x3 = words(c3);
    const __m512i t0 = _mm512_unpacklo_epi32(x0, x1), t1 = _mm512_unpackhi_epi32(x0, x1);
    const __m512i t2 = _mm512_unpacklo_epi32(x2, x3), t3 = _mm512_unpackhi_epi32(x2, x3);
    const __m512i a0 = _mm512_unpacklo_epi64(t0, t2);  // lane l: counter 4l, words 0..3
    const __m512i a1 = _mm512_unpackhi_epi64(t0, t2);  // 4l + 1
    const __m512i a2 = _mm512_unpacklo_epi64(t1, t3);  // 4l + 2
    const __m512i a3 = _mm512_unpackhi_epi64(t1, t3);  // 4l + 3
    const __m512i b0 = _mm512_shuffle_i32x4(a0, a1, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i b1 = _mm512_shuffle_i32x4(a0, a1, _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i b2 = _mm512_shuffle_i32x4(a2, a3, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i b3 = _mm512_shuffle_i32x4(a2, a3, _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * g + 0] = uniform(_mm512_shuffle_i32x4(b0, b2, _MM_SHUFFLE(2, 0, 2, 0)));
    u[4 * g + 1] = uniform(_mm512_shuffle_i32x4(b0, b2, _MM_SHUFFLE(3, 1, 3, 1)));
    u[4 * g + 2] = uniform(_mm512_shuffle_i32x4(b1, b3, _MM_SHUFFLE(2, 0, 2, 0)));
    u[4 * g + 3] = uniform(_mm512_shuffle_i32x4(b1, b3, _MM_SHUFFLE(3, 1, 3, 1)));
  }
}

struct Avx512 : Avx2 {
  template <DType OD>
  static constexpr uintptr_t stream_align() { return 16 * esize<OD>(); }

  // S[0, n) (+)= sum_i x_i, A[0, n) (+)= sum_i |x_i| (n a multiple of 16).
  template <DType D, int R, bool first>
  GRADOPS_AVX512 static void sums_rows(const char* p, int64_t rsb, int64_t n, float* S, float* A,
                                       const char* next, uint32_t lines, bool l2) {
    sweep512<64 / esize<D>(), 16>(
        n, lines,
        [&](int64_t k) GRADOPS_AVX512_LAMBDA {
          for (int i = 0; i < R; ++i) prefetch_line(next + i * rsb + k * esize<D>(), l2);
        },
        [&](int64_t k) GRADOPS_AVX512_LAMBDA {
          __m512 s = first ? _mm512_setzero_ps() : _mm512_load_ps(S + k);
          __m512 ab = first ? _mm512_setzero_ps() : _mm512_load_ps(A + k);
          for (int i = 0; i < R; ++i) {
            const __m512 x = load16<D>(p + i * rsb, k);
            s = _mm512_add_ps(s, x);
            ab = _mm512_add_ps(ab, _mm512_abs_ps(x));
          }
          _mm512_store_ps(S + k, s);
          _mm512_store_ps(A + k, ab);
        });
  }

  // sgn[0, n) (n a multiple of 16) as sign_scalar, uniforms from noise or Philox (128 columns at
  // a time; a last part of 16 to 112 columns takes 64 or 128 and uses what it needs).
  template <DType D>
  GRADOPS_AVX512 static void sign(const float* S, const float* A, float eps, const float* noise,
                                  uint64_t seed, uint64_t off0, int64_t n, float* sgn,
                                  const char* next, int64_t rsb, int64_t T, uint32_t lines,
                                  bool l2) {
    constexpr int64_t line = 64 / esize<D>();
    const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    const __m512 minus_one = _mm512_set1_ps(-1.0f), shrink = _mm512_set1_ps(1.0f / (1.0f + eps));
    auto sign16 = [&](int64_t k, __m512 u) GRADOPS_AVX512_LAMBDA {
      if (k % line == 0 && ((lines >> ((k / line) & 15)) & 1) != 0) {
        const char* r = next + k * esize<D>();
        for (int64_t t = 0; t < T; ++t, r += rsb) prefetch_line(r, l2);
      }
      const __m512 a = _mm512_load_ps(A + k);
      const __m512 q = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_UQ),
                                           _mm512_load_ps(S + k), a);  // 0 / 0 -> 0
      const __m512 p = _mm512_mul_ps(half, _mm512_add_ps(one, _mm512_mul_ps(q, shrink)));
      const __mmask16 gt = _mm512_cmp_ps_mask(p, u, _CMP_GT_OQ);
      const __mmask16 lt = _mm512_cmp_ps_mask(p, u, _CMP_LT_OQ);
      _mm512_store_ps(sgn + k, _mm512_mask_mov_ps(_mm512_maskz_mov_ps(lt, minus_one), gt, one));
    };
    int64_t k = 0;
    if (noise != nullptr) {
      for (; k < n; k += 16) sign16(k, _mm512_loadu_ps(noise + k));
      return;
    }
    for (; k + 128 <= n; k += 128) {  // off0 is a multiple of 4: counters (off0 + k) / 4 ..
      __m512 u[8];
      philox16<2>(seed, (off0 + k) >> 2, u);
      for (int v = 0; v < 8; ++v) sign16(k + 16 * v, u[v]);
    }
    for (; k < n; k += 64) {
      __m512 u[4];
      philox16<1>(seed, (off0 + k) >> 2, u);
      for (int v = 0; v < 4 && k + 16 * v < n; ++v) sign16(k + 16 * v, u[v]);
    }
  }

  // acc[0, n) (+)= the masked terms of R rows (as drop_scalar; n a multiple of 16): M as a mask
  // register, the term x where M is set and leak * x elsewhere (1 * x = x: M implies x is not
  // NaN). Mask rows as in Avx2::drop_rows.
  template <DType D, int R, bool first>
  GRADOPS_AVX512 static void drop_rows(const char* p, int64_t rsb, const float* leak, int64_t n,
                                       const float* sgn, float* acc, bool* mask, int64_t mstride,
                                       bool stream_mask, const char* next, uint32_t lines,
                                       bool l2) {
    __m512 lv[R];
    for (int i = 0; i < R; ++i) lv[i] = _mm512_set1_ps(leak[i]);
    const __m512 zero = _mm512_setzero_ps();
    const __m128i ones = _mm_set1_epi8(1);
    alignas(64) uint8_t mbuf[R][kGradDropBlock];
    sweep512<64 / esize<D>(), 16>(
        n, lines,
        [&](int64_t k) GRADOPS_AVX512_LAMBDA {
          for (int i = 0; i < R; ++i) prefetch_line(next + i * rsb + k * esize<D>(), l2);
        },
        [&](int64_t k) GRADOPS_AVX512_LAMBDA {
          __m512 s = first ? zero : _mm512_load_ps(acc + k);
          const __m512 sg = _mm512_load_ps(sgn + k);
          for (int i = 0; i < R; ++i) {
            const __m512 x = load16<D>(p + i * rsb, k);
            const __mmask16 m = _mm512_cmp_ps_mask(_mm512_mul_ps(sg, x), zero, _CMP_GT_OQ);
            s = _mm512_add_ps(s, _mm512_mask_mul_ps(x, static_cast<__mmask16>(~m), x, lv[i]));
            if (mask != nullptr) {
              void* dst = stream_mask ? static_cast<void*>(mbuf[i] + k) : mask + i * mstride + k;
              _mm_storeu_si128(static_cast<__m128i*>(dst), _mm_maskz_mov_epi8(m, ones));
            }
          }
          _mm512_store_ps(acc + k, s);
        });
    if (stream_mask) {
      for (int i = 0; i < R; ++i) {
        bool* dst = mask + i * mstride;
        int64_t k = 0;
        for (; k + 32 <= n; k += 32)
          _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + k),
                              _mm256_load_si256(reinterpret_cast<const __m256i*>(mbuf[i] + k)));
        std::memcpy(dst + k, mbuf[i] + k, static_cast<size_t>(n - k));
      }
    }
  }

  // out[c0 + k] = acc[k] converted, k in [0, n) (n a multiple of 16); acc 64-byte aligned.
  template <DType OD>
  GRADOPS_AVX512 static void store16s(const float* acc, int64_t n, void* out, int64_t c0,
                                      bool stream) {
    if (stream) {
      for (int64_t k = 0; k < n; k += 16) store16<OD, true>(out, c0 + k, _mm512_load_ps(acc + k));
    } else {
      for (int64_t k = 0; k < n; k += 16) store16<OD, false>(out, c0 + k, _mm512_load_ps(acc + k));
    }
  }

  // As Avx2::graddrop, 16 columns at a time; the last n % 16 columns as the portable variant.
  template <DType D, DType OD>
  GRADOPS_AVX512 static void graddrop(const char* p, int64_t rsb, const GradDropArgs& a,
                                      const GradDropPlan& pl, int64_t c0, int64_t n,
                                      bool stream_out, bool stream_mask) {
    alignas(64) float S[kGradDropBlock], A[kGradDropBlock], sgn[kGradDropBlock],
        acc[kGradDropBlock];
    const int64_t T = a.T, n16 = n & ~int64_t{15};
    bool* mask = a.mask != nullptr ? a.mask + c0 : nullptr;
    const char* next = p + pl.width * esize<D>();  // the next block
    for_row_groups<kGradDropRows512>(T, [&](int64_t t, auto R, auto first) {
      sums_rows<D, R, first>(p + t * rsb, rsb, n16, S, A, next + t * rsb, pl.sums, pl.l2);
    });
    sign<D>(S, A, a.eps, a.noise != nullptr ? a.noise + c0 : nullptr, a.seed,
            static_cast<uint64_t>(c0), n16, sgn, next, rsb, T, pl.sign, pl.l2);
    for_row_groups<kGradDropRows512>(T, [&](int64_t t, auto R, auto first) {
      drop_rows<D, R, first>(p + t * rsb, rsb, a.leak + t, n16, sgn, acc,
                             mask != nullptr ? mask + t * a.P : nullptr, a.P, stream_mask,
                             next + t * rsb, pl.drop, pl.l2);
    });
    store16s<OD>(acc, n16, a.out, c0, stream_out);
    if (n16 < n)
      Portable::graddrop<D, OD>(p + n16 * esize<D>(), rsb, a, pl, c0 + n16, n - n16, false, false);
  }
};

// ---------------------------------------------------------------------------------------------
// Drivers (shared by the variants). A thread's non-temporal stores are fenced before the end of
// the parallel region. Prefetches may run past the end of J; they never fault.

template <class Isa, DType D, DType OD>
struct Combine {
  static void run(const CombineArgs& a);
};

template <class Isa, DType D, DType OD>
void Combine<Isa, D, OD>::run(const CombineArgs& a) {
  const int64_t P = a.P, T = a.T, L = a.L;
  const int64_t rsb = a.row_stride * esize<D>();
  const char* J = static_cast<const char*>(a.J);
  const int64_t* off = a.offsets;
  const int64_t nb = (P + kCombineBlock - 1) / kCombineBlock;
  const bool stream =
      use_stream((T * esize<D>() + esize<OD>()) * P, a.out, Isa::template stream_align<OD>());
#pragma omp parallel if (nb > 1)
  {
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < nb; ++b) {
      alignas(32) float acc[kCombineBlock];
      const int64_t c0 = b * kCombineBlock, c1 = std::min(P, c0 + kCombineBlock);
      if (off == nullptr) {
        Isa::template accumulate<D>(J + c0 * esize<D>(), rsb, T, a.weights, c1 - c0, acc);
      } else {
        // The segment holding column c0, then the following ones up to c1 (an empty segment
        // holds no column, so upper_bound passes over it).
        int64_t l = std::upper_bound(off, off + L + 1, c0) - off - 1;
        for (; l < L && off[l] < c1; ++l) {
          const int64_t s0 = std::max(off[l], c0), s1 = std::min(off[l + 1], c1);
          if (s0 < s1)
            Isa::template accumulate<D>(J + s0 * esize<D>(), rsb, T, a.weights + l * T, s1 - s0,
                                        acc + (s0 - c0));
        }
      }
      Isa::template store<OD>(acc, c1 - c0, a.out, c0, stream);
    }
    if (stream) _mm_sfence();
  }
}

template <class Isa, DType D, DType OD>
struct GradDrop {
  static void run(const GradDropArgs& a);
};

template <class Isa, DType D, DType OD>
void GradDrop<Isa, D, OD>::run(const GradDropArgs& a) {
  const int64_t P = a.P, T = a.T;
  const int64_t rsb = a.row_stride * esize<D>();
  const char* J = static_cast<const char*>(a.J);
  const GradDropPlan pl = graddrop_plan(T, esize<D>(), a.noise != nullptr);
  const int64_t nb = (P + pl.width - 1) / pl.width;
  const int64_t bytes = (T * esize<D>() + esize<OD>() + (a.mask != nullptr ? T : 0)) * P;
  const bool stream_out = use_stream(bytes, a.out, Isa::template stream_align<OD>());
  const bool stream_mask = a.mask != nullptr && P % 32 == 0 && use_stream(bytes, a.mask, 32);
#pragma omp parallel if (nb > 1)
  {
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t c0 = b * pl.width, n = std::min(P - c0, pl.width);
      Isa::template graddrop<D, OD>(J + c0 * esize<D>(), rsb, a, pl, c0, n, stream_out,
                                    stream_mask);
    }
    if (stream_out || stream_mask) _mm_sfence();
  }
}

using IsaLevel = simd::CpuIsa;

// Kernel<Isa, J dtype, out dtype>::run(a), Isa by the CPU's features.
template <template <class, DType, DType> class Kernel, class Isa, DType D, class Args>
void run_out(const Args& a) {
  switch (a.out_dtype) {
    case DType::BF16: Kernel<Isa, D, DType::BF16>::run(a); break;
    case DType::F16: Kernel<Isa, D, DType::F16>::run(a); break;
    default: Kernel<Isa, D, DType::F32>::run(a); break;
  }
}

template <template <class, DType, DType> class Kernel, class Isa, class Args>
void run_in(const Args& a) {
  switch (a.dtype) {
    case DType::BF16: run_out<Kernel, Isa, DType::BF16>(a); break;
    case DType::F16: run_out<Kernel, Isa, DType::F16>(a); break;
    default: run_out<Kernel, Isa, DType::F32>(a); break;
  }
}

template <template <class, DType, DType> class Kernel, class Args>
void run(const Args& a) {
  switch (simd::cpu_isa()) {
    case IsaLevel::Avx512: run_in<Kernel, Avx512>(a); break;
    case IsaLevel::Avx2: run_in<Kernel, Avx2>(a); break;
    default: run_in<Kernel, Portable>(a); break;
  }
}

}  // namespace

void combine_cpu(const CombineArgs& a) {
  if (a.P > 0) run<Combine>(a);
}

void graddrop_cpu(const GradDropArgs& a) {
  if (a.P > 0) run<GradDrop>(a);
}

float philox_uniform(uint64_t seed, uint64_t column) { return philox_scalar(seed, column); }

}  // namespace gradops
