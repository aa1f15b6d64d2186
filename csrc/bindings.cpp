// gradops._C: thin torch bindings for the plain-pointer kernels in csrc/*.{cpp,cu}.
//
// User-facing validation (error messages naming the argument) happens in Python
// (gradops/_validate.py); the TORCH_CHECKs here only guard the kernels' own preconditions.
#include <torch/extension.h>
#include <ATen/Config.h>  // AT_MKL_ENABLED

#include <algorithm>
#include <tuple>
#include <vector>

#include "combine_kernels.h"
#include "copy_kernels.h"
#include "gram_kernels.h"
#include "pcgrad_kernels.h"
#include "sparse_adamw_kernels.h"
#include "topk_kernels.h"
#include "weighting_kernels.h"

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

// out = w^T J (weights [T] or [1, T]) or per segment (weights [L, T] + offsets [L+1] on the CPU),
// written into `out` ([P], contiguous, fp32/bf16/fp16).
void combine_cpu(const at::Tensor& J_in, const at::Tensor& weights,
                 const c10::optional<at::Tensor>& offsets_in, at::Tensor& out) {
  TORCH_CHECK(J_in.device().is_cpu() && out.device().is_cpu(), "gradops: combine_cpu needs CPU tensors");
  auto J = unit_column_stride(J_in);
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.is_contiguous() &&
                  (weights.dim() == 2 || weights.dim() == 1) && weights.size(-1) == J.size(0),
              "gradops: combine_cpu weights must be contiguous f32 [T] or [L, T]");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 1 && out.size(0) == J.size(1),
              "gradops: combine_cpu out must be contiguous [P]");
  at::Tensor offsets;
  gradops::CombineArgs a;
  a.L = weights.dim() == 2 ? weights.size(0) : 1;
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

// GradDrop (docs/methods.md#graddrop) into `out` ([P]) and, when given, `mask` (bool [T, P]).
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

// dst = src for two CPU tensors of one dtype and size, both contiguous (non-temporal stores for
// large copies: csrc/copy_cpu.cpp).
void stream_copy_cpu(const at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK(dst.device().is_cpu() && src.device().is_cpu(), "gradops: stream_copy_cpu needs CPU tensors");
  TORCH_CHECK(dst.scalar_type() == src.scalar_type() && dst.numel() == src.numel() &&
              dst.is_contiguous() && src.is_contiguous(),
              "gradops: stream_copy_cpu needs contiguous tensors of one dtype and size");
  pybind11::gil_scoped_release no_gil;
  gradops::stream_copy_cpu(dst.data_ptr(), src.data_ptr(),
                           static_cast<int64_t>(src.numel()) * src.element_size());
}

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

// PCGrad's coefficient matrices C [..., T, T] from Grams G [..., T, T] (f32) and orders (int64,
// G's shape). Every row of perms must be a permutation of 0..T-1 (ValueError otherwise, with
// gradops.pcgrad_weights' message: the Python wrapper leaves this check to this function).
at::Tensor pcgrad_coefficients_cpu(const at::Tensor& G, const at::Tensor& perms, double eps,
                                   bool self_visit) {
  TORCH_CHECK(G.device().is_cpu() && perms.device().is_cpu(), "gradops: pcgrad_coefficients_cpu needs CPU tensors");
  TORCH_CHECK(G.scalar_type() == at::kFloat && G.dim() >= 2 && G.size(-1) == G.size(-2) && G.is_contiguous(),
              "gradops: pcgrad_coefficients_cpu G must be contiguous f32 [..., T, T]");
  TORCH_CHECK(perms.scalar_type() == at::kLong && perms.sizes() == G.sizes() && perms.is_contiguous(),
              "gradops: pcgrad_coefficients_cpu perms must be contiguous int64 of G's shape");
  auto C = at::empty_like(G);
  const int64_t T = G.size(-1);
  const int64_t B = T > 0 ? G.numel() / (T * T) : 0;
  const int64_t* p = perms.data_ptr<int64_t>();
  std::vector<uint8_t> seen(static_cast<size_t>(T));
  for (int64_t r = 0; r < B * T; ++r) {
    std::fill(seen.begin(), seen.end(), uint8_t{0});
    bool ok = true;
    for (int64_t s = 0; s < T; ++s) {
      const int64_t j = p[r * T + s];
      ok = ok && j >= 0 && j < T && !seen[j];
      if (ok) seen[j] = 1;
    }
    TORCH_CHECK_VALUE(ok, "gradops.pcgrad_weights: every row of perms must be a permutation of 0..",
                      T - 1);
  }
  gradops::pcgrad_coefficients_cpu(G.data_ptr<float>(), p, C.data_ptr<float>(), B, T,
                                   static_cast<float>(eps), self_visit);
  return C;
}

// --- the iterative T x T solvers of gradops.weighting (csrc/weighting_cpu.cpp) ---------------
// Inputs are the tensors the Python wrappers prepared (float32 or float64, CPU); the kernels run
// in double on a copy and the results come back in G's dtype: (w [T], converged bool 0-dim,
// iterations int64 0-dim, residual 0-dim).
using SolverOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void check_solver_tensor(const at::Tensor& t, const at::Tensor& G, int64_t numel, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == G.scalar_type() && t.numel() == numel,
              "gradops: ", what, " must be a CPU tensor of G's dtype with ", numel, " element(s)");
}

// A float32 / float64 CPU tensor's elements as doubles (row-major).
std::vector<double> to_double(const at::Tensor& t_in) {
  auto t = t_in.contiguous();
  const int64_t n = t.numel();
  std::vector<double> out(n);
  if (t.scalar_type() == at::kDouble) {
    const double* p = t.data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) out[i] = p[i];
  } else {
    const float* p = t.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) out[i] = p[i];
  }
  return out;
}

std::vector<double> solver_gram(const at::Tensor& G, const char* op) {
  TORCH_CHECK(G.device().is_cpu(), "gradops: ", op, " needs a CPU tensor");
  TORCH_CHECK((G.scalar_type() == at::kFloat || G.scalar_type() == at::kDouble) && G.dim() == 2 &&
              G.size(0) == G.size(1) && G.size(0) >= 1,
              "gradops: ", op, " G must be float32 or float64 [T, T] with T >= 1");
  return to_double(G);
}

SolverOut solver_outputs(const at::Tensor& G, const std::vector<double>& x,
                         const gradops::SolverResult& r) {
  const int64_t T = G.size(0);
  auto w = at::empty({T}, G.options());
  auto converged = at::empty({}, G.options().dtype(at::kBool));
  auto iterations = at::empty({}, G.options().dtype(at::kLong));
  auto residual = at::empty({}, G.options());
  if (G.scalar_type() == at::kDouble) {
    double* p = w.data_ptr<double>();
    for (int64_t i = 0; i < T; ++i) p[i] = x[i];
    *residual.data_ptr<double>() = r.residual;
  } else {
    float* p = w.data_ptr<float>();
    for (int64_t i = 0; i < T; ++i) p[i] = static_cast<float>(x[i]);
    *residual.data_ptr<float>() = static_cast<float>(r.residual);
  }
  *converged.data_ptr<bool>() = r.converged;
  *iterations.data_ptr<int64_t>() = r.iterations;
  return {w, converged, iterations, residual};
}

// The active-set solver of gradops.weighting._simplex_qp: MGDA (b = None) or CAGrad (b [T],
// k and delta2 0-dim); scale 0-dim. All of G's dtype.
SolverOut simplex_qp_cpu(const at::Tensor& G, const c10::optional<at::Tensor>& b,
                          const at::Tensor& scale, const c10::optional<at::Tensor>& k,
                          const c10::optional<at::Tensor>& delta2, int64_t max_iter, double tol,
                          double tiny) {
  (void)tiny;  // kept in the signature of the other backends; the kernel runs in double
  auto g = solver_gram(G, "simplex_qp_cpu");
  const int64_t T = G.size(0);
  TORCH_CHECK(max_iter >= 0, "gradops: simplex_qp_cpu needs max_iter >= 0");
  check_solver_tensor(scale, G, 1, "simplex_qp_cpu scale");
  const bool cagrad = b.has_value();
  TORCH_CHECK(k.has_value() == cagrad && delta2.has_value() == cagrad,
              "gradops: simplex_qp_cpu takes b, k and delta2 together (CAGrad) or none (MGDA)");
  std::vector<double> bv, kv{0.0}, dv{0.0};
  if (cagrad) {
    check_solver_tensor(*b, G, T, "simplex_qp_cpu b");
    check_solver_tensor(*k, G, 1, "simplex_qp_cpu k");
    check_solver_tensor(*delta2, G, 1, "simplex_qp_cpu delta2");
    bv = to_double(*b);
    kv = to_double(*k);
    dv = to_double(*delta2);
  }
  const double sc = to_double(scale)[0];
  std::vector<double> w(T);
  gradops::SolverResult r;
  {
    pybind11::gil_scoped_release no_gil;
    r = gradops::simplex_qp_cpu(g.data(), T, cagrad ? bv.data() : nullptr, kv[0], dv[0], sc,
                                max_iter, tol, G.scalar_type() == at::kFloat, w.data());
  }
  return solver_outputs(G, w, r);
}

// Nash-MTL's damped Newton loop (gradops.weighting.nashmtl) on the normalised Gram Gn.
SolverOut nash_newton_cpu(const at::Tensor& Gn, int64_t max_iter, double tol, double tiny,
                          double jitter) {
  auto g = solver_gram(Gn, "nash_newton_cpu");
  TORCH_CHECK(max_iter >= 0, "gradops: nash_newton_cpu needs max_iter >= 0");
  const int64_t T = Gn.size(0);
  std::vector<double> a(T);
  gradops::SolverResult r;
  {
    pybind11::gil_scoped_release no_gil;
    r = gradops::nash_newton_cpu(g.data(), T, max_iter, tol, tiny, jitter,
                                 Gn.scalar_type() == at::kFloat, a.data());
  }
  return solver_outputs(Gn, a, r);
}

// The dual-cone projection of UPGrad / DualProj (gradops.weighting._dualcone) for the rows of U
// [K, T] (G's dtype): (V [K, T], converged, iterations, residual), V and residual in G's dtype.
SolverOut dual_cone_cpu(const at::Tensor& G, const at::Tensor& U, double reg_eps, int64_t max_iter,
                        double tol) {
  auto g = solver_gram(G, "dual_cone_cpu");
  const int64_t T = G.size(0);
  TORCH_CHECK(max_iter >= 0, "gradops: dual_cone_cpu needs max_iter >= 0");
  TORCH_CHECK(U.device().is_cpu() && U.scalar_type() == G.scalar_type() && U.dim() == 2 &&
              U.size(1) == T,
              "gradops: dual_cone_cpu U must be a CPU tensor of G's dtype of shape [K, T]");
  const int64_t K = U.size(0);
  auto u = to_double(U);
  std::vector<double> v(K * T);
  gradops::SolverResult r;
  {
    pybind11::gil_scoped_release no_gil;
    r = gradops::dual_cone_cpu(g.data(), T, u.data(), K, reg_eps, max_iter, tol, v.data());
  }
  auto out = solver_outputs(G, std::vector<double>(T), r);  // its w is replaced by V
  auto V = at::empty({K, T}, G.options());
  if (G.scalar_type() == at::kDouble) {
    std::copy(v.begin(), v.end(), V.data_ptr<double>());
  } else {
    float* p = V.data_ptr<float>();
    for (int64_t i = 0; i < K * T; ++i) p[i] = static_cast<float>(v[i]);
  }
  std::get<0>(out) = V;
  return out;
}

// Per-row top-K magnitude selection of a CPU W [R, F] (1 <= K <= F) into `mask` (bool [R, F])
// and/or `idx` (int32 [R, K], kept columns increasing), both contiguous.
void topk_cpu(const at::Tensor& W_in, int64_t K, const c10::optional<at::Tensor>& mask,
              const c10::optional<at::Tensor>& idx) {
  TORCH_CHECK(W_in.device().is_cpu(), "gradops: topk_cpu needs a CPU tensor");
  auto W = unit_column_stride(W_in);
  const int64_t R = W.size(0), F = W.size(1);
  TORCH_CHECK(K >= 1 && K <= F, "gradops: topk_cpu needs 1 <= K <= F, got K = ", K, ", F = ", F);
  gradops::TopkArgs a;
  switch (W.scalar_type()) {
    case at::kFloat: a.dtype = gradops::TopkDType::F32; break;
    case at::kBFloat16: a.dtype = gradops::TopkDType::BF16; break;
    case at::kHalf: a.dtype = gradops::TopkDType::F16; break;
    case at::kDouble: a.dtype = gradops::TopkDType::F64; break;
    default: TORCH_CHECK(false, "gradops: topk_cpu W must be float32/bfloat16/float16/float64, got ",
                         W.scalar_type());
  }
  a.W = W.data_ptr();
  a.R = R;
  a.F = F;
  a.row_stride = R > 1 ? W.stride(0) : F;
  a.K = K;
  a.mask = nullptr;
  a.idx = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == at::kBool && mask->is_contiguous() &&
                mask->dim() == 2 && mask->size(0) == R && mask->size(1) == F,
                "gradops: topk_cpu mask must be a contiguous CPU bool [R, F]");
    a.mask = mask->data_ptr<bool>();
  }
  if (idx.has_value()) {
    TORCH_CHECK(idx->device().is_cpu() && idx->scalar_type() == at::kInt && idx->is_contiguous() &&
                idx->dim() == 2 && idx->size(0) == R && idx->size(1) == K,
                "gradops: topk_cpu idx must be a contiguous CPU int32 [R, K]");
    a.idx = idx->data_ptr<int32_t>();
  }
  pybind11::gil_scoped_release no_gil;
  gradops::topk_cpu(a);
}

#if AT_MKL_ENABLED() && !defined(__APPLE__)
// torch.sqrt on CPU float tensors is MKL's vmsSqrt in MKL builds of torch (ATen/cpu/vml.h, mode
// VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE), which is not always correctly rounded; libtorch_cpu
// exports it. n is declared 64-bit: right for ILP64 and, n being small, for LP64 (which reads the
// low half). Weak: where it is missing, the kernel uses IEEE sqrt.
extern "C" void vmsSqrt(long long n, const float* a, float* r, long long mode) __attribute__((weak));

void torch_cpu_sqrt(const float* in, float* out, int64_t n) {
  vmsSqrt(static_cast<long long>(n), in, out, 0x2 | 0x140000 | 0x100);
}

gradops::SqrtFn torch_sqrt_fn() { return vmsSqrt != nullptr ? &torch_cpu_sqrt : nullptr; }
#else
gradops::SqrtFn torch_sqrt_fn() { return nullptr; }  // torch's CPU sqrt is the IEEE one here
#endif

// SparseAdamW's update of the entries `idx` selects (gradops/optim/sparse_adamw.py), in place:
// p, grad contiguous of one dtype (f32/bf16/f16), viewed as [R, C]; idx int32/int64 [R, K];
// m, v, vmax fp32 [R, K], contiguous. The scalars are AdamW's, as Python floats (rounded to fp32
// here, as torch rounds them).
void sparse_adamw_cpu(at::Tensor& p, const at::Tensor& grad, const at::Tensor& idx, at::Tensor& m,
                      at::Tensor& v, const c10::optional<at::Tensor>& vmax, bool has_decay,
                      double decay, double lerp_w, double beta2, double one_minus_beta2,
                      double bc2_sqrt, double eps, double neg_step_size, bool maximize) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&p, &grad, &idx, &m, &v})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(),
                "gradops: sparse_adamw_cpu needs contiguous CPU tensors");
  TORCH_CHECK(idx.dim() == 2 && (idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong),
              "gradops: sparse_adamw_cpu idx must be int32/int64 [R, K]");
  const int64_t R = idx.size(0), K = idx.size(1);
  TORCH_CHECK(grad.scalar_type() == p.scalar_type() && grad.numel() == p.numel(),
              "gradops: sparse_adamw_cpu grad must match p's dtype and size");
  TORCH_CHECK(R > 0 && p.numel() % R == 0, "gradops: sparse_adamw_cpu p.numel() must be a multiple of R");
  auto moment_ok = [&](const at::Tensor& t) {
    return t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == at::kFloat &&
           t.numel() == R * K;
  };
  TORCH_CHECK(moment_ok(m) && moment_ok(v) && (!vmax.has_value() || moment_ok(*vmax)),
              "gradops: sparse_adamw_cpu moments must be contiguous CPU float32 [R, K]");
  gradops::SparseAdamWArgs a;
  a.p = p.data_ptr();
  a.grad = grad.data_ptr();
  a.dtype = dtype_code(p);
  a.idx = idx.data_ptr();
  a.idx64 = idx.scalar_type() == at::kLong;
  a.R = R;
  a.K = K;
  a.C = p.numel() / R;
  a.m = m.data_ptr<float>();
  a.v = v.data_ptr<float>();
  a.vmax = vmax.has_value() ? vmax->data_ptr<float>() : nullptr;
  a.has_decay = has_decay;
  a.decay = static_cast<float>(decay);
  a.lerp_w = static_cast<float>(lerp_w);
  a.beta2 = static_cast<float>(beta2);
  a.one_minus_beta2 = static_cast<float>(one_minus_beta2);
  a.bc2_sqrt = static_cast<float>(bc2_sqrt);
  a.eps = static_cast<float>(eps);
  a.neg_step_size = static_cast<float>(neg_step_size);
  a.maximize = maximize;
  a.sqrt_fn = torch_sqrt_fn();   // the denominators' sqrt as torch.sqrt computes it
  pybind11::gil_scoped_release no_gil;
  const int64_t bad = gradops::sparse_adamw_index_errors(a);
  TORCH_CHECK(bad == 0, "gradops: sparse_adamw_cpu idx has ", bad, " entries outside [0, ", a.C, ")");
  gradops::sparse_adamw_cpu(a);
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
        pybind11::arg("G"), pybind11::arg("perms"), pybind11::arg("eps"), pybind11::arg("self_visit"));
  m.def("simplex_qp_cpu", &simplex_qp_cpu,
        "Active-set solver of MGDA / CAGrad on CPU: (w, converged, iterations, residual)",
        pybind11::arg("G"), pybind11::arg("b"), pybind11::arg("scale"), pybind11::arg("k"),
        pybind11::arg("delta2"), pybind11::arg("max_iter"), pybind11::arg("tol"),
        pybind11::arg("tiny"));
  m.def("nash_newton_cpu", &nash_newton_cpu,
        "Nash-MTL's damped Newton loop on CPU: (a, converged, iterations, residual)",
        pybind11::arg("Gn"), pybind11::arg("max_iter"), pybind11::arg("tol"), pybind11::arg("tiny"),
        pybind11::arg("jitter"));
  m.def("dual_cone_cpu", &dual_cone_cpu,
        "UPGrad / DualProj's dual-cone projection on CPU: (V, converged, iterations, residual)",
        pybind11::arg("G"), pybind11::arg("U"), pybind11::arg("reg_eps"), pybind11::arg("max_iter"),
        pybind11::arg("tol"));
  m.def("topk_cpu", &topk_cpu, "Per-row top-K magnitude mask / packed indices on CPU",
        pybind11::arg("W"), pybind11::arg("K"), pybind11::arg("mask"), pybind11::arg("idx"));
  m.def("sparse_adamw_cpu", &sparse_adamw_cpu, "SparseAdamW's update of the selected entries on CPU",
        pybind11::arg("p"), pybind11::arg("grad"), pybind11::arg("idx"), pybind11::arg("m"),
        pybind11::arg("v"), pybind11::arg("vmax"), pybind11::arg("has_decay"), pybind11::arg("decay"),
        pybind11::arg("lerp_w"), pybind11::arg("beta2"), pybind11::arg("one_minus_beta2"),
        pybind11::arg("bc2_sqrt"), pybind11::arg("eps"), pybind11::arg("neg_step_size"),
        pybind11::arg("maximize"));
  m.def("stream_copy_cpu", &stream_copy_cpu, "dst = src (contiguous CPU tensors), non-temporal stores",
        pybind11::arg("dst"), pybind11::arg("src"));
  m.def("cuda_built", &cuda_built, "Whether the CUDA kernels were compiled in");
  m.def("openmp_max_threads", &openmp_max_threads, "OpenMP threads the CPU kernels use");
}
