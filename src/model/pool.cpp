// See pool.h. One pool per process, used by one caller at a time (the decode loop); a second
// caller meanwhile runs its loop inline rather than wait.
#include "pool.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>

namespace clipcap_pool {
namespace {

thread_local int tls_index = 0;
thread_local bool tls_in_loop = false;

// Threads of one loop at most (the low byte of `Pool::state`).
constexpr int kMaxThreads = 255;

int64_t spin_ns() {
  static const int64_t ns = [] {
    const char* v = std::getenv("CLIPCAP_KERNEL_SPIN_US");
    const long us = v && *v ? std::strtol(v, nullptr, 10) : 30;
    return static_cast<int64_t>(std::max(0L, us)) * 1000;
  }();
  return ns;
}

struct Pool {
  std::mutex caller;  // held by the thread running a loop
  int workers = 0;     // detached; they never exit
  // (generation << 8) | threads of that loop: one word, so a worker reads which loop it is
  // and whether it takes part in it together.
  std::atomic<uint64_t> state{0};
  std::atomic<int> pending{0};  // workers of the current loop not yet done
  std::atomic<int> sleepers{0};
  std::mutex sleep;
  std::condition_variable wake;
  // The current loop; written before `state` is published, read by its workers.
  Body body = nullptr;
  const void* ctx = nullptr;
  int64_t begin = 0, end = 0, chunk = 0;
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  std::exception_ptr error;

  // `seen`: the state when the worker was made, before the loop it was made for is published.
  void work(int index, uint64_t seen) {
    tls_index = index;
    tls_in_loop = true;
    for (;;) {
      uint64_t now = wait_for_change(seen);
      seen = now;
      if (index >= static_cast<int>(now & 0xff)) continue;  // not in this loop
      const int64_t b = begin + index * chunk;
      if (b < end) {
        try {
          body(ctx, b, std::min(end, b + chunk));
        } catch (...) {
          if (!failed.test_and_set()) error = std::current_exception();
        }
      }
      pending.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  uint64_t wait_for_change(uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(spin_ns());
    for (int i = 0;; ++i) {
      const uint64_t now = state.load(std::memory_order_acquire);
      if (now != seen) return now;
      _mm_pause();
      if ((i & 63) == 63 && std::chrono::steady_clock::now() >= until) break;
    }
    std::unique_lock<std::mutex> lock(sleep);
    sleepers.fetch_add(1);
    wake.wait(lock, [&] { return state.load() != seen; });
    sleepers.fetch_sub(1);
    return state.load(std::memory_order_acquire);
  }

  void grow(int threads) {
    for (; workers + 1 < threads; ++workers) {
      const int index = workers + 1;
      const uint64_t seen = state.load();
      std::thread([this, index, seen] { work(index, seen); }).detach();
    }
  }
};

// Never destroyed: its detached workers outlive main's statics.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

// Marks this thread as inside a loop for a scope, so that loops nested in it run inline.
struct InLoop {
  bool outer = tls_in_loop;
  InLoop() { tls_in_loop = true; }
  ~InLoop() { tls_in_loop = outer; }
};

}  // namespace

int thread_index() { return tls_index; }

void run(int64_t begin, int64_t end, int64_t grain, Body body, const void* ctx) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  int threads = 1;
  if (!tls_in_loop && n > grain) {
    at::internal::lazy_init_num_threads();
    const int64_t want = std::min<int64_t>(at::get_num_threads(), kMaxThreads);
    threads = static_cast<int>(std::min<int64_t>(want, (n + grain - 1) / grain));
  }
  Pool& p = pool();
  std::unique_lock<std::mutex> turn(p.caller, std::defer_lock);
  if (threads <= 1 || !turn.try_lock()) {
    InLoop inside;
    body(ctx, begin, end);
    return;
  }
  p.grow(threads);
  p.body = body;
  p.ctx = ctx;
  p.begin = begin;
  p.end = end;
  p.chunk = (n + threads - 1) / threads;
  p.error = nullptr;
  p.failed.clear();
  p.pending.store(threads - 1);
  const uint64_t generation = (p.state.load() >> 8) + 1;
  p.state.store((generation << 8) | static_cast<uint64_t>(threads));
  if (p.sleepers.load() > 0) {
    std::lock_guard<std::mutex> lock(p.sleep);
    p.wake.notify_all();
  }
  {
    InLoop inside;
    try {
      body(ctx, begin, std::min(end, begin + p.chunk));
    } catch (...) {
      if (!p.failed.test_and_set()) p.error = std::current_exception();
    }
  }
  // The workers must be done before the loop's state (and the caller's lambda) goes away.
  while (p.pending.load(std::memory_order_acquire) > 0) _mm_pause();
  if (p.error) std::rethrow_exception(p.error);
}

}  // namespace clipcap_pool
