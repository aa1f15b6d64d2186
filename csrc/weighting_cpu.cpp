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
#include <algorithm>
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
// Active-set solver of MGDA's and CAGrad's problems on the simplex (gradops.weighting._simplex_qp,
// whose docstring has the method: Wolfe's min-norm-point iteration with a linear term t b, and for
// CAGrad an outer update of t by the closed-form root on the corral or bisection). All in double
// on Gs = G / scale, b / scale, k^2 / scale, delta2 / scale; iterate for iterate the torch loop.
// ----------------------------------------------------------------------------------------------
namespace {

constexpr double kF64Tiny = std::numeric_limits<double>::min();
constexpr double kFloor = 1e-12;
constexpr double kMargin = 1e-13;
constexpr double kJitter = 4 * std::numeric_limits<double>::epsilon();

// Solve on the corral S (mask) with pivot p: alpha (affine min-norm point of aff(S)) and beta
// (alpha + t beta minimises 1/2 w^T G w + t b^T w on aff(S)) by a Cholesky factorisation of the
// Gram of g_i - g_p, i in S \ {p}. Returns false when a pivot is not > 0 (or not finite).
bool face_solve(const double* G, const double* b, int64_t T, const std::vector<char>& S, int64_t p,
                double jitter, std::vector<double>& L, std::vector<int64_t>& ix,
                double* alpha, double* beta) {
  ix.clear();
  for (int64_t i = 0; i < T; ++i)
    if (S[i] && i != p) ix.push_back(i);
  const int64_t n = static_cast<int64_t>(ix.size());
  const double Gpp = G[p * T + p];
  for (int64_t i = 0; i < T; ++i) alpha[i] = beta[i] = 0.0;
  std::vector<double> y1(n), y2(n);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t i = ix[r];
    for (int64_t c = 0; c <= r; ++c) {
      const int64_t j = ix[c];
      double h = G[i * T + j] - G[i * T + p] - G[p * T + j] + Gpp;
      if (r == c) h += jitter;
      for (int64_t q = 0; q < c; ++q) h -= L[r * n + q] * L[c * n + q];
      if (r == c) {
        if (!(h > 0.0) || !std::isfinite(h)) return false;
        L[r * n + r] = std::sqrt(h);
      } else {
        L[r * n + c] = h / L[c * n + c];
      }
    }
  }
  for (int64_t r = 0; r < n; ++r) {           // L y = rhs
    const int64_t i = ix[r];
    double v1 = Gpp - G[i * T + p], v2 = (b ? b[p] - b[i] : 0.0);
    for (int64_t q = 0; q < r; ++q) { v1 -= L[r * n + q] * y1[q]; v2 -= L[r * n + q] * y2[q]; }
    y1[r] = v1 / L[r * n + r];
    y2[r] = v2 / L[r * n + r];
  }
  for (int64_t r = n - 1; r >= 0; --r) {      // L^T x = y
    double v1 = y1[r], v2 = y2[r];
    for (int64_t q = r + 1; q < n; ++q) { v1 -= L[q * n + r] * y1[q]; v2 -= L[q * n + r] * y2[q]; }
    y1[r] = v1 / L[r * n + r];
    y2[r] = v2 / L[r * n + r];
  }
  double s1 = 0.0, s2 = 0.0;
  for (int64_t r = 0; r < n; ++r) {
    alpha[ix[r]] = y1[r];
    beta[ix[r]] = y2[r];
    s1 += y1[r];
    s2 += y2[r];
  }
  alpha[p] = 1.0 - s1;
  beta[p] = -s2;
  return all_finite(alpha, T) && all_finite(beta, T);
}

double quad(const double* G, const double* x, int64_t T) {
  double s = 0.0;
  for (int64_t i = 0; i < T; ++i) s += x[i] * dot(G + i * T, x, T);
  return s;
}

}  // namespace

SolverResult simplex_qp_cpu(const double* G_in, int64_t T, const double* b_in, double k,
                            double delta2, double scale, int64_t max_iter, double tol, bool f32,
                            double* w) {
  const bool cagrad = b_in != nullptr;
  const bool finite = all_finite(G_in, T * T) && (!cagrad || all_finite(b_in, T)) &&
                      std::isfinite(scale) && std::isfinite(k) && std::isfinite(delta2);
  if (!finite) {                             // the torch loop never converges on these
    for (int64_t i = 0; i < T; ++i) w[i] = kNaN;
    return {max_iter, kNaN, false};
  }
  std::vector<double> G(T * T), b(T, 0.0), Gw(T), gr(T), grf(T), alpha(T), beta(T), a(T), L(T * T);
  std::vector<int64_t> ix;
  std::vector<char> S(T);
  for (int64_t i = 0; i < T * T; ++i) G[i] = G_in[i] / scale;
  double k2 = 0.0, d2 = 0.0, kk = 0.0, t_hi = 0.0;
  if (cagrad) {
    for (int64_t i = 0; i < T; ++i) b[i] = b_in[i] / scale;
    k2 = k * k / scale;
    d2 = delta2 / scale;
    kk = std::sqrt(k2);
    t_hi = 2.0 * std::sqrt(1.0 + d2) / clamp_min(kk, kF64Tiny);
  }
  const double jitter = kJitter * static_cast<double>(T);
  const double freeze = std::min(kFloor * (1.0 + kk), tol);
  int64_t i0 = 0;
  for (int64_t i = 1; i < T; ++i)
    if (G[i * T + i] < G[i0 * T + i0]) i0 = i;
  for (int64_t i = 0; i < T; ++i) w[i] = i == i0 ? 1.0 : 0.0;
  bool ok = true, stalled = false, settled = false;
  double t = 0.0, t_lo = 0.0;

  // gr = G w + t b; returns (gq, gap): the quadratic's and the objective's Frank-Wolfe gaps
  auto gaps = [&](double& gq) {
    matvec(G.data(), w, Gw.data(), T);
    for (int64_t i = 0; i < T; ++i) gr[i] = Gw[i] + t * b[i];
    gq = dot(gr.data(), w, T) - min_nan(gr.data(), T);
    if (!cagrad) return 2.0 * gq;
    const double rho = std::sqrt(clamp_min(dot(w, Gw.data(), T) + d2, kF64Tiny));
    for (int64_t i = 0; i < T; ++i) grf[i] = b[i] + kk * Gw[i] / rho;
    return dot(grf.data(), w, T) - min_nan(grf.data(), T);
  };

  int64_t its = 0;
  double gq = 0.0, gap = 0.0;
  for (; its < max_iter; ++its) {
    gap = gaps(gq);
    const int64_t s = argmin_nan(gr.data(), T);
    const double gw = dot(gr.data(), w, T);
    const bool can_add = gr[s] < gw - kMargin * (1.0 + t) && w[s] <= 0.0 && !stalled;
    const bool inner_done = cagrad && ok && !can_add;
    const bool done = cagrad ? (gap <= freeze || settled) : (gap <= freeze || (ok && !can_add));
    if (done) break;
    const bool add = ok && can_add && !inner_done;
    int64_t p = argmax_nan(w, T);
    for (int64_t i = 0; i < T; ++i) S[i] = w[i] > 0.0 || (add && i == s);
    const bool fail = !face_solve(G.data(), cagrad ? b.data() : nullptr, T, S, p, jitter, L, ix,
                                  alpha.data(), beta.data());
    if (inner_done) {                        // outer step (CAGrad): a new t
      const bool psi_pos = dot(w, Gw.data(), T) + d2 > k2 * t * t;
      const double lo = psi_pos ? t : t_lo, hi = psi_pos ? t_hi : t;
      const double den = k2 - quad(G.data(), beta.data(), T);
      const double tS = std::sqrt(clamp_min(quad(G.data(), alpha.data(), T) + d2, kF64Tiny) /
                                  clamp_min(den, kF64Tiny));
      const bool newton = den > 0.0 && tS >= lo && tS <= hi && !fail;
      const double t_new = newton ? tS : 0.5 * (lo + hi);
      settled = std::fabs(t_new - t) <= kMargin * t;
      t_lo = lo;
      t_hi = hi;
      t = t_new;
      ok = false;
      stalled = false;
      continue;
    }
    if (fail) {                              // keep w; this corral cannot be extended
      stalled = true;
      continue;
    }
    bool full = true;
    double theta = kInf;
    int64_t j = 0;
    for (int64_t i = 0; i < T; ++i) {
      a[i] = alpha[i] + t * beta[i];
      if (S[i] && a[i] < 0.0) {
        full = false;
        const double r = w[i] / clamp_min(w[i] - a[i], kF64Tiny);
        if (r < theta) { theta = r; j = i; }
      }
    }
    double sum = 0.0;
    for (int64_t i = 0; i < T; ++i) {
      double v;
      if (full) v = S[i] ? clamp_min(a[i], 0.0) : 0.0;
      else v = i == j ? 0.0 : clamp_min(w[i] + theta * (a[i] - w[i]), 0.0);
      w[i] = v;
      sum += v;
    }
    for (int64_t i = 0; i < T; ++i) w[i] /= sum;
    ok = full;
  }
  gap = gaps(gq);
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

// ----------------------------------------------------------------------------------------------
// The projection onto the dual cone of UPGrad and DualProj (Quinton & Rey, "Jacobian Descent for
// Multi-Objective Optimization", 2024, Proposition 1; gradops.weighting._dualcone, whose docstring
// has the method): min_{lam >= 0} 1/2 lam^T H lam + lam^T c, c = H u, by Lawson-Hanson's
// active-set method (Lawson & Hanson 1974, Ch. 23, in Gram form), step for step the torch loop,
// one row of U at a time. Per step: g = H lam + c; a row whose iterate minimises on its support
// (ok) and has no coordinate with lam_j <= 0 and g_j < -margin to add (or is stalled) is done;
// else the coordinate of most negative g joins the passive set S (when ok), z solves
// (H_SS + jitter I) z_S = -c_S (Cholesky; a non-positive pivot or a non-finite z stalls the row),
// and lam moves to z if z > 0 on S, else by the ratio test to where the first coordinate reaches 0
// (that one dropped). The Cholesky factor is of H_SS only: the torch loop's 1 off S decouples.
// ----------------------------------------------------------------------------------------------
namespace {

// z = -(H_SS + jitter I)^{-1} c_S on S = ix (0 off S). False on a pivot that is not > 0 or a
// non-finite z (the torch loop's cholesky_ex info != 0 or ~isfinite(z)).
bool passive_solve(const double* H, int64_t T, const std::vector<int64_t>& ix, double jitter,
                   const double* c, std::vector<double>& L, std::vector<double>& y, double* z) {
  const int64_t n = static_cast<int64_t>(ix.size());
  for (int64_t r = 0; r < n; ++r) {
    const double* Hr = H + ix[r] * T;
    double* Lr = L.data() + r * n;
    for (int64_t q = 0; q <= r; ++q) {
      const double* Lq = L.data() + q * n;
      double v = Hr[ix[q]];
      if (q == r) v += jitter;
      for (int64_t p = 0; p < q; ++p) v -= Lr[p] * Lq[p];
      if (q == r) {
        if (!(v > 0.0)) return false;
        Lr[r] = std::sqrt(v);
      } else {
        Lr[q] = v / Lq[q];
      }
    }
  }
  for (int64_t r = 0; r < n; ++r) {           // L y = -c_S
    double v = -c[ix[r]];
    const double* Lr = L.data() + r * n;
    for (int64_t p = 0; p < r; ++p) v -= Lr[p] * y[p];
    y[r] = v / Lr[r];
  }
  for (int64_t r = n - 1; r >= 0; --r) {      // L^T z_S = y
    double v = y[r];
    for (int64_t p = r + 1; p < n; ++p) v -= L[p * n + r] * y[p];
    y[r] = v / L[r * n + r];
  }
  for (int64_t i = 0; i < T; ++i) z[i] = 0.0;
  for (int64_t r = 0; r < n; ++r) z[ix[r]] = y[r];
  return all_finite(z, T);
}

// g = H lam + c, from the rows of H on lam's support (lam is 0 elsewhere; H is finite).
void dual_grad(const double* H, int64_t T, const double* lam, const double* c, double* g) {
  for (int64_t j = 0; j < T; ++j) g[j] = c[j];
  for (int64_t i = 0; i < T; ++i) {
    if (lam[i] == 0.0) continue;
    const double li = lam[i];
    const double* Hi = H + i * T;
    for (int64_t j = 0; j < T; ++j) g[j] += li * Hi[j];
  }
}

}  // namespace

SolverResult dual_cone_cpu(const double* G, int64_t T, const double* U, int64_t K, double reg_eps,
                           int64_t max_iter, double tol, double* V) {
  const bool finite = all_finite(G, T * T);
  std::vector<double> H(T * T, 0.0);
  if (finite) {                              // H = G / tr(G) + reg_eps I (0 + reg_eps I if not)
    double tr = 0.0;
    for (int64_t i = 0; i < T; ++i) tr += G[i * T + i];
    tr = clamp_min(tr, kF64Tiny);
    for (int64_t i = 0; i < T * T; ++i) H[i] = G[i] / tr;
  }
  double h = -kInf;
  for (int64_t i = 0; i < T; ++i) {
    H[i * T + i] += reg_eps;
    h = std::max(h, H[i * T + i]);
  }
  h = clamp_min(h, kF64Tiny);
  const double jitter = kJitter * static_cast<double>(T) * h;
  int64_t its_max = 0;
  double res = 0.0;

  {
    std::vector<double> c(T), g(T), z(T), lam(T), L(T * T), y(T);
    std::vector<int64_t> ix;
    ix.reserve(T);
    std::vector<char> S(T);
    double res_t = 0.0;                      // max of the rows' residuals (NaN sticks)
    for (int64_t k = 0; k < K; ++k) {
      const double* u = U + k * T;
      double ubar = 0.0;
      for (int64_t i = 0; i < T; ++i) ubar = std::max(ubar, std::fabs(u[i]));
      ubar = clamp_min(ubar, kF64Tiny);
      for (int64_t j = 0; j < T; ++j) c[j] = 0.0;   // c = u^T H (H symmetric: H u)
      for (int64_t i = 0; i < T; ++i)
        for (int64_t j = 0; j < T; ++j) c[j] += u[i] * H[i * T + j];
      const double margin = (kMargin * h) * ubar;
      for (int64_t i = 0; i < T; ++i) lam[i] = 0.0;
      bool ok = true, stalled = false;
      int64_t its = 0;
      for (; its < max_iter; ++its) {
        dual_grad(H.data(), T, lam.data(), c.data(), g.data());
        int64_t j = -1;
        for (int64_t i = 0; i < T; ++i)
          if (lam[i] <= 0.0 && g[i] < -margin && (j < 0 || g[i] < g[j])) j = i;
        const bool can_add = j >= 0 && !stalled;
        if (ok && !can_add) break;           // done: the torch loop freezes the row from here
        const bool add = ok && can_add;
        ix.clear();
        for (int64_t i = 0; i < T; ++i) {
          S[i] = lam[i] > 0.0 || (add && i == j);
          if (S[i]) ix.push_back(i);
        }
        if (!passive_solve(H.data(), T, ix, jitter, c.data(), L, y, z.data())) {
          stalled = true;                    // keep lam and ok; add nothing more
          continue;
        }
        bool full = true;
        double theta = kInf;
        int64_t drop = 0;
        for (int64_t i = 0; i < T; ++i) {
          if (S[i] && z[i] <= 0.0) {
            full = false;
            const double r = lam[i] / clamp_min(lam[i] - z[i], kF64Tiny);
            if (r < theta) { theta = r; drop = i; }
          }
        }
        for (int64_t i = 0; i < T; ++i) {
          if (full) lam[i] = S[i] ? z[i] : 0.0;
          else lam[i] = (S[i] && i != drop) ? clamp_min(lam[i] + theta * (z[i] - lam[i]), 0.0)
                                            : 0.0;
        }
        ok = full;
      }
      its_max = std::max(its_max, its);
      dual_grad(H.data(), T, lam.data(), c.data(), g.data());
      for (int64_t i = 0; i < T; ++i) {
        const double e = std::fabs(minimum_nan(lam[i], g[i] / h)) / ubar;
        if (std::isnan(e) || std::isnan(res_t)) res_t = kNaN;
        else if (e > res_t) res_t = e;
        V[k * T + i] = finite ? u[i] + lam[i] : kNaN;
      }
    }
    {
      if (std::isnan(res_t) || std::isnan(res)) res = kNaN;
      else if (res_t > res) res = res_t;
    }
  }
  if (!finite) res = kNaN;
  return {its_max, res, within(res, tol, false)};
}

}  // namespace gradops
