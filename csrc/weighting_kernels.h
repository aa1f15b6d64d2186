// gradops: plain-pointer interface of the iterative T x T solvers of gradops.weighting
// (csrc/weighting_cpu.cpp). No torch headers; csrc/bindings.cpp wraps them.
//
// Both run the algorithm of their torch reference in gradops/weighting/_solvers.py step for step, in double
// precision, and stop as soon as the iterate has converged: the torch loop freezes a converged
// iterate (torch.where), so stopping there returns what the full budget returns.
//
// Convergence tests `x <= tol` are made in the caller's working dtype (`f32`: x and tol rounded to
// float32 first, as torch compares a float32 tensor with a Python float), so that `converged` is
// exactly `residual <= tol` for the residual the caller gets back in that dtype.
//
// Non-finite input: comparisons with NaN are false, so a NaN residual never converges and the
// loop runs the whole budget; argmin / argmax treat NaN as the extreme value (first NaN wins, as
// torch.argmin / torch.argmax), so every index stays in [0, T); the residual comes back NaN.
#pragma once
#include <cstdint>

namespace gradops {

struct SolverResult {
  int64_t iterations;  // updates made before the iterate converged (max_iter if it never did)
  double residual;     // the solver's residual at the returned iterate
  bool converged;      // residual <= tol, compared in the working dtype
};

// MGDA's and CAGrad's problems on the simplex by an active-set method (gradops.weighting._simplex_qp).
//   b == nullptr: MGDA,   min w^T G w;
//   otherwise:    CAGrad, min b^T w + k sqrt(w^T G w + delta2)   (k >= 0, delta2 > 0).
// G: [T, T] row-major, symmetric, T >= 1; b: [T] or nullptr. Runs in double on G / scale; the
// residual is the Frank-Wolfe gap divided by `scale`. Non-finite input: w NaN, max_iter
// iterations, NaN residual (what the torch loop reports). w: [T] out (on the simplex).
SolverResult simplex_qp_cpu(const double* G, int64_t T, const double* b, double k, double delta2,
                            double scale, int64_t max_iter, double tol, bool f32, double* w);

// Nash-MTL's damped Newton iteration for G a = 1 / a, a > 0 (the loop of gradops.weighting.nashmtl),
// on the normalised Gram Gn ([T, T] row-major, symmetric, T >= 1), from a_i = c / sqrt(Gn_ii).
// `jitter`: added to the diagonal of the Newton matrix (16 eps of the working dtype). The residual
// is max_i |a_i (Gn a)_i - 1|. a: [T] out (the last iterate).
SolverResult nash_newton_cpu(const double* Gn, int64_t T, int64_t max_iter, double tol, double tiny,
                             double jitter, bool f32, double* a);

// The projection onto the dual cone of UPGrad and DualProj (gradops.weighting._dualcone, whose
// docstring has the method): for each row u of U [K, T], v = argmin_{v >= u} v^T H v with
// H = G / tr(G) + reg_eps I, by Lawson-Hanson's active-set method on lam = v - u >= 0, each row
// solved on its own (the torch loop freezes a finished row, so stopping it there returns what
// the batched loop returns). G: [T, T] row-major, symmetric, T >= 1; U: [K, T] row-major.
// Non-finite G: H = reg_eps I (as the torch loop), V NaN, residual NaN, not converged.
// `iterations`: the most steps a row took; `residual`: the largest KKT natural residual
// max_i |min(lam_i, (H v)_i / h)| / max|u| over the rows (h = max_i H_ii); `converged`:
// residual <= tol in double (the torch loop compares the float64 residual). V: [K, T] out.
SolverResult dual_cone_cpu(const double* G, int64_t T, const double* U, int64_t K, double reg_eps,
                           int64_t max_iter, double tol, double* V);

}  // namespace gradops
