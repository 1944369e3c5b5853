// The indices of each row's largest values, for beam search's candidates. libtorch's topk
// over [80, 50257] logits took ~2.7 ms here (a partial sort per row); one pass that compares
// 16 values at a time against the row's current c-th best and inserts the rare winner is
// bound by reading the row.
#include <ATen/ATen.h>
#include "pool.h"
#include <immintrin.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "shim.h"

namespace {

using clipcap_shim::copy_message;

// The c best so far, best first; ties keep the earlier index ahead.
struct Best {
  std::vector<float> value;
  std::vector<int64_t> index;
  int64_t c;
  explicit Best(int64_t c_)
      : value(c_, -std::numeric_limits<float>::infinity()), index(c_, -1), c(c_) {}
  float threshold() const { return value[c - 1]; }
  void offer(float x, int64_t i) {
    // NaN ranks as -inf: it must not become the threshold that nothing can beat.
    if (std::isnan(x)) x = -std::numeric_limits<float>::infinity();
    // Only a strictly larger value enters, so equal values keep the earlier index.
    if (!(x > value[c - 1]) && index[c - 1] >= 0) return;
    int64_t at = c - 1;
    while (at > 0 && (x > value[at - 1] || index[at - 1] < 0)) {
      value[at] = value[at - 1];
      index[at] = index[at - 1];
      --at;
    }
    value[at] = x;
    index[at] = i;
  }
};

void scan_scalar(const float* row, int64_t from, int64_t n, Best& best) {
  for (int64_t i = from; i < n; ++i) best.offer(row[i], i);
}

__attribute__((target("avx512f"))) void scan_avx512(const float* row, int64_t from, int64_t n,
                                                      Best& best) {
  int64_t i = from;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(row + i);
    __mmask16 hit = _mm512_cmp_ps_mask(x, _mm512_set1_ps(best.threshold()), _CMP_GT_OQ);
    while (hit) {
      const int l = __builtin_ctz(hit);
      best.offer(row[i + l], i + l);
      hit &= hit - 1;
      // The threshold rose: later lanes of this chunk must beat the new one.
      hit &= _mm512_cmp_ps_mask(x, _mm512_set1_ps(best.threshold()), _CMP_GT_OQ);
    }
  }
  scan_scalar(row, i, n, best);
}

}  // namespace

extern "C" {

// x [R, V] (f32, CPU, contiguous rows), 1 <= c <= V: the indices of each row's c largest
// values, largest first, as [R, c] int64 (among equal values the earlier index comes first;
// NaN ranks as -inf). Returns null with *error set on bad input.
at::Tensor* clipcap_row_topk(const at::Tensor* x, int64_t c, char** error) {
  try {
    const at::Tensor& X = *x;
    TORCH_CHECK(X.dim() == 2 && X.scalar_type() == at::kFloat && X.device().is_cpu(),
                "x must be a 2-D f32 CPU tensor");
    TORCH_CHECK(X.stride(1) == 1, "rows must be contiguous");
    const int64_t rows = X.size(0), n = X.size(1);
    TORCH_CHECK(c >= 1 && c <= n, "c must be in [1, V]");
    at::Tensor out = at::empty({rows, c}, X.options().dtype(at::kLong));
    const float* xp = X.data_ptr<float>();
    int64_t* op = out.data_ptr<int64_t>();
    const int64_t step = X.stride(0);
    static const bool avx512 = __builtin_cpu_supports("avx512f");
    clipcap_pool::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* row = xp + r * step;
        Best best(c);
        // The first c values fill the list; the scan then only admits larger ones.
        scan_scalar(row, 0, c, best);
        if (avx512) {
          scan_avx512(row, c, n, best);
        } else {
          scan_scalar(row, c, n, best);
        }
        for (int64_t j = 0; j < c; ++j) op[r * c + j] = best.index[j];
      }
    });
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
    return nullptr;
  }
}

}  // extern "C"
