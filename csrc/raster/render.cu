// Per-tile front-to-back blending (one block of 16×16 threads per tile, one thread per pixel) and its
// backward.
//
// The backward walks each pixel's splats front to back again, like the forward. For each splat the
// 32 pixels of a warp add their 10 gradient terms with a transposing butterfly (16 shuffles leave
// the warp's sum of term k in lanes 2k and 2k+1), and ten lanes then issue one atomic add each, to
// consecutive addresses: one coalesced atomic instruction per warp and splat instead of ~9 per pixel
// and splat.
#include <c10/cuda/CUDAException.h>

#include "kernels.cuh"

namespace npg {
namespace raster {
namespace {

constexpr unsigned int kFullMask = 0xFFFFFFFFu;

// a where the mask bits are set, else b. A bitwise select: the compiler turns `c ? v[i] : v[j]` into
// a select of addresses, which moves the array to local memory.
__device__ __forceinline__ float select_bits(unsigned int mask, float a, float b) {
  return __uint_as_float((__float_as_uint(a) & mask) | (__float_as_uint(b) & ~mask));
}

// Sums v over the 32 lanes of the warp; afterwards lanes 2k and 2k+1 hold the sum of v[k] in v[0].
// Each step halves the values a lane keeps: the lanes of a pair trade the halves they drop.
__device__ __forceinline__ void warp_transpose_sum16(float (&v)[16], int lane) {
#pragma unroll
  for (int step = 0; step < 4; ++step) {
    const int width = 8 >> step;  // values kept after this step
    const int bit = 16 >> step;   // the lane bit that picks the half
    const unsigned int upper = (lane & bit) ? 0xFFFFFFFFu : 0u;
#pragma unroll
    for (int k = 0; k < width; ++k) {
      const float send = select_bits(upper, v[k], v[k + width]);
      const float keep = select_bits(upper, v[k + width], v[k]);
      v[k] = keep + __shfl_xor_sync(kFullMask, send, bit);
    }
  }
  v[0] += __shfl_xor_sync(kFullMask, v[0], 1);
}

__global__ void __launch_bounds__(kBlockSize)
    render_forward_kernel(CameraParams cam,
                          const int2* __restrict__ ranges,        // [tiles]
                          const int* __restrict__ point_list,     // [M]
                          const float4* __restrict__ splats,      // [N, kSplatFloat4s]
                          const float* __restrict__ background,   // [3]
                          float* __restrict__ out_color,          // [3, H, W]
                          float* __restrict__ out_depth,          // [H, W]
                          float* __restrict__ out_alpha,          // [H, W]
                          float* __restrict__ final_T,            // [H, W]
                          int* __restrict__ n_contrib) {          // [H, W]
  __shared__ float4 s_centre[kBlockSize];  // (x, y, opacity, z)
  __shared__ float4 s_conic[kBlockSize];   // (a, b, c, threshold)
  __shared__ float4 s_color[kBlockSize];   // (r, g, b, 0)

  const int tid = threadIdx.y * kTileSize + threadIdx.x;
  const int px = blockIdx.x * kTileSize + threadIdx.x;
  const int py = blockIdx.y * kTileSize + threadIdx.y;
  const bool inside = px < cam.width && py < cam.height;
  const float pxf = static_cast<float>(px), pyf = static_cast<float>(py);
  const int2 range = ranges[blockIdx.y * cam.tiles_x + blockIdx.x];

  bool done = !inside;
  float T = 1.0f;
  float C[3] = {0.0f, 0.0f, 0.0f};
  float D = 0.0f;
  int last = 0;  // 1-based position in the tile's list of the last blended splat

  for (int base = range.x; base < range.y; base += kBlockSize) {
    if (__syncthreads_count(done) == kBlockSize) break;
    const int idx = base + tid;
    if (idx < range.y) {
      const int64_t g = point_list[idx];
      s_centre[tid] = splats[kSplatFloat4s * g];
      s_conic[tid] = splats[kSplatFloat4s * g + 1];
      s_color[tid] = splats[kSplatFloat4s * g + 2];
    }
    __syncthreads();
    const int count = min(kBlockSize, range.y - base);
    for (int j = 0; j < count; ++j) {
      if (__all_sync(kFullMask, done)) break;
      if (done) continue;
      const float4 centre = s_centre[j];
      const float4 conic = s_conic[j];
      float alpha, gauss;
      if (!splat_alpha(centre.x - pxf, centre.y - pyf, conic.x, conic.y, conic.z, centre.z, alpha, gauss)) continue;
      const float next_T = T * (1.0f - alpha);
      if (next_T < kTransmittanceMin) {
        done = true;
        continue;
      }
      const float4 color = s_color[j];
      const float w = alpha * T;
      C[0] += w * color.x;
      C[1] += w * color.y;
      C[2] += w * color.z;
      D += w * centre.w;
      T = next_T;
      last = base - range.x + j + 1;
    }
  }

  if (inside) {
    const int64_t pix = static_cast<int64_t>(py) * cam.width + px;
    const int64_t plane = static_cast<int64_t>(cam.width) * cam.height;
    out_color[pix] = C[0] + T * background[0];
    out_color[plane + pix] = C[1] + T * background[1];
    out_color[2 * plane + pix] = C[2] + T * background[2];
    out_depth[pix] = D;
    out_alpha[pix] = 1.0f - T;
    final_T[pix] = T;
    n_contrib[pix] = last;
  }
}

__global__ void __launch_bounds__(kBlockSize)
    render_backward_kernel(CameraParams cam,
                           const int2* __restrict__ ranges,        // [tiles]
                           const int* __restrict__ point_list,     // [M]
                           const float4* __restrict__ splats,      // [N, kSplatFloat4s]
                           const float* __restrict__ out_color,    // [3, H, W]
                           const float* __restrict__ out_depth,    // [H, W]
                           const float* __restrict__ final_T,      // [H, W]
                           const int* __restrict__ n_contrib,      // [H, W]
                           const float* __restrict__ grad_color,   // [3, H, W]
                           const float* __restrict__ grad_depth,   // [H, W]
                           const float* __restrict__ grad_alpha,   // [H, W]
                           float* __restrict__ splat_grads) {      // [N, kGradsPerSplat]
  __shared__ float4 s_centre[kBlockSize];
  __shared__ float4 s_conic[kBlockSize];
  __shared__ float4 s_color[kBlockSize];
  __shared__ int s_id[kBlockSize];
  __shared__ int s_block_last;

  const int tid = threadIdx.y * kTileSize + threadIdx.x;
  const int lane = tid & 31;
  const int px = blockIdx.x * kTileSize + threadIdx.x;
  const int py = blockIdx.y * kTileSize + threadIdx.y;
  const bool inside = px < cam.width && py < cam.height;
  const float pxf = static_cast<float>(px), pyf = static_cast<float>(py);
  const int2 range = ranges[blockIdx.y * cam.tiles_x + blockIdx.x];

  PixelGradState<float> st = {};
  st.transmittance = 1.0f;
  int last = 0;
  if (inside) {
    const int64_t pix = static_cast<int64_t>(py) * cam.width + px;
    const int64_t plane = static_cast<int64_t>(cam.width) * cam.height;
    last = n_contrib[pix];
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      st.total_color[c] = out_color[c * plane + pix];
      st.grad_color[c] = grad_color[c * plane + pix];
    }
    st.total_depth = out_depth[pix];
    st.final_transmittance = final_T[pix];
    st.grad_depth = grad_depth[pix];
    st.grad_alpha = grad_alpha[pix];
  }
  // Splats past the last contributor of every pixel of the warp / block are never visited.
  const int warp_last = __reduce_max_sync(kFullMask, last);
  if (tid == 0) s_block_last = 0;
  __syncthreads();
  if (lane == 0) atomicMax(&s_block_last, warp_last);
  __syncthreads();
  const int end = range.x + s_block_last;

  for (int base = range.x; base < end; base += kBlockSize) {
    __syncthreads();  // the previous batch is consumed
    const int idx = base + tid;
    if (idx < end) {
      const int g = point_list[idx];
      s_id[tid] = g;
      s_centre[tid] = splats[kSplatFloat4s * static_cast<int64_t>(g)];
      s_conic[tid] = splats[kSplatFloat4s * static_cast<int64_t>(g) + 1];
      s_color[tid] = splats[kSplatFloat4s * static_cast<int64_t>(g) + 2];
    }
    __syncthreads();
    const int count = min(kBlockSize, end - base);
    for (int j = 0; j < count; ++j) {
      const int position = base - range.x + j + 1;
      if (position > warp_last) break;  // warp-uniform
      const float4 centre = s_centre[j];
      const float4 conic = s_conic[j];
      const float dx = centre.x - pxf, dy = centre.y - pyf;
      float alpha = 0.0f, gauss = 0.0f;
      const bool blended =
          position <= last && splat_alpha(dx, dy, conic.x, conic.y, conic.z, centre.z, alpha, gauss);
      if (!__any_sync(kFullMask, blended)) continue;
      float v[16];
#pragma unroll
      for (int k = 0; k < 16; ++k) v[k] = 0.0f;
      if (blended) {
        const float4 color = s_color[j];
        float grad[kGradsPerSplat];
        blend_step_vjp(st, dx, dy, conic.x, conic.y, conic.z, centre.z, alpha, gauss, color.x, color.y, color.z,
                       centre.w, grad);
#pragma unroll
        for (int k = 0; k < kGradsPerSplat; ++k) v[k] = grad[k];
      }
      warp_transpose_sum16(v, lane);
      const int slot = lane >> 1;
      if ((lane & 1) == 0 && slot < kGradsPerSplat) {
        atomicAdd(splat_grads + static_cast<int64_t>(s_id[j]) * kGradsPerSplat + slot, v[0]);
      }
    }
  }
}

}  // namespace

void launch_render_forward(const CameraParams& cam, const int2* ranges, const int* point_list, const float4* splats,
                           const float* background, float* out_color, float* out_depth, float* out_alpha,
                           float* final_T, int* n_contrib, cudaStream_t stream) {
  const dim3 grid(cam.tiles_x, cam.tiles_y);
  const dim3 block(kTileSize, kTileSize);
  render_forward_kernel<<<grid, block, 0, stream>>>(cam, ranges, point_list, splats, background, out_color,
                                                     out_depth, out_alpha, final_T, n_contrib);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_render_backward(const CameraParams& cam, const int2* ranges, const int* point_list,
                            const float4* splats, const float* out_color, const float* out_depth,
                            const float* final_T, const int* n_contrib, const float* grad_color,
                            const float* grad_depth, const float* grad_alpha, float* splat_grads,
                            cudaStream_t stream) {
  const dim3 grid(cam.tiles_x, cam.tiles_y);
  const dim3 block(kTileSize, kTileSize);
  render_backward_kernel<<<grid, block, 0, stream>>>(cam, ranges, point_list, splats, out_color, out_depth, final_T,
                                                      n_contrib, grad_color, grad_depth, grad_alpha, splat_grads);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace raster
}  // namespace npg
