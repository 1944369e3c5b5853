// Attention of one new token over a KV cache, for CPU decoding. libtorch's SDPA runs a
// decode step's one-query attention as one small matrix-vector product per (row, head):
// ~2.5 us of overhead each, so at 80 rows x 12 heads it took a quarter of an int8 step. This
// kernel streams each (row, head)'s keys and values once, parallel over (row, head), with f32
// arithmetic; the cache may hold f32 or f16 (half the bytes to stream; int8 decoding keeps
// its cache in f16).
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

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Widest head the vector path keeps in registers (GPT-2's heads are 64 wide).
constexpr int64_t kMaxVecD = 256;

// Where one (row, head)'s inputs and output are.
template <typename T>
struct Head {
  const float* q;
  const T* k;
  const T* v;
  const bool* keep;  // null: every key
  int64_t keys, d, k_step, v_step;
  float scale;
  float* scores;
  float* out;
  // The next (row, head)'s keys and values (or null), fetched into the cache meanwhile: one
  // head's few KB are too short for the hardware prefetcher to ramp up on.
  const T* next_k;
  const T* next_v;
};

template <typename T>
inline void prefetch_row(const T* row, int64_t d) {
  for (int64_t j = 0; j < d; j += 64 / sizeof(T)) __builtin_prefetch(row + j);
}

// Turns scores into weights in place (exp(s - max), masked keys 0) and returns their sum.
inline float softmax_weights(float* scores, int64_t keys, float top) {
  float sum = 0;
  for (int64_t t = 0; t < keys; ++t) {
    const float p = scores[t] == kNegInf ? 0.0f : std::exp(scores[t] - top);
    scores[t] = p;
    sum += p;
  }
  return sum;
}

// Any CPU, any width: plain loops.
template <typename T>
void attend_scalar(const Head<T>& a) {
  float top = kNegInf;
  for (int64_t t = 0; t < a.keys; ++t) {
    float s = kNegInf;
    if (!a.keep || a.keep[t]) {
      const T* kt = a.k + t * a.k_step;
      s = 0;
      for (int64_t j = 0; j < a.d; ++j) s += a.q[j] * static_cast<float>(kt[j]);
      s *= a.scale;
    }
    a.scores[t] = s;
    if (s > top) top = s;
  }
  const float sum = softmax_weights(a.scores, a.keys, top);
  const float inv = sum > 0 ? 1.0f / sum : 0.0f;
  for (int64_t j = 0; j < a.d; ++j) a.out[j] = 0;
  for (int64_t t = 0; t < a.keys; ++t) {
    const float p = a.scores[t];
    if (p == 0) continue;
    const T* vt = a.v + t * a.v_step;
    for (int64_t j = 0; j < a.d; ++j) a.out[j] += p * static_cast<float>(vt[j]);
  }
  for (int64_t j = 0; j < a.d; ++j) a.out[j] *= inv;
}

__attribute__((target("avx512f"))) inline __m512 load16(const float* p) {
  return _mm512_loadu_ps(p);
}
__attribute__((target("avx512f"))) inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// AVX-512, width a multiple of 16 up to kMaxVecD: q and the output stay in registers.
template <typename T>
__attribute__((target("avx512f"))) void attend_avx512(const Head<T>& a) {
  const int64_t chunks = a.d / 16;
  __m512 q[kMaxVecD / 16], acc[kMaxVecD / 16];
  for (int64_t c = 0; c < chunks; ++c) q[c] = _mm512_loadu_ps(a.q + 16 * c);
  float top = kNegInf;
  for (int64_t t = 0; t < a.keys; ++t) {
    float s = kNegInf;
    if (a.next_k) prefetch_row(a.next_k + t * a.k_step, a.d);
    if (!a.keep || a.keep[t]) {
      const T* kt = a.k + t * a.k_step;
      __m512 dot = _mm512_mul_ps(q[0], load16(kt));
      for (int64_t c = 1; c < chunks; ++c) dot = _mm512_fmadd_ps(q[c], load16(kt + 16 * c), dot);
      s = _mm512_reduce_add_ps(dot) * a.scale;
    }
    a.scores[t] = s;
    if (s > top) top = s;
  }
  const float sum = softmax_weights(a.scores, a.keys, top);
  const float inv = sum > 0 ? 1.0f / sum : 0.0f;
  for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < a.keys; ++t) {
    if (a.next_v) prefetch_row(a.next_v + t * a.v_step, a.d);
    const float p = a.scores[t];
    if (p == 0) continue;
    const __m512 pv = _mm512_set1_ps(p);
    const T* vt = a.v + t * a.v_step;
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(pv, load16(vt + 16 * c), acc[c]);
  }
  const __m512 iv = _mm512_set1_ps(inv);
  for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(a.out + 16 * c, _mm512_mul_ps(acc[c], iv));
}

template <typename T>
void attend_all(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V, const bool* keep,
                at::Tensor& out) {
  const int64_t b = Q.size(0), h = Q.size(1), d = Q.size(3), t = K.size(2);
  const float* qp = Q.data_ptr<float>();
  const T* kp = K.data_ptr<T>();
  const T* vp = V.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool vec = avx512 && d >= 16 && d % 16 == 0 && d <= kMaxVecD;
  // Small steps (one image) stay on few threads: waking the others costs more.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, t * d));
  clipcap_pool::parallel_for(0, b * h, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(t);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / h, hh = i % h;
      const int64_t nr = (i + 1) / h, nh = (i + 1) % h;
      const bool next = i + 1 < end;
      Head<T> a{qp + r * Q.stride(0) + hh * Q.stride(1),
                kp + r * K.stride(0) + hh * K.stride(1),
                vp + r * V.stride(0) + hh * V.stride(1),
                keep ? keep + r * t : nullptr,
                t,
                d,
                K.stride(2),
                V.stride(2),
                scale,
                scores.data(),
                op + r * h * d + hh * d,
                next ? kp + nr * K.stride(0) + nh * K.stride(1) : nullptr,
                next ? vp + nr * V.stride(0) + nh * V.stride(1) : nullptr};
      if (vec) {
        attend_avx512(a);
      } else {
        attend_scalar(a);
      }
    }
  });
}

}  // namespace

extern "C" {

// q [B, H, 1, D] (f32), keys and values [B, H, T, D] (both f32 or both f16), all on the CPU
// with each row of D contiguous (any other strides), keep [B, 1, 1, T] (bool, contiguous) or
// null: the attention output as [B, 1, H*D] f32 (heads side by side, as GPT-2's output
// projection takes them). A (row, head) whose keys are all masked gets zeros. Returns null
// with *error set on bad input.
at::Tensor* clipcap_attend_one(const at::Tensor* q, const at::Tensor* keys,
                               const at::Tensor* values, const at::Tensor* keep,
                               char** error) {
  try {
    const at::Tensor& Q = *q;
    const at::Tensor& K = *keys;
    const at::Tensor& V = *values;
    TORCH_CHECK(Q.dim() == 4 && K.dim() == 4 && V.dim() == 4, "q, keys, values must be 4-D");
    const int64_t b = Q.size(0), h = Q.size(1), d = Q.size(3), t = K.size(2);
    TORCH_CHECK(Q.size(2) == 1, "one query per row");
    TORCH_CHECK(d > 0, "heads must be at least 1 wide");
    TORCH_CHECK(K.size(0) == b && K.size(1) == h && K.size(3) == d && V.sizes() == K.sizes(),
                "keys and values must be [B, H, T, D] like q");
    TORCH_CHECK(Q.scalar_type() == at::kFloat, "q must be f32");
    TORCH_CHECK(K.scalar_type() == V.scalar_type() &&
                    (K.scalar_type() == at::kFloat || K.scalar_type() == at::kHalf),
                "keys and values must both be f32 or both f16");
    for (const at::Tensor* x : {&Q, &K, &V}) {
      TORCH_CHECK(x->device().is_cpu(), "CPU tensors");
      TORCH_CHECK(x->stride(3) == 1, "the last dimension must be contiguous");
    }
    const bool* keep_ptr = nullptr;
    if (keep) {
      TORCH_CHECK(keep->scalar_type() == at::kBool && keep->is_contiguous() &&
                      keep->numel() == b * t,
                  "keep must be a contiguous [B, 1, 1, T] bool tensor");
      keep_ptr = keep->data_ptr<bool>();
    }
    at::Tensor out = at::empty({b, 1, h * d}, Q.options());
    if (K.scalar_type() == at::kHalf) {
      attend_all<at::Half>(Q, K, V, keep_ptr, out);
    } else {
      attend_all<float>(Q, K, V, keep_ptr, out);
    }
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
    return nullptr;
  }
}

}  // extern "C"
