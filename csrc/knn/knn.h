// Host-side entry point of the KNN extension (npg._knn_cuda); plain C++, no CUDA types.
#pragma once
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/ATen.h>

namespace npg_knn {

// (dist2 [Q, k] float32, index [Q, k] int64) of the k nearest points, ascending by (dist2, index).
// points [N, D] and queries [Q, D]: contiguous float32 on one CUDA device, D in {2, 3}, 1 <= k <= 32,
// k < N (queries = None: the points themselves, each excluding its own row; duplicates still count at
// distance 0) or k <= N, 8 <= leaf_size <= 64 - all checked by the binding (bindings.cpp). Inputs must
// be finite (the Python wrapper checks; non-finite values give wrong neighbours, never an out-of-bounds
// access).
std::vector<at::Tensor> knn_cuda(const at::Tensor& points, const std::optional<at::Tensor>& queries, int64_t k,
                                 int64_t leaf_size);

}  // namespace npg_knn
