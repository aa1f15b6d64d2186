// gradops: plain-pointer interface of PCGrad's coefficient recurrence (csrc/pcgrad_cpu.cpp).
#pragma once
#include <cstdint>

namespace gradops {

// C[b] ([T, T], row-major) from the Grams G[b] and the visiting orders perms[b] (row i: the order
// in which task i visits the tasks, a permutation of 0..T-1), b < B. All arrays contiguous.
// self_visit: also visit j = i (LibMTL's convention); false: skip it (the paper's Alg. 1, TorchJD).
void pcgrad_coefficients_cpu(const float* G, const int64_t* perms, float* C, int64_t B, int64_t T,
                             float eps, bool self_visit);

}  // namespace gradops
