// gradops: PCGrad's T x T coefficient recurrence on the CPU (docs/methods.md#pcgrad; Yu et al., "Gradient Surgery
// for Multi-Task Learning", NeurIPS 2020, Alg. 1 in its Gram form).
//
// Row i of C starts as e_i; for s = 0..T-1, with j = perms[i, s] (j = i skipped unless self_visit,
// LibMTL's convention; the paper's Alg. 1 takes j != i):
//   d = (C G)_{ij} = sum_k C[i, k] G[k, j],  den = G[j, j] + eps,
//   C[i, j] -= (d < 0 && den > 0) ? d / den : 0     (NaN d: d / den, so NaN propagates).
// The same arithmetic as the Triton kernel in gradops/ops/pcgrad.py (fp32, k summed in order). A
// few hundred flops at T = 8: the point of a C++ loop is to avoid T rounds of torch dispatch.
#include <cstdint>

#include "pcgrad_kernels.h"

namespace gradops {

void pcgrad_coefficients_cpu(const float* G, const int64_t* perms, float* C, int64_t B, int64_t T,
                             float eps, bool self_visit) {
  for (int64_t b = 0; b < B; ++b) {
    const float* Gb = G + b * T * T;
    for (int64_t i = 0; i < T; ++i) {
      float* c = C + (b * T + i) * T;
      const int64_t* order = perms + (b * T + i) * T;
      for (int64_t k = 0; k < T; ++k) c[k] = k == i ? 1.0f : 0.0f;
      for (int64_t s = 0; s < T; ++s) {
        const int64_t j = order[s];
        if (j == i && !self_visit) continue;
        float d = 0.0f;
        for (int64_t k = 0; k < T; ++k) d += c[k] * Gb[k * T + j];
        const float den = Gb[j * T + j] + eps;
        const float coef = d >= 0.0f ? 0.0f : (den > 0.0f ? d / den : 0.0f);
        c[j] -= coef;
      }
    }
  }
}

}  // namespace gradops
