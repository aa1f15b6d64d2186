// gradops CPU kernel: per-neuron top-K magnitude masks / packed indices (docs/methods.md#sparse-training). Interface and
// semantics: topk_kernels.h.
//
// Keys. Each entry becomes an unsigned key that orders like its magnitude: non-negative floats
// order like their bit patterns, so the key is the bit pattern of |x| with NaN clamped to the
// pattern just above +inf (unsigned min with 0x7f800001: every NaN pattern is at or above it), so
// NaN ranks largest, above +inf, and all NaNs tie (as torch.sort orders them). fp32: a uint32
// key. bf16 and fp16 convert to fp32 exactly and monotonically, so their keys are their own 15-bit
// magnitude patterns (NaN clamped to 0x7f81 / 0x7c01), shifted left by 16. fp64: a uint64 key of
// the fp64 magnitude (NaN -> 0x7ff0000000000001), compared in fp64 as the reference does. Equal
// keys are exactly the equal magnitudes (all NaNs included).
//
// Selection, per row (no sort): one pass computes the keys into a thread-local buffer with their
// min and max; one pass histograms the top 12 bits of the keys (uint32 keys: sign 0, 8 exponent
// bits, 3 mantissa bits, buckets of 1/8 octave; uint64 keys: sign 0 and the 11 exponent bits, an
// octave; only the bins between the min and max key are cleared);
// the bins are summed from the top until the K-th largest key's bin b is found (`above` keys lie
// in higher bins); the keys of bin b are copied out (SSE2 compares, eight keys a step) and
// `std::nth_element` finds the threshold
// `thr` = the K-th largest key among all. Then one pass writes the row: keep key > thr and, of
// the keys == thr, the first (K - #{key > thr}) by column index (when every tie is kept, which is
// the usual case, the pass is a plain `key >= thr`). The packed indices are the kept columns in
// increasing order (written branch-free into a thread-local buffer, then copied).
//
// Threads: OpenMP over rows (dynamic chunks of whole rows); a row's result depends only on the
// row, so the output is independent of the thread count.
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "topk_kernels.h"

namespace gradops {
namespace {

constexpr uint32_t kNanKey = 0x7f800001u;               // just above +inf's 0x7f800000
constexpr uint64_t kNanKey64 = 0x7ff0000000000001ull;    // just above +inf's 0x7ff0...0
constexpr int64_t kBins = int64_t{1} << 12;
// Bins: the top 12 bits of a key (sign 0, then the exponent's top bits).
template <typename Key>
constexpr int kBinShift = static_cast<int>(8 * sizeof(Key)) - 12;

template <TopkDType D>
using KeyOf = std::conditional_t<D == TopkDType::F64, uint64_t, uint32_t>;
// Calls with fewer entries than this run on one thread (thread start-up costs more).
constexpr int64_t kParallelMin = int64_t{1} << 15;
// Entries per dynamic chunk of rows (a chunk is at least one row).
constexpr int64_t kChunkEntries = int64_t{1} << 14;

// keys[i] for i < F and their min / max; `row` is the row's first element.
template <TopkDType D>
void row_keys(const void* row, int64_t F, KeyOf<D>* keys, KeyOf<D>& kmin, KeyOf<D>& kmax) {
  KeyOf<D> lo = ~KeyOf<D>{0}, hi = 0;
  if constexpr (D == TopkDType::F32) {
    const uint32_t* x = static_cast<const uint32_t*>(row);
    for (int64_t i = 0; i < F; ++i) {
      const uint32_t k = std::min(x[i] & 0x7fffffffu, kNanKey);
      keys[i] = k;
      lo = std::min(lo, k);
      hi = std::max(hi, k);
    }
  } else if constexpr (D == TopkDType::F64) {
    const uint64_t* x = static_cast<const uint64_t*>(row);
    for (int64_t i = 0; i < F; ++i) {
      const uint64_t k = std::min<uint64_t>(x[i] & 0x7fffffffffffffffull, kNanKey64);
      keys[i] = k;
      lo = std::min(lo, k);
      hi = std::max(hi, k);
    }
  } else {
    constexpr uint32_t nan16 = D == TopkDType::BF16 ? 0x7f81u : 0x7c01u;
    const uint16_t* x = static_cast<const uint16_t*>(row);
    for (int64_t i = 0; i < F; ++i) {
      const uint32_t k = std::min(static_cast<uint32_t>(x[i] & 0x7fffu), nan16) << 16;
      keys[i] = k;
      lo = std::min(lo, k);
      hi = std::max(hi, k);
    }
  }
  kmin = lo;
  kmax = hi;
}

template <typename Key>
struct Scratch {
  std::vector<Key> keys, cand;
  std::vector<uint32_t> hist;     // two interleaved histograms (even / odd columns)
  std::vector<int32_t> cols;
  Scratch(int64_t F, int64_t K) : keys(F), cand(F), hist(2 * kBins), cols(K + 1) {}
};

// Copies the keys whose top 12 bits are `bin` to c (in column order); returns how many.
template <typename Key>
int64_t compact_bin(const Key* keys, int64_t F, uint32_t bin, Key* c) {
  int64_t n = 0, i = 0;
  constexpr int shift = kBinShift<Key>;
#if defined(__SSE2__)
  if constexpr (sizeof(Key) == 4) {
  // eight keys per step; the bin usually holds a few percent of the row, so most steps find none
  const __m128i bv = _mm_set1_epi32(static_cast<int>(bin));
  for (; i + 8 <= F; i += 8) {
    const __m128i x0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keys + i));
    const __m128i x1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keys + i + 4));
    const __m128i e0 = _mm_cmpeq_epi32(_mm_srli_epi32(x0, shift), bv);
    const __m128i e1 = _mm_cmpeq_epi32(_mm_srli_epi32(x1, shift), bv);
    unsigned mm = static_cast<unsigned>(_mm_movemask_ps(_mm_castsi128_ps(e0))) |
                  static_cast<unsigned>(_mm_movemask_ps(_mm_castsi128_ps(e1))) << 4;
    while (mm != 0) {
      c[n++] = keys[i + __builtin_ctz(mm)];
      mm &= mm - 1;
    }
  }
  }
#endif
  for (; i < F; ++i) {
    c[n] = keys[i];
    n += static_cast<uint32_t>(keys[i] >> shift) == bin;
  }
  return n;
}

template <typename Key>
struct Threshold {
  Key thr;          // the K-th largest key
  int64_t room;     // keys == thr to keep (the lowest-index ones), >= 1
  bool all_ties;    // room == #{key == thr}: keep exactly key >= thr
};

// The K-th largest of keys[0, F) (1 <= K < F) and how many of its ties are kept.
template <typename Key>
Threshold<Key> select(const Key* keys, int64_t F, int64_t K, Key kmin, Key kmax,
                      Scratch<Key>& s) {
  constexpr int shift = kBinShift<Key>;
  const int64_t lo = static_cast<int64_t>(kmin >> shift), hi = static_cast<int64_t>(kmax >> shift);
  // two histograms (even / odd columns): fewer stalls on consecutive increments of one bin
  uint32_t* h0 = s.hist.data();
  uint32_t* h1 = h0 + kBins;
  std::fill(h0 + lo, h0 + hi + 1, 0u);
  std::fill(h1 + lo, h1 + hi + 1, 0u);
  int64_t i = 0;
  for (; i + 2 <= F; i += 2) {
    ++h0[keys[i] >> shift];
    ++h1[keys[i + 1] >> shift];
  }
  if (i < F) ++h0[keys[i] >> shift];
  int64_t above = 0, b = hi;
  // stops at lo at the latest: the counts sum to F >= K
  while (above + h0[b] + h1[b] < K) {
    above += h0[b] + h1[b];
    --b;
  }
  const int64_t need = K - above;             // 1 <= need <= count of bin b
  Key* c = s.cand.data();
  const int64_t n = compact_bin<Key>(keys, F, static_cast<uint32_t>(b), c);
  Key thr;
  if (need == n) {
    thr = *std::min_element(c, c + n);
  } else if (need == 1) {
    thr = *std::max_element(c, c + n);
  } else {
    std::nth_element(c, c + (need - 1), c + n, std::greater<Key>());
    thr = c[need - 1];
  }
  int64_t gt = 0, eq = 0;
  for (int64_t t = 0; t < n; ++t) {
    gt += c[t] > thr;
    eq += c[t] == thr;
  }
  const int64_t room = need - gt;
  return {thr, room, room == eq};
}

template <bool WithMask, bool WithIdx, typename Key>
void write_row(const Key* keys, int64_t F, int64_t K, const Threshold<Key>& t, bool* mask,
               int32_t* idx, int32_t* cols) {
  const Key thr = t.thr;
  if (t.all_ties) {
    if constexpr (WithMask) {
      for (int64_t i = 0; i < F; ++i) mask[i] = keys[i] >= thr;
    }
    if constexpr (WithIdx) {
      int64_t pos = 0;
      for (int64_t i = 0; i < F; ++i) {
        cols[pos] = static_cast<int32_t>(i);
        pos += keys[i] >= thr;
      }
    }
  } else {
    int64_t taken = 0, pos = 0;
    const int64_t room = t.room;
    for (int64_t i = 0; i < F; ++i) {
      const Key k = keys[i];
      const bool eq = k == thr;
      const bool keep = (k > thr) | (eq & (taken < room));
      taken += eq;
      if constexpr (WithMask) mask[i] = keep;
      if constexpr (WithIdx) {
        cols[pos] = static_cast<int32_t>(i);
        pos += keep;
      }
    }
  }
  if constexpr (WithIdx) std::memcpy(idx, cols, static_cast<size_t>(K) * sizeof(int32_t));
}

template <TopkDType D, bool WithMask, bool WithIdx>
void topk_rows(const TopkArgs& a) {
  const int64_t R = a.R, F = a.F, K = a.K;
  constexpr int64_t esize = D == TopkDType::F32 ? 4 : D == TopkDType::F64 ? 8 : 2;
  const char* base = static_cast<const char*>(a.W);
  const int64_t chunk = std::max<int64_t>(1, kChunkEntries / F);
#pragma omp parallel if (R > 1 && R * F >= kParallelMin)
  {
    Scratch<KeyOf<D>> s(F, K);
#pragma omp for schedule(dynamic, chunk)
    for (int64_t r = 0; r < R; ++r) {
      KeyOf<D> kmin, kmax;
      row_keys<D>(base + r * a.row_stride * esize, F, s.keys.data(), kmin, kmax);
      const Threshold<KeyOf<D>> t = select<KeyOf<D>>(s.keys.data(), F, K, kmin, kmax, s);
      write_row<WithMask, WithIdx>(s.keys.data(), F, K, t, WithMask ? a.mask + r * F : nullptr,
                                   WithIdx ? a.idx + r * K : nullptr, s.cols.data());
    }
  }
}

// K == F: every entry kept.
void keep_all(const TopkArgs& a) {
  if (a.mask != nullptr) std::memset(a.mask, 1, static_cast<size_t>(a.R * a.F));
  if (a.idx != nullptr) {
    for (int64_t r = 0; r < a.R; ++r)
      for (int64_t j = 0; j < a.F; ++j) a.idx[r * a.F + j] = static_cast<int32_t>(j);
  }
}

template <TopkDType D>
void topk_dispatch(const TopkArgs& a) {
  if (a.mask != nullptr && a.idx != nullptr) {
    topk_rows<D, true, true>(a);
  } else if (a.mask != nullptr) {
    topk_rows<D, true, false>(a);
  } else if (a.idx != nullptr) {
    topk_rows<D, false, true>(a);
  }
}

}  // namespace

void topk_cpu(const TopkArgs& a) {
  if (a.R <= 0 || a.K <= 0 || (a.mask == nullptr && a.idx == nullptr)) return;
  if (a.K >= a.F) {
    keep_all(a);
    return;
  }
  switch (a.dtype) {
    case TopkDType::F32: topk_dispatch<TopkDType::F32>(a); break;
    case TopkDType::BF16: topk_dispatch<TopkDType::BF16>(a); break;
    case TopkDType::F16: topk_dispatch<TopkDType::F16>(a); break;
    case TopkDType::F64: topk_dispatch<TopkDType::F64>(a); break;
  }
}

}  // namespace gradops
