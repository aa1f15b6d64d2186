// gradops: plain-pointer interface of the streaming copy (csrc/copy_cpu.cpp).
#pragma once
#include <cstdint>

namespace gradops {

// One copy: dst[0, bytes) = src[0, bytes), the buffers not overlapping.
struct CopyPair {
  void* dst;
  const void* src;
  int64_t bytes;
};

// Runs all n copies in one OpenMP parallel region. Large copies (see copy_cpu.cpp) write their
// destination with non-temporal stores: it is not read into the cache first (no read for
// ownership), which is what a copy into a buffer much larger than the cache wants. Small ones are
// a plain memcpy.
void stream_copy_cpu(const CopyPair* pairs, int64_t n);

}  // namespace gradops
