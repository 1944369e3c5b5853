// The threads that clipcap's C++ kernels (int8 GEMM, attention, beam candidates, sampling)
// split their loops over. A decode step makes some seventy short parallel loops; libgomp puts
// its workers to sleep almost at once when more threads exist than CPUs (libtorch's own team
// per calling thread is enough for that), and waking one through the kernel cost ~60 us per
// loop on a KVM guest: more than a one-image GEMM takes. These workers spin a while after each
// loop (CLIPCAP_KERNEL_SPIN_US, default 30), so back-to-back loops hand over in a microsecond,
// then sleep: longer spins made one-image decoding faster still but a server slower, whose
// encoder wants the CPU meanwhile. The thread count follows libtorch's intra-op setting.
#pragma once
#include <cstdint>

namespace clipcap_pool {

using Body = void (*)(const void* ctx, int64_t begin, int64_t end);

// Runs body over [begin, end) in at most ceil((end - begin) / grain) contiguous chunks, one
// per thread, the caller taking the first; as at::parallel_for splits. Inline when nested
// inside another loop, when another thread holds the pool, or when one chunk suffices.
void run(int64_t begin, int64_t end, int64_t grain, Body body, const void* ctx);

// Which of the loop's threads this is (0 for the caller or outside a loop).
int thread_index();

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  run(
      begin, end, grain,
      [](const void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); }, &f);
}

}  // namespace clipcap_pool
