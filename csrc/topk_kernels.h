// gradops: plain-pointer interface of the per-neuron top-K magnitude selection (docs/methods.md#sparse-training;
// csrc/topk_cpu.cpp). No torch headers; csrc/bindings.cpp wraps it.
//
// W is viewed as [R, F] (row r = output neuron r, unit column stride). In each row the K entries of
// largest |W| are kept, magnitudes compared in fp64 for fp64 W and in fp32 otherwise, equal
// magnitudes broken by the lower column index, NaN ranked largest (above +inf; NaNs tie): bit for
// bit the mask of
// gradops.reference.topk_mask_reference (a stable descending sort).
#pragma once
#include <cstdint>

namespace gradops {

enum class TopkDType : int { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };

struct TopkArgs {
  const void* W;            // address of W[0, 0]
  TopkDType dtype;
  int64_t R, F;             // rows >= 0, fan-in >= 1
  int64_t row_stride;       // elements between rows; column stride is 1
  int64_t K;                // 1 <= K <= F
  bool* mask;               // [R, F] row-major (true = kept), or nullptr
  int32_t* idx;             // [R, K] row-major, kept columns increasing, or nullptr
};

// OpenMP over rows; the result depends on nothing but the inputs.
void topk_cpu(const TopkArgs& a);

}  // namespace gradops
