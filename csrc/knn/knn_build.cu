// Tree construction and the host entry point of the KNN extension: Morton keys, one radix sort,
// packed sorted points, the box levels, then the search (knn_search.cuh).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/device/device_radix_sort.cuh>

#include "knn.h"
#include "knn_launch.h"

namespace npg_knn {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return int((n + kThreads - 1) / kThreads); }

// keys [n]: Morton key of each row of coords [n, D] quantised over bbox [2, D]; rows [n] = 0..n-1.
template <int D>
__global__ void morton_keys_kernel(const float* __restrict__ coords, const float* __restrict__ bbox, int n,
                                   uint32_t* __restrict__ keys, int32_t* __restrict__ rows) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  keys[i] = morton_key<D>(coords, i, bbox);
  rows[i] = i;
}

// packed [n]: coords [n, D] in the order given by order [n], each with its row in w.
template <int D>
__global__ void pack_sorted_kernel(const float* __restrict__ coords, const int32_t* __restrict__ order, int n,
                                   float4* __restrict__ packed) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n) return;
  packed[t] = pack_point<D>(coords, order[t]);
}

// Boxes of every leaf (level 0) from the sorted points [n_points].
template <int D>
__global__ void leaf_box_kernel(const float4* __restrict__ points, const TreeShape shape, float4* __restrict__ boxes) {
  const int leaf = blockIdx.x * blockDim.x + threadIdx.x;
  if (leaf >= shape.level_count[0]) return;
  leaf_box<D>(points, shape, leaf, boxes);
}

// Boxes of every node of `level` (>= 1) from the level below.
template <int D>
__global__ void node_box_kernel(const TreeShape shape, int level, float4* __restrict__ boxes) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= shape.level_count[level]) return;
  node_box<D>(shape, level, index, boxes);
}

// A point set sorted along the Morton curve of the points' bounding box.
struct SortedSet {
  at::Tensor keys;    // [n] int32 holding uint32 Morton keys, ascending
  at::Tensor packed;  // [n, 4] float32: x, y, z (0 in 2D), source row as float bits
};

template <int D>
SortedSet sort_along_curve(const at::Tensor& coords, const at::Tensor& bbox, cudaStream_t stream) {
  const int n = int(coords.size(0));
  const auto int_options = coords.options().dtype(at::kInt);
  at::Tensor keys = at::empty({n}, int_options);
  at::Tensor rows = at::empty({n}, int_options);
  morton_keys_kernel<D><<<blocks_for(n), kThreads, 0, stream>>>(
      coords.data_ptr<float>(), bbox.data_ptr<float>(), n, reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>()),
      rows.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor sorted_keys = at::empty({n}, int_options);
  at::Tensor order = at::empty({n}, int_options);
  const int end_bit = (D == 3) ? 3 * kMortonBits3 : 2 * kMortonBits2;
  const auto* keys_in = reinterpret_cast<const uint32_t*>(keys.data_ptr<int32_t>());
  auto* keys_out = reinterpret_cast<uint32_t*>(sorted_keys.data_ptr<int32_t>());
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in, keys_out, rows.data_ptr<int32_t>(),
                                                 order.data_ptr<int32_t>(), n, 0, end_bit, stream));
  at::Tensor temp = at::empty({int64_t(temp_bytes)}, coords.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data_ptr(), temp_bytes, keys_in, keys_out,
                                                 rows.data_ptr<int32_t>(), order.data_ptr<int32_t>(), n, 0, end_bit,
                                                 stream));

  at::Tensor packed = at::empty({n, 4}, coords.options());
  pack_sorted_kernel<D><<<blocks_for(n), kThreads, 0, stream>>>(coords.data_ptr<float>(), order.data_ptr<int32_t>(),
                                                                 n, reinterpret_cast<float4*>(packed.data_ptr<float>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sorted_keys, packed};
}

template <int D>
std::vector<at::Tensor> knn_impl(const at::Tensor& points, const std::optional<at::Tensor>& queries, int k,
                                 int leaf_size) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int n = int(points.size(0));
  const auto minmax = at::aminmax(points, 0);
  const at::Tensor bbox = at::stack({std::get<0>(minmax), std::get<1>(minmax)}).contiguous();  // [2, D]

  const SortedSet sorted_points = sort_along_curve<D>(points, bbox, stream);
  const auto* packed_points = reinterpret_cast<const float4*>(sorted_points.packed.data_ptr<float>());
  const auto* point_keys = reinterpret_cast<const uint32_t*>(sorted_points.keys.data_ptr<int32_t>());

  const TreeShape shape = make_tree_shape(n, leaf_size);
  TORCH_CHECK(shape.level_count[shape.n_levels - 1] == 1, "knn: too many points for the tree depth (", n, ")");
  at::Tensor boxes_storage = at::empty({int64_t(shape.n_nodes) * (D == 3 ? 2 : 1), 4}, points.options());
  auto* boxes = reinterpret_cast<float4*>(boxes_storage.data_ptr<float>());
  leaf_box_kernel<D><<<blocks_for(shape.level_count[0]), kThreads, 0, stream>>>(packed_points, shape, boxes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int level = 1; level < shape.n_levels; ++level) {
    node_box_kernel<D><<<blocks_for(shape.level_count[level]), kThreads, 0, stream>>>(shape, level, boxes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  const int n_queries = queries ? int(queries->size(0)) : n;
  at::Tensor dist2 = at::empty({n_queries, k}, points.options());
  at::Tensor index = at::empty({n_queries, k}, points.options().dtype(at::kLong));
  if (n_queries == 0) return {dist2, index};
  if (!queries) {
    launch_search<D>(packed_points, nullptr, point_keys, packed_points, boxes, shape, n, k, dist2.data_ptr<float>(),
                     index.data_ptr<int64_t>(), stream);
  } else {
    // Queries sorted along the points' curve too: neighbouring threads then walk the same nodes.
    const SortedSet sorted_queries = sort_along_curve<D>(*queries, bbox, stream);
    launch_search<D>(reinterpret_cast<const float4*>(sorted_queries.packed.data_ptr<float>()),
                     reinterpret_cast<const uint32_t*>(sorted_queries.keys.data_ptr<int32_t>()), point_keys,
                     packed_points, boxes, shape, n_queries, k, dist2.data_ptr<float>(), index.data_ptr<int64_t>(),
                     stream);
  }
  return {dist2, index};
}

}  // namespace

std::vector<at::Tensor> knn_cuda(const at::Tensor& points, const std::optional<at::Tensor>& queries, int64_t k,
                                 int64_t leaf_size) {
  const c10::cuda::CUDAGuard guard(points.device());
  if (points.size(1) == 3) return knn_impl<3>(points, queries, int(k), int(leaf_size));
  return knn_impl<2>(points, queries, int(k), int(leaf_size));
}

}  // namespace npg_knn
