// gradops: plain-pointer interface of the element-wise combination kernels
// (weighted combination and GradDrop). No torch headers; csrc/bindings.cpp wraps them.
//
//   combine  (docs/methods.md#combine, second pass of every Gram-weighted method):
//       out[k] = sum_t w[l(k), t] * J[t, k]        (l(k): the segment of column k; L = 1: one w)
//   graddrop (docs/methods.md#graddrop, Chen et al. "Just Pick a Sign", parameter-gradient variant, TorchJD's):
//       S_k = sum_t J[t,k],  A_k = sum_t |J[t,k]|,  p_k = 0.5 * (1 + S_k / ((1 + eps) A_k))
//       (p_k = 0.5 where A_k = 0: a column of zeros; eps is relative, so p is scale-free),
//       U_k ~ U(0,1),  M[t,k] = [p_k > U_k][J[t,k] > 0] + [p_k < U_k][J[t,k] < 0],
//       out[k] = sum_t (leak[t] + (1 - leak[t]) * M[t,k]) * J[t,k]
// Both read J once and write out once; fp32 math whatever the input dtype. Every term is
// multiplied and added even when its weight is 0, so NaN/Inf in J always reach `out`.
#pragma once
#include <cstdint>

#include "gram_kernels.h"  // DType

namespace gradops {

struct CombineArgs {
  const void* J;            // address of J[0, 0]
  DType dtype;              // J's element type
  int64_t T, P;
  int64_t row_stride;       // elements between rows; column stride is 1
  const float* weights;     // [L, T] row-major, fp32
  const int64_t* offsets;   // [L + 1] validated segment table (host memory), or nullptr when L == 1
  int64_t L;
  void* out;                // [P], contiguous, element type out_dtype (fp32, bf16 or fp16);
  DType out_dtype;          // may alias nothing in J
};

// Counter-based uniform numbers shared by every backend: U_k is word k % 4 of Philox4x32-10 at
// counter (j_lo, j_hi, 0, 0), j = k / 4, key (seed_lo, seed_hi), read as int32 x, x < 0 ? ~x : x,
// times 4.6566127342e-10f; bit-identical to Triton's `tl.rand4x(seed, k // 4)[k % 4]`.
struct GradDropArgs {
  const void* J;
  DType dtype;
  int64_t T, P;
  int64_t row_stride;
  const float* leak;        // [T] fp32, each in [0, 1]
  const float* noise;       // [P] fp32 U_k given by the caller, or nullptr: use Philox below
  uint64_t seed;            // Philox key
  float eps;                // relative: the purity's S / A is divided by 1 + eps
  void* out;                // [P], element type out_dtype
  DType out_dtype;
  bool* mask;               // [T, P] row-major (the M above), or nullptr
};

void combine_cpu(const CombineArgs& a);
void graddrop_cpu(const GradDropArgs& a);
float philox_uniform(uint64_t seed, uint64_t column);  // U_k of column k, exposed for tests

}  // namespace gradops
