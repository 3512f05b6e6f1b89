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

__global__ void gather_counts_kernel(int n, const int* __restrict__ order, const int* __restrict__ tiles_touched,
                                     int64_t* __restrict__ counts) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) counts[i] = tiles_touched[order[i]];
}

__global__ void duplicate_kernel(int n, const int* __restrict__ order, const int64_t* __restrict__ offsets,
                                 const int* __restrict__ tiles_touched, const float4* __restrict__ splats,
                                 const uint2* __restrict__ tile_rects, int tiles_x, unsigned int sentinel_tile,
                                 unsigned int* __restrict__ keys, int* __restrict__ values) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int gaussian = order[i];
  const int count = tiles_touched[gaussian];
  if (count == 0) return;
  const int64_t start = offsets[i] - count;
  const float4 centre = splats[kSplatFloat4s * static_cast<int64_t>(gaussian)];
  const float4 conic = splats[kSplatFloat4s * static_cast<int64_t>(gaussian) + 1];
  int written = 0;
  for_each_listed_tile(tile_rects[gaussian], centre.x, centre.y, conic.x, conic.y, conic.z, conic.w,
                       [&](int tx, int ty) {
                         keys[start + written] = static_cast<unsigned int>(ty * tiles_x + tx);
                         values[start + written] = gaussian;
                         return ++written < count;
                       });
  // Never reached while the count and the emission agree (tiles.cuh); keeps the buffer defined if not.
  for (; written < count; ++written) {
    keys[start + written] = sentinel_tile;
    values[start + written] = gaussian;
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

void launch_gather_counts(int n, const int* order, const int* tiles_touched, int64_t* counts, cudaStream_t stream) {
  if (n == 0) return;
  gather_counts_kernel<<<blocks_for(n), kThreads, 0, stream>>>(n, order, tiles_touched, counts);
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
