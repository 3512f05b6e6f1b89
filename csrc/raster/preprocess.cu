// Per-Gaussian preprocessing (cull, covariances, conic, radius, tiles, colour) and its backward.
#include <c10/cuda/CUDAException.h>

#include "kernels.cuh"
#include "tiles.cuh"

namespace npg {
namespace raster {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ Vec3<float> load3(const float* p) { return {p[0], p[1], p[2]}; }

__device__ __forceinline__ bool finite3(const Vec3<float>& v) {
  return isfinite(v.x) && isfinite(v.y) && isfinite(v.z);
}

// Σ of Gaussian i from scales + rotations or the precomputed covariance; raises bad-input flags.
__device__ __forceinline__ Sym3<float> load_covariance(const GaussianInputs& in, int i, unsigned int& bad) {
  if (in.cov3d != nullptr) {
    const float* c = in.cov3d + 6 * static_cast<int64_t>(i);
    const Sym3<float> sigma = {c[0], c[1], c[2], c[3], c[4], c[5]};
    if (!(isfinite(sigma.xx) && isfinite(sigma.xy) && isfinite(sigma.xz) && isfinite(sigma.yy) &&
          isfinite(sigma.yz) && isfinite(sigma.zz)))
      bad |= kBadCov3d;
    return sigma;
  }
  const Vec3<float> s = load3(in.scales + 3 * static_cast<int64_t>(i));
  const float* r = in.rotations + 4 * static_cast<int64_t>(i);
  const Quat<float> q = {r[0], r[1], r[2], r[3]};
  if (!finite3(s)) bad |= kBadScales;
  if (!(isfinite(q.w) && isfinite(q.x) && isfinite(q.y) && isfinite(q.z))) bad |= kBadRotations;
  return covariance_from_scale_rotation(s, in.scale_modifier, q);
}

// The 3DGS view-dependent colour SH(dir) + 0.5 before the clamp at 0, dir from the camera centre.
__device__ __forceinline__ Vec3<float> sh_color_unclamped(const GaussianInputs& in, int i, const Vec3<float>& dir,
                                                          const float (&basis)[16]) {
  const float* sh = in.shs + static_cast<int64_t>(i) * in.sh_stride * 3;
  const int count = (in.sh_degree + 1) * (in.sh_degree + 1);
  Vec3<float> c = {0.5f, 0.5f, 0.5f};
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    if (k < count) {
      c.x += basis[k] * sh[3 * k + 0];
      c.y += basis[k] * sh[3 * k + 1];
      c.z += basis[k] * sh[3 * k + 2];
    }
  }
  return c;
}

__global__ void __launch_bounds__(kThreads)
    preprocess_forward_kernel(GaussianInputs in, CameraParams cam, PreprocessOutputs out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i == 0 && !(isfinite(in.background[0]) && isfinite(in.background[1]) && isfinite(in.background[2]))) {
    atomicOr(out.bad_input, kBadBackground);
  }
  if (i >= in.num_gaussians) return;
  out.depth_order[i] = i;
  out.radii[i] = 0;
  out.depth_keys[i] = 0xFFFFFFFFu;

  unsigned int bad = 0;
  const Vec3<float> p = load3(in.means3d + 3 * static_cast<int64_t>(i));
  if (!finite3(p)) bad |= kBadMeans;
  const float opacity = in.opacities[i];
  if (!isfinite(opacity)) bad |= kBadOpacities;
  const Sym3<float> sigma = load_covariance(in, i, bad);
  if (bad) {
    atomicOr(out.bad_input, bad);
    return;
  }

  const Vec3<float> t = transform_point(cam.R, cam.t, p);
  if (!(t.z > kNearCullZ)) return;
  const EwaJacobian<float> J = ewa_jacobian(t, cam.fx, cam.fy, cam.lim_x, cam.lim_y);
  const Sym2<float> cov = project_covariance(sigma, cam.R, J);
  const float det = cov.xx * cov.yy - cov.xy * cov.xy;
  if (det == 0.0f || !isfinite(det)) return;
  const Sym2<float> conic = invert_sym2(cov, det);
  const float mid = 0.5f * (cov.xx + cov.yy);
  const float lambda1 = mid + __fsqrt_rn(fmaxf(kMinLambdaGap, mid * mid - det));
  const float radius = ceilf(3.0f * __fsqrt_rn(lambda1));
  float px, py;
  project_point(t, cam.fx, cam.fy, cam.cx, cam.cy, px, py);
  if (!(isfinite(px) && isfinite(py) && isfinite(radius) && isfinite(conic.xx) && isfinite(conic.xy) &&
        isfinite(conic.yy)))
    return;
  const int rect_x0 = convention_tile(px - radius, cam.tiles_x);
  const int rect_x1 = convention_tile(px + radius + (kTileSize - 1), cam.tiles_x);
  const int rect_y0 = convention_tile(py - radius, cam.tiles_y);
  const int rect_y1 = convention_tile(py + radius + (kTileSize - 1), cam.tiles_y);
  if ((rect_x1 - rect_x0) * (rect_y1 - rect_y0) == 0) return;

  Vec3<float> rgb;
  if (in.shs != nullptr) {
    const Vec3<float> dir = normalize(Vec3<float>{p.x - cam.campos.x, p.y - cam.campos.y, p.z - cam.campos.z});
    float basis[16];
    sh_basis(in.sh_degree, dir, basis);
    rgb = sh_color_unclamped(in, i, dir, basis);
    if (!finite3(rgb)) {
      atomicOr(out.bad_input, kBadShs);
      return;
    }
    rgb = {fmaxf(rgb.x, 0.0f), fmaxf(rgb.y, 0.0f), fmaxf(rgb.z, 0.0f)};
  } else {
    rgb = load3(in.colors + 3 * static_cast<int64_t>(i));
    if (!finite3(rgb)) {
      atomicOr(out.bad_input, kBadColors);
      return;
    }
  }

  // Tiles to test: the convention rectangle cut to the bounding box of the ellipse dᵀQd <= threshold,
  // whose half-widths are sqrt(threshold·cov_xx), sqrt(threshold·cov_yy).
  const float threshold = tile_cull_threshold(opacity, conic.xx, conic.xy, conic.yy);
  int x0 = rect_x0, x1 = rect_x1, y0 = rect_y0, y1 = rect_y1;
  if (threshold != INFINITY) {
    if (threshold >= 0.0f) {
      const float half_w = sqrtf(threshold * cov.xx) * 1.001f + 0.01f;
      const float half_h = sqrtf(threshold * cov.yy) * 1.001f + 0.01f;
      const float lo_x = fminf(fmaxf(floorf((px - half_w) / kTileSize), -1.0f), 65536.0f);
      const float hi_x = fminf(fmaxf(floorf((px + half_w) / kTileSize) + 1.0f, -1.0f), 65536.0f);
      const float lo_y = fminf(fmaxf(floorf((py - half_h) / kTileSize), -1.0f), 65536.0f);
      const float hi_y = fminf(fmaxf(floorf((py + half_h) / kTileSize) + 1.0f, -1.0f), 65536.0f);
      x0 = max(x0, static_cast<int>(lo_x));
      x1 = min(x1, static_cast<int>(hi_x));
      y0 = max(y0, static_cast<int>(lo_y));
      y1 = min(y1, static_cast<int>(hi_y));
    }
    if (threshold < 0.0f || x0 >= x1 || y0 >= y1) x0 = x1 = y0 = y1 = 0;
  }
  const uint2 rect = pack_tile_rect(x0, x1, y0, y1);
  float4* splat = out.splats + kSplatFloat4s * static_cast<int64_t>(i);
  splat[0] = make_float4(px, py, opacity, t.z);
  splat[1] = make_float4(conic.xx, conic.xy, conic.yy, threshold);
  splat[2] = make_float4(rgb.x, rgb.y, rgb.z, 0.0f);
  out.tile_rects[i] = rect;
  out.radii[i] = static_cast<int>(radius);
  out.depth_keys[i] = __float_as_uint(t.z);  // z > 0.2: the float bits sort like the values
}

__global__ void __launch_bounds__(kThreads)
    preprocess_backward_kernel(GaussianInputs in, CameraParams cam,
                               const int* __restrict__ radii,          // [N]
                               const float* __restrict__ splat_grads,  // [N, kGradsPerSplat]
                               InputGrads out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= in.num_gaussians) return;
  const int64_t i64 = i;
  const int sh_count = (in.sh_degree + 1) * (in.sh_degree + 1);

  if (radii[i] <= 0) {
    for (int k = 0; k < 3; ++k) {
      out.means3d[3 * i64 + k] = 0.0f;
      out.means2d[3 * i64 + k] = 0.0f;
    }
    out.opacities[i] = 0.0f;
    if (out.shs != nullptr) {
      for (int k = 0; k < 3 * in.sh_stride; ++k) out.shs[i64 * in.sh_stride * 3 + k] = 0.0f;
    }
    if (out.colors != nullptr) {
      for (int k = 0; k < 3; ++k) out.colors[3 * i64 + k] = 0.0f;
    }
    if (out.scales != nullptr) {
      for (int k = 0; k < 3; ++k) out.scales[3 * i64 + k] = 0.0f;
    }
    if (out.rotations != nullptr) {
      for (int k = 0; k < 4; ++k) out.rotations[4 * i64 + k] = 0.0f;
    }
    if (out.cov3d != nullptr) {
      for (int k = 0; k < 6; ++k) out.cov3d[6 * i64 + k] = 0.0f;
    }
    return;
  }

  float g[kGradsPerSplat];
#pragma unroll
  for (int k = 0; k < kGradsPerSplat; ++k) g[k] = splat_grads[i64 * kGradsPerSplat + k];

  // Recompute the forward quantities the chain rule needs.
  const Vec3<float> p = load3(in.means3d + 3 * i64);
  unsigned int unused_flags = 0;
  const Sym3<float> sigma = load_covariance(in, i, unused_flags);
  const Vec3<float> t = transform_point(cam.R, cam.t, p);
  const EwaJacobian<float> J = ewa_jacobian(t, cam.fx, cam.fy, cam.lim_x, cam.lim_y);
  const Sym2<float> cov = project_covariance(sigma, cam.R, J);
  const Sym2<float> conic = invert_sym2(cov, cov.xx * cov.yy - cov.xy * cov.xy);

  // Screen-space centre, for densification: NDC = (2·pixel + 1)/size − 1.
  out.means2d[3 * i64 + 0] = g[kGradX] * (0.5f * cam.width);
  out.means2d[3 * i64 + 1] = g[kGradY] * (0.5f * cam.height);
  out.means2d[3 * i64 + 2] = 0.0f;

  Vec3<float> dt = project_point_vjp(t, cam.fx, cam.fy, g[kGradX], g[kGradY]);
  dt.z += g[kGradDepth];
  // b fills both off-diagonal entries of Q: its symmetric gradient entry is half of ∂L/∂b.
  const Sym2<float> dconic = {g[kGradA], 0.5f * g[kGradB], g[kGradC]};
  const Sym2<float> dcov = invert_sym2_vjp(conic, dconic);
  const Sym3<float> dsigma = project_covariance_vjp(sigma, cam.R, t, cam.fx, cam.fy, J, dcov, dt);
  Vec3<float> dp = transform_point_vjp(cam.R, dt);

  if (in.shs != nullptr) {
    const Vec3<float> offset = {p.x - cam.campos.x, p.y - cam.campos.y, p.z - cam.campos.z};
    const Vec3<float> dir = normalize(offset);
    float basis[16];
    sh_basis(in.sh_degree, dir, basis);
    const Vec3<float> raw = sh_color_unclamped(in, i, dir, basis);
    // No gradient through a channel clamped at 0.
    const float dr = raw.x >= 0.0f ? g[kGradR] : 0.0f;
    const float dg = raw.y >= 0.0f ? g[kGradG] : 0.0f;
    const float db = raw.z >= 0.0f ? g[kGradBlue] : 0.0f;
    const float* sh = in.shs + i64 * in.sh_stride * 3;
    float* dsh = out.shs + i64 * in.sh_stride * 3;
    float dbasis[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      dbasis[k] = 0.0f;
      if (k < sh_count) {
        dbasis[k] = sh[3 * k + 0] * dr + sh[3 * k + 1] * dg + sh[3 * k + 2] * db;
        dsh[3 * k + 0] = basis[k] * dr;
        dsh[3 * k + 1] = basis[k] * dg;
        dsh[3 * k + 2] = basis[k] * db;
      }
    }
    for (int k = 3 * sh_count; k < 3 * in.sh_stride; ++k) dsh[k] = 0.0f;
    const Vec3<float> ddir = sh_basis_vjp(in.sh_degree, dir, dbasis);
    const Vec3<float> dmean = normalize_vjp(offset, ddir);
    dp.x += dmean.x;
    dp.y += dmean.y;
    dp.z += dmean.z;
  } else {
    out.colors[3 * i64 + 0] = g[kGradR];
    out.colors[3 * i64 + 1] = g[kGradG];
    out.colors[3 * i64 + 2] = g[kGradBlue];
  }

  out.means3d[3 * i64 + 0] = dp.x;
  out.means3d[3 * i64 + 1] = dp.y;
  out.means3d[3 * i64 + 2] = dp.z;
  out.opacities[i] = g[kGradOpacity];

  if (in.cov3d != nullptr) {
    // An off-diagonal parameter fills two entries of Σ.
    float* d = out.cov3d + 6 * i64;
    d[0] = dsigma.xx;
    d[1] = 2.0f * dsigma.xy;
    d[2] = 2.0f * dsigma.xz;
    d[3] = dsigma.yy;
    d[4] = 2.0f * dsigma.yz;
    d[5] = dsigma.zz;
  } else {
    const Vec3<float> s = load3(in.scales + 3 * i64);
    const float* r = in.rotations + 4 * i64;
    Vec3<float> ds;
    Quat<float> dq;
    covariance_from_scale_rotation_vjp(s, in.scale_modifier, Quat<float>{r[0], r[1], r[2], r[3]}, dsigma, ds, dq);
    out.scales[3 * i64 + 0] = ds.x;
    out.scales[3 * i64 + 1] = ds.y;
    out.scales[3 * i64 + 2] = ds.z;
    out.rotations[4 * i64 + 0] = dq.w;
    out.rotations[4 * i64 + 1] = dq.x;
    out.rotations[4 * i64 + 2] = dq.y;
    out.rotations[4 * i64 + 3] = dq.z;
  }
}

int blocks_for(int n) { return (n + kThreads - 1) / kThreads; }

}  // namespace

void launch_preprocess_forward(const GaussianInputs& in, const CameraParams& cam, const PreprocessOutputs& out,
                               cudaStream_t stream) {
  // One block even for N = 0: thread 0 checks the background.
  preprocess_forward_kernel<<<blocks_for(in.num_gaussians > 0 ? in.num_gaussians : 1), kThreads, 0, stream>>>(
      in, cam, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_preprocess_backward(const GaussianInputs& in, const CameraParams& cam, const int* radii,
                                const float* splat_grads, const InputGrads& grads, cudaStream_t stream) {
  if (in.num_gaussians == 0) return;
  preprocess_backward_kernel<<<blocks_for(in.num_gaussians), kThreads, 0, stream>>>(in, cam, radii, splat_grads,
                                                                                     grads);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace raster
}  // namespace npg
