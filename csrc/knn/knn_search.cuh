// The search kernel, instantiated per dimension in knn_search2d.cu / knn_search3d.cu (so the two
// compile in parallel) and per top-k capacity below.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "knn_launch.h"

namespace npg_knn {

// One thread per query, queries in Morton order so that a warp walks nearly the same nodes.
//   queries    [Q]   sorted, packed (x, y, z, row bits): the query's output row travels in w
//   query_keys [Q]   their Morton keys, or nullptr when the queries are the sorted points themselves
//   point_keys [N]   sorted Morton keys of the points
//   points     [N]   sorted, packed;  boxes: every tree level (see knn_tree.cuh)
//   out_dist2  [Q, k], out_index [Q, k]
template <int D, int KMAX>
__global__ void __launch_bounds__(128) search_kernel(const float4* __restrict__ queries,
                                                     const uint32_t* __restrict__ query_keys,
                                                     const uint32_t* __restrict__ point_keys,
                                                     const float4* __restrict__ points,
                                                     const float4* __restrict__ boxes, const TreeShape shape,
                                                     int n_queries, int k, float* __restrict__ out_dist2,
                                                     int64_t* __restrict__ out_index) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n_queries) return;
  const float4 q = queries[t];
  const uint32_t row = __float_as_uint(q.w);
  uint32_t self;
  int home_leaf;
  if (query_keys == nullptr) {
    self = row;
    home_leaf = t / shape.leaf_size;
  } else {
    self = kNoSelf;
    const int position = lower_bound(point_keys, shape.n_points, query_keys[t]);
    home_leaf = imin(position, shape.n_points - 1) / shape.leaf_size;
  }
  search<D, KMAX>(points, boxes, shape, q, self, home_leaf, k, out_dist2 + int64_t(row) * k,
                  out_index + int64_t(row) * k);
}

template <int D, int KMAX>
void launch_search_k(const float4* queries, const uint32_t* query_keys, const uint32_t* point_keys,
                     const float4* points, const float4* boxes, const TreeShape& shape, int n_queries, int k,
                     float* out_dist2, int64_t* out_index, cudaStream_t stream) {
  constexpr int threads = 128;
  const int blocks = (n_queries + threads - 1) / threads;
  search_kernel<D, KMAX><<<blocks, threads, 0, stream>>>(queries, query_keys, point_keys, points, boxes, shape,
                                                         n_queries, k, out_dist2, out_index);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Top-k capacities: the smallest that holds k (unused slots cost a compare-and-select per insertion).
template <int D>
void launch_search(const float4* queries, const uint32_t* query_keys, const uint32_t* point_keys,
                   const float4* points, const float4* boxes, const TreeShape& shape, int n_queries, int k,
                   float* out_dist2, int64_t* out_index, cudaStream_t stream) {
#define NPG_KNN_CASE(KMAX)                                                                                     \
  if (k <= KMAX) {                                                                                             \
    launch_search_k<D, KMAX>(queries, query_keys, point_keys, points, boxes, shape, n_queries, k, out_dist2,  \
                             out_index, stream);                                                               \
    return;                                                                                                    \
  }
  NPG_KNN_CASE(1)
  NPG_KNN_CASE(2)
  NPG_KNN_CASE(3)
  NPG_KNN_CASE(4)
  NPG_KNN_CASE(6)
  NPG_KNN_CASE(8)
  NPG_KNN_CASE(12)
  NPG_KNN_CASE(16)
  NPG_KNN_CASE(20)
  NPG_KNN_CASE(24)
  NPG_KNN_CASE(32)
#undef NPG_KNN_CASE
  TORCH_CHECK(false, "knn: k must be at most 32, got ", k);
}

}  // namespace npg_knn
