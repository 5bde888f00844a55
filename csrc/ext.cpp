// edit_runtime._C: float64 dense linear algebra for the closed-form solver (LAPACK, no torch).
//
// sym_eig_split(C, threshold, relative=False, side="auto")
//     -> (w (k,), V (n, k), lam_max, below, tau, count_below)
//     Splits the spectrum of the symmetric C (n, n) at tau = threshold (relative=False) or
//     threshold * lambda_max(C) (relative=True) and forms the eigenvectors of ONE side only:
//     eigenvalues in (-inf, tau] (below=True: the null-space basis U0) or in (tau, inf)
//     (below=False: its complement U1, so that P0 = I - U1 U1ᵀ). side="auto" takes the side with
//     fewer eigenpairs: a projector never needs more than min(k, n - k) eigenvectors.
//       dsytrd  C = Q T Qᵀ                       4/3 n³  (the only O(n³) step)
//       dstebz  lambda_max(T) by bisection       O(n)    (the relative threshold, before any
//                                                         eigenvector; no second reduction)
//       dstemr  query: Sturm count below tau     O(n)
//       dstemr  range='V', eigenpairs of T       O(n k)  (MRRR, also for tight clusters)
//       dormtr  V = Q Z                          2 n² k  (back-transform of k vectors only)
//     torch.linalg.eigh forms all n eigenvectors (back-transform 2 n³ + divide and conquer).
//
// nullspace_basis(C, threshold, relative=False, method="mrrr") -> (w (k,), U0 (n, k), lam_max)
//     The eigenpairs with eigenvalue <= tau, always that side. method="mrrr" is the path above;
//     method="evr" is one LAPACK dsyevr call with range='V' (dsytrd -> dstebz + dstein; inverse
//     iteration is slow on a large cluster such as the exact null space of a rank-deficient C),
//     absolute thresholds only, lam_max NaN.
//     Eigenvalues ascending; the sign / rotation of eigenvectors within a degenerate cluster is
//     arbitrary (compare projectors U0 U0ᵀ, not bases).
//
// whitened_lowrank(Q, B, rank) -> (left (n, r), right (r, m), s (min(n, m),))
//     argmin over rank(X) <= r of tr(Xᵀ Q X) - 2 tr(Xᵀ B) for symmetric positive definite Q:
//       dpotrf Q = Rᵀ R;  G = R⁻ᵀ B (dtrtrs);  G = U S Vᵀ (dgesdd);
//       left = R⁻¹ U_r S_r (dtrtrs), right = V_rᵀ;  s = all singular values of G, descending.
//     Raises ValueError when Q is not positive definite.
//
// Arrays are numpy float64; any layout is accepted (copied into Fortran order). The GIL is
// released during LAPACK calls. Threads: OpenBLAS's pool, see set_num_threads.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "lapack.h"

namespace py = pybind11;
using FArray = py::array_t<double, py::array::f_style | py::array::forcecast>;

namespace {

void check_info(lapack_int info, const char* routine) {
  if (info != 0) {
    std::ostringstream msg;
    msg << "LAPACK " << routine << " failed with info=" << info;
    throw std::runtime_error(msg.str());
  }
}

lapack_int checked_dim(py::ssize_t v, const char* what) {
  if (v < 0 || v > static_cast<py::ssize_t>(std::numeric_limits<lapack_int>::max())) {
    std::ostringstream msg;
    msg << what << "=" << v << " does not fit a 32-bit LAPACK integer";
    throw std::invalid_argument(msg.str());
  }
  return static_cast<lapack_int>(v);
}

// A private Fortran-order copy of a 2-D float64 array (LAPACK overwrites its input).
FArray fortran_copy(const py::array& src, const char* name) {
  FArray a = FArray::ensure(src);
  if (!a) throw std::invalid_argument(std::string(name) + " must be convertible to float64");
  if (a.ndim() != 2) {
    std::ostringstream msg;
    msg << name << " must be 2-D, got ndim=" << a.ndim();
    throw std::invalid_argument(msg.str());
  }
  FArray out({a.shape(0), a.shape(1)});
  std::copy(a.data(), a.data() + a.size(), out.mutable_data());
  return out;
}

FArray fortran_empty(py::ssize_t rows, py::ssize_t cols) {
  return FArray({rows, cols});
}

// A compact copy of the leading k columns of a Fortran-order (n, kk) array.
FArray leading_columns(const FArray& a, py::ssize_t k) {
  FArray out = fortran_empty(a.shape(0), k);
  std::copy(a.data(), a.data() + a.shape(0) * k, out.mutable_data());
  return out;
}

enum class Side { Below, Above, Auto };

Side parse_side(const std::string& side) {
  if (side == "below") return Side::Below;
  if (side == "above") return Side::Above;
  if (side == "auto") return Side::Auto;
  throw std::invalid_argument("side must be 'below', 'above' or 'auto', got '" + side + "'");
}

// The MRRR path on a private Fortran copy `a` (overwritten). Returns
// (w (k,), V (n, k), lam_max, below, tau, count_below):
//   below=True:  V holds the eigenvectors with eigenvalue <= tau (the null space), k = count_below;
//   below=False: V holds those with eigenvalue > tau (its complement), k = n - count_below.
py::tuple eig_split_mrrr(FArray& a, double threshold, bool relative, Side side) {
  const lapack_int n = checked_dim(a.shape(0), "n");
  double* A = a.mutable_data();
  const lapack_int one = 1;
  lapack_int info = 0, lwork = -1, liwork = -1, m = 0;
  const double abstol = 2.0 * ER_F77(dlamch_)("S", 1);

  std::vector<double> d(n), e(n), tau(std::max<lapack_int>(n - 1, 1));
  {
    double wq = 0;
    ER_F77(dsytrd_)("L", &n, A, &n, d.data(), e.data(), tau.data(), &wq, &lwork, &info, 1);
    check_info(info, "dsytrd (workspace query)");
    lwork = std::max<lapack_int>(static_cast<lapack_int>(wq), 1);
  }
  std::vector<double> work(lwork);
  {
    py::gil_scoped_release nogil;
    ER_F77(dsytrd_)("L", &n, A, &n, d.data(), e.data(), tau.data(), work.data(), &lwork, &info,
                    1);
  }
  check_info(info, "dsytrd");
  e[n - 1] = 0.0;

  // Gershgorin interval of T, widened: every eigenvalue lies in (lo, hi).
  double gl = std::numeric_limits<double>::infinity(), gu = -gl;
  for (lapack_int i = 0; i < n; ++i) {
    const double off = (i > 0 ? std::abs(e[i - 1]) : 0.0) + (i + 1 < n ? std::abs(e[i]) : 0.0);
    gl = std::min(gl, d[i] - off);
    gu = std::max(gu, d[i] + off);
  }
  const double span = std::max({std::abs(gl), std::abs(gu), std::numeric_limits<double>::min()});
  const double lo = gl - 1e-3 * span, hi = gu + 1e-3 * span;

  double lam_max = 0.0;
  {
    // lambda_max(T) = lambda_max(C) by bisection, O(n): the relative threshold is known before
    // any eigenvector is computed.
    lapack_int nsplit = 0, mfound = 0;
    std::vector<double> wb(n), wk(4 * static_cast<size_t>(n));
    std::vector<lapack_int> iblock(n), isplit(n), iwk(3 * static_cast<size_t>(n));
    double dummy = 0.0;
    ER_F77(dstebz_)("I", "E", &n, &dummy, &dummy, &n, &n, &abstol, d.data(), e.data(), &mfound,
                    &nsplit, wb.data(), iblock.data(), isplit.data(), wk.data(), iwk.data(),
                    &info, 1, 1);
    check_info(info, "dstebz");
    lam_max = wb[0];
  }
  const double vtau = relative ? threshold * lam_max : threshold;

  // dstemr workspace query on (vl, vu]: Z(1,1) = number of eigenvalues there (Sturm count).
  lapack_int tryrac = 0;  // a dense matrix reduced by dsytrd has no high relative accuracy
  const lapack_int ldz = n;
  std::vector<double> w(n);
  std::vector<lapack_int> isuppz(2 * static_cast<size_t>(n));
  auto query = [&](double vl, double vu, lapack_int& count, lapack_int& lw, lapack_int& liw) {
    double wq = 0, zq = 0;
    lapack_int iwq = 0, nzc = -1, mm = 0, neg = -1, tr = 0;
    ER_F77(dstemr_)("V", "V", &n, d.data(), e.data(), &vl, &vu, &one, &one, &mm, w.data(), &zq,
                    &ldz, &nzc, isuppz.data(), &tr, &wq, &neg, &iwq, &neg, &info, 1, 1);
    check_info(info, "dstemr (workspace query)");
    count = static_cast<lapack_int>(zq);
    lw = std::max<lapack_int>(static_cast<lapack_int>(wq), 1);
    liw = std::max<lapack_int>(iwq, 1);
  };

  lapack_int count_below = 0;
  if (vtau >= hi) {
    count_below = n;
  } else if (vtau > lo) {
    lapack_int lw = 0, liw = 0;
    query(lo, vtau, count_below, lw, liw);
  }
  const bool below = side == Side::Below || (side == Side::Auto && 2 * count_below <= n);
  const lapack_int want = below ? count_below : n - count_below;
  if (want == 0) {
    return py::make_tuple(py::array_t<double>(0), fortran_empty(n, 0), lam_max, below, vtau,
                          count_below);
  }
  const double vl = below ? lo : vtau, vu = below ? vtau : hi;
  lapack_int nzc = 0;
  query(vl, vu, nzc, lwork, liwork);
  // Room for all n vectors: the Sturm count of the query can be short when tau hits an exact
  // eigenvalue of a split T (0/0 pivots, e.g. C = 0 with tau = 0), and dstemr would then write
  // past a count-sized Z. Untouched columns cost address space only; the result is compacted.
  nzc = n;
  FArray z = fortran_empty(n, nzc);
  work.assign(lwork, 0.0);
  std::vector<lapack_int> iwork(liwork);
  {
    py::gil_scoped_release nogil;
    ER_F77(dstemr_)("V", "V", &n, d.data(), e.data(), &vl, &vu, &one, &one, &m, w.data(),
                    z.mutable_data(), &ldz, &nzc, isuppz.data(), &tryrac, work.data(), &lwork,
                    iwork.data(), &liwork, &info, 1, 1);
  }
  check_info(info, "dstemr");

  if (m > 0) {
    // Back-transform only the m computed vectors: V = Q Z, O(n² m).
    double oq = 0;
    lwork = -1;
    ER_F77(dormtr_)("L", "L", "N", &n, &m, A, &n, tau.data(), z.mutable_data(), &ldz, &oq,
                    &lwork, &info, 1, 1, 1);
    check_info(info, "dormtr (workspace query)");
    lwork = std::max<lapack_int>(static_cast<lapack_int>(oq), 1);
    work.assign(lwork, 0.0);
    {
      py::gil_scoped_release nogil;
      ER_F77(dormtr_)("L", "L", "N", &n, &m, A, &n, tau.data(), z.mutable_data(), &ldz,
                      work.data(), &lwork, &info, 1, 1, 1);
    }
    check_info(info, "dormtr");
  }
  py::array_t<double> wout(m);
  std::copy(w.begin(), w.begin() + m, wout.mutable_data());
  return py::make_tuple(wout, leading_columns(z, m), lam_max, below, vtau, below ? m : n - m);
}

FArray square_copy(const py::array& c_in) {
  FArray a = fortran_copy(c_in, "C");
  if (a.shape(0) != a.shape(1)) {
    std::ostringstream msg;
    msg << "C must be square, got (" << a.shape(0) << ", " << a.shape(1) << ")";
    throw std::invalid_argument(msg.str());
  }
  const double* A = a.data();
  for (py::ssize_t i = 0; i < a.size(); ++i)
    if (!std::isfinite(A[i])) throw std::invalid_argument("C has non-finite entries");
  return a;
}

py::tuple sym_eig_split(const py::array& c_in, double threshold, bool relative,
                        const std::string& side) {
  const Side s = parse_side(side);
  if (!std::isfinite(threshold)) throw std::invalid_argument("threshold must be finite");
  FArray a = square_copy(c_in);
  if (a.shape(0) == 0) {
    return py::make_tuple(py::array_t<double>(0), fortran_empty(0, 0),
                          std::numeric_limits<double>::quiet_NaN(), s != Side::Above,
                          threshold, 0);
  }
  return eig_split_mrrr(a, threshold, relative, s);
}

py::tuple nullspace_basis(const py::array& c_in, double threshold, bool relative,
                          const std::string& method) {
  if (!std::isfinite(threshold)) throw std::invalid_argument("threshold must be finite");
  if (method != "mrrr" && method != "evr")
    throw std::invalid_argument("method must be 'mrrr' or 'evr', got '" + method + "'");
  if (method == "evr" && relative)
    throw std::invalid_argument("method='evr' needs an absolute threshold (relative=False)");
  FArray a = square_copy(c_in);
  const lapack_int n = checked_dim(a.shape(0), "n");
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (n == 0) return py::make_tuple(py::array_t<double>(0), fortran_empty(0, 0), nan);
  if (method == "mrrr") {
    py::tuple r = eig_split_mrrr(a, threshold, relative, Side::Below);
    return py::make_tuple(r[0], r[1], r[2]);
  }

  // method == "evr": one dsyevr call, range (vl, threshold], vl below C's Gershgorin bound.
  double* A = a.mutable_data();
  double gl = std::numeric_limits<double>::infinity();
  for (lapack_int j = 0; j < n; ++j) {
    double off = 0.0;
    for (lapack_int i = 0; i < n; ++i)
      if (i != j) off += std::abs(A[static_cast<size_t>(j) * n + i]);
    gl = std::min(gl, A[static_cast<size_t>(j) * n + j] - off);
  }
  const double vl = gl - 1.0 - 1e-3 * std::abs(gl), vu = threshold;
  if (vu <= vl) return py::make_tuple(py::array_t<double>(0), fortran_empty(n, 0), nan);
  const lapack_int one = 1;
  lapack_int info = 0, lwork = -1, liwork = -1, m = 0;
  const double abstol = 2.0 * ER_F77(dlamch_)("S", 1);
  std::vector<double> w(n);
  FArray z = fortran_empty(n, n);  // dsyevr needs room for every eigenvector when range='V'
  std::vector<lapack_int> isuppz(2 * static_cast<size_t>(n));
  double wq = 0;
  lapack_int iwq = 0;
  ER_F77(dsyevr_)("V", "V", "L", &n, A, &n, &vl, &vu, &one, &one, &abstol, &m, w.data(),
                  z.mutable_data(), &n, isuppz.data(), &wq, &lwork, &iwq, &liwork, &info, 1, 1,
                  1);
  check_info(info, "dsyevr (workspace query)");
  lwork = std::max<lapack_int>(static_cast<lapack_int>(wq), 1);
  liwork = std::max<lapack_int>(iwq, 1);
  std::vector<double> work(lwork);
  std::vector<lapack_int> iwork(liwork);
  {
    py::gil_scoped_release nogil;
    ER_F77(dsyevr_)("V", "V", "L", &n, A, &n, &vl, &vu, &one, &one, &abstol, &m, w.data(),
                    z.mutable_data(), &n, isuppz.data(), work.data(), &lwork, iwork.data(),
                    &liwork, &info, 1, 1, 1);
  }
  check_info(info, "dsyevr");
  py::array_t<double> wout(m);
  std::copy(w.begin(), w.begin() + m, wout.mutable_data());
  return py::make_tuple(wout, leading_columns(z, m), nan);
}

py::tuple whitened_lowrank(const py::array& q_in, const py::array& b_in, py::ssize_t rank) {
  FArray r = fortran_copy(q_in, "Q");
  FArray g = fortran_copy(b_in, "B");
  if (r.shape(0) != r.shape(1)) {
    std::ostringstream msg;
    msg << "Q must be square, got (" << r.shape(0) << ", " << r.shape(1) << ")";
    throw std::invalid_argument(msg.str());
  }
  if (g.shape(0) != r.shape(0)) {
    std::ostringstream msg;
    msg << "B must have " << r.shape(0) << " rows (Q is " << r.shape(0) << "x" << r.shape(0)
        << "), got " << g.shape(0);
    throw std::invalid_argument(msg.str());
  }
  if (rank < 0) throw std::invalid_argument("rank must be >= 0, got " + std::to_string(rank));
  const lapack_int n = checked_dim(r.shape(0), "n"), m = checked_dim(g.shape(1), "m");
  const lapack_int p = std::min(n, m);
  const lapack_int k = static_cast<lapack_int>(std::min<py::ssize_t>(rank, p));
  lapack_int info = 0;

  if (n == 0 || m == 0) {
    return py::make_tuple(fortran_empty(n, 0), fortran_empty(0, m), py::array_t<double>(0));
  }
  {
    py::gil_scoped_release nogil;
    ER_F77(dpotrf_)("U", &n, r.mutable_data(), &n, &info, 1);
  }
  if (info > 0) {
    std::ostringstream msg;
    msg << "Q is not positive definite (the leading minor of order " << info
        << " is not); use a larger lam";
    throw std::invalid_argument(msg.str());
  }
  check_info(info, "dpotrf");
  {
    py::gil_scoped_release nogil;
    ER_F77(dtrtrs_)("U", "T", "N", &n, &m, r.data(), &n, g.mutable_data(), &n, &info, 1, 1, 1);
  }
  check_info(info, "dtrtrs (R^T G = B)");

  py::array_t<double> s(p);
  FArray u = fortran_empty(n, p), vt = fortran_empty(p, m);
  lapack_int lwork = -1;
  std::vector<lapack_int> iwork(8 * static_cast<size_t>(p));
  double wq = 0;
  ER_F77(dgesdd_)("S", &n, &m, g.mutable_data(), &n, s.mutable_data(), u.mutable_data(), &n,
                  vt.mutable_data(), &p, &wq, &lwork, iwork.data(), &info, 1);
  check_info(info, "dgesdd (workspace query)");
  lwork = std::max<lapack_int>(static_cast<lapack_int>(wq), 1);
  std::vector<double> work(lwork);
  {
    py::gil_scoped_release nogil;
    ER_F77(dgesdd_)("S", &n, &m, g.mutable_data(), &n, s.mutable_data(), u.mutable_data(), &n,
                    vt.mutable_data(), &p, work.data(), &lwork, iwork.data(), &info, 1);
  }
  check_info(info, "dgesdd");

  FArray left = fortran_empty(n, k), right = fortran_empty(k, m);
  {
    const double* U = u.data();
    const double* S = s.data();
    const double* VT = vt.data();
    double* L = left.mutable_data();
    double* Rt = right.mutable_data();
    py::gil_scoped_release nogil;
    for (lapack_int j = 0; j < k; ++j)
      for (lapack_int i = 0; i < n; ++i)
        L[static_cast<size_t>(j) * n + i] = U[static_cast<size_t>(j) * n + i] * S[j];
    for (lapack_int c = 0; c < m; ++c)
      for (lapack_int i = 0; i < k; ++i)
        Rt[static_cast<size_t>(c) * k + i] = VT[static_cast<size_t>(c) * p + i];
    if (k > 0) ER_F77(dtrtrs_)("U", "N", "N", &n, &k, r.data(), &n, L, &n, &info, 1, 1, 1);
  }
  check_info(info, "dtrtrs (R left = U_r S_r)");
  return py::make_tuple(left, right, s);
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() =
      "edit_runtime._C: float64 LAPACK kernels of the closed-form solver (null-space basis by "
      "value, whitened low-rank solve). Linked against scipy-openblas32; no torch.";
  mod.def("nullspace_basis", &nullspace_basis, py::arg("C"), py::arg("threshold"),
          py::arg("relative") = false, py::arg("method") = "mrrr",
          "(w (k,), U0 (n, k), lam_max): eigenpairs of symmetric C with eigenvalue <= tau, "
          "tau = threshold, or threshold * lambda_max(C) if relative. lam_max is NaN for "
          "method='evr'.");
  mod.def("sym_eig_split", &sym_eig_split, py::arg("C"), py::arg("threshold"),
          py::arg("relative") = false, py::arg("side") = "auto",
          "(w (k,), V (n, k), lam_max, below, tau, count_below): split the spectrum of symmetric "
          "C at tau = threshold (or threshold * lambda_max(C) if relative) and form only one "
          "side's eigenvectors: eigenvalues <= tau (below=True) or > tau (below=False); "
          "side='auto' picks the side with fewer eigenpairs. count_below = number of "
          "eigenvalues <= tau. One tridiagonal reduction (dsytrd), MRRR (dstemr) by value, "
          "back-transform (dormtr) of the chosen vectors only.");
  mod.def("whitened_lowrank", &whitened_lowrank, py::arg("Q"), py::arg("B"), py::arg("rank"),
          "(left (n, r), right (r, m), s): argmin_{rank X <= r} tr(X^T Q X) - 2 tr(X^T B), "
          "X = left @ right; s = singular values of R^-T B (Q = R^T R).");
  mod.def(
      "set_num_threads", [](int n) { ER_F77(openblas_set_num_threads)(std::max(n, 1)); },
      py::arg("n"), "Set the OpenBLAS thread count used by the LAPACK calls.");
  mod.def(
      "get_num_threads", []() { return ER_F77(openblas_get_num_threads)(); },
      "OpenBLAS thread count.");
  mod.def(
      "blas_config", []() { return std::string(ER_F77(openblas_get_config)()); },
      "OpenBLAS build configuration string.");
}
