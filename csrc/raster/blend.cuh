// One (pixel, splat) step of front-to-back alpha blending and its VJP, shared by the render kernels
// (float) and the host checks (double).
#pragma once

#include "math.cuh"

namespace npg {
namespace raster {

NPG_HD float exp_fast(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}

NPG_HD double exp_fast(double x) { return std::exp(x); }

// Per-splat data the render kernels read, 3 float4 per Gaussian:
//   [0] (x, y, opacity, z): centre in pixels, opacity, view-space depth
//   [1] (a, b, c, threshold): conic Q = [[a, b], [b, c]] and the bound on dᵀQd beyond which α < 1/255
//   [2] (r, g, b, 0): colour
constexpr int kSplatFloat4s = 3;

// Gradient slots per splat accumulated by the render backward ([N, kGradsPerSplat] floats).
enum SplatGrad : int {
  kGradX = 0,  // ∂L/∂(centre x, pixels)
  kGradY,      // ∂L/∂(centre y, pixels)
  kGradA,      // ∂L/∂a
  kGradB,      // ∂L/∂b (b fills both off-diagonal entries of Q)
  kGradC,      // ∂L/∂c
  kGradOpacity,
  kGradR,
  kGradG,
  kGradBlue,
  kGradDepth,
};
static_assert(kGradDepth + 1 == kGradsPerSplat, "SplatGrad must fill kGradsPerSplat slots");

// α of a splat at a pixel, d = centre − pixel. False when the pixel skips it (power > 0 or α < 1/255).
template <typename T>
NPG_HD bool splat_alpha(T dx, T dy, T qa, T qb, T qc, T opacity, T& alpha, T& gauss) {
  const T power = splat_power(dx, dy, qa, qb, qc);
  if (power > T(0)) return false;
  gauss = exp_fast(power);
  const T a = opacity * gauss;
  alpha = a < T(kAlphaMax) ? a : T(kAlphaMax);
  return alpha >= T(kAlphaMin);
}

// What the backward of one pixel carries from splat to splat (front to back).
template <typename T>
struct PixelGradState {
  T transmittance;      // T before the current splat
  T acc_color[3];       // Σ wⱼ·cⱼ over the splats blended so far
  T acc_depth;          // Σ wⱼ·zⱼ likewise
  T total_color[3];     // the pixel's output colour (background term included)
  T total_depth;        // the pixel's output depth
  T final_transmittance;
  T grad_color[3];      // upstream gradients of the pixel's outputs
  T grad_depth;
  T grad_alpha;
};

// VJP of blending one splat (α = min(0.99, o·G) taken straight-through) into a pixel. Writes the
// gradient of the pixel's loss with respect to the splat's SplatGrad slots into grad and advances
// the state past the splat.
template <typename T>
NPG_HD void blend_step_vjp(PixelGradState<T>& s, T dx, T dy, T qa, T qb, T qc, T opacity, T alpha, T gauss,
                           T r, T g, T b, T z, T (&grad)[kGradsPerSplat]) {
  const T weight = alpha * s.transmittance;
  s.acc_color[0] += weight * r;
  s.acc_color[1] += weight * g;
  s.acc_color[2] += weight * b;
  s.acc_depth += weight * z;
  // Outputs of the splats behind this one (and the background) fade with 1/(1 − α).
  const T inv_keep = T(1) / (T(1) - alpha);
  const T T_i = s.transmittance;
  const T dalpha = s.grad_color[0] * (T_i * r - (s.total_color[0] - s.acc_color[0]) * inv_keep) +
                   s.grad_color[1] * (T_i * g - (s.total_color[1] - s.acc_color[1]) * inv_keep) +
                   s.grad_color[2] * (T_i * b - (s.total_color[2] - s.acc_color[2]) * inv_keep) +
                   s.grad_depth * (T_i * z - (s.total_depth - s.acc_depth) * inv_keep) +
                   s.grad_alpha * s.final_transmittance * inv_keep;
  const T dpower = opacity * gauss * dalpha;
  grad[kGradX] = -(qa * dx + qb * dy) * dpower;
  grad[kGradY] = -(qb * dx + qc * dy) * dpower;
  grad[kGradA] = T(-0.5) * dx * dx * dpower;
  grad[kGradB] = -dx * dy * dpower;
  grad[kGradC] = T(-0.5) * dy * dy * dpower;
  grad[kGradOpacity] = gauss * dalpha;
  grad[kGradR] = weight * s.grad_color[0];
  grad[kGradG] = weight * s.grad_color[1];
  grad[kGradBlue] = weight * s.grad_color[2];
  grad[kGradDepth] = weight * s.grad_depth;
  s.transmittance = T_i * (T(1) - alpha);
}

}  // namespace raster
}  // namespace npg
