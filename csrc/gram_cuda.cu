// gradops: CUDA backend of the segmented Gram kernel (interface: csrc/gram_kernels.h).
//
// What it computes (docs/methods.md#gram). J is [T, P] (row t = flattened gradient of task t; fp32, bf16 or
// fp16; column stride 1, row stride `row_stride`); `offsets` cuts the columns into L segments
// (the layers). Per segment l:
//   gram[l]         = J_l J_l^T in fp32 (the Gram of the whole model is the sum over l; the
//                     per-layer Grams serve the per-layer methods),
//   opposite[l]     = #columns where rows i and j are both non-zero and of opposite signs,
//   both_nonzero[l] = #columns where rows i and j are both non-zero,
// so opposite / both_nonzero is the sign-conflict ratio. The two int64 count tables are optional
// and come out of the SAME pass over J. NaN is neither zero nor signed (it counts in neither
// table) and, like Inf, propagates into the Gram entries of its row; -0.0 is zero.
//
// Decomposition (no host synchronisation; the launch configuration depends only on T, P, L,
// with_counts and num_sms, never on `offsets`, which stays in device memory):
//  * Columns are cut into NC chunks of CH columns (CH a multiple of the tile width KT, about
//    4 chunks per SM, CH <= 2^30). Block c of the piece kernel owns chunk [c*CH, min(P, (c+1)*CH))
//    and walks the pieces "chunk c ∩ segment l" in column order (binary search of `offsets` for
//    the first segment, then a forward walk). The partial Gram (and int32 counts) of piece (c, l)
//    goes to workspace slot c + l: non-empty pieces form a staircase in (c, l) where every step
//    increases c or l, so c + l is injective over them (NC + L slots). A slot holds the packed
//    upper triangle (E = T(T+1)/2 entries).
//  * A piece is processed in tiles of KT columns staged through shared memory as fp32 (16-bit
//    inputs converted on the way). The next tile is loaded into registers (64 elements per thread,
//    coalesced scalar loads, so no alignment is assumed) while the current one is multiplied:
//    each SM keeps up to 64 KiB (fp32) / 32 KiB (16-bit) of loads in flight.
//  * Rows are padded to TP, a multiple of the register block R (2, 4 or 8), giving nb = TP / R
//    row blocks and NP = nb(nb+1)/2 block pairs bi <= bj (upper triangle only). The 256 threads
//    are NP pairs x S slices: thread (pair, slice) accumulates an R x R block in registers over the
//    4-column groups slice, slice + S, ... of every tile (KT = 4*S*m: equal work per slice).
//  * Sign counts: per tile, each row's 32-column words of "non-zero" and "negative" bits are built
//    with warp ballots; an entry (i, j) then costs two popcounts per 32 columns. Per-piece counts
//    are exact int32 (a piece has at most 2^30 columns) and are widened to int64 at the end.
//  * At the end of a piece the S slice partials of each entry are summed in a fixed order (two
//    fixed stages) and written to the slot. A second kernel, grid (L, ceil(T*T/256)), sums for
//    each segment l the slots c + l, c = offsets[l]/CH .. (offsets[l+1]-1)/CH, in increasing c
//    (empty segment: zeros), mirrors the upper triangle and widens the counts. Slots that were
//    never written are never read.
//
// Determinism: every floating-point sum has an order fixed by (T, P, num_sms, offsets) alone: the
// chunk / piece / tile / slice decomposition, the column order inside a thread (fmaf chains), the
// slice reduction order and the slot order. There are no float atomics (the only atomics are int32
// count additions in shared memory, exact in any order). Results are bit-identical from run to run
// on a given device, and gram[l] is exactly symmetric (both halves come from the same sum).
//
// Performance model. J is read exactly once (T * P * sizeof(elem) bytes); the workspace adds
// (NC + L) * E * 4 bytes (x3 with counts), negligible when P >> L * T. fp32 FMAs per pass:
// NP * R^2 * P ~= (TP^2 + TP*R) / 2 * P (upper triangle plus register-block padding; 960 P for
// T = 40, 640 P for T = 32, 64 P for T = 8). Shared-memory traffic: 2R floats per R^2 FMAs,
// balanced with the FMA pipe at R = 8. Other issue slots: ~10 instructions per loaded element
// plus ~1 per 8 FMAs for the shared loads. H100 SXM: 3.35 TB/s HBM; 132 SMs x 128 FMA/clk
// ~ 30 TFMA/s fp32 at sustained clocks. The target, >= 80% of HBM bandwidth (2.7 TB/s) for
// T = 8..40 and P >= 50M, needs 5.4 (T = 8) to 16 (T = 40) TFMA/s with fp32 input, i.e. at most
// ~55% of the FMA peak: memory-bound, reachable. 16-bit input halves the bytes per FMA: up to
// T ~ 16 (16 TFMA/s) the target holds; beyond that the kernel is FMA-bound on the CUDA cores (bf16
// T = 40 would need 32 TFMA/s > peak) and runs at ~60-70% of the FMA peak instead. Sign counts
// add ~10 instructions per element (bit-word pass) and ~8 per entry per 32 columns.

#include "gram_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>

namespace gradops {
namespace {

constexpr int kThreads = 256;                         // threads per block (both kernels)
constexpr int kWarps = kThreads / 32;
constexpr int kPrefetch = 64;                         // tile elements per thread (in registers)
constexpr int kTileFloats = 16384;                    // TP * KT <= kTileFloats (64 KiB)
constexpr int kMaxEntries = int(kCudaMaxT * (kCudaMaxT + 1) / 2);
constexpr int kMaxUnits = (kMaxEntries + kThreads - 1) / kThreads;  // count units per thread
constexpr int kChunksPerSM = 4;
constexpr int64_t kMaxChunk = int64_t(1) << 30;       // keeps per-piece int32 counts exact

__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Packed upper triangle of an n x n matrix, row-major: (0,0), (0,1), ..., (0,n-1), (1,1), ...
__host__ __device__ inline int tri_index(int i, int j, int n) {  // requires i <= j < n
  return i * n - i * (i - 1) / 2 + (j - i);
}
__host__ __device__ inline void tri_decode(int e, int n, int& i, int& j) {  // inverse of tri_index
  i = 0;
  while (e >= n - i) {
    e -= n - i;
    ++i;
  }
  j = i + e;
}

// Launch plan: a pure function of (T, P, L, with_counts, num_sms), shared by the workspace-size
// query and the launch so that both agree on NC and the slot layout.
struct Plan {
  int T;           // rows
  int R;           // register block (2, 4 or 8)
  int JN;          // loader: column repeats per thread (compile-time in the kernel)
  int LW;          // loader: columns per row group, ceil(KT / JN) <= kThreads
  int G;           // loader: row groups, kThreads / LW
  int TP;          // rows padded to a multiple of R
  int nb;          // row blocks, TP / R
  int NP;          // block pairs (bi <= bj), nb(nb+1)/2
  int S;           // column slices per pair; NP * S <= kThreads threads do Gram work
  int KT;          // tile width in columns, 4 * S * m
  int Wp;          // bit words per row per tile, ceil(KT/32) rounded up to odd (bank spread)
  int E;           // packed upper-triangle entries, T(T+1)/2
  int WS;          // word slices per count entry (spreads small E over the threads)
  int NU;          // count units, E * WS
  int Q;           // Gram partial entries per slice, NP * R * R
  int nsub;        // slice sub-ranges of the first reduction stage
  int SUB;         // slices per sub-range
  int buf_floats;  // shared tile / reduction buffer, in floats
  int part_floats; // first-stage reduction results, in floats
  int64_t CH;      // chunk width in columns (multiple of KT)
  int64_t NC;      // chunks (= blocks of the piece kernel), 0 when P == 0
  int64_t slots;   // workspace slots, NC + L
  size_t smem_bytes;
  size_t workspace_bytes;
};

Plan make_plan(int64_t T64, int64_t P, int64_t L, bool with_counts, int num_sms) {
  if (T64 < 1 || T64 > kCudaMaxT)
    throw std::invalid_argument("gradops segment_gram_cuda: T must be in [1, 64]");
  if (P < 0) throw std::invalid_argument("gradops segment_gram_cuda: P must be >= 0");
  if (L < 1) throw std::invalid_argument("gradops segment_gram_cuda: L must be >= 1");
  Plan p{};
  p.T = int(T64);
  const int T = p.T;
  // Register block and loader shape (kernel variants): the loader holds kPrefetch = JN x AN
  // elements per thread: JN column repeats x AN rows.
  if (T <= 2) { p.R = 2; p.JN = 32; }
  else if (T <= 4) { p.R = 4; p.JN = 16; }
  else if (T <= 8) { p.R = 8; p.JN = 8; }
  else { p.R = 8; p.JN = 4; }
  const int AN = kPrefetch / p.JN;
  p.TP = (T + p.R - 1) / p.R * p.R;
  p.nb = p.TP / p.R;
  p.NP = p.nb * (p.nb + 1) / 2;
  p.S = kThreads / p.NP;  // >= 7 (nb <= 8)
  // Tile width KT = 4 * S * m (equal work for every slice), as wide as the loader and the shared
  // tile allow: thread (row group rg, column c) loads rows rg, rg + G, ... (at most AN of them)
  // at columns c, c + LW, ... (JN of them).
  const auto fits = [&](int KT) {
    const int LW = (KT + p.JN - 1) / p.JN;
    if (LW > kThreads || p.TP * KT > kTileFloats) return false;
    const int G = kThreads / LW;
    return (T + G - 1) / G <= AN;
  };
  int m = 1;
  if (!fits(4 * p.S)) throw std::logic_error("gradops segment_gram_cuda: no tile fits");
  while (fits(4 * p.S * (m + 1))) ++m;
  p.KT = 4 * p.S * m;
  p.LW = (p.KT + p.JN - 1) / p.JN;
  p.G = kThreads / p.LW;
  p.Wp = ((p.KT + 31) / 32) | 1;
  p.E = T * (T + 1) / 2;
  p.WS = p.E < kThreads ? kThreads / p.E : 1;
  p.NU = p.E * p.WS;
  p.Q = p.NP * p.R * p.R;
  const int nsub0 = p.Q < kThreads ? kThreads / p.Q : 1;
  p.SUB = (p.S + nsub0 - 1) / nsub0;
  p.nsub = (p.S + p.SUB - 1) / p.SUB;                      // every sub-range non-empty
  p.buf_floats = std::max(p.TP * p.KT, kThreads * (p.R * p.R + 1));
  p.part_floats = p.Q * p.nsub;
  if (p.NU > kMaxUnits * kThreads || p.NP * p.S > kThreads)
    throw std::logic_error("gradops segment_gram_cuda: inconsistent launch plan");

  const int64_t sms = std::max(1, num_sms);
  const int64_t target = ceil_div64(P, kChunksPerSM * sms);           // columns per chunk
  const int64_t tiles = min64(max64(1, ceil_div64(target, p.KT)), kMaxChunk / p.KT);
  p.CH = tiles * p.KT;
  p.NC = P > 0 ? ceil_div64(P, p.CH) : 0;
  p.slots = p.NC + L;

  size_t words = 0;
  if (with_counts) words = size_t(2) * T * p.Wp + size_t(2) * p.E;  // bit words + int32 tables
  p.smem_bytes = (size_t(p.buf_floats) + size_t(p.part_floats)) * sizeof(float) + words * 4;
  p.workspace_bytes = size_t(p.slots) * size_t(p.E) * 4 * (with_counts ? 3 : 1);
  return p;
}

// ------------------------------------------------------------------------------------------------
// Device side

template <typename Elem>
struct ElemTraits;
template <>
struct ElemTraits<float> {
  using Raw = float;
  static __device__ __forceinline__ float to_float(Raw r) { return r; }
};
template <>
struct ElemTraits<__nv_bfloat16> {
  using Raw = unsigned short;
  static __device__ __forceinline__ float to_float(Raw r) {
    return __bfloat162float(__ushort_as_bfloat16(r));
  }
};
template <>
struct ElemTraits<__half> {
  using Raw = unsigned short;
  static __device__ __forceinline__ float to_float(Raw r) {
    return __half2float(__ushort_as_half(r));
  }
};

// Current tile: columns [t0, t0 + len) of segment `seg`; its piece (chunk ∩ segment) ends at pend.
struct Cursor {
  int64_t t0;
  int64_t pend;
  int64_t seg;
  int len;
};

// First tile of chunk [c0, c1) (c0 < c1 <= P): the segment holding column c0 is the first l with
// offsets[l+1] > c0 (it exists because offsets[L] = P > c0, and it is non-empty).
__device__ Cursor first_tile(const int64_t* __restrict__ offsets, int64_t L, int64_t c0, int64_t c1,
                             int KT) {
  int64_t lo = 0, hi = L - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid + 1] > c0) hi = mid;
    else lo = mid + 1;
  }
  Cursor c;
  c.seg = lo;
  c.t0 = c0;
  c.pend = min64(c1, offsets[lo + 1]);
  c.len = int(min64(KT, c.pend - c.t0));
  return c;
}

// Tile after `cur` within the chunk ending at c1; false when the chunk is done. When the piece is
// done, skip to the next segment holding column t (segments in between are empty).
__device__ bool next_tile(const Cursor& cur, const int64_t* __restrict__ offsets, int64_t c1,
                          int KT, Cursor& nxt) {
  const int64_t t = cur.t0 + cur.len;
  if (t >= c1) return false;
  nxt.seg = cur.seg;
  nxt.pend = cur.pend;
  if (t == cur.pend) {  // then pend = offsets[seg + 1] < c1 <= P = offsets[L]: l stays < L
    int64_t l = cur.seg + 1;
    while (offsets[l + 1] <= t) ++l;
    nxt.seg = l;
    nxt.pend = min64(c1, offsets[l + 1]);
  }
  nxt.t0 = t;
  nxt.len = int(min64(KT, nxt.pend - t));
  return true;
}

// Returns x unchanged, but opaque to the optimizer. The tile loops below run once per tile with
// the same per-thread geometry; without this, the compiler hoists every per-element address and
// predicate out of the main loop (one register each, > 100 in all) instead of recomputing them
// with one add per element.
__device__ __forceinline__ int opaque(int x) {
  asm volatile("" : "+r"(x));
  return x;
}
__device__ __forceinline__ int64_t opaque(int64_t x) {
  asm volatile("" : "+l"(x));
  return x;
}

// Loader role of a thread: row group rg = tid / LW, column c = tid % LW of the tile; it moves the
// elements (rg + G*a, c + LW*j), a < rows, j < JN. Over all threads this covers rows [0, T) and
// columns [0, LW*JN) ⊇ [0, KT). Threads with tid >= G*LW have rows = 0.
struct Loader {
  int row0;  // rg
  int col0;  // c
  int rows;  // number of rows rg + G*a < T
  int LW;
  int G;
};

// Issues this thread's global loads of tile columns [t0, t0 + len) into registers (elements
// outside the tile read as +0). The pointer steps by whole rows and may pass the end of J; it is
// dereferenced only under the guard.
template <typename Raw, int JN, int AN>
__device__ __forceinline__ void prefetch_tile(Raw (&v)[JN][AN], const Raw* __restrict__ J,
                                              int64_t row_stride, const Loader& ld, int64_t t0,
                                              int len) {
  const int64_t step = opaque(int64_t(ld.G) * row_stride);
  const int rows = opaque(ld.rows), LW = opaque(ld.LW);
  int col = opaque(ld.col0);
  const Raw* p0 = J + (t0 + int64_t(ld.row0) * row_stride + col);
#pragma unroll
  for (int j = 0; j < JN; ++j) {
    const bool col_ok = col < len;
    const Raw* p = p0;
#pragma unroll
    for (int a = 0; a < AN; ++a) {
      v[j][a] = Raw(0);
      if (col_ok && a < rows) v[j][a] = __ldg(p);
      p += step;
    }
    col += LW;
    p0 += LW;
  }
}

// st.shared.f32 at a shared-window byte address. Used by store_tile so that the per-element
// address is one register add (with a generic pointer, sm_90 code re-derives the shared window
// base for every store).
__device__ __forceinline__ void store_shared(unsigned addr, float x) {
  asm volatile("st.shared.f32 [%0], %1;" : : "r"(addr), "f"(x) : "memory");
}

// Stores the prefetched registers as fp32 into rows [0, T), columns [0, KT) of the shared tile.
template <typename Elem, int JN, int AN>
__device__ __forceinline__ void store_tile(const typename ElemTraits<Elem>::Raw (&v)[JN][AN],
                                           float* tile, const Loader& ld, int KT) {
  const int step = opaque(ld.G * KT * 4);
  const int rows = opaque(ld.rows), LW = opaque(ld.LW);
  int col = opaque(ld.col0);
  unsigned addr0 = unsigned(__cvta_generic_to_shared(tile + ld.row0 * KT + col));
#pragma unroll
  for (int j = 0; j < JN; ++j) {
    const bool col_ok = col < KT;
    unsigned addr = addr0;
#pragma unroll
    for (int a = 0; a < AN; ++a) {
      if (col_ok && a < rows) store_shared(addr, ElemTraits<Elem>::to_float(v[j][a]));
      addr += step;
    }
    col += LW;
    addr0 += 4 * LW;
  }
}

// acc[ii][jj] += sum over this slice's 4-column groups of tile[bi*R+ii][k] * tile[bj*R+jj][k],
// columns in increasing order (fixed order, fmaf).
template <int R>
__device__ __forceinline__ void accumulate_tile(float (&acc)[R][R], const float* tile, int KT,
                                                int bi, int bj, int slice, int S, int ngroups) {
  const int KT4 = KT / 4;
  const float4* ta = reinterpret_cast<const float4*>(tile) + bi * R * KT4;
  const float4* tb = reinterpret_cast<const float4*>(tile) + bj * R * KT4;
  for (int g = slice; g < ngroups; g += S) {
    float4 a[R];
#pragma unroll
    for (int ii = 0; ii < R; ++ii) a[ii] = ta[ii * KT4 + g];
#pragma unroll
    for (int jj = 0; jj < R; ++jj) {
      const float4 b = tb[jj * KT4 + g];
#pragma unroll
      for (int ii = 0; ii < R; ++ii) {
        acc[ii][jj] = fmaf(a[ii].x, b.x, acc[ii][jj]);
        acc[ii][jj] = fmaf(a[ii].y, b.y, acc[ii][jj]);
        acc[ii][jj] = fmaf(a[ii].z, b.z, acc[ii][jj]);
        acc[ii][jj] = fmaf(a[ii].w, b.w, acc[ii][jj]);
      }
    }
  }
}

// End of a piece: sums the S slice partials of every Gram entry in a fixed order (stage 1: each
// of nsub consecutive slice ranges in increasing slice order; stage 2: the ranges in increasing
// order) and writes the upper triangle to `out` (a workspace slot, packed). Resets acc.
// Starts with a barrier (all threads done with the tile); `red` aliases the tile buffer.
template <int R>
__device__ void reduce_piece(float (&acc)[R][R], bool active, const Plan& plan, float* red,
                             float* part, float* __restrict__ out, int tid) {
  constexpr int RR = R * R;
  constexpr int kStride = RR + 1;  // odd stride: conflict-free writes and reads
  __syncthreads();
  if (active) {
    float* dst = red + tid * kStride;
#pragma unroll
    for (int ii = 0; ii < R; ++ii) {
#pragma unroll
      for (int jj = 0; jj < R; ++jj) {
        dst[ii * R + jj] = acc[ii][jj];
        acc[ii][jj] = 0.f;
      }
    }
  }
  __syncthreads();
  for (int it = tid; it < plan.Q * plan.nsub; it += kThreads) {
    const int q = it / plan.nsub, u = it - q * plan.nsub;
    const int p = q / RR, e = q - p * RR;
    const int s_begin = u * plan.SUB, s_end = min(plan.S, s_begin + plan.SUB);  // non-empty
    const float* src = red + (p * plan.S) * kStride + e;  // thread p*S + s holds slice s of pair p
    float sum = src[s_begin * kStride];
    for (int s = s_begin + 1; s < s_end; ++s) sum += src[s * kStride];
    part[it] = sum;
  }
  __syncthreads();
  for (int q = tid; q < plan.Q; q += kThreads) {
    const float* src = part + q * plan.nsub;
    float sum = src[0];
    for (int u = 1; u < plan.nsub; ++u) sum += src[u];
    const int p = q / RR, e = q - p * RR;
    int bi, bj;
    tri_decode(p, plan.nb, bi, bj);
    const int i = bi * R + e / R, j = bj * R + e % R;
    if (i <= j && j < plan.T) out[tri_index(i, j, plan.T)] = sum;
  }
}

// Shared-memory areas of the sign counts.
struct CountSmem {
  unsigned* nzw;  // [T][Wp] bit k of word c: column 32c + k of the tile is non-zero (not NaN)
  unsigned* ngw;  // [T][Wp] bit k of word c: column 32c + k of the tile is < 0
  int* opp;       // [E] counts of the current piece
  int* both;      // [E]
};

// Per-thread sign-count work. Count unit u in [0, NU) is (entry e = u % E, word slice u / E):
// it counts words c = slice, slice + WS, ... of entry e's rows. Thread tid owns units
// tid + r * kThreads (r < kMaxUnits). Integer additions: any order gives the same result.
template <bool kEnabled>
struct SignCounter {
  unsigned unit[kMaxUnits];  // packed i | j << 8 | slice << 16 (i, j < 64, slice < 256)
  int n_units;

  __device__ void init(const Plan& p, const CountSmem& cs, int tid) {
    n_units = 0;
#pragma unroll
    for (int r = 0; r < kMaxUnits; ++r) {
      const int u = tid + r * kThreads;
      unit[r] = 0;
      if (u < p.NU) {
        int i, j;
        tri_decode(u % p.E, p.T, i, j);
        unit[r] = unsigned(i) | unsigned(j) << 8 | unsigned(u / p.E) << 16;
        n_units = r + 1;
      }
    }
    for (int e = tid; e < p.E; e += kThreads) {
      cs.opp[e] = 0;
      cs.both[e] = 0;
    }
  }

  // After the tile is in shared memory (and a barrier): builds the bit words (warp ballots over
  // 32 consecutive columns of one row), barrier, then adds this thread's units into cs.opp/both.
  __device__ void count_tile(const Plan& p, const CountSmem& cs, const float* tile, int len,
                             int tid) {
    const int lane = tid & 31, warp = tid >> 5;
    const int nw = (len + 31) / 32;  // >= 1
    // Word items (row, word) in row-major order, dealt round-robin to the warps; (row, word) is
    // warp-uniform, so every ballot has the full warp.
    int row = 0, word = warp;
    while (word >= nw) {
      word -= nw;
      ++row;
    }
    while (row < p.T) {
      const int k = word * 32 + lane;
      const float x = k < len ? tile[row * p.KT + k] : 0.f;
      const unsigned nz = __ballot_sync(0xffffffffu, x < 0.f || x > 0.f);
      const unsigned ng = __ballot_sync(0xffffffffu, x < 0.f);
      if (lane == 0) {
        cs.nzw[row * p.Wp + word] = nz;
        cs.ngw[row * p.Wp + word] = ng;
      }
      word += kWarps;
      while (word >= nw) {
        word -= nw;
        ++row;
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kMaxUnits; ++r) {
      if (r < n_units) {
        const int i = int(unit[r] & 0xffu), j = int((unit[r] >> 8) & 0xffu);
        const int slice = int(unit[r] >> 16);
        const unsigned* zi = cs.nzw + i * p.Wp;
        const unsigned* zj = cs.nzw + j * p.Wp;
        const unsigned* gi = cs.ngw + i * p.Wp;
        const unsigned* gj = cs.ngw + j * p.Wp;
        int n_both = 0, n_opp = 0;
        for (int c = slice; c < nw; c += p.WS) {
          const unsigned z = zi[c] & zj[c];
          n_both += __popc(z);
          n_opp += __popc(z & (gi[c] ^ gj[c]));
        }
        if (n_both != 0) {  // n_opp <= n_both
          const int e = tri_index(i, j, p.T);
          atomicAdd(&cs.both[e], n_both);
          if (n_opp != 0) atomicAdd(&cs.opp[e], n_opp);
        }
      }
    }
  }

  // End of a piece (after a barrier that follows the last count_tile): writes the piece's counts
  // to the slot and clears the tables for the next piece.
  __device__ void flush(const Plan& p, const CountSmem& cs, int* __restrict__ ws_opp,
                        int* __restrict__ ws_both, int64_t slot, int tid) {
    for (int e = tid; e < p.E; e += kThreads) {
      ws_opp[slot * p.E + e] = cs.opp[e];
      ws_both[slot * p.E + e] = cs.both[e];
      cs.opp[e] = 0;
      cs.both[e] = 0;
    }
  }
};

template <>
struct SignCounter<false> {
  __device__ void init(const Plan&, const CountSmem&, int) {}
  __device__ void count_tile(const Plan&, const CountSmem&, const float*, int, int) {}
  __device__ void flush(const Plan&, const CountSmem&, int*, int*, int64_t, int) {}
};

// Piece kernel: block c handles chunk c (see the header comment). All control flow that reaches a
// barrier is block-uniform (it depends only on the plan, the chunk and `offsets`).
template <typename Elem, int R, int JN, bool kCounts>
__global__ void __launch_bounds__(kThreads, 1)
segment_gram_pieces_kernel(const void* __restrict__ J_, int64_t row_stride,
                           const int64_t* __restrict__ offsets, int64_t L, int64_t P,
                           const Plan plan, float* __restrict__ ws_gram,
                           int* __restrict__ ws_opp, int* __restrict__ ws_both) {
  using Raw = typename ElemTraits<Elem>::Raw;
  const Raw* __restrict__ J = static_cast<const Raw*>(J_);
  const int T = plan.T, KT = plan.KT, S = plan.S;
  const int tid = threadIdx.x;

  extern __shared__ float4 smem[];
  float* tile = reinterpret_cast<float*>(smem);  // [TP][KT] fp32 tile / reduction buffer
  float* part = tile + plan.buf_floats;
  CountSmem cs;
  cs.nzw = reinterpret_cast<unsigned*>(part + plan.part_floats);
  cs.ngw = cs.nzw + T * plan.Wp;
  cs.opp = reinterpret_cast<int*>(cs.ngw + T * plan.Wp);
  cs.both = cs.opp + plan.E;

  // Gram role: pair p = tid / S of row blocks (bi <= bj), column slice tid % S.
  const bool active = tid < plan.NP * S;
  int bi = 0, bj = 0, slice = 0;
  if (active) {
    tri_decode(tid / S, plan.nb, bi, bj);
    slice = tid % S;
  }
  float acc[R][R];
#pragma unroll
  for (int ii = 0; ii < R; ++ii) {
#pragma unroll
    for (int jj = 0; jj < R; ++jj) acc[ii][jj] = 0.f;
  }
  SignCounter<kCounts> counter;
  counter.init(plan, cs, tid);

  Loader ld;
  ld.LW = plan.LW;
  ld.G = plan.G;
  ld.row0 = tid / plan.LW;
  ld.col0 = tid - ld.row0 * plan.LW;
  ld.rows = ld.row0 < min(plan.G, T) ? (T - ld.row0 + plan.G - 1) / plan.G : 0;
  constexpr int AN = kPrefetch / JN;
  Raw v[JN][AN];

  const int64_t c0 = int64_t(blockIdx.x) * plan.CH;
  const int64_t c1 = min64(P, c0 + plan.CH);
  Cursor cur = first_tile(offsets, L, c0, c1, KT);
  prefetch_tile(v, J, row_stride, ld, cur.t0, cur.len);

  for (;;) {
    // Rows [0, T) of the tile are rewritten in full; the padding rows [T, TP) keep whatever the
    // buffer held: they only reach accumulator entries with i >= T or j >= T, which are dropped.
    store_tile<Elem>(v, tile, ld, KT);
    Cursor nxt;
    const bool more = next_tile(cur, offsets, c1, KT, nxt);
    __syncthreads();  // tile complete

    // Loads of the next tile fly while this one is processed.
    if (more) prefetch_tile(v, J, row_stride, ld, nxt.t0, nxt.len);
    counter.count_tile(plan, cs, tile, cur.len, tid);
    if (active) accumulate_tile<R>(acc, tile, KT, bi, bj, slice, S, (cur.len + 3) / 4);

    if (cur.t0 + cur.len == cur.pend) {  // piece (chunk c ∩ segment cur.seg) complete
      const int64_t slot = int64_t(blockIdx.x) + cur.seg;
      reduce_piece<R>(acc, active, plan, tile, part, ws_gram + slot * plan.E, tid);
      counter.flush(plan, cs, ws_opp, ws_both, slot, tid);
    }
    if (!more) break;
    cur = nxt;
    __syncthreads();  // everyone done with the tile / reduction buffer before it is overwritten
  }
}

// Finalize kernel: grid (L, ceil(T*T / kThreads)); thread -> output entry o = (i, j) of gram[l].
// Sums the slots c + l, c = c_first .. c_last, in increasing c (empty segment: zeros).
template <bool kCounts>
__global__ void __launch_bounds__(kThreads)
segment_gram_finalize_kernel(const int64_t* __restrict__ offsets, int T, int E, int64_t CH,
                             const float* __restrict__ ws_gram, const int* __restrict__ ws_opp,
                             const int* __restrict__ ws_both, float* __restrict__ gram,
                             int64_t* __restrict__ opposite, int64_t* __restrict__ both_nonzero) {
  const int64_t l = blockIdx.x;
  const int o = int(blockIdx.y) * kThreads + int(threadIdx.x);
  if (o >= T * T) return;
  const int i = o / T, j = o % T;
  const int64_t e = i <= j ? tri_index(i, j, T) : tri_index(j, i, T);
  const int64_t begin = offsets[l], end = offsets[l + 1];
  float g = 0.f;
  int64_t n_opp = 0, n_both = 0;
  if (end > begin) {
    const int64_t c_first = begin / CH, c_last = (end - 1) / CH;
    g = ws_gram[(c_first + l) * E + e];
    for (int64_t c = c_first + 1; c <= c_last; ++c) g += ws_gram[(c + l) * E + e];
    if constexpr (kCounts) {
      for (int64_t c = c_first; c <= c_last; ++c) {
        n_opp += ws_opp[(c + l) * E + e];
        n_both += ws_both[(c + l) * E + e];
      }
    }
  }
  const int64_t out = l * T * T + o;
  gram[out] = g;
  if constexpr (kCounts) {
    opposite[out] = n_opp;
    both_nonzero[out] = n_both;
  }
}

// ------------------------------------------------------------------------------------------------
// Host side

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("gradops segment_gram_cuda: ") + what + ": " +
                             cudaGetErrorString(err));
}

template <typename Elem, int R, int JN, bool kCounts>
void launch_pieces(const SegGramArgs& a, const Plan& plan, float* ws_gram, int* ws_opp,
                   int* ws_both, cudaStream_t stream) {
  const auto kernel = segment_gram_pieces_kernel<Elem, R, JN, kCounts>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  int(plan.smem_bytes)),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  kernel<<<dim3(unsigned(plan.NC)), dim3(kThreads), plan.smem_bytes, stream>>>(
      a.J, a.row_stride, a.offsets, a.L, a.P, plan, ws_gram, ws_opp, ws_both);
  check_cuda(cudaGetLastError(), "launch of segment_gram_pieces_kernel");
}

template <typename Elem, bool kCounts>
void launch_pieces_r(const SegGramArgs& a, const Plan& plan, float* wg, int* wo, int* wb,
                     cudaStream_t s) {
  // The (R, JN) pairs chosen by make_plan.
  if (plan.R == 2) launch_pieces<Elem, 2, 32, kCounts>(a, plan, wg, wo, wb, s);
  else if (plan.R == 4) launch_pieces<Elem, 4, 16, kCounts>(a, plan, wg, wo, wb, s);
  else if (plan.JN == 8) launch_pieces<Elem, 8, 8, kCounts>(a, plan, wg, wo, wb, s);
  else launch_pieces<Elem, 8, 4, kCounts>(a, plan, wg, wo, wb, s);
}

template <bool kCounts>
void launch_pieces_dtype(const SegGramArgs& a, const Plan& plan, float* wg, int* wo, int* wb,
                         cudaStream_t s) {
  switch (a.dtype) {
    case DType::F32: launch_pieces_r<float, kCounts>(a, plan, wg, wo, wb, s); break;
    case DType::BF16: launch_pieces_r<__nv_bfloat16, kCounts>(a, plan, wg, wo, wb, s); break;
    case DType::F16: launch_pieces_r<__half, kCounts>(a, plan, wg, wo, wb, s); break;
    default: throw std::invalid_argument("gradops segment_gram_cuda: unsupported dtype");
  }
}

}  // namespace

size_t segment_gram_cuda_workspace_bytes(int64_t T, int64_t P, int64_t L, bool with_counts,
                                         int num_sms) {
  return make_plan(T, P, L, with_counts, num_sms).workspace_bytes;
}

void segment_gram_cuda(const SegGramArgs& a, void* workspace, int num_sms, void* stream) {
  const bool with_counts = a.opposite != nullptr;
  if (with_counts != (a.both_nonzero != nullptr))
    throw std::invalid_argument(
        "gradops segment_gram_cuda: opposite and both_nonzero must both be set or both null");
  const Plan plan = make_plan(a.T, a.P, a.L, with_counts, num_sms);
  if (plan.NC > INT_MAX || a.L > INT_MAX)
    throw std::invalid_argument(
        "gradops segment_gram_cuda: too many chunks or segments for one grid");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);

  // Workspace: [slots][E] fp32 partial Grams, then (counts) [slots][E] int32 opposite, both.
  float* ws_gram = static_cast<float*>(workspace);
  int* ws_opp = with_counts ? reinterpret_cast<int*>(ws_gram + plan.slots * plan.E) : nullptr;
  int* ws_both = with_counts ? ws_opp + plan.slots * plan.E : nullptr;

  if (plan.NC > 0) {
    if (with_counts) launch_pieces_dtype<true>(a, plan, ws_gram, ws_opp, ws_both, s);
    else launch_pieces_dtype<false>(a, plan, ws_gram, ws_opp, ws_both, s);
  }

  const dim3 grid(unsigned(a.L), unsigned((plan.T * plan.T + kThreads - 1) / kThreads));
  if (with_counts) {
    segment_gram_finalize_kernel<true><<<grid, dim3(kThreads), 0, s>>>(
        a.offsets, plan.T, plan.E, plan.CH, ws_gram, ws_opp, ws_both, a.gram, a.opposite,
        a.both_nonzero);
  } else {
    segment_gram_finalize_kernel<false><<<grid, dim3(kThreads), 0, s>>>(
        a.offsets, plan.T, plan.E, plan.CH, ws_gram, ws_opp, ws_both, a.gram, a.opposite,
        a.both_nonzero);
  }
  check_cuda(cudaGetLastError(), "launch of segment_gram_finalize_kernel");
}

}  // namespace gradops
