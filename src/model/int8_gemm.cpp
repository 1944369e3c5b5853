// clipcap's own int8 GEMM for CPU decoding, with its neighbours fused in. A decode step makes
// 49 small products; through PyTorch's quantized ops each one is a dozen passes (row scales,
// guard rows, the op's own range, quantize, pack, GEMM, dequantize, row rescale, bias) and as
// many parallel regions whose thread wake-ups cost more than the arithmetic at one image. Here
// one call does it all: an optional LayerNorm of each input row, per-row symmetric 8-bit
// quantization, the product with per-output-channel int8 weights (AVX-512 VNNI where the CPU
// has it, plain loops elsewhere), then scales, bias, an optional activation and an optional
// residual in the same pass that stores the result. The sums are exact integers and every
// other operation is per element, so a row's result depends on that row only, whatever batch
// it shares.
#include <ATen/ATen.h>
#include "pool.h"
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#include "shim.h"

namespace {

using clipcap_shim::copy_message;

// Output columns per block: two AVX-512 registers of 16 int32 sums. The weights are stored
// block by block, each block's bytes in the order the kernel reads them: for every 4 input
// columns, 32 output columns x 4 bytes (VNNI's u8 x s8 dot products of 4). A block of 768
// inputs (24 KB) stays in L1 while every row tile passes over it.
constexpr int64_t kCols = 32;
// Rows sharing one pass over a block's weights (8 x 2 sums + 2 weights + 1 broadcast
// registers; 4 x 64 and 8 x 48 tiles measured slower or no faster).
constexpr int kRows = 8;
// How far ahead of its reads the first pass over a block fetches weights.
constexpr int64_t kPrefetchBytes = 2048;

enum Activation : int { kNone = 0, kGeluTanh = 1, kRelu = 2 };

struct Free {
  void operator()(void* p) const { std::free(p); }
};

template <typename T>
std::unique_ptr<T[], Free> aligned(size_t n) {
  size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes ? bytes : 64);
  if (!p) throw std::runtime_error("out of memory packing int8 weights");
  std::memset(p, 0, bytes);
  return std::unique_ptr<T[], Free>(static_cast<T*>(p));
}

struct Matrix {
  int64_t n = 0, k = 0;   // out, in
  int64_t kp = 0;         // in, rounded up to 4
  int64_t blocks = 0;     // ceil(n / kCols)
  bool vector = false;    // AVX-512 VNNI, else plain loops
  std::unique_ptr<int8_t[], Free> w;     // [blocks][kp / 4][kCols][4]
  std::unique_ptr<float[], Free> scale;  // [blocks * kCols], per output column
  // 128 x the column's sum of weights: inputs are stored as q + 128 (VNNI multiplies
  // unsigned by signed bytes), and this takes the offset back out of every sum.
  std::unique_ptr<int32_t[], Free> offset;
};

bool has_vnni() {
  static const bool v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512vnni");
  return v;
}



// ---- the activation, shared by both paths' epilogues -------------------------------------

// GELU's tanh form is x * sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3): no cancellation.
constexpr float kGeluC0 = 0.7978845608028654f;
constexpr float kGeluC1 = 0.7978845608028654f * 0.044715f;

inline float activate(float y, int act) {
  if (act == kGeluTanh) {
    const float z = y * (kGeluC0 + kGeluC1 * y * y);
    return y / (1.0f + std::exp(-2.0f * z));
  }
  if (act == kRelu) return y > 0 ? y : 0.0f;
  return y;
}

__attribute__((target("avx512f"))) inline __m512 exp16(__m512 x) {
  // exp(x) = 2^n exp(r), |r| <= ln2/2, exp(r) by its Taylor series to r^7 (relative error
  // about 2e-8 before f32 rounding).
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f"))) inline __m512 activate16(__m512 y, int act) {
  if (act == kGeluTanh) {
    const __m512 y2 = _mm512_mul_ps(y, y);
    const __m512 z = _mm512_mul_ps(
        y, _mm512_fmadd_ps(y2, _mm512_set1_ps(kGeluC1), _mm512_set1_ps(kGeluC0)));
    const __m512 e = exp16(_mm512_mul_ps(z, _mm512_set1_ps(-2.0f)));
    return _mm512_div_ps(y, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  }
  if (act == kRelu) return _mm512_max_ps(y, _mm512_setzero_ps());
  return y;
}

// ---- packing -----------------------------------------------------------------------------

Matrix pack(const at::Tensor& weight, bool plain_loops) {
  at::Tensor w = weight.to(at::kFloat).contiguous();
  Matrix m;
  m.vector = has_vnni() && !plain_loops;
  m.n = w.size(0);
  m.k = w.size(1);
  m.kp = (m.k + 3) / 4 * 4;
  m.blocks = (m.n + kCols - 1) / kCols;
  const int64_t cols = m.blocks * kCols;
  m.w = aligned<int8_t>(static_cast<size_t>(cols * m.kp));
  m.scale = aligned<float>(cols);
  m.offset = aligned<int32_t>(cols);
  const float* src = w.data_ptr<float>();
  clipcap_pool::parallel_for(0, m.n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const float* row = src + o * m.k;
      float top = 0;
      for (int64_t i = 0; i < m.k; ++i) top = std::max(top, std::fabs(row[i]));
      // As PyTorch's per-channel int8: scale = max |w| / 127, zero point 0.
      const float scale = std::max(top, 1e-12f) / 127.0f;
      const float inv = 1.0f / scale;
      const int64_t b = o / kCols, c = o % kCols;
      int8_t* dst = m.w.get() + b * m.kp * kCols;
      int32_t sum = 0;
      for (int64_t i = 0; i < m.k; ++i) {
        const float q = std::min(127.0f, std::max(-127.0f, std::nearbyint(row[i] * inv)));
        const int8_t v = static_cast<int8_t>(q);
        dst[((i / 4) * kCols + c) * 4 + i % 4] = v;
        sum += v;
      }
      m.scale[o] = scale;
      m.offset[o] = 128 * sum;
    }
  });
  return m;
}

// ---- the input rows: LayerNorm (optional), then 8-bit symmetric per row ------------------

struct LayerNormArgs {
  const float* weight;  // null: no LayerNorm
  const float* bias;
  float eps;
};

// Row `x` (k values) to `q` (kp bytes, q + 128) and its scale (max |row| / 127). `tmp` holds
// the normalized row.
void quantize_row_scalar(const float* x, int64_t k, int64_t kp, const LayerNormArgs& ln,
                         float* tmp, uint8_t* q, float* scale) {
  const float* row = x;
  if (ln.weight) {
    float sum = 0;
    for (int64_t i = 0; i < k; ++i) sum += x[i];
    const float mean = sum / k;
    float var = 0;
    for (int64_t i = 0; i < k; ++i) var += (x[i] - mean) * (x[i] - mean);
    const float rstd = 1.0f / std::sqrt(var / k + ln.eps);
    for (int64_t i = 0; i < k; ++i) tmp[i] = (x[i] - mean) * rstd * ln.weight[i] + ln.bias[i];
    row = tmp;
  }
  float top = 0;
  for (int64_t i = 0; i < k; ++i) top = std::max(top, std::fabs(row[i]));
  const float inv = top > 0 ? 127.0f / top : 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    const float v = std::min(127.0f, std::max(-127.0f, std::nearbyint(row[i] * inv)));
    q[i] = static_cast<uint8_t>(static_cast<int>(v) + 128);
  }
  for (int64_t i = k; i < kp; ++i) q[i] = 128;
  *scale = top / 127.0f;
}

__attribute__((target("avx512f,avx512bw"))) void quantize_row_avx512(
    const float* x, int64_t k, int64_t kp, const LayerNormArgs& ln, float* tmp, uint8_t* q,
    float* scale) {
  const int64_t k16 = k / 16 * 16;
  const float* row = x;
  if (ln.weight) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t i = 0; i < k16; i += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(x + i));
    float sum = _mm512_reduce_add_ps(s);
    for (int64_t i = k16; i < k; ++i) sum += x[i];
    const float mean = sum / k;
    const __m512 vm = _mm512_set1_ps(mean);
    __m512 v = _mm512_setzero_ps();
    for (int64_t i = 0; i < k16; i += 16) {
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + i), vm);
      v = _mm512_fmadd_ps(d, d, v);
    }
    float var = _mm512_reduce_add_ps(v);
    for (int64_t i = k16; i < k; ++i) var += (x[i] - mean) * (x[i] - mean);
    const float rstd = 1.0f / std::sqrt(var / k + ln.eps);
    const __m512 vr = _mm512_set1_ps(rstd);
    for (int64_t i = 0; i < k16; i += 16) {
      const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm), vr);
      _mm512_storeu_ps(tmp + i, _mm512_fmadd_ps(d, _mm512_loadu_ps(ln.weight + i),
                                                _mm512_loadu_ps(ln.bias + i)));
    }
    for (int64_t i = k16; i < k; ++i) tmp[i] = (x[i] - mean) * rstd * ln.weight[i] + ln.bias[i];
    row = tmp;
  }
  __m512 hi = _mm512_setzero_ps();
  for (int64_t i = 0; i < k16; i += 16) hi = _mm512_max_ps(hi, _mm512_abs_ps(_mm512_loadu_ps(row + i)));
  float top = _mm512_reduce_max_ps(hi);
  for (int64_t i = k16; i < k; ++i) top = std::max(top, std::fabs(row[i]));
  const float inv = top > 0 ? 127.0f / top : 0.0f;
  const __m512 vi = _mm512_set1_ps(inv);
  const __m512i off = _mm512_set1_epi32(128);
  for (int64_t i = 0; i < k16; i += 16) {
    // Rounds to nearest even, as std::nearbyint does in the plain path.
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + i), vi));
    v = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(v, _mm512_set1_epi32(-127)),
                                          _mm512_set1_epi32(127)),
                         off);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(v));
  }
  for (int64_t i = k16; i < k; ++i) {
    const float v = std::min(127.0f, std::max(-127.0f, std::nearbyint(row[i] * inv)));
    q[i] = static_cast<uint8_t>(static_cast<int>(v) + 128);
  }
  for (int64_t i = k; i < kp; ++i) q[i] = 128;
  *scale = top / 127.0f;
}

// ---- the product ---------------------------------------------------------------------------

struct Epilogue {
  const float* bias;      // [n] or null
  const float* residual;  // [rows, n] or null, added last
  int act;
  float* out;             // [rows, n]
};

inline int32_t load4(const uint8_t* p) {
  int32_t four;
  std::memcpy(&four, p, 4);
  return four;
}

// Rows r0 .. r0 + R of block b, vector path. The 2 x R sums are named one by one: held in an
// array, GCC shuffled them between registers at every step (half the loop's instructions).
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void block_avx512(
    const Matrix& m, int64_t b, const uint8_t* q, const float* qscale, int64_t r0,
    const Epilogue& e, bool prefetch) {
  static_assert(R >= 1 && R <= 8, "1 to 8 rows");
  static_assert(kCols == 32, "two registers of sums per row");
  const __m512i z = _mm512_setzero_si512();
  __m512i c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z;
  __m512i c40 = z, c41 = z, c50 = z, c51 = z, c60 = z, c61 = z, c70 = z, c71 = z;
  const int8_t* wg = m.w.get() + b * m.kp * kCols;
  const uint8_t* a0 = q + r0 * m.kp;
  const uint8_t* a1 = a0 + m.kp;
  const uint8_t* a2 = a1 + m.kp;
  const uint8_t* a3 = a2 + m.kp;
  const uint8_t* a4 = a3 + m.kp;
  const uint8_t* a5 = a4 + m.kp;
  const uint8_t* a6 = a5 + m.kp;
  const uint8_t* a7 = a6 + m.kp;
  const int64_t groups = m.kp / 4;
  for (int64_t g = 0; g < groups; ++g, wg += kCols * 4) {
    // The first rows' pass reads the block from memory: a few groups ahead, fetch the lines
    // (into the next block too) rather than wait on each.
    if (prefetch) {
      _mm_prefetch(reinterpret_cast<const char*>(wg) + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wg) + kPrefetchBytes + 64, _MM_HINT_T0);
    }
    const __m512i w0 = _mm512_load_si512(wg);
    const __m512i w1 = _mm512_load_si512(wg + 64);
#define CLIPCAP_ROW(r)                                          \
  if constexpr (R > r) {                                        \
    const __m512i x = _mm512_set1_epi32(load4(a##r + g * 4));   \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, x, w0);              \
    c##r##1 = _mm512_dpbusd_epi32(c##r##1, x, w1);              \
  }
    CLIPCAP_ROW(0)
    CLIPCAP_ROW(1)
    CLIPCAP_ROW(2)
    CLIPCAP_ROW(3)
    CLIPCAP_ROW(4)
    CLIPCAP_ROW(5)
    CLIPCAP_ROW(6)
    CLIPCAP_ROW(7)
#undef CLIPCAP_ROW
  }
  const __m512i acc[8][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31},
                             {c40, c41}, {c50, c51}, {c60, c61}, {c70, c71}};
  for (int j = 0; j < 2; ++j) {
    const int64_t c0 = b * kCols + j * 16;
    if (c0 >= m.n) break;
    const int64_t left = std::min<int64_t>(16, m.n - c0);
    const __mmask16 mask = left == 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
    const __m512i off = _mm512_load_si512(m.offset.get() + c0);
    const __m512 ws = _mm512_load_ps(m.scale.get() + c0);
    const __m512 bias =
        e.bias ? _mm512_maskz_loadu_ps(mask, e.bias + c0) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const int64_t row = r0 + r;
      const __m512 s = _mm512_mul_ps(ws, _mm512_set1_ps(qscale[row]));
      const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][j], off));
      __m512 y = _mm512_fmadd_ps(f, s, bias);
      y = activate16(y, e.act);
      if (e.residual) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, e.residual + row * m.n + c0));
      _mm512_mask_storeu_ps(e.out + row * m.n + c0, mask, y);
    }
  }
}

// The same sums and epilogue in plain loops (any CPU).
void block_scalar(const Matrix& m, int64_t b, const uint8_t* q, const float* qscale, int64_t r0,
                  int64_t rows, const Epilogue& e) {
  const int8_t* wb = m.w.get() + b * m.kp * kCols;
  for (int64_t r = r0; r < r0 + rows; ++r) {
    const uint8_t* a = q + r * m.kp;
    int32_t acc[kCols] = {0};
    for (int64_t g = 0; g < m.kp / 4; ++g) {
      const int8_t* wg = wb + g * kCols * 4;
      for (int64_t c = 0; c < kCols; ++c)
        for (int t = 0; t < 4; ++t) acc[c] += static_cast<int32_t>(a[g * 4 + t]) * wg[c * 4 + t];
    }
    for (int64_t c = 0; c < kCols; ++c) {
      const int64_t col = b * kCols + c;
      if (col >= m.n) break;
      const float s = m.scale[col] * qscale[r];
      float y = std::fma(static_cast<float>(acc[c] - m.offset[col]), s, e.bias ? e.bias[col] : 0.0f);
      y = activate(y, e.act);
      if (e.residual) y += e.residual[r * m.n + col];
      e.out[r * m.n + col] = y;
    }
  }
}

void product(const Matrix& m, const uint8_t* q, const float* qscale, int64_t rows,
             const Epilogue& e) {
  const bool vec = m.vector;
  clipcap_pool::parallel_for(0, m.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t r0 = 0;
      if (!vec) {
        block_scalar(m, b, q, qscale, 0, rows, e);
        continue;
      }
      for (; r0 + kRows <= rows; r0 += kRows)
        block_avx512<kRows>(m, b, q, qscale, r0, e, r0 == 0);
      const bool first = r0 == 0;
      switch (rows - r0) {
        case 7: block_avx512<7>(m, b, q, qscale, r0, e, first); break;
        case 6: block_avx512<6>(m, b, q, qscale, r0, e, first); break;
        case 5: block_avx512<5>(m, b, q, qscale, r0, e, first); break;
        case 4: block_avx512<4>(m, b, q, qscale, r0, e, first); break;
        case 3: block_avx512<3>(m, b, q, qscale, r0, e, first); break;
        case 2: block_avx512<2>(m, b, q, qscale, r0, e, first); break;
        case 1: block_avx512<1>(m, b, q, qscale, r0, e, first); break;
        default: break;
      }
    }
  });
}

const float* data_or_null(const at::Tensor* t, const char* what, int64_t numel) {
  if (!t) return nullptr;
  if (t->scalar_type() != at::kFloat || !t->is_contiguous() || t->numel() != numel)
    throw std::invalid_argument(std::string("int8 gemm: ") + what +
                                " must be a contiguous f32 tensor of the right size");
  return t->data_ptr<float>();
}

}  // namespace

extern "C" {

// Quantizes `weight` [out, in] per output row (scale = max |w| / 127, zero point 0) and packs
// it for clipcap_int8_gemm, which then runs AVX-512 VNNI where the CPU has it unless
// `plain_loops` (tests compare the two). Returns an opaque handle, or null with *error set.
void* clipcap_int8_gemm_pack(const at::Tensor* weight, int plain_loops, char** error) {
  try {
    if (weight->dim() != 2 || !weight->device().is_cpu())
      throw std::invalid_argument("int8 gemm weights must be a 2-D CPU matrix");
    return new Matrix(pack(*weight, plain_loops != 0));
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
    return nullptr;
  }
}

// act(LayerNorm(x) W^T + bias) + residual for x [rows, in] (f32, contiguous): [rows, out]
// (f32). ln_weight / ln_bias [in] (both or neither), bias [out], residual [rows, out] may be
// null; act is 0 (none), 1 (GELU, tanh form) or 2 (ReLU).
at::Tensor* clipcap_int8_gemm(const at::Tensor* x, void* packed, const at::Tensor* ln_weight,
                              const at::Tensor* ln_bias, double ln_eps, const at::Tensor* bias,
                              const at::Tensor* residual, int act, char** error) {
  try {
    const Matrix& m = *static_cast<const Matrix*>(packed);
    if (x->dim() != 2 || x->size(1) != m.k || x->scalar_type() != at::kFloat ||
        !x->is_contiguous() || !x->device().is_cpu())
      throw std::invalid_argument("int8 gemm: x must be a contiguous f32 CPU [rows, in]");
    if (act < kNone || act > kRelu) throw std::invalid_argument("int8 gemm: unknown activation");
    const int64_t rows = x->size(0);
    LayerNormArgs ln{data_or_null(ln_weight, "ln weight", m.k), data_or_null(ln_bias, "ln bias", m.k),
                     static_cast<float>(ln_eps)};
    if ((ln.weight == nullptr) != (ln.bias == nullptr))
      throw std::invalid_argument("int8 gemm: LayerNorm needs both weight and bias");
    Epilogue e{data_or_null(bias, "bias", m.n), data_or_null(residual, "residual", rows * m.n), act,
               nullptr};
    at::Tensor out = at::empty({rows, m.n}, x->options());
    e.out = out.data_ptr<float>();
    if (rows > 0) {
      auto q = aligned<uint8_t>(static_cast<size_t>(rows * m.kp));
      std::vector<float> qscale(rows);
      const float* src = x->data_ptr<float>();
      const bool vec = m.vector;
      auto quantize = [&](int64_t begin, int64_t end) {
        std::vector<float> tmp(ln.weight ? m.k : 0);
        for (int64_t r = begin; r < end; ++r) {
          if (vec)
            quantize_row_avx512(src + r * m.k, m.k, m.kp, ln, tmp.data(), q.get() + r * m.kp, &qscale[r]);
          else
            quantize_row_scalar(src + r * m.k, m.k, m.kp, ln, tmp.data(), q.get() + r * m.kp, &qscale[r]);
        }
      };
      // A decode step's rows are quantized faster than threads wake up; a prefill's are not.
      if (rows * m.k < (1 << 18))
        quantize(0, rows);
      else
        clipcap_pool::parallel_for(0, rows, 16, quantize);
      product(m, q.get(), qscale.data(), rows, e);
    }
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
    return nullptr;
  }
}

void clipcap_int8_gemm_free(void* packed) { delete static_cast<Matrix*>(packed); }

// Whether clipcap_int8_gemm runs AVX-512 VNNI here (else plain loops, far slower).
int clipcap_int8_gemm_vnni() { return has_vnni() ? 1 : 0; }

// How many threads a parallel loop of these kernels runs on (pool.h): libtorch's intra-op
// thread count, unless another caller holds the pool.
int clipcap_kernel_threads() {
  std::atomic<uint64_t> seen{0};
  clipcap_pool::parallel_for(0, 64, 1, [&](int64_t, int64_t) {
    seen.fetch_or(uint64_t{1} << (clipcap_pool::thread_index() & 63));
  });
  return __builtin_popcountll(seen.load());
}

}  // extern "C"
