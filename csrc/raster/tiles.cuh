// Which tiles list a Gaussian. The convention (../shared/refdata/README.md) lists a Gaussian for the
// tiles [trunc((p − r)/16), trunc((p + r + 15)/16)) per axis, r its 3σ radius. Within that rectangle
// we list only the tiles holding a pixel where the Gaussian can pass the α ≥ 1/255 test: α ≤ o·G, so a
// pixel with dᵀQd > 2·ln(255·o) always skips it. Dropping the other tiles leaves every render and
// gradient unchanged and removes most of the sorting and blending work of large or thin Gaussians.
//
// The count (preprocessing) and the emission (duplicate) of a Gaussian's tiles run in different
// kernels, so the test uses only round-to-nearest intrinsics: no contraction or fast-math rewrite can
// make the two disagree. The emission still never writes more pairs than were counted.
#pragma once

#include <cuda_runtime.h>

#include "config.h"

namespace npg {
namespace raster {

// Tile index trunc(v / 16) of pixel coordinate v, clamped to [0, grid]; v is clamped first (to a
// pixel range that changes no result) so that the conversion never overflows.
__device__ __forceinline__ int convention_tile(float v, int grid) {
  v = fminf(fmaxf(v, -1.0f), static_cast<float>(grid + 1) * kTileSize);
  return min(grid, max(0, static_cast<int>(v / kTileSize)));
}

// Bound on dᵀQd beyond which a pixel skips the Gaussian (α < 1/255), with a margin far above the
// float error of the test in the render kernels. +inf when Q is not positive definite (then the
// ellipse test does not apply and the whole convention rectangle is listed); negative (no tile) when
// the opacity alone keeps α below 1/255.
__device__ __forceinline__ float tile_cull_threshold(float opacity, float qa, float qb, float qc) {
  if (!(qa > 0.0f && qc > 0.0f && qa * qc - qb * qb > 0.0f)) return INFINITY;
  if (!(opacity * 255.0f >= 1.0f)) return -1.0f;
  const float bound = 2.0f * logf(255.0f * opacity);
  return bound * 1.001f + 1e-3f;
}

// qa·x² + 2·qb·x·y + qc·y², rounded to nearest at every step.
__device__ __forceinline__ float quadratic_rn(float qa, float qb, float qc, float x, float y) {
  const float xx = __fmul_rn(__fmul_rn(qa, x), x);
  const float xy = __fmul_rn(__fmul_rn(2.0f * qb, x), y);
  const float yy = __fmul_rn(__fmul_rn(qc, y), y);
  return __fadd_rn(__fadd_rn(xx, xy), yy);
}

// Whether the pixel centres of tile (tx, ty) hold a d = pixel − centre with dᵀQd <= threshold, for a
// positive definite Q: the minimum of the convex quadratic over the tile's box is 0 when the centre
// lies in the box and otherwise lies on one of its edges, where it is a clamped 1D minimum.
__device__ __forceinline__ bool tile_touched(float mx, float my, float qa, float qb, float qc, float threshold,
                                             int tx, int ty) {
  const float x0 = __fsub_rn(static_cast<float>(tx * kTileSize), mx);
  const float x1 = __fadd_rn(x0, static_cast<float>(kTileSize - 1));
  const float y0 = __fsub_rn(static_cast<float>(ty * kTileSize), my);
  const float y1 = __fadd_rn(y0, static_cast<float>(kTileSize - 1));
  if (x0 <= 0.0f && x1 >= 0.0f && y0 <= 0.0f && y1 >= 0.0f) return true;
  const float inv_qa = __frcp_rn(qa);
  const float inv_qc = __frcp_rn(qc);
  float best = INFINITY;
  // Edges x = x0, x1: minimiser y = −qb·x/qc clamped to the edge.
  const float ya = fminf(fmaxf(__fmul_rn(__fmul_rn(-qb, x0), inv_qc), y0), y1);
  const float yb = fminf(fmaxf(__fmul_rn(__fmul_rn(-qb, x1), inv_qc), y0), y1);
  // Edges y = y0, y1: minimiser x = −qb·y/qa clamped.
  const float xa = fminf(fmaxf(__fmul_rn(__fmul_rn(-qb, y0), inv_qa), x0), x1);
  const float xb = fminf(fmaxf(__fmul_rn(__fmul_rn(-qb, y1), inv_qa), x0), x1);
  best = fminf(best, quadratic_rn(qa, qb, qc, x0, ya));
  best = fminf(best, quadratic_rn(qa, qb, qc, x1, yb));
  best = fminf(best, quadratic_rn(qa, qb, qc, xa, y0));
  best = fminf(best, quadratic_rn(qa, qb, qc, xb, y1));
  return best <= threshold;
}

__device__ __forceinline__ uint2 pack_tile_rect(int x0, int x1, int y0, int y1) {
  return make_uint2(static_cast<unsigned int>(x0) | (static_cast<unsigned int>(x1) << 16),
                    static_cast<unsigned int>(y0) | (static_cast<unsigned int>(y1) << 16));
}

constexpr unsigned int kFullWarp = 0xFFFFFFFFu;

// Warp-cooperative walk over the listed tiles of one Gaussian: the whole warp calls it with the same
// arguments; lane j tests tiles j, j + 32, ... of the rectangle (row-major) and, for each round of 32,
// visit(tx, ty, hit, rank, round_total) is called on every lane, where rank is the number of hits on
// lower lanes of the round. Returns the number of listed tiles. Large Gaussians cover hundreds of
// tiles: one thread per Gaussian would leave the other 31 lanes idle for the whole walk.
template <typename Visit>
__device__ __forceinline__ int warp_walk_listed_tiles(uint2 rect, float mx, float my, float qa, float qb, float qc,
                                                      float threshold, Visit visit) {
  const int x0 = rect.x & 0xFFFF, x1 = rect.x >> 16;
  const int y0 = rect.y & 0xFFFF, y1 = rect.y >> 16;
  const int width = x1 - x0;
  const int total = width * (y1 - y0);
  const bool test = threshold != INFINITY;
  const unsigned int lane = threadIdx.x & 31u;
  const unsigned int lower_lanes = (1u << lane) - 1u;
  int listed = 0;
  for (int base = 0; base < total; base += 32) {
    const int t = base + static_cast<int>(lane);
    int tx = 0, ty = 0;
    bool hit = false;
    if (t < total) {
      ty = y0 + t / width;
      tx = x0 + t % width;
      hit = !test || tile_touched(mx, my, qa, qb, qc, threshold, tx, ty);
    }
    const unsigned int hits = __ballot_sync(kFullWarp, hit);
    visit(tx, ty, hit, listed + __popc(hits & lower_lanes));
    listed += __popc(hits);
  }
  return listed;
}

}  // namespace raster
}  // namespace npg
