// Constants of the 3DGS rasterization conventions (../shared/refdata/README.md) and of the kernels.
#pragma once

namespace npg {
namespace raster {

constexpr int kTileSize = 16;                       // tiles are kTileSize × kTileSize pixels
constexpr int kBlockSize = kTileSize * kTileSize;   // one thread per pixel of a tile
constexpr int kGradsPerSplat = 10;                  // see SplatGrad in blend.cuh

constexpr float kNearCullZ = 0.2f;           // a Gaussian with view-space z <= this is culled
constexpr float kFovClamp = 1.3f;            // x/z, y/z clamped to ±1.3·tan(half fov) in the Jacobian
constexpr float kCovDilation = 0.3f;         // added to the diagonal of the 2D covariance
constexpr float kMinLambdaGap = 0.1f;        // λ₁ = mid + sqrt(max(0.1, mid² − det))
constexpr float kAlphaMax = 0.99f;           // α = min(0.99, o·G)
constexpr float kAlphaMin = 1.0f / 255.0f;   // a pixel skips a Gaussian with α below this
constexpr float kTransmittanceMin = 1e-4f;   // stop before the transmittance would fall below this

// Bits of the flags word the preprocessing kernel raises on non-finite input values.
enum BadInput : unsigned int {
  kBadMeans = 1u << 0,
  kBadOpacities = 1u << 1,
  kBadShs = 1u << 2,
  kBadColors = 1u << 3,
  kBadScales = 1u << 4,
  kBadRotations = 1u << 5,
  kBadCov3d = 1u << 6,
  kBadBackground = 1u << 7,
};

}  // namespace raster
}  // namespace npg
