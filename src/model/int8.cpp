// int8 linear layers for CPU decoding: per-output-channel symmetric int8 weights and f32
// activations quantized per call (dynamic quantization), computed by PyTorch's own
// quantized::linear_prepack / quantized::linear_dynamic ops (fbgemm's kernels on x86).
// tch does not wrap these ops; this shim reaches them through the dispatcher. Tensors cross
// as `at::Tensor*`, the same pointer tch's C API passes as a tensor.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "shim.h"

namespace {

using clipcap_shim::copy_message;

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

}  // namespace

extern "C" {

// Quantizes `weight` [out, in] (f32) per output row (scale = max |w| / 127, zero point 0) and
// packs it with `bias` [out] (or none) for fbgemm. Returns an opaque handle, or null with
// *error set (free it with clipcap_int8_free_error).
void* clipcap_int8_pack(const at::Tensor* weight, const at::Tensor* bias, char** error) {
  try {
    at::Tensor w = weight->to(at::kFloat).contiguous();
    at::Tensor scales = (w.abs().amax({1}).clamp_min(1e-12) / 127.0).to(at::kDouble);
    at::Tensor zero_points = at::zeros({w.size(0)}, at::TensorOptions().dtype(at::kLong));
    at::Tensor qw = at::quantize_per_channel(w, scales, zero_points, 0, at::kQInt8);
    static const c10::OperatorHandle prepack = op("quantized::linear_prepack");
    std::vector<c10::IValue> stack;
    stack.emplace_back(qw);
    if (bias) {
      stack.emplace_back(bias->to(at::kFloat).contiguous());
    } else {
      stack.emplace_back(c10::IValue());
    }
    prepack.callBoxed(&stack);
    return new c10::IValue(std::move(stack.at(0)));
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
    return nullptr;
  }
}

// x [rows, in] (f32) times the packed weight, plus its bias: [rows, out] (f32). The
// activations are quantized to 7 bits per call (reduce_range, as PyTorch does for x86, so
// that AVX2's 16-bit accumulation cannot saturate).
at::Tensor* clipcap_int8_linear(const at::Tensor* x, void* packed, char** error) {
  try {
    static const c10::OperatorHandle linear = op("quantized::linear_dynamic");
    std::vector<c10::IValue> stack;
    stack.emplace_back(*x);
    stack.emplace_back(*static_cast<c10::IValue*>(packed));
    stack.emplace_back(true);
    linear.callBoxed(&stack);
    return new at::Tensor(stack.at(0).toTensor());
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
    return nullptr;
  }
}

// The engine quantized weights are packed for from now on (PyTorch's process-wide setting:
// `quantized::linear_prepack`, and a TorchScript archive's packed weights when it is loaded,
// follow it; a packed weight keeps its engine). 1 = fbgemm, 3 = onednn (at::QEngine).
// Returns 0, or -1 with *error set when this libtorch lacks the engine.
int clipcap_int8_set_engine(int engine, char** error) {
  try {
    at::globalContext().setQEngine(static_cast<at::QEngine>(engine));
    return 0;
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
    return -1;
  }
}

int clipcap_int8_engine() { return static_cast<int>(at::globalContext().qEngine()); }

void clipcap_int8_free(void* packed) { delete static_cast<c10::IValue*>(packed); }

void clipcap_int8_free_error(char* error) { std::free(error); }

}  // extern "C"
