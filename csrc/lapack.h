// Fortran LAPACK / BLAS prototypes used by edit_runtime._C.
//
// The library is scipy-openblas32 from PyPI: 32-bit integers (LP64) and every symbol prefixed
// (``scipy_dsytrd_`` ...). setup.py reads the prefix from ``scipy_openblas32.get_pkg_config()``
// (``-DBLAS_SYMBOL_PREFIX=scipy_``) and passes it as ER_BLAS_PREFIX; an empty prefix gives the
// plain reference names (``dsytrd_``), so any LP64 LAPACK links too.
//
// Character arguments carry gfortran's hidden length arguments (``size_t``, appended at the end),
// as LAPACK's own lapack.h does with LAPACK_FORTRAN_STRLEN_END.
#pragma once

#include <cstddef>

#ifndef ER_BLAS_PREFIX
#define ER_BLAS_PREFIX scipy_
#endif
#define ER_CAT2(a, b) a##b
#define ER_CAT(a, b) ER_CAT2(a, b)
#define ER_F77(name) ER_CAT(ER_BLAS_PREFIX, name)

using lapack_int = int;  // scipy-openblas32: 32-bit integers

extern "C" {

// Reduce a symmetric matrix to tridiagonal form T = Qᵀ A Q (Householder).
void ER_F77(dsytrd_)(const char* uplo, const lapack_int* n, double* a, const lapack_int* lda,
                     double* d, double* e, double* tau, double* work, const lapack_int* lwork,
                     lapack_int* info, std::size_t uplo_len);

// Selected eigenvalues of a symmetric tridiagonal matrix by bisection.
void ER_F77(dstebz_)(const char* range, const char* order, const lapack_int* n, const double* vl,
                     const double* vu, const lapack_int* il, const lapack_int* iu,
                     const double* abstol, const double* d, const double* e, lapack_int* m,
                     lapack_int* nsplit, double* w, lapack_int* iblock, lapack_int* isplit,
                     double* work, lapack_int* iwork, lapack_int* info, std::size_t range_len,
                     std::size_t order_len);

// Selected eigenpairs of a symmetric tridiagonal matrix (MRRR).
void ER_F77(dstemr_)(const char* jobz, const char* range, const lapack_int* n, double* d,
                     double* e, const double* vl, const double* vu, const lapack_int* il,
                     const lapack_int* iu, lapack_int* m, double* w, double* z,
                     const lapack_int* ldz, const lapack_int* nzc, lapack_int* isuppz,
                     lapack_int* tryrac, double* work, const lapack_int* lwork, lapack_int* iwork,
                     const lapack_int* liwork, lapack_int* info, std::size_t jobz_len,
                     std::size_t range_len);

// Multiply by the orthogonal Q from dsytrd.
void ER_F77(dormtr_)(const char* side, const char* uplo, const char* trans, const lapack_int* m,
                     const lapack_int* n, const double* a, const lapack_int* lda,
                     const double* tau, double* c, const lapack_int* ldc, double* work,
                     const lapack_int* lwork, lapack_int* info, std::size_t side_len,
                     std::size_t uplo_len, std::size_t trans_len);

// Selected eigenpairs of a dense symmetric matrix (driver: dsytrd + dstebz/dstein or dstemr).
void ER_F77(dsyevr_)(const char* jobz, const char* range, const char* uplo, const lapack_int* n,
                     double* a, const lapack_int* lda, const double* vl, const double* vu,
                     const lapack_int* il, const lapack_int* iu, const double* abstol,
                     lapack_int* m, double* w, double* z, const lapack_int* ldz,
                     lapack_int* isuppz, double* work, const lapack_int* lwork, lapack_int* iwork,
                     const lapack_int* liwork, lapack_int* info, std::size_t jobz_len,
                     std::size_t range_len, std::size_t uplo_len);

// Cholesky factorisation A = Uᵀ U.
void ER_F77(dpotrf_)(const char* uplo, const lapack_int* n, double* a, const lapack_int* lda,
                     lapack_int* info, std::size_t uplo_len);

// Triangular solve op(A) X = B.
void ER_F77(dtrtrs_)(const char* uplo, const char* trans, const char* diag, const lapack_int* n,
                     const lapack_int* nrhs, const double* a, const lapack_int* lda, double* b,
                     const lapack_int* ldb, lapack_int* info, std::size_t uplo_len,
                     std::size_t trans_len, std::size_t diag_len);

// SVD by divide and conquer.
void ER_F77(dgesdd_)(const char* jobz, const lapack_int* m, const lapack_int* n, double* a,
                     const lapack_int* lda, double* s, double* u, const lapack_int* ldu,
                     double* vt, const lapack_int* ldvt, double* work, const lapack_int* lwork,
                     lapack_int* iwork, lapack_int* info, std::size_t jobz_len);

// Machine constants ('S': safe minimum).
double ER_F77(dlamch_)(const char* cmach, std::size_t cmach_len);

// OpenBLAS thread pool (C symbols, same prefix).
void ER_F77(openblas_set_num_threads)(int num_threads);
int ER_F77(openblas_get_num_threads)(void);
const char* ER_F77(openblas_get_config)(void);

}  // extern "C"
