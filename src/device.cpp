// CUDA facts and streams that tch does not wrap, reached through c10's device-neutral
// interfaces (the CUDA allocator and guard that libtorch_cuda registers when it loads), so this
// compiles against a CPU build's headers and needs no CUDA toolkit. On a host without CUDA
// every call fails with libtorch's own reason, written into the caller's buffer.
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstdint>
#include <cstring>
#include <exception>

namespace {

void write_error(const char* what, char* error, size_t capacity) {
  if (!error || capacity == 0) return;
  std::strncpy(error, what, capacity - 1);
  error[capacity - 1] = '\0';
}

const c10::impl::DeviceGuardImplInterface* cuda_guard() {
  TORCH_CHECK(c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA),
              "this libtorch has no CUDA support");
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
}

c10::Stream unpack(int64_t id, int32_t device) {
  return c10::Stream::unpack3(id, static_cast<c10::DeviceIndex>(device), c10::DeviceType::CUDA);
}

}  // namespace

extern "C" {

// Free and total bytes of CUDA device `device` (cudaMemGetInfo, as the caching allocator
// reports it). Returns 0, or 1 with `error` filled.
int clipcap_cuda_memory(int32_t device, uint64_t* free, uint64_t* total, char* error,
                        size_t capacity) {
  try {
    cuda_guard();
    auto [f, t] = c10::getDeviceAllocator(c10::DeviceType::CUDA)
                      ->getMemoryInfo(static_cast<c10::DeviceIndex>(device));
    *free = f;
    *total = t;
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), error, capacity);
    return 1;
  }
}

// Makes a stream from libtorch's pool the calling thread's current stream on `device`; the
// stream it replaced is written to `previous`. Returns 0, or 1 with `error` filled.
int clipcap_cuda_enter_pool_stream(int32_t device, int64_t* previous, char* error,
                                   size_t capacity) {
  try {
    const auto* guard = cuda_guard();
    const c10::Device d(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    const c10::Stream side = guard->getStreamFromGlobalPool(d, /*isHighPriority=*/false);
    *previous = guard->exchangeStream(side).id();
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), error, capacity);
    return 1;
  }
}

// Waits for the calling thread's current stream on `device`, then makes stream `previous`
// current again. Returns 0, or 1 with `error` filled (the previous stream is restored anyway).
int clipcap_cuda_leave_stream(int32_t device, int64_t previous, char* error, size_t capacity) {
  int rc = 0;
  try {
    const auto* guard = cuda_guard();
    const c10::Device d(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    guard->synchronizeStream(guard->getStream(d));
  } catch (const std::exception& e) {
    write_error(e.what(), error, capacity);
    rc = 1;
  }
  try {
    cuda_guard()->exchangeStream(unpack(previous, device));
  } catch (const std::exception& e) {
    if (rc == 0) write_error(e.what(), error, capacity);
    rc = 1;
  }
  return rc;
}

// The id of the calling thread's current stream on `device` (0 is the default stream).
int clipcap_cuda_current_stream(int32_t device, int64_t* id, char* error, size_t capacity) {
  try {
    const c10::Device d(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    *id = cuda_guard()->getStream(d).id();
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), error, capacity);
    return 1;
  }
}

}  // extern "C"
