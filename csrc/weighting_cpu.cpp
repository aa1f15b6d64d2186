// gradops: the iterative T x T solvers of gradops.weighting on the CPU (interface and conventions:
// weighting_kernels.h). The torch loops in gradops/weighting/_solvers.py are the reference; these are the
// same algorithms, step for step, in double precision. At T = 8 an iteration is a few hundred
// flops: the point of a C++ loop is to avoid ~30 rounds of torch dispatch per iteration.
//
// NaN conventions of the torch ops mirrored here (they only matter for a non-finite G, whose
// weights the Python wrappers poison anyway; they keep the loop well defined):
//   clamp(x, min=lo)   NaN stays NaN               -> clamp_min
//   x.min(), x.max()   NaN propagates              -> min_nan / max_nan
//   argmin / argmax    the first NaN wins          -> argmin_nan / argmax_nan
//   minimum(x, y)      NaN propagates              -> minimum_nan
//   G @ d, b @ d       0 * Inf = NaN               -> dense products when G or b is not finite
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "weighting_kernels.h"

namespace gradops {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

inline double clamp_min(double x, double lo) { return x < lo ? lo : x; }

inline double minimum_nan(double x, double y) {
  if (std::isnan(x) || std::isnan(y)) return kNaN;
  return x < y ? x : y;
}

// `x <= tol` in the working dtype (weighting_kernels.h): float32 rounds both sides first.
inline bool within(double x, double tol, bool f32) {
  return f32 ? static_cast<float>(x) <= static_cast<float>(tol) : x <= tol;
}

double min_nan(const double* x, int64_t n) {
  double m = kInf;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return kNaN;
    if (x[i] < m) m = x[i];
  }
  return m;
}

int64_t argmin_nan(const double* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] < x[best]) best = i;
  }
  return best;
}

int64_t argmax_nan(const double* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > x[best]) best = i;
  }
  return best;
}

bool all_finite(const double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

inline double dot(const double* x, const double* y, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

// y = A x, A [n, n] row-major.
inline void matvec(const double* A, const double* x, double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = dot(A + i * n, x, n);
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// Pairwise Frank-Wolfe (Lacoste-Julien & Jaggi, "On the Global Linear Convergence of Frank-Wolfe
// Optimization Variants", NeurIPS 2015, Alg. 2) on the simplex, from w = 1/T. Each step:
//   Gw = G w (fresh, so that the gap is a true certificate), gr = grad f(w),
//   gap = (gr . w - min gr) / scale; stop when gap <= tol;
//   s = argmin gr (Frank-Wolfe vertex), v = argmax_{w_v > 0} gr (away vertex), d = e_s - e_v;
//   gamma in [0, w_v] minimising f(w + gamma d) exactly; w += gamma d (w_v clamped at 0: exact drop).
// The line search works with A = d^T G d, B = w^T G d (= (Gw)_s - (Gw)_v):
//   MGDA:   f(w + gamma d) - f(w) = A gamma^2 + 2 B gamma  ->  gamma* = -B / A;
//   CAGrad: a gamma + k sqrt(A gamma^2 + 2 B gamma + C), a = b . d, C = w^T G w + delta2: convex in
//           gamma; with r = (a / k)^2 a stationary point exists iff A > r (and k > 0), at
//           gamma = u - B / A, |u| = sqrt(r (C - B^2 / A) / (A (A - r))), sign(u) = -sign(a);
//           otherwise f is monotone along d: gamma = +inf (clipped to w_v) if a < 0, else 0.
// ----------------------------------------------------------------------------------------------
SolverResult pairwise_fw_cpu(const double* G, int64_t T, const double* b, double k, double delta2,
                             double scale, int64_t max_iter, double tol, double tiny, bool f32,
                             double* w) {
  std::vector<double> Gw(T), gr(T), Gd(T), masked(T), d(T);
  for (int64_t i = 0; i < T; ++i) w[i] = 1.0 / static_cast<double>(T);
  // With finite G and b the products with d = e_s - e_v need only columns s and v (the other
  // terms are exact zeros); otherwise they are formed in full, so that 0 * Inf = NaN as in torch.
  const bool finite = all_finite(G, T * T) && (b == nullptr || all_finite(b, T));

  // gr = grad f(w) from Gw; returns w^T G w clamped at 0 (CAGrad's C - delta2).
  auto grad_of = [&]() {
    const double q = clamp_min(dot(w, Gw.data(), T), 0.0);
    if (b == nullptr) {
      for (int64_t i = 0; i < T; ++i) gr[i] = 2.0 * Gw[i];
    } else {
      const double norm = std::sqrt(q + delta2);
      for (int64_t i = 0; i < T; ++i) gr[i] = b[i] + k * Gw[i] / norm;
    }
    return q;
  };
  auto gap_of = [&]() { return (dot(gr.data(), w, T) - min_nan(gr.data(), T)) / scale; };

  int64_t its = 0;
  for (; its < max_iter; ++its) {
    matvec(G, w, Gw.data(), T);
    const double q = grad_of();
    if (within(gap_of(), tol, f32)) break;  // converged: the reference freezes w from here on

    const int64_t s = argmin_nan(gr.data(), T);
    for (int64_t i = 0; i < T; ++i) masked[i] = w[i] > 0.0 ? gr[i] : -kInf;
    const int64_t v = argmax_nan(masked.data(), T);
    const double ds = s == v ? 0.0 : 1.0;   // d = e_s - e_v (0 when s == v: no move)
    double A;                               // curvature d^T G d >= 0
    if (finite) {                           // G d = G[:, s] - G[:, v], exactly
      for (int64_t i = 0; i < T; ++i) Gd[i] = ds * (G[i * T + s] - G[i * T + v]);
      A = Gd[s] - Gd[v];
    } else {
      for (int64_t i = 0; i < T; ++i) d[i] = (i == s ? 1.0 : 0.0) - (i == v ? 1.0 : 0.0);
      matvec(G, d.data(), Gd.data(), T);
      A = dot(d.data(), Gd.data(), T);
    }
    const double B = dot(w, Gd.data(), T);  // (G w)_s - (G w)_v
    double wv = 0.0;                        // w_v, NaN if any w_i is (as sum(w * onehot))
    for (int64_t i = 0; i < T; ++i) wv += i == v ? w[i] : 0.0 * w[i];

    double gamma;
    if (b == nullptr) {
      gamma = -B / clamp_min(A, tiny);
    } else {
      const double a = finite ? ds * (b[s] - b[v]) : dot(b, d.data(), T);
      const double C = q + delta2;
      const double Ac = clamp_min(A, tiny);
      const double ak = a / clamp_min(k, tiny);
      const double r = ak * ak;
      const double Dq = clamp_min(C - B * B / Ac, 0.0);
      const bool interior = A > r && k > 0.0;
      double u = std::sqrt(r * Dq / clamp_min(Ac * (A - r), tiny));
      if (a > 0.0) u = -u;                  // sign(u) = -sign(a) at the stationary point
      const double g_int = u - B / Ac;
      const double g_mono = a < 0.0 ? kInf : 0.0;
      gamma = interior ? g_int : g_mono;
    }
    if (std::isnan(gamma)) gamma = 0.0;
    gamma = minimum_nan(clamp_min(gamma, 0.0), wv);
    if (std::isnan(gamma)) {                // only from a NaN w: w + NaN * d is NaN everywhere
      for (int64_t i = 0; i < T; ++i) w[i] = kNaN;
    } else if (s != v) {
      w[s] += gamma;
      w[v] = clamp_min(w[v] - gamma, 0.0);  // exact drop of the away vertex
    }
  }
  matvec(G, w, Gw.data(), T);
  grad_of();
  const double gap = gap_of();
  return {its, gap, within(gap, tol, f32)};
}

// ----------------------------------------------------------------------------------------------
// Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022): Newton's method
// on the strictly convex F(a) = 1/2 a^T G a - sum_i log a_i, whose stationary point solves
// G a = 1 / a. Each step:
//   grad = G a - 1 / a,  H = G + diag(1 / a^2) + jitter I  (Cholesky, lower),
//   step = -H^-1 grad, Newton decrement lam = sqrt(-grad . step),
//   a += t step with t = 1 if lam < 1/4, else 1 / (1 + lam) (the damped Newton step of a
//   self-concordant function, Nesterov 2004, Sec. 4.1.5: it keeps a > 0 in exact arithmetic);
//   a rounding guard replaces an entry that still became <= 0 by half its old value.
// Start: a_i = 1 / sqrt(G_ii), scaled so that a^T G a = T (its value at the solution).
// A Cholesky pivot that is not > 0 (only possible for a non-finite or numerically indefinite H)
// gives a NaN step, which the rounding guard turns into a halving of a.
// ----------------------------------------------------------------------------------------------
SolverResult nash_newton_cpu(const double* Gn, int64_t T, int64_t max_iter, double tol, double tiny,
                             double jitter, bool f32, double* a) {
  std::vector<double> Ga(T), grad(T), step(T), L(T * T);
  auto residual = [&]() {                   // max_i |a_i (G a)_i - 1|, NaN propagating
    double m = 0.0;
    for (int64_t i = 0; i < T; ++i) {
      const double e = std::fabs(a[i] * Ga[i] - 1.0);
      if (std::isnan(e)) return kNaN;
      if (e > m) m = e;
    }
    return m;
  };

  for (int64_t i = 0; i < T; ++i) a[i] = 1.0 / std::sqrt(clamp_min(Gn[i * T + i], tiny));
  matvec(Gn, a, Ga.data(), T);
  const double q = dot(a, Ga.data(), T);
  const double c = std::sqrt(static_cast<double>(T) / clamp_min(q, tiny));
  for (int64_t i = 0; i < T; ++i) a[i] *= c;

  int64_t its = 0;
  for (; its < max_iter; ++its) {
    matvec(Gn, a, Ga.data(), T);
    if (within(residual(), tol, f32)) break;  // converged: the reference freezes a from here on
    for (int64_t i = 0; i < T; ++i) grad[i] = Ga[i] - 1.0 / a[i];

    // H = L L^T (lower triangle of H, row by row; Cholesky-Banachiewicz)
    bool ok = true;
    for (int64_t i = 0; i < T && ok; ++i) {
      for (int64_t j = 0; j <= i; ++j) {
        double h = Gn[i * T + j];
        if (i == j) h = (h + 1.0 / (a[i] * a[i])) + jitter;
        for (int64_t p = 0; p < j; ++p) h -= L[i * T + p] * L[j * T + p];
        if (i == j) {
          if (!(h > 0.0)) { ok = false; break; }
          L[i * T + i] = std::sqrt(h);
        } else {
          L[i * T + j] = h / L[j * T + j];
        }
      }
    }
    if (ok) {                               // L y = -grad, then L^T step = y
      for (int64_t i = 0; i < T; ++i) {
        double y = -grad[i];
        for (int64_t p = 0; p < i; ++p) y -= L[i * T + p] * step[p];
        step[i] = y / L[i * T + i];
      }
      for (int64_t i = T - 1; i >= 0; --i) {
        double x = step[i];
        for (int64_t p = i + 1; p < T; ++p) x -= L[p * T + i] * step[p];
        step[i] = x / L[i * T + i];
      }
    } else {
      for (int64_t i = 0; i < T; ++i) step[i] = kNaN;
    }
    const double lam = std::sqrt(clamp_min(-dot(grad.data(), step.data(), T), 0.0));
    const double t = lam < 0.25 ? 1.0 : 1.0 / (1.0 + lam);
    for (int64_t i = 0; i < T; ++i) {
      const double an = a[i] + t * step[i];
      a[i] = an > 0.0 ? an : 0.5 * a[i];    // rounding guard (theory: > 0)
    }
  }
  matvec(Gn, a, Ga.data(), T);
  const double res = residual();
  return {its, res, within(res, tol, f32)};
}

}  // namespace gradops
