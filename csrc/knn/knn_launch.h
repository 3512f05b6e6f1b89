// Declaration of the search launcher shared by knn_build.cu and its instantiations (knn_search*d.cu).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "knn_tree.cuh"

namespace npg_knn {

template <int D>
void launch_search(const float4* queries, const uint32_t* query_keys, const uint32_t* point_keys,
                   const float4* points, const float4* boxes, const TreeShape& shape, int n_queries, int k,
                   float* out_dist2, int64_t* out_index, cudaStream_t stream);

}  // namespace npg_knn
