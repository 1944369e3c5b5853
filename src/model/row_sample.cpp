// One sampled token per row from probabilities, with top-k and top-p (nucleus) filtering.
// libtorch's way sorts every row (50257 values) to find the nucleus: 3.5 ms a row here, more
// than a whole beam-5 step of 8 images. The nucleus only needs its boundary value, which a
// selection by mass over the values' bits finds in a few linear passes.
#include <ATen/ATen.h>
#include "pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "shim.h"

namespace {

using clipcap_shim::copy_message;

// The nucleus boundary: the value b and the count c of values equal to b that complete the
// smallest set of largest values whose mass reaches `target` (mass(> b) < target <=
// mass(> b) + c·b), and that set's mass.
struct Boundary {
  float value;
  int64_t ties;
  double mass;
};

inline uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

// A positive float's bits order like the float, so the boundary is found by its bits in three
// rounds of a mass histogram (11, 11 and 10 bits), each over the values left by the one
// before: a few linear passes without the mispredicted branches of a partition.
template <typename Keep>
Boundary radix_select(const float* w, int64_t n, Keep keep, double target,
                      std::vector<float>& scratch) {
  constexpr int kShift[3] = {21, 10, 0};
  constexpr uint32_t kMask[3] = {0x7ff, 0x7ff, 0x3ff};
  double mass[2048];
  int64_t count[2048];
  double above = 0;  // mass of the values above the rounds' buckets so far
  uint32_t prefix = 0, prefix_mask = 0;
  const float* v = w;
  int64_t m = n;
  bool from_scratch = false;
  for (int round = 0; round < 3; ++round) {
    const int shift = kShift[round];
    const uint32_t mask = kMask[round];
    std::fill(mass, mass + mask + 1, 0.0);
    std::fill(count, count + mask + 1, 0);
    for (int64_t i = 0; i < m; ++i) {
      const float x = v[i];
      if (!from_scratch && !keep(x)) continue;
      const uint32_t b = bits_of(x);
      if ((b & prefix_mask) != prefix) continue;
      const uint32_t key = (b >> shift) & mask;
      mass[key] += x;
      count[key] += 1;
    }
    // The bucket where the mass from the top reaches the target (the lowest non-empty one if
    // rounding kept it short).
    int64_t bucket = -1;
    double acc = above;
    for (int64_t k = mask; k >= 0; --k) {
      if (count[k] == 0) continue;
      bucket = k;
      if (acc + mass[k] >= target) break;
      acc += mass[k];
    }
    if (bucket < 0) return {0.f, 0, 0.0};  // nothing has mass
    above = acc;
    prefix |= static_cast<uint32_t>(bucket) << shift;
    prefix_mask |= mask << shift;
    if (round == 2) {
      // One value: b.
      float b;
      std::memcpy(&b, &prefix, sizeof b);
      const int64_t c = std::min<int64_t>(
          std::max<int64_t>(static_cast<int64_t>(std::ceil((target - above) / b)), 1),
          count[bucket]);
      return {b, c, above + c * static_cast<double>(b)};
    }
    if (round == 0) {
      // Later rounds read only this bucket's values.
      scratch.clear();
      for (int64_t i = 0; i < n; ++i) {
        const float x = w[i];
        if (keep(x) && (bits_of(x) & prefix_mask) == prefix) scratch.push_back(x);
      }
      v = scratch.data();
      m = static_cast<int64_t>(scratch.size());
      from_scratch = true;
    }
  }
  return {0.f, 0, 0.0};  // not reached
}

// One row's token; `scratch` holds up to a row of values.
int64_t sample_row(const float* p, int64_t V, int64_t top_k, double top_p, float u,
                   std::vector<float>& scratch) {
  // Weights: the probabilities, NaN and negatives as zero.
  auto weight = [&](int64_t i) {
    const float x = p[i];
    return x > 0 ? x : 0.f;
  };
  // Top-k: keep values >= the k-th largest (ties at the threshold all stay).
  float floor_value = 0;  // values must be > 0 and >= this
  if (top_k > 0 && top_k < V) {
    scratch.resize(V);
    for (int64_t i = 0; i < V; ++i) scratch[i] = weight(i);
    std::nth_element(scratch.begin(), scratch.begin() + (top_k - 1), scratch.end(),
                     std::greater<float>());
    floor_value = scratch[top_k - 1];
  }
  auto kept_by_k = [&](float w) { return w > 0 && w >= floor_value; };
  // Top-p: the boundary value, and how many values equal to it stay (earliest first).
  float boundary = 0;
  int64_t boundary_ties = V;  // no limit
  double mass = 0;
  if (top_p < 1.0) {
    double total = 0;
    for (int64_t i = 0; i < V; ++i) {
      const float w = weight(i);
      if (kept_by_k(w)) total += w;
    }
    auto keep = [&](float x) { return x > 0 && x >= floor_value; };
    const Boundary b = radix_select(p, V, keep, top_p * total, scratch);
    boundary = b.value;
    boundary_ties = b.ties;
    mass = b.mass;
  } else {
    for (int64_t i = 0; i < V; ++i) {
      const float w = weight(i);
      if (kept_by_k(w)) mass += w;
    }
  }
  // The draw: the first kept index whose running mass reaches u · (kept mass), in index order.
  auto kept = [&](int64_t i, int64_t& ties_left) {
    const float w = weight(i);
    if (!kept_by_k(w) || w < boundary) return 0.f;
    if (w == boundary && top_p < 1.0) {
      if (ties_left == 0) return 0.f;
      --ties_left;
    }
    return w;
  };
  const double target = static_cast<double>(u) * mass;
  double run = 0;
  int64_t last = -1;
  int64_t ties = boundary_ties;
  for (int64_t i = 0; i < V; ++i) {
    const float w = kept(i, ties);
    if (w == 0) continue;
    run += w;
    last = i;
    if (run >= target) return i;
  }
  // Rounding left the target above the last partial sum (or nothing had mass).
  return last >= 0 ? last : 0;
}

}  // namespace

extern "C" {

// probs [R, V] (f32, CPU, contiguous rows: a softmax), uniforms [R] (f32 in [0, 1)): one
// token per row, drawn by inverse CDF in index order from the probabilities that survive
// top-k (values >= the k-th largest; 0 = off) and top-p (the smallest set of largest values
// whose mass reaches p of what top-k kept; among values equal at its boundary the earlier
// indices; 1 = off). Returns [R] int64, or null with *error set on bad input.
at::Tensor* clipcap_row_sample(const at::Tensor* probs, const at::Tensor* uniforms, int64_t top_k,
                               double top_p, char** error) {
  try {
    const at::Tensor& P = *probs;
    const at::Tensor U = uniforms->contiguous();
    TORCH_CHECK(P.dim() == 2 && P.scalar_type() == at::kFloat && P.device().is_cpu(),
                "probs must be a 2-D f32 CPU tensor");
    TORCH_CHECK(P.stride(1) == 1, "rows must be contiguous");
    TORCH_CHECK(U.dim() == 1 && U.size(0) == P.size(0) && U.scalar_type() == at::kFloat,
                "uniforms must be [R] f32");
    TORCH_CHECK(top_p > 0 && top_p <= 1, "top_p must be in (0, 1]");
    TORCH_CHECK(top_k >= 0, "top_k must be >= 0");
    const int64_t rows = P.size(0), V = P.size(1);
    TORCH_CHECK(V >= 1, "rows must not be empty");
    at::Tensor out = at::empty({rows}, P.options().dtype(at::kLong));
    const float* pp = P.data_ptr<float>();
    const float* up = U.data_ptr<float>();
    int64_t* op = out.data_ptr<int64_t>();
    const int64_t step = P.stride(0);
    clipcap_pool::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      scratch.reserve(V);
      for (int64_t r = begin; r < end; ++r) {
        op[r] = sample_row(pp + r * step, V, top_k, top_p, up[r], scratch);
      }
    });
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
    return nullptr;
  }
}

}  // extern "C"
