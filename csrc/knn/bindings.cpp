// Python binding of the KNN extension; every argument is checked here, in plain C++, before the CUDA code
// (knn_build.cu) runs.
#include <limits>

#include <torch/extension.h>

#include "knn.h"

namespace {

std::vector<at::Tensor> knn(const at::Tensor& points, const std::optional<at::Tensor>& queries, int64_t k,
                            int64_t leaf_size) {
  TORCH_CHECK(points.is_cuda(), "knn: points must be a CUDA tensor, got device ", points.device());
  TORCH_CHECK(points.scalar_type() == at::kFloat, "knn: points must be float32, got ", points.scalar_type());
  TORCH_CHECK(points.dim() == 2 && (points.size(1) == 2 || points.size(1) == 3),
              "knn: points must have shape [N, 2] or [N, 3], got ", points.sizes());
  const int64_t n = points.size(0);
  const int64_t dim = points.size(1);
  TORCH_CHECK(n >= 1, "knn: points is empty");
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "knn: at most 2^31 - 2 points are supported, got ", n);
  TORCH_CHECK(k >= 1 && k <= 32, "knn: k must be in [1, 32], got ", k);
  TORCH_CHECK(leaf_size >= 8 && leaf_size <= 64, "knn: leaf_size must be in [8, 64], got ", leaf_size);
  std::optional<at::Tensor> contiguous_queries;
  if (queries.has_value()) {
    const at::Tensor& q = *queries;
    TORCH_CHECK(q.device() == points.device(), "knn: queries are on ", q.device(), " but points on ", points.device());
    TORCH_CHECK(q.scalar_type() == at::kFloat, "knn: queries must be float32, got ", q.scalar_type());
    TORCH_CHECK(q.dim() == 2 && q.size(1) == dim, "knn: queries must have shape [Q, ", dim, "], got ", q.sizes());
    TORCH_CHECK(q.size(0) < std::numeric_limits<int32_t>::max(), "knn: too many queries (", q.size(0), ")");
    TORCH_CHECK(k <= n, "knn: k = ", k, " exceeds the number of points (", n, ")");
    contiguous_queries = q.contiguous();
  } else {
    TORCH_CHECK(k <= n - 1, "knn: k = ", k, " must be smaller than the number of points (", n,
                ") when the points are their own queries");
  }
  return npg_knn::knn_cuda(points.contiguous(), contiguous_queries, k, leaf_size);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "npg exact k-nearest-neighbour search on a Morton-ordered bounding-box tree (CUDA)";
  m.def("knn", &knn,
        "(dist2 [Q,k] float32, index [Q,k] int64) of the k nearest points, ascending by (dist2, index)",
        pybind11::arg("points"), pybind11::arg("queries"), pybind11::arg("k"), pybind11::arg("leaf_size"));
}
