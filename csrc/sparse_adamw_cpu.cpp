// gradops CPU kernel: SparseAdamW's update of the selected entries (gradops/optim/sparse_adamw.py).
// Interface and per-entry formula: sparse_adamw_kernels.h.
//
// Arithmetic. The same fp32 operations, in the same order, as the torch path (`_update_torch`),
// as torch's CPU kernels evaluate them on x86 with AVX2/AVX-512 (checked against torch 2.14):
//   w.mul_(decay)                 w * decay                       (scalar rounded to fp32)
//   m.lerp_(g, lerp_w)            fma(lerp_w, g - m, m)            |lerp_w| < 0.5
//                                 fma(lerp_w - 1, g - m, g)        otherwise (torch's lerp_vec)
//   v.mul_(beta2).addcmul_(g, g, value=c)   v * beta2, then fma(c * g, g, v)  (torch's addcmul
//                                 `self + c * t1 * t2` is contracted to one fma in its kernels)
//   torch.maximum(vmax, v)        max, NaN if either is NaN
//   sqrt(.).div_(bc2).add_(eps)   sqrt(s) / bc2 + eps              (sqrt: torch.sqrt's, below)
//   w.addcdiv_(m, d, value=-ss)   w + (-ss * m) / d
// The two fmas are explicit; every other product is rounded on its own: this file is compiled
// with fp contraction off (the pragma below: GCC would otherwise fuse e.g. `w * decay + q` into
// one fma, which the torch path does not), so the results equal the torch path bit for bit (up to
// NaN payloads). The scalar (tail / portable) and AVX2 paths do the same IEEE operations, so
// every entry's result is independent of its lane, of the chunking and of the thread count.
//
// Square roots: torch.sqrt on CPU float tensors is MKL's vmsSqrt in MKL builds of torch, which is
// not always correctly rounded; the bindings pass it as `sqrt_fn` (IEEE sqrt when there is none).
// It is elementwise (an entry's result does not depend on the call's length or its position), so
// each chunk takes its square roots in one call between two phases.
//
// Memory: the table is cut into fixed chunks of kChunk entries (OpenMP, static schedule). Per
// chunk: phase 1 gathers grad at the selected positions (scalar loads, converted to fp32) and
// updates the moments (read / written contiguously), eight entries at a time with AVX2 + FMA
// (scalar for the tail, and on CPUs without AVX2/FMA), keeping the values whose sqrt the
// denominators take; one sqrt_fn call; phase 2 gathers p, updates the weights and scatters them
// back (scalar stores). The chunk's positions and square roots stay in per-thread buffers (L2).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "sparse_adamw_kernels.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#define GRADOPS_AVX2FMA __attribute__((target("avx2,fma")))
#define GRADOPS_INLINE inline __attribute__((always_inline))

namespace gradops {
namespace {

// Entries of the flat [R*K] table per OpenMP chunk, and the smallest table worth threads.
constexpr int64_t kChunk = 4096;
constexpr int64_t kParallelMin = int64_t{1} << 15;

inline uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline float float_of(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// Conversions as in combine_cpu.cpp: bf16/fp16 -> fp32 exact; fp32 -> bf16/fp16 round to
// nearest even, overflow to Inf, NaN stays a (quiet) NaN.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return float_of(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return float_of(sign | ((exp + 112) << 23) | (man << 13));
  return float_of(bits_of(static_cast<float>(man) * 0x1p-24f) | sign);
}

inline uint16_t float_to_bf16(float f) {
  const uint32_t b = bits_of(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

inline uint16_t float_to_half(float f) {
  const uint32_t b = bits_of(f);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t ab = b & 0x7fffffffu;
  uint32_t h;
  if (ab > 0x7f800000u) {
    h = 0x7e00u | ((ab >> 13) & 0x3ffu);
  } else if (ab >= 0x477ff000u) {
    h = 0x7c00u;
  } else if (ab >= 0x38800000u) {
    h = (ab - 0x38000000u + 0xfffu + ((ab >> 13) & 1u)) >> 13;
  } else {
    h = bits_of(float_of(ab) + 0.5f) - 0x3f000000u;
  }
  return static_cast<uint16_t>(sign | h);
}

template <DType D>
inline float load_at(const void* base, int64_t pos) {
  if constexpr (D == DType::F32) {
    return static_cast<const float*>(base)[pos];
  } else {
    const uint16_t h = static_cast<const uint16_t*>(base)[pos];
    return D == DType::F16 ? half_to_float(h) : float_of(static_cast<uint32_t>(h) << 16);
  }
}

template <DType D>
inline void store_at(void* base, int64_t pos, float w) {
  if constexpr (D == DType::F32) {
    static_cast<float*>(base)[pos] = w;
  } else {
    static_cast<uint16_t*>(base)[pos] = D == DType::F16 ? float_to_half(w) : float_to_bf16(w);
  }
}

// The hyper-parameters of one call, as fp32 (torch rounds its Python-float scalars the same way).
struct Hyper {
  bool has_decay, lerp_low, maximize;
  float decay, lerp_w, lerp_w1, beta2, omb2, bc2, eps, nss;
};

Hyper hyper_of(const SparseAdamWArgs& a) {
  Hyper h;
  h.has_decay = a.has_decay;
  h.maximize = a.maximize;
  h.decay = a.decay;
  h.lerp_w = a.lerp_w;
  h.lerp_w1 = a.lerp_w - 1.0f;
  h.lerp_low = std::fabs(a.lerp_w) < 0.5f;
  h.beta2 = a.beta2;
  h.omb2 = a.one_minus_beta2;
  h.bc2 = a.bc2_sqrt;
  h.eps = a.eps;
  h.nss = a.neg_step_size;
  return h;
}

// torch.maximum(x, y) on fp32 as its x86 kernels compute it: max_ps(x, y), NaN (all-ones
// pattern) if either is NaN.
inline float torch_maximum(float x, float y) {
  if (std::isnan(x) || std::isnan(y)) return float_of(0xffffffffu);
  return x > y ? x : y;
}

// Phase 1 of one entry: the moments, and in `s` the value whose sqrt the denominator takes.
template <bool AMS>
inline void moments1(float g, float* m, float* v, float* vmax, float* s, const Hyper& h) {
  const float mo = *m;
  const float d = g - mo;
  const float mn = h.lerp_low ? std::fma(h.lerp_w, d, mo) : std::fma(h.lerp_w1, d, g);
  float vn = *v * h.beta2;
  const float cg = h.omb2 * g;
  vn = std::fma(cg, g, vn);
  float x = vn;
  if constexpr (AMS) {
    x = torch_maximum(*vmax, vn);
    *vmax = x;
  }
  *m = mn;
  *v = vn;
  *s = x;
}

// Phase 2 of one entry: the weight, from the new m and sq = sqrt(s).
inline void weight1(float& w, float m, float sq, const Hyper& h) {
  if (h.has_decay) w = w * h.decay;
  const float denom = sq / h.bc2 + h.eps;
  const float q = h.nss * m;
  w = w + q / denom;
}

template <bool AMS>
GRADOPS_AVX2FMA inline void moments8(const float* g, float* m, float* v, float* vmax, float* s,
                                     const Hyper& h) {
  const __m256 G = _mm256_loadu_ps(g);
  const __m256 M = _mm256_loadu_ps(m);
  const __m256 D = _mm256_sub_ps(G, M);
  const __m256 Mn = h.lerp_low ? _mm256_fmadd_ps(_mm256_set1_ps(h.lerp_w), D, M)
                               : _mm256_fmadd_ps(_mm256_set1_ps(h.lerp_w1), D, G);
  __m256 V = _mm256_mul_ps(_mm256_loadu_ps(v), _mm256_set1_ps(h.beta2));
  V = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(h.omb2), G), G, V);
  __m256 X = V;
  if constexpr (AMS) {
    const __m256 Y = _mm256_loadu_ps(vmax);
    X = _mm256_or_ps(_mm256_max_ps(Y, V), _mm256_cmp_ps(Y, V, _CMP_UNORD_Q));
    _mm256_storeu_ps(vmax, X);
  }
  _mm256_storeu_ps(m, Mn);
  _mm256_storeu_ps(v, V);
  _mm256_storeu_ps(s, X);
}

GRADOPS_AVX2FMA inline void weight8(float* w, const float* m, const float* sq, const Hyper& h) {
  __m256 W = _mm256_loadu_ps(w);
  if (h.has_decay) W = _mm256_mul_ps(W, _mm256_set1_ps(h.decay));
  const __m256 Den = _mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(sq), _mm256_set1_ps(h.bc2)),
                                   _mm256_set1_ps(h.eps));
  const __m256 Q = _mm256_mul_ps(_mm256_set1_ps(h.nss), _mm256_loadu_ps(m));
  _mm256_storeu_ps(w, _mm256_add_ps(W, _mm256_div_ps(Q, Den)));
}

// IEEE sqrt (the fallback when the bindings pass no sqrt_fn).
GRADOPS_AVX2FMA void sqrt_avx2(const float* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_sqrt_ps(_mm256_loadu_ps(in + i)));
  for (; i < n; ++i) out[i] = std::sqrt(in[i]);
}

void sqrt_portable(const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = std::sqrt(in[i]);
}

// Positions of table entries [s, s + n) in p / grad, advancing the running (row, j).
template <class I>
inline void positions(const I* idx, int64_t s, int64_t n, int64_t K, int64_t C, int64_t& r,
                      int64_t& j, int64_t* pos) {
  for (int64_t t = 0; t < n; ++t) {
    pos[t] = r * C + static_cast<int64_t>(idx[s + t]);
    if (++j == K) {
      j = 0;
      ++r;
    }
  }
}

// Per-thread buffers of one chunk.
struct Buffers {
  std::vector<int64_t> pos;
  std::vector<float> s, sq;
  Buffers() : pos(kChunk), s(kChunk), sq(kChunk) {}
};

// Table entries [s0, s1) (at most kChunk): phase 1 (gather grad, moments), the sqrts of the
// chunk in one sqrt_fn call, phase 2 (gather p, weights, scatter p).
template <DType D, class I, bool AMS, bool Avx>
GRADOPS_INLINE void chunk_body(const SparseAdamWArgs& a, const Hyper& h, int64_t s0, int64_t s1,
                               Buffers& b, SqrtFn sqrt_fn) {
  const I* idx = static_cast<const I*>(a.idx);
  const int64_t n = s1 - s0;
  int64_t r = s0 / a.K, j = s0 - r * a.K;
  positions(idx, s0, n, a.K, a.C, r, j, b.pos.data());
  alignas(32) float buf[8];
  for (int64_t t = 0; t < n; t += 8) {
    const int64_t n8 = std::min<int64_t>(8, n - t);
    const int64_t* pos = b.pos.data() + t;
    for (int64_t u = 0; u < n8; ++u) {
      const float x = load_at<D>(a.grad, pos[u]);
      buf[u] = a.maximize ? -x : x;
    }
    float* m = a.m + s0 + t;
    float* v = a.v + s0 + t;
    float* vmax = AMS ? a.vmax + s0 + t : nullptr;
    bool done = false;
    if constexpr (Avx) {
      if (n8 == 8) {
        moments8<AMS>(buf, m, v, vmax, b.s.data() + t, h);
        done = true;
      }
    }
    if (!done) {
      for (int64_t u = 0; u < n8; ++u)
        moments1<AMS>(buf[u], m + u, v + u, AMS ? vmax + u : nullptr, b.s.data() + t + u, h);
    }
  }
  sqrt_fn(b.s.data(), b.sq.data(), n);
  for (int64_t t = 0; t < n; t += 8) {
    const int64_t n8 = std::min<int64_t>(8, n - t);
    const int64_t* pos = b.pos.data() + t;
    for (int64_t u = 0; u < n8; ++u) buf[u] = load_at<D>(a.p, pos[u]);
    const float* m = a.m + s0 + t;
    bool done = false;
    if constexpr (Avx) {
      if (n8 == 8) {
        weight8(buf, m, b.sq.data() + t, h);
        done = true;
      }
    }
    if (!done) {
      for (int64_t u = 0; u < n8; ++u) weight1(buf[u], m[u], b.sq[t + u], h);
    }
    for (int64_t u = 0; u < n8; ++u) store_at<D>(a.p, pos[u], buf[u]);
  }
}

template <DType D, class I, bool AMS>
GRADOPS_AVX2FMA void chunk_avx2(const SparseAdamWArgs& a, const Hyper& h, int64_t s0, int64_t s1,
                                Buffers& b) {
  chunk_body<D, I, AMS, true>(a, h, s0, s1, b, a.sqrt_fn ? a.sqrt_fn : &sqrt_avx2);
}

template <DType D, class I, bool AMS>
void chunk_portable(const SparseAdamWArgs& a, const Hyper& h, int64_t s0, int64_t s1,
                    Buffers& b) {
  chunk_body<D, I, AMS, false>(a, h, s0, s1, b, a.sqrt_fn ? a.sqrt_fn : &sqrt_portable);
}

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

using ChunkFn = void (*)(const SparseAdamWArgs&, const Hyper&, int64_t, int64_t, Buffers&);

template <DType D, class I, bool AMS>
ChunkFn pick_chunk() {
  return cpu_has_avx2_fma() ? &chunk_avx2<D, I, AMS> : &chunk_portable<D, I, AMS>;
}

template <DType D, class I>
ChunkFn pick_ams(bool ams) {
  return ams ? pick_chunk<D, I, true>() : pick_chunk<D, I, false>();
}

template <DType D>
ChunkFn pick_idx(bool idx64, bool ams) {
  return idx64 ? pick_ams<D, int64_t>(ams) : pick_ams<D, int32_t>(ams);
}

template <class I>
int64_t count_bad(const I* idx, int64_t N, int64_t C) {
  int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (N >= 4 * kParallelMin)
  for (int64_t s = 0; s < N; ++s) bad += (idx[s] < 0) | (idx[s] >= C);
  return bad;
}

}  // namespace

int64_t sparse_adamw_index_errors(const SparseAdamWArgs& a) {
  const int64_t N = a.R * a.K;
  if (N <= 0) return 0;
  return a.idx64 ? count_bad(static_cast<const int64_t*>(a.idx), N, a.C)
                 : count_bad(static_cast<const int32_t*>(a.idx), N, static_cast<int64_t>(a.C));
}

void sparse_adamw_cpu(const SparseAdamWArgs& a) {
  const int64_t N = a.R * a.K;
  if (N <= 0) return;
  const bool ams = a.vmax != nullptr;
  ChunkFn fn = nullptr;
  switch (a.dtype) {
    case DType::F32: fn = pick_idx<DType::F32>(a.idx64, ams); break;
    case DType::BF16: fn = pick_idx<DType::BF16>(a.idx64, ams); break;
    case DType::F16: fn = pick_idx<DType::F16>(a.idx64, ams); break;
  }
  const Hyper h = hyper_of(a);
  const int64_t chunks = (N + kChunk - 1) / kChunk;
#pragma omp parallel if (N >= kParallelMin)
  {
    Buffers b;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) fn(a, h, c * kChunk, std::min(N, (c + 1) * kChunk), b);
  }
}

}  // namespace gradops
