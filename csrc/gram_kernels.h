// gradops: plain-pointer interface of the Gram-family kernels (no torch headers here, so the
// kernel files compile fast; csrc/bindings.cpp validates tensors and calls these).
//
// Math (docs/methods.md#gram): J is [T, P] (row t = flattened gradient of task t). For a segment table
// `offsets` ([L+1], int64, offsets[0]=0, offsets[L]=P, non-decreasing) the output is, per segment l,
//   gram[l, i, j]         = sum_{k in [offsets[l], offsets[l+1])} J[i,k] * J[j,k]     (fp32)
//   opposite[l, i, j]     = #{k in segment : J[i,k] != 0, J[j,k] != 0, sign(J[i,k]) != sign(J[j,k])}
//   both_nonzero[l, i, j] = #{k in segment : J[i,k] != 0 and J[j,k] != 0}
// (sign-conflict ratio of Elich et al. = opposite / both_nonzero). NaN entries are neither zero
// nor of a sign: they count in neither table, but propagate into gram.
//
// Determinism contract (both backends): the result depends only on the inputs (and, for CUDA, the
// device), never on thread count or scheduling: columns are cut into pieces at fixed positions,
// each piece reduced in a fixed order, pieces summed in a fixed order. No float atomics.
#pragma once
#include <cstddef>
#include <cstdint>

namespace gradops {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

struct SegGramArgs {
  const void* J;            // address of J[0, 0]; element type given by `dtype`
  DType dtype;
  int64_t T;                // rows (tasks), >= 1
  int64_t P;                // columns, >= 0 (may exceed 2^31: use int64 indexing everywhere)
  int64_t row_stride;       // elements between J[i, 0] and J[i+1, 0]; column stride is always 1
  const int64_t* offsets;   // [L + 1], already validated by the caller (host memory for the CPU
                            // kernel, device memory for the CUDA kernel)
  int64_t L;                // segments, >= 1
  float* gram;              // out [L, T, T] row-major, fully written (caller need not zero it)
  int64_t* opposite;        // out [L, T, T] or nullptr (then both_nonzero is nullptr too)
  int64_t* both_nonzero;    // out [L, T, T] or nullptr
};

// CPU (csrc/gram_cpu.cpp): OpenMP over column pieces; fp32 accumulation in the inner loops.
void segment_gram_cpu(const SegGramArgs& a);

// CUDA (csrc/gram_cuda.cu). Launches on `stream` (a cudaStream_t passed as void*), no host sync,
// no reads of `offsets` on the host. The caller allocates `workspace` of the size returned by
// segment_gram_cuda_workspace_bytes (device memory, any content) and keeps it alive until the
// work on `stream` is done (the torch caching allocator does this when allocated on that stream).
// `num_sms` is the device's multiprocessor count (used to size the column pieces).
size_t segment_gram_cuda_workspace_bytes(int64_t T, int64_t P, int64_t L, bool with_counts,
                                         int num_sms);
void segment_gram_cuda(const SegGramArgs& a, void* workspace, int num_sms, void* stream);

// Largest T the CUDA kernel supports (larger T: the caller falls back to another backend).
constexpr int64_t kCudaMaxT = 64;

}  // namespace gradops
