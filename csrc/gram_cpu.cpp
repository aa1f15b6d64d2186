// gradops CPU kernel: per-segment Gram matrices and sign-conflict counts in one pass over J
// (docs/methods.md#gram: Gram G^(l) = J_l J_l^T and the sign-conflict ratio opposite / both_nonzero).
// Interface and math: gram_kernels.h.
//
// Decomposition (fixed, so results are bit-identical for any OpenMP thread count):
//  - Columns are cut into pieces of `piece_cols(T)` columns at multiples of that size (a function
//    of T only). A piece meets a run of segments; each (piece, segment) intersection is a *part*.
//  - A part is reduced in tiles of kTileCols columns starting at the part's first column. Inside
//    a tile the dot products run in fp32 (vector accumulators of 8 lanes, 16 in the AVX-512
//    variant, lanes summed in a fixed order); each tile's sums are added to the part's fp64
//    accumulators.
//  - A segment that lies inside one piece is written straight from its part accumulators. A
//    segment crossing piece boundaries leaves one partial per piece in a "slot"; after the
//    parallel loop its slots are summed in piece order (fp64), then rounded to fp32.
//  - Threads take whole pieces (schedule(dynamic)); nothing depends on which thread runs which.
//
// Sign counts (optional, same pass): per tile, each row gets two bitmaps, bit k set when
// J[i,k] > 0 (resp. < 0). -0.0, +0.0 and NaN set neither bit, so they count in neither table
// (NaN is neither zero nor of a sign); +-Inf count with their sign. Then
//   both_nonzero += popcount((pos_i | neg_i) & (pos_j | neg_j)),
//   opposite     += popcount((pos_i & neg_j) | (neg_i & pos_j)).
// NaN and Inf always propagate into the Gram entries of the rows that hold them.
//
// Instruction sets, chosen at run time with __builtin_cpu_supports (function-level target
// attributes, so the file builds for any x86-64): an AVX-512 (F, BW, VL) variant, an AVX2+FMA+F16C
// variant and a portable variant (GCC vector extensions). GRADOPS_CPU_ISA=avx2 or portable selects
// a lesser one than the CPU allows (tests). The variants round differently (lane count, register
// blocks) but each is deterministic; the AVX-512 one sums 32 columns per lane per tile, the AVX2
// and portable ones 64. All convert each tile to fp32 into a small per-thread buffer (bf16:
// `bits << 16`; fp16: F16C, or an exact software conversion with subnormals, Inf and NaN), whose
// rows are an odd number of cache lines apart so they never collide in L1 however J's rows are
// strided. The vector variants fill the buffer during their first pass of register blocks over the
// tile, which reads J directly, so J is read once, inside the FMA loops; its rows are
// software-prefetched into L2 a few blocks ahead (see block_schedule and Prefetch4).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "gram_kernels.h"
#include "cpu_simd.h"

#define GRADOPS_AVX2 __attribute__((target("avx2,fma,f16c")))
#define GRADOPS_INLINE inline __attribute__((always_inline))

namespace gradops {
namespace {

// ---------------------------------------------------------------------------------------------
// Fixed decomposition sizes.

// Tile width: the fp32 accumulation length (64 columns per vector lane, 32 in the AVX-512
// variant), a multiple of 64 (one bitmap word). T = 8 tile rows take 16 KiB (L1), T = 64 rows
// 128 KiB (L2). (1024 in the AVX-512 variant, 64 columns per lane, measured no faster at T = 40
// and 64 on Zen 4 and slower at T = 8 and 16, where a tile row is then a whole 4 KiB page.)
constexpr int64_t kTileCols = 512;

// Prefetch distance of the J reads, in Gram blocks (see block_schedule): AVX2 and AVX-512
// variants.
constexpr int64_t kPrefetchBlocksAvx2 = 2;
constexpr int64_t kPrefetchBlocksAvx512 = 2;

// Piece width: at least 2^17 elements of J per piece (the per-piece bookkeeping is negligible),
// at least 256*T columns (a piece's partial slots, O(T^2), stay a few % of the piece's data), a
// multiple of kTileCols.
int64_t piece_cols(int64_t T) {
  const int64_t c = std::max((int64_t{1} << 17) / T, 256 * T);
  return (c + kTileCols - 1) / kTileCols * kTileCols;
}

// The Gram blocks of a tile, f(kind, i0, j0): for each group of 4 rows i0 = 0, 4, ...: the
// triangle (kind 0), then the w = T - i0 - 4 rows j >= i0 + 4 in 4x3 blocks (kind 3) and at most
// two 4x2 blocks (kind 2): w % 3 == 2 -> one 4x2; w % 3 == 1 -> two 4x2 instead of the last 4x3
// (one 4x2 with a zero row when w == 1: then T % 4 == 1, so row T < Tp exists). The blocks of
// group 0 touch every row, in order: they are the first pass.
template <class F>
GRADOPS_INLINE void for_each_block(int64_t T, F f) {
  for (int64_t i0 = 0; i0 < T; i0 += 4) {
    f(0, i0, i0);
    const int64_t w = std::max<int64_t>(0, T - i0 - 4);
    int64_t n3 = w / 3, n2 = (w % 3 + 1) / 2;
    if (w % 3 == 1 && n3 > 0) {
      n3 -= 1;
      n2 = 2;
    }
    int64_t j0 = i0 + 4;
    for (int64_t b = 0; b < n3; ++b, j0 += 3) f(3, i0, j0);
    for (int64_t b = 0; b < n2; ++b, j0 += 2) f(2, i0, j0);
  }
}

struct Block {
  int kind;  // 0: triangle of rows i0.. (up to 4); k > 0: 4 x k block at (i0, j0)
  int64_t i0, j0;
  // J rows this block prefetches alongside its own columns: row pf_row[m] of the tile pf_tile[m]
  // tiles ahead, m < pf_count.
  int pf_count = 0;
  int64_t pf_row[4] = {}, pf_tile[4] = {};
};

// The Gram blocks of a tile in the AVX2 variant: for_each_block in its order.
std::vector<Block> blocks_avx2(int64_t T) {
  std::vector<Block> out;
  for_each_block(T, [&](int kind, int64_t i0, int64_t j0) { out.push_back(Block{kind, i0, j0}); });
  return out;
}

// The Gram blocks of a tile in the AVX-512 variant (32 vector registers): for each group of 4
// rows i0 = 0, 4, ...: the triangle, then the w = T - i0 - 4 rows j >= i0 + 4 in ceil(w / 6)
// blocks of 4 x k, k <= 6, as even as possible (wider ones first). Group 0 is the first pass.
std::vector<Block> blocks_avx512(int64_t T) {
  std::vector<Block> out;
  for (int64_t i0 = 0; i0 < T; i0 += 4) {
    out.push_back(Block{0, i0, i0});
    const int64_t w = std::max<int64_t>(0, T - i0 - 4);
    const int64_t nb = (w + 5) / 6;
    int64_t j0 = i0 + 4;
    for (int64_t b = 0; b < nb; ++b) {
      const int k = static_cast<int>(w / nb + (b < w % nb ? 1 : 0));
      out.push_back(Block{k, i0, j0});
      j0 += k;
    }
  }
  return out;
}

// The order of the Gram blocks of a tile (AVX2 and AVX-512 variants). The first-pass blocks (group 0, which
// read J) come in row order; the other blocks are spread between them, in proportion to their
// FMA work, as soon as the rows they use have been read: J is then read at a steady pace through
// the tile instead of all at its start. Every pair belongs to one block, so the order changes no
// result. Each J row read by a first-pass block is prefetched by one of the blocks at least
// kPrefetchBlocks places before it (in the sequence of tiles), the latest one with a free slot:
// early enough to hide the memory latency, late enough that the lines are still cached when read
// even when all rows of J alias in the cache sets, and spread over the blocks (as few rows per
// block as T allows) so that J streams at an even rate.
std::vector<Block> block_schedule(int64_t T, const std::vector<Block>& blocks,
                                  int64_t prefetch_blocks) {
  std::vector<Block> first, rest, out;
  for (const Block& b : blocks) (b.i0 == 0 ? first : rest).push_back(b);
  auto work = [T](const Block& b) {
    const int64_t r = std::min<int64_t>(4, T - b.i0);
    return b.kind == 0 ? r * (r + 1) / 2 : 4 * b.kind;  // pairs
  };
  auto last_row = [T](const Block& b) {
    return std::min(T - 1, b.kind == 0 ? b.i0 + 3 : b.j0 + b.kind - 1);
  };
  int64_t rest_work = 0;
  for (const Block& b : rest) rest_work += work(b);
  // After each first-pass block, the other blocks get rest_work / first.size() more work to do
  // (scaled by first.size() to stay in integers).
  const int64_t nfirst = static_cast<int64_t>(first.size());
  std::vector<bool> done(rest.size(), false);
  size_t lo = 0;  // rest[0, lo) are all done
  int64_t budget = 0, loaded = 0;
  for (const Block& f : first) {
    out.push_back(f);
    loaded = last_row(f) + 1;
    budget += rest_work;
    for (size_t i = lo; i < rest.size() && budget > 0; ++i) {
      if (done[i] || last_row(rest[i]) >= loaded) continue;
      done[i] = true;
      budget -= work(rest[i]) * nfirst;
      out.push_back(rest[i]);
    }
    while (lo < rest.size() && done[lo]) ++lo;
  }
  for (size_t i = lo; i < rest.size(); ++i)
    if (!done[i]) out.push_back(rest[i]);
  const int64_t len = static_cast<int64_t>(out.size());
  const int cap = static_cast<int>(std::min<int64_t>(4, (T + len - 1) / len));  // rows per block
  for (int64_t q = 0; q < len; ++q) {
    const Block t = out[q];
    if (t.i0 != 0) continue;
    const int64_t r_end = std::min(T, t.kind == 0 ? int64_t{4} : t.j0 + t.kind);
    int64_t back = prefetch_blocks;  // distance of the prefetching block
    for (int64_t r = t.j0; r < r_end; ++r) {
      while (out[((q - back) % len + len) % len].pf_count == cap) ++back;
      Block& pb = out[((q - back) % len + len) % len];
      pb.pf_row[pb.pf_count] = r;
      // Tiles from the prefetching block's tile to this one: ceil((back - q) / len) if back > q.
      pb.pf_tile[pb.pf_count] = back > q ? (back - q + len - 1) / len : 0;
      ++pb.pf_count;
    }
  }
  return out;
}

struct Plan {
  int64_t T;
  int64_t Tp;   // T rounded up to a multiple of 4: rows of the tile buffer, stride of accumulators
  int64_t ldb;  // row stride of the tile buffer: kTileCols + 16 floats (33 cache lines)
  bool counts;
  std::vector<Block> blocks;  // block_schedule(T)
};

constexpr int64_t kWords = kTileCols / 64;  // bitmap words per tile row

// Per-thread scratch. Accumulators are [Tp, Tp] row-major; only i <= j < T entries are meaningful.
struct Scratch {
  explicit Scratch(const Plan& p)
      : acc(p.Tp * p.Tp),
        opp(p.counts ? p.Tp * p.Tp : 0),
        both(p.counts ? p.Tp * p.Tp : 0),
        pos(p.counts ? p.Tp * kWords : 0),
        neg(p.counts ? p.Tp * kWords : 0),
        buf_store(p.Tp * p.ldb + 16) {  // rows T..Tp-1 stay zero
    // 64-byte aligned view of buf_store (16 spare floats).
    const uintptr_t u = reinterpret_cast<uintptr_t>(buf_store.data());
    buf = buf_store.data() + ((64 - u % 64) % 64) / sizeof(float);
  }
  void clear() {
    std::fill(acc.begin(), acc.end(), 0.0);
    std::fill(opp.begin(), opp.end(), 0);
    std::fill(both.begin(), both.end(), 0);
  }
  std::vector<double> acc;
  std::vector<int64_t> opp, both;
  std::vector<uint64_t> pos, neg;  // sign bitmaps of the current tile ([kWords, Tp] or [T, kWords])
  std::vector<float> buf_store;
  float* buf;  // [Tp, ldb] fp32 copy of the current tile
};

// Exact IEEE binary16 -> binary32 (subnormals, Inf, NaN payloads).
GRADOPS_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // Inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else {
    const float mag = static_cast<float>(man) * 0x1p-24f;  // zero / subnormal, exact
    std::memcpy(&bits, &mag, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

GRADOPS_INLINE float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

constexpr int64_t elem_size(DType d) { return d == DType::F32 ? 4 : 2; }

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C variant.
//
// Gram of a tile: register blocks over row groups of 4 (see block_schedule); no pair is computed
// twice and rows T..Tp-1 of the tile buffer are zero. All accumulators hold 8 lanes; lane sums
// are reduced in a fixed order, ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)), then added to the fp64
// accumulators.

// Lanes [0, r) set.
GRADOPS_AVX2 inline __m256i lane_mask(int64_t r) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(r)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

using simd::load8;  // elements [k, k+8) of a J row as fp32 (cpu_simd.h)

// As load8, but only the first r (< 8) elements; zeros after.
template <DType D>
GRADOPS_AVX2 inline __m256 load8_tail(const char* row, int64_t k, int64_t r) {
  if constexpr (D == DType::F32) {
    return _mm256_maskload_ps(reinterpret_cast<const float*>(row) + k, lane_mask(r));
  } else {
    uint16_t tmp[8] = {};
    std::memcpy(tmp, row + 2 * k, static_cast<size_t>(r) * 2);
    return load8<D>(reinterpret_cast<const char*>(tmp), 0);
  }
}

// Where a register block gets a row of the tile. Buf: the fp32 tile buffer. FromJ<D>: J itself
// (the first pass over a tile): converts to fp32 and stores into the tile buffer. get(k) loads
// columns [k, k+8); tail(k, r) the last r (< 8) columns of the tile, zero-padded.
struct Buf {
  const float* p;
  GRADOPS_AVX2 __m256 get(int64_t k) const { return _mm256_load_ps(p + k); }
  GRADOPS_AVX2 __m256 tail(int64_t k, int64_t) const { return get(k); }
};
template <DType D>
struct FromJ {
  const char* src;  // J row at the tile's first column (or a zero row of the tile buffer)
  float* dst;       // tile buffer row
  GRADOPS_AVX2 __m256 get(int64_t k) const {
    const __m256 v = load8<D>(src, k);
    _mm256_store_ps(dst + k, v);
    return v;
  }
  GRADOPS_AVX2 __m256 tail(int64_t k, int64_t r) const {
    const __m256 v = load8_tail<D>(src, k, r);
    _mm256_store_ps(dst + k, v);
    return v;
  }
};

// The J rows a block prefetches (addresses of their first column, row[m] for m < count): at step
// k, the cache line of each row holding column k, once per line, into L2 (prefetcht1: into L1,
// the prefetches of a first pass over J take the L1 miss buffers long enough to stall the demand
// loads). Integer addresses: a prefetched row may lie beyond the end of J (a prefetch never
// faults).
struct Prefetch4 {
  uintptr_t row[4];
  int64_t esize;
  int count;
  GRADOPS_INLINE void at(int64_t k) const {
    if (count == 0 || (k * esize) % 64 != 0) return;
    const uintptr_t off = static_cast<uintptr_t>(k * esize);
    for (int m = 0; m < 4; ++m)
      if (m < count) __builtin_prefetch(reinterpret_cast<const void*>(row[m] + off), 0, 2);
  }
};

// [sum a, sum b, sum c, sum d] as doubles.
GRADOPS_AVX2 inline __m256d reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm256_cvtps_pd(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

GRADOPS_AVX2 inline void add2(double* p, __m128d v) {
  _mm_storeu_pd(p, _mm_add_pd(_mm_loadu_pd(p), v));
}
GRADOPS_AVX2 inline void add4(double* p, __m256d v) {
  _mm256_storeu_pd(p, _mm256_add_pd(_mm256_loadu_pd(p), v));
}

// Keeps a loaded vector in a register: GCC would otherwise re-load it inside each FMA.
#define GRADOPS_IN_REG(v) __asm__("" : "+x"(v))

// Pairs (i, j), i0 <= i <= j < i0+R (R <= 4), over the n columns of the tile:
// acc[i][j] += x[i] . x[j], with rows x[i0+m] from src[m]; R(R+1)/2 accumulators.
template <int R, class Src>
GRADOPS_AVX2 void gram_tri_avx2(const Src src[4], const Prefetch4& prefetch, int64_t n,
                                int64_t i0, double* acc, int64_t ld_acc) {
  // Local copies: the stores of FromJ (through may_alias vector types) would otherwise force a
  // reload of the row pointers at every step.
  const Src r0 = src[0], r1 = src[1], r2 = src[2], r3 = src[3];
  const Prefetch4 pf = prefetch;
  __m256 s00 = _mm256_setzero_ps(), s01 = s00, s02 = s00, s03 = s00, s11 = s00, s12 = s00,
         s13 = s00, s22 = s00, s23 = s00, s33 = s00;
  auto step = [&](__m256 x0, __m256 x1, __m256 x2, __m256 x3)
                  GRADOPS_AVX2 __attribute__((always_inline)) {
    GRADOPS_IN_REG(x0);
    s00 = _mm256_fmadd_ps(x0, x0, s00);
    if constexpr (R > 1) {
      GRADOPS_IN_REG(x1);
      s01 = _mm256_fmadd_ps(x0, x1, s01);
      s11 = _mm256_fmadd_ps(x1, x1, s11);
    }
    if constexpr (R > 2) {
      GRADOPS_IN_REG(x2);
      s02 = _mm256_fmadd_ps(x0, x2, s02);
      s12 = _mm256_fmadd_ps(x1, x2, s12);
      s22 = _mm256_fmadd_ps(x2, x2, s22);
    }
    if constexpr (R > 3) {
      GRADOPS_IN_REG(x3);
      s03 = _mm256_fmadd_ps(x0, x3, s03);
      s13 = _mm256_fmadd_ps(x1, x3, s13);
      s23 = _mm256_fmadd_ps(x2, x3, s23);
      s33 = _mm256_fmadd_ps(x3, x3, s33);
    }
  };
  const __m256 z = _mm256_setzero_ps();
  const int64_t n8 = n / 8 * 8;
  for (int64_t k = 0; k < n8; k += 8) {
    pf.at(k);
    step(r0.get(k), R > 1 ? r1.get(k) : z, R > 2 ? r2.get(k) : z, R > 3 ? r3.get(k) : z);
  }
  if (n8 < n) {
    const int64_t r = n - n8;
    step(r0.tail(n8, r), R > 1 ? r1.tail(n8, r) : z, R > 2 ? r2.tail(n8, r) : z,
         R > 3 ? r3.tail(n8, r) : z);
  }
  // Row i0+m gets columns i0+m .. i0+R-1 (the accumulators beyond R are zero and unused).
  const __m256d d0 = reduce4(s00, s01, s02, s03), d1 = reduce4(s11, s12, s13, z),
                d2 = reduce4(s22, s23, s33, z);
  alignas(32) double v[3][4];
  _mm256_store_pd(v[0], d0);
  _mm256_store_pd(v[1], d1);
  _mm256_store_pd(v[2], d2);
  double* a = acc + i0 * ld_acc + i0;
  for (int q = 0; q < R; ++q) a[q] += v[0][q];
  for (int q = 1; q < R; ++q) a[ld_acc + q] += v[1][q - 1];
  for (int q = 2; q < R; ++q) a[2 * ld_acc + q] += v[2][q - 2];
  if constexpr (R > 3) a[3 * ld_acc + 3] += v[2][2];
}

template <class Src>
GRADOPS_AVX2 void gram_tri_any(int64_t R, const Src src[4], const Prefetch4& pf, int64_t n,
                               int64_t i0, double* acc, int64_t ld_acc) {
  switch (R) {  // R < 4 only for the last rows
    case 1: return gram_tri_avx2<1>(src, pf, n, i0, acc, ld_acc);
    case 2: return gram_tri_avx2<2>(src, pf, n, i0, acc, ld_acc);
    case 3: return gram_tri_avx2<3>(src, pf, n, i0, acc, ld_acc);
    default: return gram_tri_avx2<4>(src, pf, n, i0, acc, ld_acc);
  }
}

// Pairs (i, j), i in [i0, i0+4) (rows from the tile buffer x), j in [j0, j0+NJ) (rows from
// y[q]). NJ = 3: 12 accumulators, so the FMA latency is hidden; NJ = 2: the remainder blocks.
template <int NJ, class Src>
GRADOPS_AVX2 void gram_4xn_avx2(const float* x, int64_t ldb, const Src y[NJ],
                                const Prefetch4& prefetch, int64_t n, int64_t i0, int64_t j0,
                                double* acc, int64_t ld_acc) {
  Src yr[NJ];  // local copies (see gram_tri_avx2)
  for (int q = 0; q < NJ; ++q) yr[q] = y[q];
  const Prefetch4 pf = prefetch;
  __m256 s[4][NJ];
  for (int m = 0; m < 4; ++m)
    for (int q = 0; q < NJ; ++q) s[m][q] = _mm256_setzero_ps();
  auto step = [&](const __m256 (&yv)[NJ], int64_t k)
                  GRADOPS_AVX2 __attribute__((always_inline)) {
    for (int m = 0; m < 4; ++m) {
      __m256 xv = _mm256_load_ps(x + m * ldb + k);
      GRADOPS_IN_REG(xv);
      for (int q = 0; q < NJ; ++q) s[m][q] = _mm256_fmadd_ps(xv, yv[q], s[m][q]);
    }
  };
  const int64_t n8 = n / 8 * 8;
  for (int64_t k = 0; k < n8; k += 8) {
    pf.at(k);
    __m256 yv[NJ];
    for (int q = 0; q < NJ; ++q) yv[q] = yr[q].get(k);
    step(yv, k);
  }
  if (n8 < n) {
    __m256 yv[NJ];
    for (int q = 0; q < NJ; ++q) yv[q] = yr[q].tail(n8, n - n8);
    step(yv, n8);
  }
  double* r = acc + i0 * ld_acc + j0;
  for (int m = 0; m < 4; m += 2) {  // columns j0, j0+1 of rows i0+m, i0+m+1
    const __m256d c = reduce4(s[m][0], s[m][1], s[m + 1][0], s[m + 1][1]);
    add2(r + m * ld_acc, _mm256_castpd256_pd128(c));
    add2(r + (m + 1) * ld_acc, _mm256_extractf128_pd(c, 1));
  }
  if constexpr (NJ == 3) {  // column j0+2
    alignas(32) double c2[4];
    _mm256_store_pd(c2, reduce4(s[0][2], s[1][2], s[2][2], s[3][2]));
    for (int m = 0; m < 4; ++m) r[m * ld_acc + 2] += c2[m];
  }
}

// 64 compare masks (8 vectors of 32-bit all-ones / zero lanes) -> 64 bits, in the (fixed) lane
// order of the saturating packs.
GRADOPS_AVX2 inline uint64_t bits64(const __m256i m[8]) {
  const __m256i lo =
      _mm256_packs_epi16(_mm256_packs_epi32(m[0], m[1]), _mm256_packs_epi32(m[2], m[3]));
  const __m256i hi =
      _mm256_packs_epi16(_mm256_packs_epi32(m[4], m[5]), _mm256_packs_epi32(m[6], m[7]));
  return static_cast<uint32_t>(_mm256_movemask_epi8(lo)) |
         static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_epi8(hi))) << 32;
}

// Per-byte popcount (nibble lookup).
GRADOPS_AVX2 inline __m256i popcount8(__m256i v) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,  //
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(v, low4)),
                         _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4)));
}

struct Avx2 {
  // Gram of the n (<= kTileCols) columns of J starting at column t0, added to acc; fills buf
  // with the tile (fp32, zero-padded to a multiple of 64 columns) on the way.
  template <DType D>
  GRADOPS_AVX2 static void gram(const SegGramArgs& a, int64_t t0, int64_t n, const Plan& p,
                                float* buf, double* acc) {
    const int64_t T = p.T, ldb = p.ldb, esize = elem_size(D);
    // Zero padding of rows < T (rows >= T are zero); the first pass writes columns < ceil8(n).
    const int64_t n8 = (n + 7) / 8 * 8, n64 = (n + 63) / 64 * 64;
    for (int64_t i = 0; i < T; ++i) std::fill(buf + i * ldb + n8, buf + i * ldb + n64, 0.0f);
    const char* J = static_cast<const char*>(a.J);
    auto from_j = [&](int64_t r) {  // row r of the first pass (a zero row of buf when r >= T)
      float* d = buf + r * ldb;
      return FromJ<D>{r < T ? J + (r * a.row_stride + t0) * esize : reinterpret_cast<char*>(d), d};
    };
    auto from_buf = [&](int64_t r) { return Buf{buf + r * ldb}; };
    for (const Block& b : p.blocks) {
      const int64_t i0 = b.i0, j0 = b.j0;
      Prefetch4 pf{{}, esize, b.pf_count};
      for (int m = 0; m < b.pf_count; ++m)
        pf.row[m] = reinterpret_cast<uintptr_t>(J) +
                    static_cast<uintptr_t>(
                        (b.pf_row[m] * a.row_stride + t0 + b.pf_tile[m] * kTileCols) * esize);
      if (b.kind == 0) {
        const int64_t rows = std::min<int64_t>(4, T - i0);
        if (i0 == 0) {
          const FromJ<D> src[4] = {from_j(0), from_j(1), from_j(2), from_j(3)};
          gram_tri_any(rows, src, pf, n, i0, acc, p.Tp);
        } else {
          const Buf src[4] = {from_buf(i0), from_buf(i0 + 1), from_buf(i0 + 2), from_buf(i0 + 3)};
          gram_tri_any(rows, src, pf, n, i0, acc, p.Tp);
        }
      } else if (b.kind == 3) {
        if (i0 == 0) {
          const FromJ<D> y[3] = {from_j(j0), from_j(j0 + 1), from_j(j0 + 2)};
          gram_4xn_avx2<3>(buf + i0 * ldb, ldb, y, pf, n, i0, j0, acc, p.Tp);
        } else {
          const Buf y[3] = {from_buf(j0), from_buf(j0 + 1), from_buf(j0 + 2)};
          gram_4xn_avx2<3>(buf + i0 * ldb, ldb, y, pf, n, i0, j0, acc, p.Tp);
        }
      } else {
        if (i0 == 0) {
          const FromJ<D> y[2] = {from_j(j0), from_j(j0 + 1)};
          gram_4xn_avx2<2>(buf + i0 * ldb, ldb, y, pf, n, i0, j0, acc, p.Tp);
        } else {
          const Buf y[2] = {from_buf(j0), from_buf(j0 + 1)};
          gram_4xn_avx2<2>(buf + i0 * ldb, ldb, y, pf, n, i0, j0, acc, p.Tp);
        }
      }
    }
  }

  // Sign bitmaps of the tile, transposed: pos[w * Tp + i] bit b set when column 64w + (a fixed
  // permutation of b) of row i is > 0; neg likewise for < 0 (the permutation, from the pack
  // instructions, is the same for every row, so pair counts are unaffected). Then, for each row i
  // and 4 rows j at a time, popcounts of (pos_i & neg_j) | (neg_i & pos_j) and of
  // (pos_i | neg_i) & (pos_j | neg_j) via a nibble lookup, in byte counters (at most 8 per word,
  // kWords = 8 words per tile: no overflow), summed per 64-bit lane (one lane per j) at the end.
  GRADOPS_AVX2 static void counts(const float* buf, int64_t n, const Plan& p, Scratch& s) {
    const int64_t T = p.T, Tp = p.Tp, words = (n + 63) / 64;
    uint64_t* pos = s.pos.data();
    uint64_t* neg = s.neg.data();
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t i = 0; i < T; ++i)
      for (int64_t w = 0; w < words; ++w) {
        const float* r = buf + i * p.ldb + 64 * w;
        __m256i gt[8], lt[8];
        for (int v = 0; v < 8; ++v) {
          const __m256 x = _mm256_load_ps(r + 8 * v);
          gt[v] = _mm256_castps_si256(_mm256_cmp_ps(x, zero, _CMP_GT_OQ));
          lt[v] = _mm256_castps_si256(_mm256_cmp_ps(x, zero, _CMP_LT_OQ));
        }
        pos[w * Tp + i] = bits64(gt);
        neg[w * Tp + i] = bits64(lt);
      }
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j0 = i / 4 * 4; j0 < T; j0 += 4) {
        __m256i co = _mm256_setzero_si256(), cb = _mm256_setzero_si256();
        for (int64_t w = 0; w < words; ++w) {
          const __m256i pi = _mm256_set1_epi64x(static_cast<long long>(pos[w * Tp + i]));
          const __m256i ni = _mm256_set1_epi64x(static_cast<long long>(neg[w * Tp + i]));
          const __m256i pj =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos + w * Tp + j0));
          const __m256i nj =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(neg + w * Tp + j0));
          const __m256i opp = _mm256_or_si256(_mm256_and_si256(pi, nj), _mm256_and_si256(ni, pj));
          const __m256i both = _mm256_and_si256(_mm256_or_si256(pi, ni), _mm256_or_si256(pj, nj));
          co = _mm256_add_epi8(co, popcount8(opp));
          cb = _mm256_add_epi8(cb, popcount8(both));
        }
        __m256i* o = reinterpret_cast<__m256i*>(s.opp.data() + i * Tp + j0);
        __m256i* b = reinterpret_cast<__m256i*>(s.both.data() + i * Tp + j0);
        const __m256i z = _mm256_setzero_si256();
        _mm256_storeu_si256(o, _mm256_add_epi64(_mm256_loadu_si256(o), _mm256_sad_epu8(co, z)));
        _mm256_storeu_si256(b, _mm256_add_epi64(_mm256_loadu_si256(b), _mm256_sad_epu8(cb, z)));
      }
  }
};

// ---------------------------------------------------------------------------------------------
// AVX-512 variant (AVX-512 F, BW, VL; the ymm helpers it shares with the AVX2 variant need
// avx2,fma,f16c).
//
// As the AVX2 variant, with 16-lane accumulators and wider register blocks (blocks_avx512: 4 x k,
// k <= 6, so 24 accumulators + 4 rows + 1 row in the 32 registers), tails by masked loads (no
// separate tail step). Lane sums are reduced in a fixed order: l_m + l_{m+8} (m < 8), then the
// AVX2 order over those 8. On Zen 4 a 512-bit FMA has the throughput of two 256-bit ones: the gain
// is fewer instructions, loads and reductions per FMA.

#define GRADOPS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

// Elements [k, k+16) of a J row as fp32, those not in `mask` zero (and not read).
template <DType D>
GRADOPS_AVX512 inline __m512 load16(const char* row, int64_t k, __mmask16 mask) {
  if constexpr (D == DType::F32) {
    return _mm512_maskz_loadu_ps(mask, reinterpret_cast<const float*>(row) + k);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, row + 2 * k);
    // (maskz forms: the plain ones have an undefined source, see fold16)
    if constexpr (D == DType::F16) return _mm512_maskz_cvtph_ps(0xffff, h);
    return _mm512_castsi512_ps(
        _mm512_maskz_slli_epi32(0xffff, _mm512_maskz_cvtepu16_epi32(0xffff, h), 16));
  }
}

// Row sources of the AVX-512 blocks (see Buf / FromJ). get(k, mask): columns [k, k+16) of the
// tile, those not in mask (past the tile's end) zero. The tile buffer is zero there already.
struct BufZ {
  const float* p;
  GRADOPS_AVX512 __m512 get(int64_t k, __mmask16) const { return _mm512_load_ps(p + k); }
};
template <DType D>
struct FromJZ {
  const char* src;
  float* dst;
  GRADOPS_AVX512 __m512 get(int64_t k, __mmask16 mask) const {
    const __m512 v = load16<D>(src, k, mask);
    _mm512_store_ps(dst + k, v);
    return v;
  }
};

// 16 lanes -> 8: l_m + l_{m+8}.
GRADOPS_AVX512 inline __m256 fold16(__m512 v) {
  // (masked extracts: with -Wall GCC 12 warns about the undefined source of the plain extract,
  // which _mm512_castps512_ps256 uses too)
  const __m512d d = _mm512_castps_pd(v);
  const __m256d lo = _mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xff, d, 0);
  const __m256d hi = _mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xff, d, 1);
  return _mm256_add_ps(_mm256_castpd_ps(lo), _mm256_castpd_ps(hi));
}
GRADOPS_AVX512 inline __m256d reduce4z(__m512 a, __m512 b, __m512 c, __m512 d) {
  return reduce4(fold16(a), fold16(b), fold16(c), fold16(d));
}

// Mask of the columns [k, k+16) below n.
GRADOPS_INLINE __mmask16 cols_mask(int64_t k, int64_t n) {
  return k + 16 <= n ? __mmask16{0xffff} : static_cast<__mmask16>((1u << (n - k)) - 1);
}

// Triangle of rows i0 .. i0+R-1 (R <= 4), as gram_tri_avx2.
template <int R, class Src>
GRADOPS_AVX512 void gram_tri_avx512(const Src src[4], const Prefetch4& prefetch, int64_t n,
                                    int64_t i0, double* acc, int64_t ld_acc) {
  const Src r0 = src[0], r1 = src[1], r2 = src[2], r3 = src[3];
  const Prefetch4 pf = prefetch;
  const __m512 z = _mm512_setzero_ps();
  __m512 s00 = z, s01 = z, s02 = z, s03 = z, s11 = z, s12 = z, s13 = z, s22 = z, s23 = z, s33 = z;
  for (int64_t k = 0; k < n; k += 16) {
    pf.at(k);
    const __mmask16 m = cols_mask(k, n);
    __m512 x0 = r0.get(k, m);
    GRADOPS_IN_REG(x0);
    s00 = _mm512_fmadd_ps(x0, x0, s00);
    if constexpr (R > 1) {
      __m512 x1 = r1.get(k, m);
      GRADOPS_IN_REG(x1);
      s01 = _mm512_fmadd_ps(x0, x1, s01);
      s11 = _mm512_fmadd_ps(x1, x1, s11);
      if constexpr (R > 2) {
        __m512 x2 = r2.get(k, m);
        GRADOPS_IN_REG(x2);
        s02 = _mm512_fmadd_ps(x0, x2, s02);
        s12 = _mm512_fmadd_ps(x1, x2, s12);
        s22 = _mm512_fmadd_ps(x2, x2, s22);
        if constexpr (R > 3) {
          __m512 x3 = r3.get(k, m);
          GRADOPS_IN_REG(x3);
          s03 = _mm512_fmadd_ps(x0, x3, s03);
          s13 = _mm512_fmadd_ps(x1, x3, s13);
          s23 = _mm512_fmadd_ps(x2, x3, s23);
          s33 = _mm512_fmadd_ps(x3, x3, s33);
        }
      }
    }
  }
  const __m256d d0 = reduce4z(s00, s01, s02, s03), d1 = reduce4z(s11, s12, s13, z),
                d2 = reduce4z(s22, s23, s33, z);
  alignas(32) double v[3][4];
  _mm256_store_pd(v[0], d0);
  _mm256_store_pd(v[1], d1);
  _mm256_store_pd(v[2], d2);
  double* a = acc + i0 * ld_acc + i0;
  for (int q = 0; q < R; ++q) a[q] += v[0][q];
  for (int q = 1; q < R; ++q) a[ld_acc + q] += v[1][q - 1];
  for (int q = 2; q < R; ++q) a[2 * ld_acc + q] += v[2][q - 2];
  if constexpr (R > 3) a[3 * ld_acc + 3] += v[2][2];
}

template <class Src>
GRADOPS_AVX512 void gram_tri_any512(int64_t R, const Src src[4], const Prefetch4& pf, int64_t n,
                                    int64_t i0, double* acc, int64_t ld_acc) {
  switch (R) {
    case 1: return gram_tri_avx512<1>(src, pf, n, i0, acc, ld_acc);
    case 2: return gram_tri_avx512<2>(src, pf, n, i0, acc, ld_acc);
    case 3: return gram_tri_avx512<3>(src, pf, n, i0, acc, ld_acc);
    default: return gram_tri_avx512<4>(src, pf, n, i0, acc, ld_acc);
  }
}

// Pairs (i, j), i in [i0, i0+4) (rows from the tile buffer x), j in [j0, j0+NJ) (rows y[q]),
// NJ <= 6: 4 * NJ accumulators.
template <int NJ, class Src>
GRADOPS_AVX512 void gram_4xn_avx512(const float* x, int64_t ldb, const Src* y,
                                    const Prefetch4& prefetch, int64_t n, int64_t i0, int64_t j0,
                                    double* acc, int64_t ld_acc) {
  Src yr[NJ];
  for (int q = 0; q < NJ; ++q) yr[q] = y[q];
  const Prefetch4 pf = prefetch;
  const float* x0 = x;
  const float* x1 = x + ldb;
  const float* x2 = x + 2 * ldb;
  const float* x3 = x + 3 * ldb;
  // Accumulators s<q><m> (column j0+q, row i0+m) as named variables: GCC keeps an array of them
  // in memory.
  const __m512 z = _mm512_setzero_ps();
  __m512 s00 = z, s01 = z, s02 = z, s03 = z, s10 = z, s11 = z, s12 = z, s13 = z, s20 = z, s21 = z,
         s22 = z, s23 = z, s30 = z, s31 = z, s32 = z, s33 = z, s40 = z, s41 = z, s42 = z, s43 = z,
         s50 = z, s51 = z, s52 = z, s53 = z;
  for (int64_t k = 0; k < n; k += 16) {
    pf.at(k);
    const __mmask16 mask = cols_mask(k, n);
    __m512 a0 = _mm512_load_ps(x0 + k), a1 = _mm512_load_ps(x1 + k), a2 = _mm512_load_ps(x2 + k),
           a3 = _mm512_load_ps(x3 + k);
    GRADOPS_IN_REG(a0);
    GRADOPS_IN_REG(a1);
    GRADOPS_IN_REG(a2);
    GRADOPS_IN_REG(a3);
#define GRADOPS_COL(q)                          \
  if constexpr (NJ > q) {                       \
    __m512 yv = yr[q].get(k, mask);             \
    GRADOPS_IN_REG(yv);                         \
    s##q##0 = _mm512_fmadd_ps(a0, yv, s##q##0); \
    s##q##1 = _mm512_fmadd_ps(a1, yv, s##q##1); \
    s##q##2 = _mm512_fmadd_ps(a2, yv, s##q##2); \
    s##q##3 = _mm512_fmadd_ps(a3, yv, s##q##3); \
  }
    GRADOPS_COL(0) GRADOPS_COL(1) GRADOPS_COL(2) GRADOPS_COL(3) GRADOPS_COL(4) GRADOPS_COL(5)
#undef GRADOPS_COL
  }
  // Column j0+q of rows i0..i0+3.
  alignas(32) double c[6][4];
  _mm256_store_pd(c[0], reduce4z(s00, s01, s02, s03));
  if constexpr (NJ > 1) _mm256_store_pd(c[1], reduce4z(s10, s11, s12, s13));
  if constexpr (NJ > 2) _mm256_store_pd(c[2], reduce4z(s20, s21, s22, s23));
  if constexpr (NJ > 3) _mm256_store_pd(c[3], reduce4z(s30, s31, s32, s33));
  if constexpr (NJ > 4) _mm256_store_pd(c[4], reduce4z(s40, s41, s42, s43));
  if constexpr (NJ > 5) _mm256_store_pd(c[5], reduce4z(s50, s51, s52, s53));
  double* r = acc + i0 * ld_acc + j0;
  for (int m = 0; m < 4; ++m)
    for (int q = 0; q < NJ; ++q) r[m * ld_acc + q] += c[q][m];
}

template <class Src>
GRADOPS_AVX512 void gram_4xn_any512(int kind, const float* x, int64_t ldb, const Src* y,
                                    const Prefetch4& pf, int64_t n, int64_t i0, int64_t j0,
                                    double* acc, int64_t ld_acc) {
  switch (kind) {
    case 1: return gram_4xn_avx512<1>(x, ldb, y, pf, n, i0, j0, acc, ld_acc);
    case 2: return gram_4xn_avx512<2>(x, ldb, y, pf, n, i0, j0, acc, ld_acc);
    case 3: return gram_4xn_avx512<3>(x, ldb, y, pf, n, i0, j0, acc, ld_acc);
    case 4: return gram_4xn_avx512<4>(x, ldb, y, pf, n, i0, j0, acc, ld_acc);
    case 5: return gram_4xn_avx512<5>(x, ldb, y, pf, n, i0, j0, acc, ld_acc);
    default: return gram_4xn_avx512<6>(x, ldb, y, pf, n, i0, j0, acc, ld_acc);
  }
}

struct Avx512 {
  // As Avx2::gram (fills buf with the tile, zero-padded to a multiple of 64 columns).
  template <DType D>
  GRADOPS_AVX512 static void gram(const SegGramArgs& a, int64_t t0, int64_t n, const Plan& p,
                                  float* buf, double* acc) {
    const int64_t T = p.T, ldb = p.ldb, esize = elem_size(D);
    const int64_t n16 = (n + 15) / 16 * 16, n64 = (n + 63) / 64 * 64;
    if (n16 < n64)
      for (int64_t i = 0; i < T; ++i) std::fill(buf + i * ldb + n16, buf + i * ldb + n64, 0.0f);
    const char* J = static_cast<const char*>(a.J);
    auto from_j = [&](int64_t r) {
      float* d = buf + r * ldb;
      return FromJZ<D>{r < T ? J + (r * a.row_stride + t0) * esize : reinterpret_cast<char*>(d), d};
    };
    auto from_buf = [&](int64_t r) { return BufZ{buf + r * ldb}; };
    for (const Block& b : p.blocks) {
      const int64_t i0 = b.i0, j0 = b.j0;
      Prefetch4 pf{{}, esize, b.pf_count};
      for (int m = 0; m < b.pf_count; ++m)
        pf.row[m] = reinterpret_cast<uintptr_t>(J) +
                    static_cast<uintptr_t>(
                        (b.pf_row[m] * a.row_stride + t0 + b.pf_tile[m] * kTileCols) * esize);
      if (b.kind == 0) {
        const int64_t rows = std::min<int64_t>(4, T - i0);
        if (i0 == 0) {
          const FromJZ<D> src[4] = {from_j(0), from_j(1), from_j(2), from_j(3)};
          gram_tri_any512(rows, src, pf, n, i0, acc, p.Tp);
        } else {
          const BufZ src[4] = {from_buf(i0), from_buf(i0 + 1), from_buf(i0 + 2), from_buf(i0 + 3)};
          gram_tri_any512(rows, src, pf, n, i0, acc, p.Tp);
        }
      } else if (i0 == 0) {
        FromJZ<D> y[6];
        for (int q = 0; q < b.kind; ++q) y[q] = from_j(j0 + q);
        gram_4xn_any512(b.kind, buf + i0 * ldb, ldb, y, pf, n, i0, j0, acc, p.Tp);
      } else {
        BufZ y[6];
        for (int q = 0; q < b.kind; ++q) y[q] = from_buf(j0 + q);
        gram_4xn_any512(b.kind, buf + i0 * ldb, ldb, y, pf, n, i0, j0, acc, p.Tp);
      }
    }
  }

  GRADOPS_AVX2 static void counts(const float* buf, int64_t n, const Plan& p, Scratch& s) {
    Avx2::counts(buf, n, p, s);
  }
};

// ---------------------------------------------------------------------------------------------
// Portable variant (x86-64 without AVX2 / FMA / F16C): GCC vector extensions, one pair at a time.

typedef float v8f __attribute__((vector_size(32)));

struct Portable {
  // Gram of the n (<= kTileCols) columns of J starting at column t0, added to acc; fills buf
  // with the tile (fp32, zero-padded to a multiple of 8 columns) first.
  template <DType D>
  static void gram(const SegGramArgs& a, int64_t t0, int64_t n, const Plan& p, float* buf,
                   double* acc) {
    const int64_t T = p.T, n8 = (n + 7) / 8 * 8;
    for (int64_t i = 0; i < T; ++i) {
      float* d = buf + i * p.ldb;
      if constexpr (D == DType::F32) {
        std::memcpy(d, static_cast<const float*>(a.J) + i * a.row_stride + t0,
                    static_cast<size_t>(n) * sizeof(float));
      } else {
        const uint16_t* r = static_cast<const uint16_t*>(a.J) + i * a.row_stride + t0;
        for (int64_t k = 0; k < n; ++k)
          d[k] = D == DType::F16 ? half_to_float(r[k]) : bf16_to_float(r[k]);
      }
      std::fill(d + n, d + n8, 0.0f);
    }
    for (int64_t i = 0; i < T; ++i) {
      const float* x = buf + i * p.ldb;
      for (int64_t j = i; j < T; ++j) {
        const float* y = buf + j * p.ldb;
        v8f s = {};
        for (int64_t k = 0; k < n8; k += 8) {
          v8f u, v;
          std::memcpy(&u, x + k, sizeof u);
          std::memcpy(&v, y + k, sizeof v);
          s += u * v;
        }
        acc[i * p.Tp + j] += ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
      }
    }
  }

  // Sign bitmaps of the tile rows ([i * kWords + w], bit b = column 64w + b), then the pair
  // counts with scalar popcounts.
  static void counts(const float* buf, int64_t n, const Plan& p, Scratch& s) {
    const int64_t T = p.T, words = (n + 63) / 64;
    for (int64_t i = 0; i < T; ++i) {
      const float* row = buf + i * p.ldb;
      for (int64_t w = 0; w < words; ++w) {
        uint64_t pw = 0, nw = 0;
        const int64_t end = std::min(n - w * 64, int64_t{64});
        for (int64_t b = 0; b < end; ++b) {
          const float x = row[w * 64 + b];
          pw |= static_cast<uint64_t>(x > 0.0f) << b;
          nw |= static_cast<uint64_t>(x < 0.0f) << b;
        }
        s.pos[i * kWords + w] = pw;
        s.neg[i * kWords + w] = nw;
      }
    }
    for (int64_t i = 0; i < T; ++i) {
      const uint64_t* pi = s.pos.data() + i * kWords;
      const uint64_t* ni = s.neg.data() + i * kWords;
      for (int64_t j = i; j < T; ++j) {
        const uint64_t* pj = s.pos.data() + j * kWords;
        const uint64_t* nj = s.neg.data() + j * kWords;
        int64_t o = 0, b = 0;
        for (int64_t w = 0; w < words; ++w) {
          o += __builtin_popcountll((pi[w] & nj[w]) | (ni[w] & pj[w]));
          b += __builtin_popcountll((pi[w] | ni[w]) & (pj[w] | nj[w]));
        }
        s.opp[i * p.Tp + j] += o;
        s.both[i * p.Tp + j] += b;
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Shared driver.

// Adds the Gram (and counts) of columns [c0, c1) to s.acc (s.opp, s.both), tile by tile.
template <class Isa, DType D>
void part(const SegGramArgs& a, int64_t c0, int64_t c1, const Plan& p, Scratch& s) {
  for (int64_t t0 = c0; t0 < c1; t0 += kTileCols) {
    const int64_t n = std::min(kTileCols, c1 - t0);
    Isa::template gram<D>(a, t0, n, p, s.buf, s.acc.data());
    if (p.counts) Isa::counts(s.buf, n, p, s);
  }
}

using PartFn = void (*)(const SegGramArgs&, int64_t, int64_t, const Plan&, Scratch&);

template <class Isa>
PartFn part_for(DType d) {
  switch (d) {
    case DType::BF16: return &part<Isa, DType::BF16>;
    case DType::F16: return &part<Isa, DType::F16>;
    default: return &part<Isa, DType::F32>;
  }
}

using Isa = simd::CpuIsa;

// Upper triangles (i <= j, row-major, packed) of part accumulators, one per slot.
struct Slots {
  int64_t tri = 0;
  std::vector<double> gram;
  std::vector<int64_t> opp, both;
};

void store_slot(const Plan& p, const Scratch& s, int64_t slot, Slots& sl) {
  int64_t q = slot * sl.tri;
  for (int64_t i = 0; i < p.T; ++i)
    for (int64_t j = i; j < p.T; ++j, ++q) {
      sl.gram[q] = s.acc[i * p.Tp + j];
      if (p.counts) {
        sl.opp[q] = s.opp[i * p.Tp + j];
        sl.both[q] = s.both[i * p.Tp + j];
      }
    }
}

// Writes segment l of the outputs (both triangles) from upper-triangle values gram(i, j), ...
template <class G, class O, class B>
void emit(const SegGramArgs& a, int64_t l, G gram, O opp, B both) {
  const int64_t T = a.T;
  float* g = a.gram + l * T * T;
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = i; j < T; ++j) g[i * T + j] = g[j * T + i] = static_cast<float>(gram(i, j));
  if (a.opposite == nullptr) return;
  int64_t* o = a.opposite + l * T * T;
  int64_t* b = a.both_nonzero + l * T * T;
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = i; j < T; ++j) {
      o[i * T + j] = o[j * T + i] = opp(i, j);
      b[i * T + j] = b[j * T + i] = both(i, j);
    }
}

}  // namespace

void segment_gram_cpu(const SegGramArgs& a) {
  Plan p;
  p.T = a.T;
  p.Tp = (a.T + 3) / 4 * 4;
  p.counts = a.opposite != nullptr;
  const Isa isa = simd::cpu_isa();
  if (isa == Isa::Avx2) p.blocks = block_schedule(a.T, blocks_avx2(a.T), kPrefetchBlocksAvx2);
  if (isa == Isa::Avx512)
    p.blocks = block_schedule(a.T, blocks_avx512(a.T), kPrefetchBlocksAvx512);
  p.ldb = kTileCols + 16;
  const int64_t T = a.T, Tp = p.Tp, L = a.L, P = a.P, C = piece_cols(a.T);
  const int64_t* off = a.offsets;
  const int64_t pieces = (P + C - 1) / C;

  // Slots of the segments that cross piece boundaries: tail[c] = the part of piece c belonging to
  // a segment that starts in c and ends after it; head[c] = the part of piece c belonging to a
  // segment that started before c. Numbered in column order.
  std::vector<int64_t> head(pieces, -1), tail(pieces, -1);
  int64_t nslots = 0;
  for (int64_t l = 0; l < L; ++l) {
    if (off[l] == off[l + 1]) continue;
    const int64_t cs = off[l] / C, ce = (off[l + 1] - 1) / C;
    if (cs == ce) continue;
    tail[cs] = nslots++;
    for (int64_t c = cs + 1; c <= ce; ++c) head[c] = nslots++;
  }
  Slots sl;
  sl.tri = T * (T + 1) / 2;
  sl.gram.resize(nslots * sl.tri);
  if (p.counts) {
    sl.opp.resize(nslots * sl.tri);
    sl.both.resize(nslots * sl.tri);
  }

  const PartFn part_fn = isa == Isa::Avx512 ? part_for<Avx512>(a.dtype)
                        : isa == Isa::Avx2   ? part_for<Avx2>(a.dtype)
                                             : part_for<Portable>(a.dtype);

#pragma omp parallel if (pieces > 1)
  {
    Scratch s(p);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < pieces; ++c) {
      const int64_t start = c * C, end = std::min(P, start + C);
      // First segment holding column `start` (non-empty), then the following ones.
      int64_t l = std::upper_bound(off, off + L + 1, start) - off - 1;
      for (; l < L && off[l] < end; ++l) {
        const int64_t c0 = std::max(off[l], start), c1 = std::min(off[l + 1], end);
        if (c0 >= c1) continue;  // empty segment: written after the loop
        s.clear();
        part_fn(a, c0, c1, p, s);
        if (off[l] < start) {
          store_slot(p, s, head[c], sl);
        } else if (off[l + 1] > end) {
          store_slot(p, s, tail[c], sl);
        } else {  // the whole segment is in this piece
          emit(
              a, l, [&](int64_t i, int64_t j) { return s.acc[i * Tp + j]; },
              [&](int64_t i, int64_t j) { return s.opp[i * Tp + j]; },
              [&](int64_t i, int64_t j) { return s.both[i * Tp + j]; });
        }
      }
    }
  }

  // Empty segments (zeros) and crossing segments (their slots summed in column order).
#pragma omp parallel for schedule(dynamic, 16) if (L > 1)
  for (int64_t l = 0; l < L; ++l) {
    if (off[l] == off[l + 1]) {
      emit(
          a, l, [](int64_t, int64_t) { return 0.0; }, [](int64_t, int64_t) { return int64_t{0}; },
          [](int64_t, int64_t) { return int64_t{0}; });
      continue;
    }
    const int64_t cs = off[l] / C, ce = (off[l + 1] - 1) / C;
    if (cs == ce) continue;
    // Slots tail[cs], head[cs+1..ce] are consecutive: first = tail[cs], count = ce - cs + 1.
    const int64_t first = tail[cs], count = ce - cs + 1;
    std::vector<double> g(sl.gram.begin() + first * sl.tri, sl.gram.begin() + (first + 1) * sl.tri);
    std::vector<int64_t> o, b;
    if (p.counts) {
      o.assign(sl.opp.begin() + first * sl.tri, sl.opp.begin() + (first + 1) * sl.tri);
      b.assign(sl.both.begin() + first * sl.tri, sl.both.begin() + (first + 1) * sl.tri);
    }
    for (int64_t r = 1; r < count; ++r) {
      const int64_t q0 = (first + r) * sl.tri;
      for (int64_t q = 0; q < sl.tri; ++q) g[q] += sl.gram[q0 + q];
      if (p.counts)
        for (int64_t q = 0; q < sl.tri; ++q) {
          o[q] += sl.opp[q0 + q];
          b[q] += sl.both[q0 + q];
        }
    }
    // Packed upper-triangle index of (i, j), i <= j.
    auto tri = [T](int64_t i, int64_t j) { return i * T - i * (i - 1) / 2 + (j - i); };
    emit(
        a, l, [&](int64_t i, int64_t j) { return g[tri(i, j)]; },
        [&](int64_t i, int64_t j) { return o[tri(i, j)]; },
        [&](int64_t i, int64_t j) { return b[tri(i, j)]; });
  }
}

}  // namespace gradops
