// gradops: a copy that writes its destination with non-temporal stores (MTLOptimizer's per-task
// rows of J, SPEC §0).
//
// MTLOptimizer copies every shared parameter's gradient of task t into its slice of row t of the
// [T, P] buffer J right after autograd computes it: the source is hot in the cache, the
// destination is cold and not read again before the Gram pass, T x P elements later. A plain
// copy loop (torch's copy_) first reads every destination line into the cache (read for
// ownership) and later writes it back: two memory transfers per line. Non-temporal stores write
// the line once. On the project's CPU machine this takes the T = 8 copies of a 4.2M-parameter
// encoder from 7.2 ms to 4.9 ms per step.
//
// Bytes are copied as they are (any dtype). MTLOptimizer copies one gradient per call, while it
// is still in cache (copying a task's gradients together at the end of its backward measured
// slower).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "copy_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gradops {
namespace {

// Below this size a copy is one memcpy work item (regular stores).
constexpr int64_t kStreamMinBytes = int64_t{1} << 18;
// Bytes per OpenMP work item.
constexpr int64_t kChunkBytes = int64_t{1} << 16;

__attribute__((target("avx2"))) void stream_range_avx2(char* dst, const char* src, int64_t n) {
  // dst is 32-byte aligned and n a multiple of 128
  for (int64_t k = 0; k < n; k += 128) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k + 64));
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + k), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + k + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + k + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + k + 96), d);
  }
}

void stream_range_sse2(char* dst, const char* src, int64_t n) {
  // dst is 16-byte aligned (32 here) and n a multiple of 128
  for (int64_t k = 0; k < n; k += 16) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + k), a);
  }
}

}  // namespace

void stream_copy_cpu(void* dst_v, const void* src_v, int64_t bytes) {
  if (bytes <= 0) return;
  char* dst = static_cast<char*>(dst_v);
  const char* src = static_cast<const char*>(src_v);
  if (bytes < kStreamMinBytes) {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
    return;
  }
  // The work list: the head that brings dst to a 32-byte boundary and the tail are memcpy'd, the
  // body in chunks of kChunkBytes is streamed.
  struct Item {
    char* dst;
    const char* src;
    int64_t bytes;
    bool stream;
  };
  std::vector<Item> items;
  const int64_t head = static_cast<int64_t>((32 - reinterpret_cast<uintptr_t>(dst) % 32) % 32);
  const int64_t body = (bytes - head) / 128 * 128;
  if (head > 0) items.push_back({dst, src, head, false});
  for (int64_t a = head; a < head + body; a += kChunkBytes)
    items.push_back({dst + a, src + a, std::min(kChunkBytes, head + body - a), true});
  if (head + body < bytes)
    items.push_back({dst + head + body, src + head + body, bytes - head - body, false});
  const int64_t m = static_cast<int64_t>(items.size());
  const bool avx2 = __builtin_cpu_supports("avx2");
  auto run = [&](const Item& it) {
    if (!it.stream) {
      std::memcpy(it.dst, it.src, static_cast<size_t>(it.bytes));
    } else if (avx2) {
      stream_range_avx2(it.dst, it.src, it.bytes);
    } else {
      stream_range_sse2(it.dst, it.src, it.bytes);
    }
  };
#pragma omp parallel
  {
#pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < m; ++c) run(items[c]);
    // non-temporal stores are weakly ordered: each thread fences its own before the region ends
    _mm_sfence();
  }
}

}  // namespace gradops
