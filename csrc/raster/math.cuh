// Per-Gaussian forward math of the rasterizer as small functions, each with its hand-written VJP
// beside it. Templated on the scalar so that the same code runs in float in the kernels and in double
// on the host (finite-difference checks of every VJP).
//
// Gradients of symmetric matrices are kept as symmetric matrices G = ½(∂L/∂M + ∂L/∂Mᵀ), the entries
// of M treated as independent. The gradient with respect to a parameter that fills both M_ij and M_ji
// (i ≠ j) is then 2·G_ij; with respect to a diagonal entry it is G_ii.
#pragma once

#include <cmath>

#include "config.h"

#if defined(__CUDACC__)
#define NPG_HD __host__ __device__ __forceinline__
#else
#define NPG_HD inline
#endif

namespace npg {
namespace raster {

template <typename T>
struct Vec3 {
  T x, y, z;
};

template <typename T>
struct Quat {
  T w, x, y, z;
};

template <typename T>
struct Mat3 {
  T m[3][3];  // row-major
};

template <typename T>
struct Sym2 {
  T xx, xy, yy;
};

template <typename T>
struct Sym3 {
  T xx, xy, xz, yy, yz, zz;
};

template <typename T>
NPG_HD T clamp_value(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// ----------------------------------------------------------------------------------------------
// World -> view space: t = R·p + translation (R, translation from w2c). VJP: dp = Rᵀ·dt.

template <typename T>
NPG_HD Vec3<T> transform_point(const Mat3<T>& R, const Vec3<T>& translation, const Vec3<T>& p) {
  return {R.m[0][0] * p.x + R.m[0][1] * p.y + R.m[0][2] * p.z + translation.x,
          R.m[1][0] * p.x + R.m[1][1] * p.y + R.m[1][2] * p.z + translation.y,
          R.m[2][0] * p.x + R.m[2][1] * p.y + R.m[2][2] * p.z + translation.z};
}

template <typename T>
NPG_HD Vec3<T> transform_point_vjp(const Mat3<T>& R, const Vec3<T>& dt) {
  return {R.m[0][0] * dt.x + R.m[1][0] * dt.y + R.m[2][0] * dt.z,
          R.m[0][1] * dt.x + R.m[1][1] * dt.y + R.m[2][1] * dt.z,
          R.m[0][2] * dt.x + R.m[1][2] * dt.y + R.m[2][2] * dt.z};
}

// ----------------------------------------------------------------------------------------------
// Pixel position of a view-space point: (fx·x/z + cx, fy·y/z + cy).

template <typename T>
NPG_HD void project_point(const Vec3<T>& t, T fx, T fy, T cx, T cy, T& px, T& py) {
  const T inv_z = T(1) / t.z;
  px = fx * t.x * inv_z + cx;
  py = fy * t.y * inv_z + cy;
}

template <typename T>
NPG_HD Vec3<T> project_point_vjp(const Vec3<T>& t, T fx, T fy, T dpx, T dpy) {
  const T inv_z = T(1) / t.z;
  const T gx = dpx * fx * inv_z;
  const T gy = dpy * fy * inv_z;
  return {gx, gy, -(gx * t.x + gy * t.y) * inv_z};
}

// ----------------------------------------------------------------------------------------------
// Rotation matrix of a quaternion q = (w, x, y, z) by the standard formula, applied to q as given
// (a non-unit q is not normalised, and no normalisation is differentiated).

template <typename T>
NPG_HD Mat3<T> quat_to_rotmat(const Quat<T>& q) {
  const T w = q.w, x = q.x, y = q.y, z = q.z;
  Mat3<T> R;
  R.m[0][0] = T(1) - T(2) * (y * y + z * z);
  R.m[0][1] = T(2) * (x * y - w * z);
  R.m[0][2] = T(2) * (x * z + w * y);
  R.m[1][0] = T(2) * (x * y + w * z);
  R.m[1][1] = T(1) - T(2) * (x * x + z * z);
  R.m[1][2] = T(2) * (y * z - w * x);
  R.m[2][0] = T(2) * (x * z - w * y);
  R.m[2][1] = T(2) * (y * z + w * x);
  R.m[2][2] = T(1) - T(2) * (x * x + y * y);
  return R;
}

template <typename T>
NPG_HD Quat<T> quat_to_rotmat_vjp(const Quat<T>& q, const Mat3<T>& dR) {
  const T w = q.w, x = q.x, y = q.y, z = q.z;
  const auto& g = dR.m;
  Quat<T> dq;
  dq.w = T(2) * (-z * g[0][1] + y * g[0][2] + z * g[1][0] - x * g[1][2] - y * g[2][0] + x * g[2][1]);
  dq.x = T(2) * (y * g[0][1] + z * g[0][2] + y * g[1][0] - T(2) * x * g[1][1] - w * g[1][2] + z * g[2][0] +
                 w * g[2][1] - T(2) * x * g[2][2]);
  dq.y = T(2) * (-T(2) * y * g[0][0] + x * g[0][1] + w * g[0][2] + x * g[1][0] + z * g[1][2] - w * g[2][0] +
                 z * g[2][1] - T(2) * y * g[2][2]);
  dq.z = T(2) * (-T(2) * z * g[0][0] - w * g[0][1] + x * g[0][2] + w * g[1][0] - T(2) * z * g[1][1] +
                 y * g[1][2] + x * g[2][0] + y * g[2][1]);
  return dq;
}

// ----------------------------------------------------------------------------------------------
// Σ = R·diag(m·s)²·Rᵀ, m the scale modifier.

template <typename T>
NPG_HD Sym3<T> covariance_from_scale_rotation(const Vec3<T>& s, T modifier, const Quat<T>& q) {
  const Mat3<T> R = quat_to_rotmat(q);
  const T s2[3] = {modifier * modifier * s.x * s.x, modifier * modifier * s.y * s.y,
                   modifier * modifier * s.z * s.z};
  auto entry = [&](int a, int b) {
    return R.m[a][0] * R.m[b][0] * s2[0] + R.m[a][1] * R.m[b][1] * s2[1] + R.m[a][2] * R.m[b][2] * s2[2];
  };
  return {entry(0, 0), entry(0, 1), entry(0, 2), entry(1, 1), entry(1, 2), entry(2, 2)};
}

// dSigma: symmetric gradient of Σ. Returns ∂L/∂s (exact: includes the modifier) and ∂L/∂q.
template <typename T>
NPG_HD void covariance_from_scale_rotation_vjp(const Vec3<T>& s, T modifier, const Quat<T>& q,
                                               const Sym3<T>& dSigma, Vec3<T>& ds, Quat<T>& dq) {
  const Mat3<T> R = quat_to_rotmat(q);
  const T S[3] = {modifier * s.x, modifier * s.y, modifier * s.z};
  const T G[3][3] = {{dSigma.xx, dSigma.xy, dSigma.xz},
                     {dSigma.xy, dSigma.yy, dSigma.yz},
                     {dSigma.xz, dSigma.yz, dSigma.zz}};
  // Σ = M·Mᵀ with M = R·diag(S): ∂L/∂M = 2·G·M.
  Mat3<T> dR;
  T dS[3] = {T(0), T(0), T(0)};
#pragma unroll
  for (int i = 0; i < 3; ++i) {
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      const T dM = T(2) * (G[i][0] * R.m[0][j] + G[i][1] * R.m[1][j] + G[i][2] * R.m[2][j]) * S[j];
      dR.m[i][j] = dM * S[j];
      dS[j] += dM * R.m[i][j];
    }
  }
  ds = {dS[0] * modifier, dS[1] * modifier, dS[2] * modifier};
  dq = quat_to_rotmat_vjp(q, dR);
}

// ----------------------------------------------------------------------------------------------
// EWA projection: cov2D = J·W·Σ·Wᵀ·Jᵀ + 0.3·I, J = [[fx/z, 0, −fx·x'/z²], [0, fy/z, −fy·y'/z²]] with
// x' = clamp(x/z, ±lim_x)·z, y' likewise, (x, y, z) = t the view-space centre, W the w2c rotation.

template <typename T>
struct EwaJacobian {
  T j00, j02, j11, j12;  // the non-zero entries of J
  T x_clamped, y_clamped;  // x', y'
  bool x_inside, y_inside;  // |x/z| <= lim_x, |y/z| <= lim_y (else x' = ±lim·z)
  T x_limit, y_limit;       // clamp(x/z, ±lim_x), clamp(y/z, ±lim_y)
};

template <typename T>
NPG_HD EwaJacobian<T> ewa_jacobian(const Vec3<T>& t, T fx, T fy, T lim_x, T lim_y) {
  EwaJacobian<T> J;
  const T inv_z = T(1) / t.z;
  const T xz = t.x * inv_z, yz = t.y * inv_z;
  J.x_inside = xz >= -lim_x && xz <= lim_x;
  J.y_inside = yz >= -lim_y && yz <= lim_y;
  J.x_limit = clamp_value(xz, -lim_x, lim_x);
  J.y_limit = clamp_value(yz, -lim_y, lim_y);
  J.x_clamped = J.x_limit * t.z;
  J.y_clamped = J.y_limit * t.z;
  J.j00 = fx * inv_z;
  J.j11 = fy * inv_z;
  J.j02 = -fx * J.x_clamped * inv_z * inv_z;
  J.j12 = -fy * J.y_clamped * inv_z * inv_z;
  return J;
}

template <typename T>
NPG_HD Sym2<T> project_covariance(const Sym3<T>& sigma, const Mat3<T>& W, const EwaJacobian<T>& J) {
  // A = J·W (2×3), U = A·Σ, cov = U·Aᵀ.
  T A[2][3];
#pragma unroll
  for (int j = 0; j < 3; ++j) {
    A[0][j] = J.j00 * W.m[0][j] + J.j02 * W.m[2][j];
    A[1][j] = J.j11 * W.m[1][j] + J.j12 * W.m[2][j];
  }
  const T S[3][3] = {{sigma.xx, sigma.xy, sigma.xz}, {sigma.xy, sigma.yy, sigma.yz}, {sigma.xz, sigma.yz, sigma.zz}};
  T U[2][3];
#pragma unroll
  for (int a = 0; a < 2; ++a) {
#pragma unroll
    for (int j = 0; j < 3; ++j) U[a][j] = A[a][0] * S[0][j] + A[a][1] * S[1][j] + A[a][2] * S[2][j];
  }
  return {U[0][0] * A[0][0] + U[0][1] * A[0][1] + U[0][2] * A[0][2] + T(kCovDilation),
          U[0][0] * A[1][0] + U[0][1] * A[1][1] + U[0][2] * A[1][2],
          U[1][0] * A[1][0] + U[1][1] * A[1][1] + U[1][2] * A[1][2] + T(kCovDilation)};
}

// dCov: symmetric gradient of cov2D. Adds ∂L/∂t (through J) to dt and returns the symmetric ∂L/∂Σ.
template <typename T>
NPG_HD Sym3<T> project_covariance_vjp(const Sym3<T>& sigma, const Mat3<T>& W, const Vec3<T>& t, T fx, T fy,
                                      const EwaJacobian<T>& J, const Sym2<T>& dCov, Vec3<T>& dt) {
  T A[2][3];
#pragma unroll
  for (int j = 0; j < 3; ++j) {
    A[0][j] = J.j00 * W.m[0][j] + J.j02 * W.m[2][j];
    A[1][j] = J.j11 * W.m[1][j] + J.j12 * W.m[2][j];
  }
  const T S[3][3] = {{sigma.xx, sigma.xy, sigma.xz}, {sigma.xy, sigma.yy, sigma.yz}, {sigma.xz, sigma.yz, sigma.zz}};
  const T G[2][2] = {{dCov.xx, dCov.xy}, {dCov.xy, dCov.yy}};
  // ∂L/∂Σ = Aᵀ·G·A.
  T GA[2][3];
#pragma unroll
  for (int a = 0; a < 2; ++a) {
#pragma unroll
    for (int j = 0; j < 3; ++j) GA[a][j] = G[a][0] * A[0][j] + G[a][1] * A[1][j];
  }
  auto dsig = [&](int i, int j) { return A[0][i] * GA[0][j] + A[1][i] * GA[1][j]; };
  const Sym3<T> dSigma = {dsig(0, 0), dsig(0, 1), dsig(0, 2), dsig(1, 1), dsig(1, 2), dsig(2, 2)};
  // ∂L/∂A = 2·G·A·Σ.
  T dA[2][3];
#pragma unroll
  for (int a = 0; a < 2; ++a) {
#pragma unroll
    for (int j = 0; j < 3; ++j) dA[a][j] = T(2) * (GA[a][0] * S[0][j] + GA[a][1] * S[1][j] + GA[a][2] * S[2][j]);
  }
  // A = J·W: ∂L/∂J = ∂L/∂A·Wᵀ, non-zero entries only.
  const T dj00 = dA[0][0] * W.m[0][0] + dA[0][1] * W.m[0][1] + dA[0][2] * W.m[0][2];
  const T dj02 = dA[0][0] * W.m[2][0] + dA[0][1] * W.m[2][1] + dA[0][2] * W.m[2][2];
  const T dj11 = dA[1][0] * W.m[1][0] + dA[1][1] * W.m[1][1] + dA[1][2] * W.m[1][2];
  const T dj12 = dA[1][0] * W.m[2][0] + dA[1][1] * W.m[2][1] + dA[1][2] * W.m[2][2];
  const T inv_z = T(1) / t.z;
  const T inv_z2 = inv_z * inv_z;
  const T inv_z3 = inv_z2 * inv_z;
  // j02 = −fx·x'/z² with x' = clamp(x/z)·z: x' = x inside the clamp, ±lim·z outside.
  const T dx_clamped = -fx * inv_z2 * dj02;
  const T dy_clamped = -fy * inv_z2 * dj12;
  T dz = -fx * inv_z2 * dj00 - fy * inv_z2 * dj11 + T(2) * fx * J.x_clamped * inv_z3 * dj02 +
         T(2) * fy * J.y_clamped * inv_z3 * dj12;
  if (J.x_inside) {
    dt.x += dx_clamped;
  } else {
    dz += dx_clamped * J.x_limit;
  }
  if (J.y_inside) {
    dt.y += dy_clamped;
  } else {
    dz += dy_clamped * J.y_limit;
  }
  dt.z += dz;
  return dSigma;
}

// ----------------------------------------------------------------------------------------------
// Conic = cov2D⁻¹. VJP: ∂L/∂cov = −Q·G·Q (Q the conic, G its symmetric gradient).

template <typename T>
NPG_HD Sym2<T> invert_sym2(const Sym2<T>& cov, T det) {
  const T inv_det = T(1) / det;
  return {cov.yy * inv_det, -cov.xy * inv_det, cov.xx * inv_det};
}

template <typename T>
NPG_HD Sym2<T> invert_sym2_vjp(const Sym2<T>& conic, const Sym2<T>& dConic) {
  // P = Q·G, result = −P·Q (symmetric because Q and G are).
  const T p00 = conic.xx * dConic.xx + conic.xy * dConic.xy;
  const T p01 = conic.xx * dConic.xy + conic.xy * dConic.yy;
  const T p10 = conic.xy * dConic.xx + conic.yy * dConic.xy;
  const T p11 = conic.xy * dConic.xy + conic.yy * dConic.yy;
  return {-(p00 * conic.xx + p01 * conic.xy), -(p00 * conic.xy + p01 * conic.yy), -(p10 * conic.xy + p11 * conic.yy)};
}

// ----------------------------------------------------------------------------------------------
// Direction from the camera centre: dir = v/|v|. VJP: dv = (ddir − dir·(dir·ddir))/|v|.

template <typename T>
NPG_HD Vec3<T> normalize_vjp(const Vec3<T>& v, const Vec3<T>& ddir) {
  const T len2 = v.x * v.x + v.y * v.y + v.z * v.z;
  if (!(len2 > T(0))) return {T(0), T(0), T(0)};
  const T inv_len = T(1) / std::sqrt(len2);
  const Vec3<T> d = {v.x * inv_len, v.y * inv_len, v.z * inv_len};
  const T dot = d.x * ddir.x + d.y * ddir.y + d.z * ddir.z;
  return {(ddir.x - d.x * dot) * inv_len, (ddir.y - d.y * dot) * inv_len, (ddir.z - d.z * dot) * inv_len};
}

template <typename T>
NPG_HD Vec3<T> normalize(const Vec3<T>& v) {
  const T len2 = v.x * v.x + v.y * v.y + v.z * v.z;
  if (!(len2 > T(0))) return {T(0), T(0), T(0)};
  const T inv_len = T(1) / std::sqrt(len2);
  return {v.x * inv_len, v.y * inv_len, v.z * inv_len};
}

// ----------------------------------------------------------------------------------------------
// Real spherical harmonics of degree 0–3 in the order and signs of 3DGS (npg/raster/sh.py).

constexpr double kShC0 = 0.28209479177387814;
constexpr double kShC1 = 0.4886025119029199;
// (Scalars, not arrays: device code may read constexpr scalars of the host.)
constexpr double kShC2_0 = 1.0925484305920792;
constexpr double kShC2_1 = -1.0925484305920792;
constexpr double kShC2_2 = 0.31539156525252005;
constexpr double kShC2_3 = -1.0925484305920792;
constexpr double kShC2_4 = 0.5462742152960396;
constexpr double kShC3_0 = -0.5900435899266435;
constexpr double kShC3_1 = 2.890611442640554;
constexpr double kShC3_2 = -0.4570457994644658;
constexpr double kShC3_3 = 0.3731763325901154;
constexpr double kShC3_4 = -0.4570457994644658;
constexpr double kShC3_5 = 1.445305721320277;
constexpr double kShC3_6 = -0.5900435899266435;

// basis[k] for k < (degree+1)²; the rest is left untouched.
template <typename T>
NPG_HD void sh_basis(int degree, const Vec3<T>& dir, T (&basis)[16]) {
  const T x = dir.x, y = dir.y, z = dir.z;
  basis[0] = T(kShC0);
  if (degree < 1) return;
  basis[1] = -T(kShC1) * y;
  basis[2] = T(kShC1) * z;
  basis[3] = -T(kShC1) * x;
  if (degree < 2) return;
  const T xx = x * x, yy = y * y, zz = z * z, xy = x * y, yz = y * z, xz = x * z;
  basis[4] = T(kShC2_0) * xy;
  basis[5] = T(kShC2_1) * yz;
  basis[6] = T(kShC2_2) * (T(2) * zz - xx - yy);
  basis[7] = T(kShC2_3) * xz;
  basis[8] = T(kShC2_4) * (xx - yy);
  if (degree < 3) return;
  basis[9] = T(kShC3_0) * y * (T(3) * xx - yy);
  basis[10] = T(kShC3_1) * xy * z;
  basis[11] = T(kShC3_2) * y * (T(4) * zz - xx - yy);
  basis[12] = T(kShC3_3) * z * (T(2) * zz - T(3) * xx - T(3) * yy);
  basis[13] = T(kShC3_4) * x * (T(4) * zz - xx - yy);
  basis[14] = T(kShC3_5) * z * (xx - yy);
  basis[15] = T(kShC3_6) * x * (xx - T(3) * yy);
}

// Given dbasis[k] = ∂L/∂basis[k] for k < (degree+1)², returns ∂L/∂dir.
template <typename T>
NPG_HD Vec3<T> sh_basis_vjp(int degree, const Vec3<T>& dir, const T (&dbasis)[16]) {
  Vec3<T> g = {T(0), T(0), T(0)};
  if (degree < 1) return g;
  const T x = dir.x, y = dir.y, z = dir.z;
  g.x += -T(kShC1) * dbasis[3];
  g.y += -T(kShC1) * dbasis[1];
  g.z += T(kShC1) * dbasis[2];
  if (degree < 2) return g;
  const T xx = x * x, yy = y * y, zz = z * z, xy = x * y, yz = y * z, xz = x * z;
  g.x += T(kShC2_0) * y * dbasis[4] - T(2) * T(kShC2_2) * x * dbasis[6] + T(kShC2_3) * z * dbasis[7] +
         T(2) * T(kShC2_4) * x * dbasis[8];
  g.y += T(kShC2_0) * x * dbasis[4] + T(kShC2_1) * z * dbasis[5] - T(2) * T(kShC2_2) * y * dbasis[6] -
         T(2) * T(kShC2_4) * y * dbasis[8];
  g.z += T(kShC2_1) * y * dbasis[5] + T(4) * T(kShC2_2) * z * dbasis[6] + T(kShC2_3) * x * dbasis[7];
  if (degree < 3) return g;
  g.x += T(kShC3_0) * T(6) * xy * dbasis[9] + T(kShC3_1) * yz * dbasis[10] - T(kShC3_2) * T(2) * xy * dbasis[11] -
         T(kShC3_3) * T(6) * xz * dbasis[12] + T(kShC3_4) * (T(4) * zz - T(3) * xx - yy) * dbasis[13] +
         T(kShC3_5) * T(2) * xz * dbasis[14] + T(kShC3_6) * T(3) * (xx - yy) * dbasis[15];
  g.y += T(kShC3_0) * T(3) * (xx - yy) * dbasis[9] + T(kShC3_1) * xz * dbasis[10] +
         T(kShC3_2) * (T(4) * zz - xx - T(3) * yy) * dbasis[11] - T(kShC3_3) * T(6) * yz * dbasis[12] -
         T(kShC3_4) * T(2) * xy * dbasis[13] - T(kShC3_5) * T(2) * yz * dbasis[14] -
         T(kShC3_6) * T(6) * xy * dbasis[15];
  g.z += T(kShC3_1) * xy * dbasis[10] + T(kShC3_2) * T(8) * yz * dbasis[11] +
         T(kShC3_3) * (T(6) * zz - T(3) * xx - T(3) * yy) * dbasis[12] + T(kShC3_4) * T(8) * xz * dbasis[13] +
         T(kShC3_5) * (xx - yy) * dbasis[14];
  return g;
}

// ----------------------------------------------------------------------------------------------
// One pixel's view of one splat: power = −½·dᵀ·Q·d with d = centre − pixel.

template <typename T>
NPG_HD T splat_power(T dx, T dy, T qa, T qb, T qc) {
  return T(-0.5) * (qa * dx * dx + qc * dy * dy) - qb * dx * dy;
}

}  // namespace raster
}  // namespace npg
