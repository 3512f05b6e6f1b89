// Exact k-nearest-neighbour search over an implicit, Morton-ordered bounding-box tree.
//
// Why a tree and not a uniform grid: real point clouds (the 138k garden points, say) are strongly
// clustered; a grid sized from the bounding box puts ~1000 points in the typical occupied cell there,
// while a grid sized for the dense core has millions of empty cells to walk through for the sparse
// points. Points sorted along a Morton curve and cut into leaves of a fixed count adapt to any density:
//
//   level 0      leaves: `leaf_size` consecutive sorted points each, with their bounding box;
//   level l > 0  node i: the bounding box of nodes [kBranch*i, kBranch*i + kBranch) of level l-1;
//   top level    one node (the root).
//
// Each query scans its home leaf first (a near-final k-th distance for free), then walks the tree depth
// first, nearest child first, skipping every box whose squared distance exceeds the current k-th one.
// Box and point distances go through the same rounded operations on coordinate differences that are
// ordered like the exact ones, so the box distance never exceeds the distance of a point inside it: the
// pruning is exact, not an approximation.
//
// Every device function here is plain arithmetic on raw pointers, so that it also compiles as host C++
// (an includer that defines NPG_HD and the few CUDA intrinsics it uses) for checking the traversal
// without a GPU.
#pragma once
#include <cstdint>

#ifndef NPG_HD
#define NPG_HD __device__ __forceinline__
#endif

namespace npg_knn {

constexpr int kBranch = 4;                                // children per internal node
constexpr int kMaxLevels = 16;                            // 8-point leaves and 2^31 points need 15
constexpr int kStackSize = (kMaxLevels - 1) * (kBranch - 1) + 1;
constexpr uint32_t kNoSelf = 0xffffffffu;                 // "the query is not one of the points"
constexpr uint32_t kNoNode = 0xffffffffu;
constexpr int kMortonBits3 = 10;                          // bits per axis: 30-bit keys in 3D
constexpr int kMortonBits2 = 16;                          // 32-bit keys in 2D
// (dist2 = +inf, index = 0xffffffff): larger than the key of every real candidate.
constexpr uint64_t kEmptyKey = (uint64_t(0x7f800000u) << 32) | 0xffffffffull;

struct TreeShape {
  int n_points;
  int leaf_size;
  int n_levels;                  // level 0 = leaves, level n_levels - 1 = the root (one node)
  int level_offset[kMaxLevels];  // index of the first node of each level in the box array
  int level_count[kMaxLevels];   // nodes per level
  int n_nodes;                   // all levels together
};

inline TreeShape make_tree_shape(int n_points, int leaf_size) {
  TreeShape s{};
  s.n_points = n_points;
  s.leaf_size = leaf_size;
  int count = (n_points + leaf_size - 1) / leaf_size;
  int offset = 0;
  int level = 0;
  while (true) {
    s.level_offset[level] = offset;
    s.level_count[level] = count;
    offset += count;
    ++level;
    if (count == 1 || level == kMaxLevels) break;
    count = (count + kBranch - 1) / kBranch;
  }
  s.n_levels = level;  // the caller checks level_count[n_levels - 1] == 1
  s.n_nodes = offset;
  return s;
}

NPG_HD int imin(int a, int b) { return a < b ? a : b; }

NPG_HD uint32_t encode_node(int level, int index) { return (uint32_t(index) << 4) | uint32_t(level); }

// ---------------------------------------------------------------- Morton keys

NPG_HD uint32_t spread_bits3(uint32_t x) {  // 10 bits -> every third bit
  x &= 0x3ffu;
  x = (x | (x << 16)) & 0x030000ffu;
  x = (x | (x << 8)) & 0x0300f00fu;
  x = (x | (x << 4)) & 0x030c30c3u;
  x = (x | (x << 2)) & 0x09249249u;
  return x;
}

NPG_HD uint32_t spread_bits2(uint32_t x) {  // 16 bits -> every second bit
  x &= 0xffffu;
  x = (x | (x << 8)) & 0x00ff00ffu;
  x = (x | (x << 4)) & 0x0f0f0f0fu;
  x = (x | (x << 2)) & 0x33333333u;
  x = (x | (x << 1)) & 0x55555555u;
  return x;
}

// Cell of coordinate v on an axis quantised into `cells` cells over [lo, hi]; positions outside the box
// (queries) are clamped to its border cells. A flat axis (hi == lo) has one cell.
NPG_HD uint32_t quantize(float v, float lo, float hi, uint32_t cells) {
  const float extent = hi - lo;
  if (!(extent > 0.f)) return 0u;
  const float c = (v - lo) * (float(cells) / extent);
  if (!(c > 0.f)) return 0u;
  if (c >= float(cells - 1)) return cells - 1;
  return uint32_t(c);
}

// Morton key of row i of a row-major [n, D] array, quantised over the box bbox [2, D] (min row, max row).
template <int D>
NPG_HD uint32_t morton_key(const float* coords, int64_t i, const float* bbox) {
  if (D == 3) {
    const uint32_t cells = 1u << kMortonBits3;
    const uint32_t x = quantize(coords[3 * i + 0], bbox[0], bbox[3], cells);
    const uint32_t y = quantize(coords[3 * i + 1], bbox[1], bbox[4], cells);
    const uint32_t z = quantize(coords[3 * i + 2], bbox[2], bbox[5], cells);
    return spread_bits3(x) | (spread_bits3(y) << 1) | (spread_bits3(z) << 2);
  } else {
    const uint32_t cells = 1u << kMortonBits2;
    const uint32_t x = quantize(coords[2 * i + 0], bbox[0], bbox[2], cells);
    const uint32_t y = quantize(coords[2 * i + 1], bbox[1], bbox[3], cells);
    return spread_bits2(x) | (spread_bits2(y) << 1);
  }
}

// Sorted copy of row `source` as (x, y, z or 0, row index as float bits): one 16-byte load per point.
template <int D>
NPG_HD float4 pack_point(const float* coords, int64_t source) {
  const float z = (D == 3) ? coords[D * source + 2] : 0.f;
  return make_float4(coords[D * source + 0], coords[D * source + 1], z, __uint_as_float(uint32_t(source)));
}

// ---------------------------------------------------------------- distances
// Both use correctly rounded products and fused adds of coordinate differences; rounding is monotone,
// so a box's distance (from per-axis gaps no larger than any inside point's differences) is never
// above the distance of a point inside it, which keeps the pruning exact.

NPG_HD float sq_norm(float dx, float dy, float dz) { return __fmaf_rn(dz, dz, __fmaf_rn(dy, dy, __fmul_rn(dx, dx))); }

template <int D>
NPG_HD float point_dist2(float4 p, float4 q) {
  return sq_norm(p.x - q.x, p.y - q.y, D == 3 ? p.z - q.z : 0.f);
}

NPG_HD float axis_gap(float v, float lo, float hi) { return fmaxf(fmaxf(lo - v, v - hi), 0.f); }

// Boxes: 3D node i = (boxes[2i] = min corner, boxes[2i+1] = max corner); 2D node i = boxes[i] =
// (min x, min y, max x, max y).
template <int D>
NPG_HD float box_dist2(const float4* boxes, int node, float4 q) {
  if (D == 3) {
    const float4 lo = boxes[2 * node];
    const float4 hi = boxes[2 * node + 1];
    return sq_norm(axis_gap(q.x, lo.x, hi.x), axis_gap(q.y, lo.y, hi.y), axis_gap(q.z, lo.z, hi.z));
  } else {
    const float4 b = boxes[node];
    return sq_norm(axis_gap(q.x, b.x, b.z), axis_gap(q.y, b.y, b.w), 0.f);
  }
}

// ---------------------------------------------------------------- tree boxes

NPG_HD void grow(float4& lo, float4& hi, float4 p) {
  lo.x = fminf(lo.x, p.x); lo.y = fminf(lo.y, p.y); lo.z = fminf(lo.z, p.z);
  hi.x = fmaxf(hi.x, p.x); hi.y = fmaxf(hi.y, p.y); hi.z = fmaxf(hi.z, p.z);
}

template <int D>
NPG_HD void store_box(float4* boxes, int node, float4 lo, float4 hi) {
  if (D == 3) {
    boxes[2 * node] = make_float4(lo.x, lo.y, lo.z, 0.f);
    boxes[2 * node + 1] = make_float4(hi.x, hi.y, hi.z, 0.f);
  } else {
    boxes[node] = make_float4(lo.x, lo.y, hi.x, hi.y);
  }
}

template <int D>
NPG_HD void load_box(const float4* boxes, int node, float4& lo, float4& hi) {
  if (D == 3) {
    lo = boxes[2 * node];
    hi = boxes[2 * node + 1];
  } else {
    const float4 b = boxes[node];
    lo = make_float4(b.x, b.y, 0.f, 0.f);
    hi = make_float4(b.z, b.w, 0.f, 0.f);
  }
}

// Box of leaf `leaf` from the sorted points [n_points] (float4 as packed by pack_point).
template <int D>
NPG_HD void leaf_box(const float4* points, const TreeShape& s, int leaf, float4* boxes) {
  const int begin = leaf * s.leaf_size;
  const int end = imin(begin + s.leaf_size, s.n_points);
  float4 lo = points[begin];
  float4 hi = lo;
  for (int j = begin + 1; j < end; ++j) grow(lo, hi, points[j]);
  store_box<D>(boxes, s.level_offset[0] + leaf, lo, hi);
}

// Box of node `index` of `level` >= 1 from its children's boxes.
template <int D>
NPG_HD void node_box(const TreeShape& s, int level, int index, float4* boxes) {
  const int first = index * kBranch;
  const int n_child = imin(kBranch, s.level_count[level - 1] - first);
  const int child0 = s.level_offset[level - 1] + first;
  float4 lo, hi, clo, chi;
  load_box<D>(boxes, child0, lo, hi);
  for (int c = 1; c < n_child; ++c) {
    load_box<D>(boxes, child0 + c, clo, chi);
    grow(lo, hi, clo);
    grow(lo, hi, chi);
  }
  store_box<D>(boxes, s.level_offset[level] + index, lo, hi);
}

// First position in keys [n] (ascending) whose key is >= key.
NPG_HD int lower_bound(const uint32_t* keys, int n, uint32_t key) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = lo + ((hi - lo) >> 1);
    if (keys[mid] < key) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// ---------------------------------------------------------------- top-k in registers
// Candidates are packed as (dist2 bits << 32 | index): for non-negative floats the bit patterns order
// like the values, so one 64-bit compare orders by distance and breaks ties by the smaller index. The
// KMAX - k lowest slots hold key 0, which no candidate can move, so one instantiation serves every
// k <= KMAX and all indexing stays static (registers, not local memory).
template <int KMAX>
struct TopK {
  uint64_t slot[KMAX];  // ascending

  NPG_HD void init(int k) {
#pragma unroll
    for (int j = 0; j < KMAX; ++j) slot[j] = (j < KMAX - k) ? 0ull : kEmptyKey;
  }

  NPG_HD float worst() const { return __uint_as_float(uint32_t(slot[KMAX - 1] >> 32)); }

  NPG_HD void push(float dist2, uint32_t index) {
    const uint64_t key = (uint64_t(__float_as_uint(dist2)) << 32) | uint64_t(index);
    if (!(key < slot[KMAX - 1])) return;
#pragma unroll
    for (int j = KMAX - 1; j > 0; --j) {
      const uint64_t below = slot[j - 1];
      slot[j] = (key < below) ? below : ((key < slot[j]) ? key : slot[j]);
    }
    slot[0] = (key < slot[0]) ? key : slot[0];
  }
};

// Points of leaf `leaf` into the top-k, skipping the point whose row is `self`.
template <int D, int KMAX>
NPG_HD void scan_leaf(const float4* points, const TreeShape& s, int leaf, float4 q, uint32_t self, TopK<KMAX>& top) {
  const int begin = leaf * s.leaf_size;
  const int end = imin(begin + s.leaf_size, s.n_points);
  for (int j = begin; j < end; ++j) {
    const float4 p = points[j];
    const uint32_t row = __float_as_uint(p.w);
    if (row == self) continue;
    top.push(point_dist2<D>(p, q), row);
  }
}

// A box can still hold a better candidate: closer than the k-th, or as close with a smaller index.
// Once the k-th distance is 0 nothing can improve it (which of more than k duplicates are returned is
// then unspecified), which keeps piles of identical points linear instead of quadratic.
NPG_HD bool worth_visiting(float box_d2, float bound) { return box_d2 <= bound && bound > 0.f; }

NPG_HD void order_pair(float* d, uint32_t* n, int a, int b) {  // larger distance first
  if (d[a] < d[b]) {
    const float td = d[a]; d[a] = d[b]; d[b] = td;
    const uint32_t tn = n[a]; n[a] = n[b]; n[b] = tn;
  }
}

// k nearest points to q (ascending by (dist2, index)) into out_dist2 [k] and out_index [k].
//   points [n_points] sorted, packed; boxes: all levels; home_leaf: the leaf scanned first.
template <int D, int KMAX>
NPG_HD void search(const float4* points, const float4* boxes, const TreeShape& s, float4 q, uint32_t self,
                   int home_leaf, int k, float* out_dist2, int64_t* out_index) {
  static_assert(kBranch == 4, "the child ordering network below is written for 4 children");
  TopK<KMAX> top;
  top.init(k);
  scan_leaf<D, KMAX>(points, s, home_leaf, q, self, top);

  float stack_d2[kStackSize];
  uint32_t stack_node[kStackSize];
  stack_d2[0] = 0.f;
  stack_node[0] = encode_node(s.n_levels - 1, 0);
  int depth = 1;
  while (depth > 0) {
    --depth;
    const float bound = top.worst();
    if (!worth_visiting(stack_d2[depth], bound)) continue;
    const uint32_t node = stack_node[depth];
    const int level = int(node & 15u);
    const int index = int(node >> 4);
    if (level == 0) {
      if (index != home_leaf) scan_leaf<D, KMAX>(points, s, index, q, self, top);
      continue;
    }
    const int child_level = level - 1;
    const int first = index * kBranch;
    const int n_child = imin(kBranch, s.level_count[child_level] - first);
    const int child_offset = s.level_offset[child_level];
    float child_d2[kBranch];
    uint32_t child_node[kBranch];
#pragma unroll
    for (int c = 0; c < kBranch; ++c) {
      child_d2[c] = __uint_as_float(0x7f800000u);
      child_node[c] = kNoNode;
      if (c < n_child) {
        child_d2[c] = box_dist2<D>(boxes, child_offset + first + c, q);
        child_node[c] = encode_node(child_level, first + c);
      }
    }
    // Farthest pushed first so that the nearest child is visited first.
    order_pair(child_d2, child_node, 0, 1);
    order_pair(child_d2, child_node, 2, 3);
    order_pair(child_d2, child_node, 0, 2);
    order_pair(child_d2, child_node, 1, 3);
    order_pair(child_d2, child_node, 1, 2);
#pragma unroll
    for (int c = 0; c < kBranch; ++c) {
      if (child_node[c] != kNoNode && worth_visiting(child_d2[c], bound)) {
        stack_d2[depth] = child_d2[c];
        stack_node[depth] = child_node[c];
        ++depth;
      }
    }
  }

#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    if (j >= KMAX - k) {
      const int column = j - (KMAX - k);
      out_dist2[column] = __uint_as_float(uint32_t(top.slot[j] >> 32));
      out_index[column] = int64_t(top.slot[j] & 0xffffffffull);
    }
  }
}

}  // namespace npg_knn
