// Tile binning: list every (tile, Gaussian) pair so that each tile's Gaussians come front to back.
//
// Rather than sorting 64-bit (tile << 32 | depth) keys, the Gaussians are sorted by depth once (N
// 32-bit keys) and their pairs are emitted in that order; a stable radix sort on the tile id alone
// (ceil(log2(tiles + 1)) bits: two 8-bit passes up to 65 535 tiles) then keeps each tile's pairs in
// depth order. Same order as the 64-bit sort, a fraction of the passes and bytes.
#include <c10/cuda/CUDAException.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "kernels.cuh"
#include "tiles.cuh"

namespace npg {
namespace raster {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

// Loads what the tile walk of Gaussian g needs (the same values on every lane that asks).
struct TileWalk {
  uint2 rect;
  float4 centre, conic;
};

__device__ __forceinline__ TileWalk load_walk(const float4* splats, const uint2* tile_rects, int g) {
  return {tile_rects[g], splats[kSplatFloat4s * static_cast<int64_t>(g)],
          splats[kSplatFloat4s * static_cast<int64_t>(g) + 1]};
}

// counts[i] = number of listed tiles of Gaussian order[i] (0 when culled), also stored per Gaussian in
// tiles_touched. One warp walks each of its 32 Gaussians' tiles in turn.
__global__ void count_tiles_kernel(int n, const int* __restrict__ order, const int* __restrict__ radii,
                                   const float4* __restrict__ splats, const uint2* __restrict__ tile_rects,
                                   int* __restrict__ tiles_touched, int64_t* __restrict__ counts) {
  // Every lane of the warp takes part in every walk, so lanes past n stay until the end.
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned int lane = threadIdx.x & 31u;
  const int gaussian = i < n ? order[i] : -1;
  const bool live = gaussian >= 0 && radii[gaussian] > 0;
  int count = 0;
  for (unsigned int pending = __ballot_sync(kFullWarp, live); pending != 0; pending &= pending - 1) {
    const int src = __ffs(pending) - 1;
    const int g = __shfl_sync(kFullWarp, gaussian, src);
    const TileWalk w = load_walk(splats, tile_rects, g);
    const int listed = warp_walk_listed_tiles(w.rect, w.centre.x, w.centre.y, w.conic.x, w.conic.y, w.conic.z,
                                              w.conic.w, [](int, int, bool, int) {});
    if (static_cast<int>(lane) == src) count = listed;
  }
  if (i < n) {
    counts[i] = count;
    tiles_touched[gaussian] = count;
  }
}

__global__ void duplicate_kernel(int n, const int* __restrict__ order, const int64_t* __restrict__ offsets,
                                 const int* __restrict__ tiles_touched, const float4* __restrict__ splats,
                                 const uint2* __restrict__ tile_rects, int tiles_x, unsigned int sentinel_tile,
                                 unsigned int* __restrict__ keys, int* __restrict__ values) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned int lane = threadIdx.x & 31u;
  const int gaussian = i < n ? order[i] : -1;
  const int count = gaussian >= 0 ? tiles_touched[gaussian] : 0;
  const int64_t start = i < n ? offsets[i] - count : 0;
  for (unsigned int pending = __ballot_sync(kFullWarp, count > 0); pending != 0; pending &= pending - 1) {
    const int src = __ffs(pending) - 1;
    const int g = __shfl_sync(kFullWarp, gaussian, src);
    const int c = __shfl_sync(kFullWarp, count, src);
    const int64_t s = __shfl_sync(kFullWarp, start, src);
    const TileWalk w = load_walk(splats, tile_rects, g);
    const int listed = warp_walk_listed_tiles(w.rect, w.centre.x, w.centre.y, w.conic.x, w.conic.y, w.conic.z,
                                              w.conic.w, [&](int tx, int ty, bool hit, int rank) {
                                                if (hit && rank < c) {
                                                  keys[s + rank] = static_cast<unsigned int>(ty * tiles_x + tx);
                                                  values[s + rank] = g;
                                                }
                                              });
    // Never reached while the count and the emission agree (tiles.cuh); keeps the buffer defined if not.
    for (int k = listed + static_cast<int>(lane); k < c; k += 32) {
      keys[s + k] = sentinel_tile;
      values[s + k] = g;
    }
  }
}

__global__ void tile_ranges_kernel(int num_pairs, const unsigned int* __restrict__ keys, unsigned int num_tiles,
                                   int2* __restrict__ ranges) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= num_pairs) return;
  const unsigned int tile = keys[i];
  if (tile >= num_tiles) return;  // sentinel pairs sort last and belong to no tile
  if (i == 0 || keys[i - 1] != tile) ranges[tile].x = i;
  if (i == num_pairs - 1 || keys[i + 1] != tile) ranges[tile].y = i + 1;
}

}  // namespace

void launch_count_tiles(int n, const int* order, const int* radii, const float4* splats, const uint2* tile_rects,
                        int* tiles_touched, int64_t* counts, cudaStream_t stream) {
  if (n == 0) return;
  count_tiles_kernel<<<blocks_for(n), kThreads, 0, stream>>>(n, order, radii, splats, tile_rects, tiles_touched,
                                                             counts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_duplicate(int n, const int* order, const int64_t* offsets, const int* tiles_touched,
                      const float4* splats, const uint2* tile_rects, int tiles_x, unsigned int sentinel_tile,
                      unsigned int* keys, int* values, cudaStream_t stream) {
  if (n == 0) return;
  duplicate_kernel<<<blocks_for(n), kThreads, 0, stream>>>(n, order, offsets, tiles_touched, splats, tile_rects,
                                                           tiles_x, sentinel_tile, keys, values);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_tile_ranges(int num_pairs, const unsigned int* sorted_keys, unsigned int num_tiles, int2* ranges,
                        cudaStream_t stream) {
  if (num_pairs == 0) return;
  tile_ranges_kernel<<<blocks_for(num_pairs), kThreads, 0, stream>>>(num_pairs, sorted_keys, num_tiles, ranges);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

cudaError_t sort_pairs_u32(void* temp, size_t& temp_bytes, const unsigned int* keys_in, unsigned int* keys_out,
                           const int* values_in, int* values_out, int n, int end_bit, cudaStream_t stream) {
  return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, values_in, values_out, n, 0, end_bit,
                                         stream);
}

cudaError_t inclusive_sum_i64(void* temp, size_t& temp_bytes, const int64_t* in, int64_t* out, int n,
                              cudaStream_t stream) {
  return cub::DeviceScan::InclusiveSum(temp, temp_bytes, in, out, n, stream);
}

}  // namespace raster
}  // namespace npg
