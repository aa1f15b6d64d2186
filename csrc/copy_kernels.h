// gradops: plain-pointer interface of the streaming copy (csrc/copy_cpu.cpp).
#pragma once
#include <cstdint>

namespace gradops {

// dst[0, bytes) = src[0, bytes), the buffers not overlapping. Large copies (see copy_cpu.cpp)
// write their destination with non-temporal stores from all OpenMP threads: it is not read into
// the cache first (no read for ownership), which is what a copy into a buffer much larger than the
// cache wants. Small ones are a plain memcpy.
void stream_copy_cpu(void* dst, const void* src, int64_t bytes);

}  // namespace gradops
