#include "knn_search.cuh"

namespace npg_knn {
template void launch_search<3>(const float4*, const uint32_t*, const uint32_t*, const float4*, const float4*,
                                const TreeShape&, int, int, float*, int64_t*, cudaStream_t);
}  // namespace npg_knn
