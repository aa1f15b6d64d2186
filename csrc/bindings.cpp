// gradops._C: thin torch bindings for the plain-pointer kernels in csrc/*.{cpp,cu}.
//
// User-facing validation (error messages naming the argument) happens in Python
// (gradops/_validate.py); the TORCH_CHECKs here only guard the kernels' own preconditions.
#include <torch/extension.h>

#include <tuple>

#include "combine_kernels.h"
#include "gram_kernels.h"
#include "pcgrad_kernels.h"

#ifdef GRADOPS_WITH_CUDA
// Only the light c10 headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a
// bare CUDA toolkit may lack.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

gradops::DType dtype_code(const at::Tensor& J) {
  switch (J.scalar_type()) {
    case at::kFloat: return gradops::DType::F32;
    case at::kBFloat16: return gradops::DType::BF16;
    case at::kHalf: return gradops::DType::F16;
    default: TORCH_CHECK(false, "gradops: J must be float32, bfloat16 or float16, got ", J.scalar_type());
  }
}

// J with unit column stride (a copy only when the columns are strided).
at::Tensor unit_column_stride(const at::Tensor& J) {
  TORCH_CHECK(J.dim() == 2, "gradops: J must be 2-D [T, P]");
  if (J.size(1) <= 1 || J.stride(1) == 1) return J;
  return J.contiguous();
}

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Result allocate(const at::Tensor& J, int64_t L, bool with_counts) {
  const int64_t T = J.size(0);
  auto G = at::empty({L, T, T}, J.options().dtype(at::kFloat));
  auto cnt_opts = J.options().dtype(at::kLong);
  auto opp = with_counts ? at::empty({L, T, T}, cnt_opts) : at::empty({0}, cnt_opts);
  auto nz = with_counts ? at::empty({L, T, T}, cnt_opts) : at::empty({0}, cnt_opts);
  return {G, opp, nz};
}

// The fields every kernel argument struct has for J: base pointer, dtype, shape, row stride.
template <class Args>
void set_matrix(Args& a, const at::Tensor& J) {
  a.J = J.data_ptr();
  a.dtype = dtype_code(J);
  a.T = J.size(0);
  a.P = J.size(1);
  a.row_stride = J.size(0) > 1 ? J.stride(0) : J.size(1);
}

gradops::SegGramArgs make_args(const at::Tensor& J, const at::Tensor& offsets, Result& out,
                               bool with_counts) {
  gradops::SegGramArgs a;
  set_matrix(a, J);
  a.offsets = offsets.data_ptr<int64_t>();
  a.L = offsets.numel() - 1;
  a.gram = std::get<0>(out).data_ptr<float>();
  a.opposite = with_counts ? std::get<1>(out).data_ptr<int64_t>() : nullptr;
  a.both_nonzero = with_counts ? std::get<2>(out).data_ptr<int64_t>() : nullptr;
  return a;
}

void check_offsets(const at::Tensor& J, const at::Tensor& offsets) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.numel() >= 2,
              "gradops: offsets must be a 1-D int64 tensor with at least 2 entries");
  TORCH_CHECK(offsets.device() == J.device(), "gradops: offsets must be on J's device");
}

// Per-segment Grams (and optional sign counts) of a CPU tensor J [T, P].
// offsets: int64 [L+1] on the CPU, already validated. Returns (gram [L,T,T] f32, opposite, both_nonzero),
// the last two empty unless with_counts.
Result segment_gram_cpu(const at::Tensor& J_in, const at::Tensor& offsets_in, bool with_counts) {
  TORCH_CHECK(J_in.device().is_cpu(), "gradops: segment_gram_cpu needs a CPU tensor");
  auto J = unit_column_stride(J_in);
  auto offsets = offsets_in.contiguous();
  check_offsets(J, offsets);
  Result out = allocate(J, offsets.numel() - 1, with_counts);
  auto args = make_args(J, offsets, out, with_counts);
  {
    pybind11::gil_scoped_release no_gil;
    gradops::segment_gram_cpu(args);
  }
  return out;
}

// out = w^T J (weights [1, T]) or per segment (weights [L, T] + offsets [L+1] on the CPU), written
// into `out` ([P], contiguous, fp32/bf16/fp16).
void combine_cpu(const at::Tensor& J_in, const at::Tensor& weights,
                 const c10::optional<at::Tensor>& offsets_in, at::Tensor& out) {
  TORCH_CHECK(J_in.device().is_cpu() && out.device().is_cpu(), "gradops: combine_cpu needs CPU tensors");
  auto J = unit_column_stride(J_in);
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.is_contiguous() && weights.dim() == 2 &&
              weights.size(1) == J.size(0), "gradops: combine_cpu weights must be contiguous f32 [L, T]");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 1 && out.size(0) == J.size(1),
              "gradops: combine_cpu out must be contiguous [P]");
  at::Tensor offsets;
  gradops::CombineArgs a;
  a.L = weights.size(0);
  a.offsets = nullptr;
  if (offsets_in.has_value()) {
    offsets = offsets_in->contiguous();
    check_offsets(J, offsets);
    TORCH_CHECK(offsets.numel() == a.L + 1, "gradops: combine_cpu offsets must have L + 1 entries");
    a.offsets = offsets.data_ptr<int64_t>();
  } else {
    TORCH_CHECK(a.L == 1, "gradops: combine_cpu with L > 1 weight rows needs offsets");
  }
  set_matrix(a, J);
  a.weights = weights.data_ptr<float>();
  a.out = out.data_ptr();
  a.out_dtype = dtype_code(out);
  pybind11::gil_scoped_release no_gil;
  gradops::combine_cpu(a);
}

// GradDrop (SPEC §3) into `out` ([P]) and, when given, `mask` (bool [T, P]).
void graddrop_cpu(const at::Tensor& J_in, const at::Tensor& leak, int64_t seed,
                  const c10::optional<at::Tensor>& noise, at::Tensor& out,
                  const c10::optional<at::Tensor>& mask, double eps) {
  TORCH_CHECK(J_in.device().is_cpu() && out.device().is_cpu(), "gradops: graddrop_cpu needs CPU tensors");
  auto J = unit_column_stride(J_in);
  const int64_t T = J.size(0), P = J.size(1);
  TORCH_CHECK(leak.scalar_type() == at::kFloat && leak.is_contiguous() && leak.numel() == T,
              "gradops: graddrop_cpu leak must be contiguous f32 [T]");
  TORCH_CHECK(out.is_contiguous() && out.numel() == P, "gradops: graddrop_cpu out must be contiguous [P]");
  gradops::GradDropArgs a;
  set_matrix(a, J);
  a.leak = leak.data_ptr<float>();
  a.noise = nullptr;
  if (noise.has_value()) {
    TORCH_CHECK(noise->scalar_type() == at::kFloat && noise->is_contiguous() && noise->numel() == P,
                "gradops: graddrop_cpu noise must be contiguous f32 [P]");
    a.noise = noise->data_ptr<float>();
  }
  a.seed = static_cast<uint64_t>(seed);
  a.eps = static_cast<float>(eps);
  a.out = out.data_ptr();
  a.out_dtype = dtype_code(out);
  a.mask = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->numel() == T * P,
                "gradops: graddrop_cpu mask must be contiguous bool [T, P]");
    a.mask = mask->data_ptr<bool>();
  }
  pybind11::gil_scoped_release no_gil;
  gradops::graddrop_cpu(a);
}

#ifdef GRADOPS_WITH_CUDA
Result segment_gram_cuda(const at::Tensor& J_in, const at::Tensor& offsets_in, bool with_counts) {
  TORCH_CHECK(J_in.is_cuda(), "gradops: segment_gram_cuda needs a CUDA tensor");
  TORCH_CHECK(J_in.size(0) <= gradops::kCudaMaxT, "gradops: the CUDA kernel supports T <= ",
              gradops::kCudaMaxT, ", got T = ", J_in.size(0));
  const c10::cuda::CUDAGuard guard(J_in.device());
  auto J = unit_column_stride(J_in);
  auto offsets = offsets_in.contiguous();
  check_offsets(J, offsets);
  const int64_t L = offsets.numel() - 1;
  Result out = allocate(J, L, with_counts);
  int num_sms = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount,
                                     J.device().index()) == cudaSuccess,
              "gradops: cannot query the multiprocessor count of ", J.device());
  const size_t ws_bytes = gradops::segment_gram_cuda_workspace_bytes(J.size(0), J.size(1), L,
                                                                    with_counts, num_sms);
  auto workspace = at::empty({static_cast<int64_t>(ws_bytes)}, J.options().dtype(at::kByte));
  auto args = make_args(J, offsets, out, with_counts);
  gradops::segment_gram_cuda(args, workspace.data_ptr(), num_sms,
                             c10::cuda::getCurrentCUDAStream().stream());
  return out;
}
#endif

bool cuda_built() {
#ifdef GRADOPS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// PCGrad's coefficient matrices C [B, T, T] from Grams G [B, T, T] (f32) and orders (int64).
at::Tensor pcgrad_coefficients_cpu(const at::Tensor& G, const at::Tensor& perms, double eps) {
  TORCH_CHECK(G.device().is_cpu() && perms.device().is_cpu(), "gradops: pcgrad_coefficients_cpu needs CPU tensors");
  TORCH_CHECK(G.scalar_type() == at::kFloat && G.dim() == 3 && G.size(1) == G.size(2) && G.is_contiguous(),
              "gradops: pcgrad_coefficients_cpu G must be contiguous f32 [B, T, T]");
  TORCH_CHECK(perms.scalar_type() == at::kLong && perms.sizes() == G.sizes() && perms.is_contiguous(),
              "gradops: pcgrad_coefficients_cpu perms must be contiguous int64 of G's shape");
  auto C = at::empty_like(G);
  const int64_t T = G.size(1);
  const int64_t* p = perms.data_ptr<int64_t>();
  for (int64_t n = 0; n < perms.numel(); ++n)
    TORCH_CHECK(p[n] >= 0 && p[n] < T, "gradops: pcgrad_coefficients_cpu perms entries must be in [0, T)");
  gradops::pcgrad_coefficients_cpu(G.data_ptr<float>(), p, C.data_ptr<float>(), G.size(0), T,
                                   static_cast<float>(eps));
  return C;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gradops compiled kernels (CPU C++ always, CUDA C++ when built with a toolkit)";
  m.def("segment_gram_cpu", &segment_gram_cpu, "Per-segment Gram (+ sign counts) on CPU",
        pybind11::arg("J"), pybind11::arg("offsets"), pybind11::arg("with_counts"));
#ifdef GRADOPS_WITH_CUDA
  m.def("segment_gram_cuda", &segment_gram_cuda, "Per-segment Gram (+ sign counts) on CUDA",
        pybind11::arg("J"), pybind11::arg("offsets"), pybind11::arg("with_counts"));
  m.attr("cuda_max_T") = gradops::kCudaMaxT;
#endif
  m.def("combine_cpu", &combine_cpu, "Weighted combination w^T J (per segment) on CPU",
        pybind11::arg("J"), pybind11::arg("weights"), pybind11::arg("offsets"), pybind11::arg("out"));
  m.def("graddrop_cpu", &graddrop_cpu, "GradDrop on CPU", pybind11::arg("J"), pybind11::arg("leak"),
        pybind11::arg("seed"), pybind11::arg("noise"), pybind11::arg("out"), pybind11::arg("mask"),
        pybind11::arg("eps"));
  m.def("philox_uniform", &gradops::philox_uniform, "GradDrop's uniform of column k (Philox4x32-10, word k % 4 of counter k / 4)",
        pybind11::arg("seed"), pybind11::arg("offset"));
  m.def("pcgrad_coefficients_cpu", &pcgrad_coefficients_cpu, "PCGrad coefficient matrices on CPU",
        pybind11::arg("G"), pybind11::arg("perms"), pybind11::arg("eps"));
  m.def("cuda_built", &cuda_built, "Whether the CUDA kernels were compiled in");
  m.def("openmp_max_threads", &openmp_max_threads, "OpenMP threads the CPU kernels use");
}
