// gradops: plain-pointer interface of SparseAdamW's packed update (csrc/sparse_adamw_cpu.cpp).
// No torch headers; csrc/bindings.cpp wraps it.
//
// p and grad ([R, C] contiguous, same element type) are updated / read at the R*K positions
// (r, idx[r, j]); the fp32 moments m, v (and vmax with amsgrad) are [R, K] contiguous. Per
// selected entry, in fp32, in this order (torch.optim.AdamW's single-tensor path as torch's CPU
// kernels evaluate it, see the .cpp):
//   g = grad (negated if maximize);  w = p
//   w = w * decay                                  (only if has_decay)
//   m = lerp(m, g, lerp_w)                         (torch's lerp: one fma)
//   v = v * beta2;  v = fma(one_minus_beta2 * g, g, v)   (torch's addcmul)
//   vmax = maximum(vmax, v)                        (amsgrad)
//   denom = sqrt(v or vmax) / bc2_sqrt + eps       (sqrt: `sqrt_fn`, see below)
//   w = w + (neg_step_size * m) / denom            (torch's addcdiv)
//   p = w (rounded to p's type)
#pragma once
#include <cstdint>

#include "gram_kernels.h"  // DType

namespace gradops {

// out[i] = sqrt(in[i]) for i < n (n <= 4096), elementwise: the result of an element must not depend
// on n or on its position. The bindings pass torch's own CPU sqrt where it is not the IEEE one
// (MKL's vmsSqrt in MKL builds of torch); nullptr: IEEE (correctly rounded) sqrt.
using SqrtFn = void (*)(const float* in, float* out, int64_t n);

struct SparseAdamWArgs {
  void* p;                  // [R, C] contiguous, element type `dtype`
  const void* grad;         // [R, C] contiguous, element type `dtype`
  DType dtype;
  const void* idx;          // [R, K] contiguous, int32 (idx64 false) or int64, each in [0, C)
  bool idx64;
  int64_t R, K, C;
  float* m;                 // [R, K] fp32
  float* v;                 // [R, K] fp32
  float* vmax;              // [R, K] fp32, or nullptr (no amsgrad)
  bool has_decay;           // weight_decay != 0
  float decay;              // 1 - lr * weight_decay
  float lerp_w;             // 1 - beta1
  float beta2, one_minus_beta2;
  float bc2_sqrt;           // sqrt(1 - beta2 ** step)
  float eps;
  float neg_step_size;      // -lr / (1 - beta1 ** step)
  bool maximize;
  SqrtFn sqrt_fn;           // or nullptr
};

// The number of idx entries outside [0, C) (the update must not run unless 0).
int64_t sparse_adamw_index_errors(const SparseAdamWArgs& a);
void sparse_adamw_cpu(const SparseAdamWArgs& a);

}  // namespace gradops
