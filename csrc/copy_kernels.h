// gradops: plain-pointer interface of the streaming copy (csrc/copy_cpu.cpp).
#pragma once
#include <cstdint>

namespace gradops {

// dst[0, bytes) = src[0, bytes) for non-overlapping buffers. Large copies (see copy_cpu.cpp) use
// non-temporal stores and OpenMP threads: the destination is written without first being read
// into the cache (no read-for-ownership), which is what a copy into a buffer much larger than the
// cache wants. Small copies are a plain memcpy.
void stream_copy_cpu(void* dst, const void* src, int64_t bytes);

}  // namespace gradops
