// y [M, N] = x [M, K] @ w [K, N], float32, for a few rows M: the matrix-vector products of
// decoding, where every weight is read once per token and the time is the time to stream w.
//
// An XLA FFI handler (registered by lm/gemv.py, which also builds this file). The rows of w are
// cut into contiguous pieces, one per thread of XLA's intra-op pool: each piece is read front to
// back once (the access pattern memory prefetchers serve best) into its own partial [M, N], and
// the partials are added at the end. Pieces are claimed from a shared counter, so the calling
// thread does every piece itself when the pool's other threads are busy: no wait on a thread
// that never comes.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 16 floats, loaded and stored at any 4-byte alignment (GCC/Clang vector extension).
typedef float vec __attribute__((vector_size(64), aligned(4)));
constexpr int64_t kLanes = 16;

// out [M, N] = x[:, k0:k1] @ w[k0:k1, :], out overwritten.
void Partial(const float* x, const float* w, float* out, int64_t m_rows, int64_t k_dim, int64_t n,
             int64_t k0, int64_t k1) {
  std::memset(out, 0, sizeof(float) * m_rows * n);
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {  // four rows of w per pass over out: a quarter of the out traffic
    const float* w0 = w + k * n;
    const float* w1 = w0 + n;
    const float* w2 = w1 + n;
    const float* w3 = w2 + n;
    for (int64_t m = 0; m < m_rows; ++m) {
      const float* xm = x + m * k_dim + k;
      const float a0 = xm[0], a1 = xm[1], a2 = xm[2], a3 = xm[3];
      float* o = out + m * n;
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes) {
        vec acc = *reinterpret_cast<const vec*>(o + j);
        acc += a0 * *reinterpret_cast<const vec*>(w0 + j) + a1 * *reinterpret_cast<const vec*>(w1 + j);
        acc += a2 * *reinterpret_cast<const vec*>(w2 + j) + a3 * *reinterpret_cast<const vec*>(w3 + j);
        *reinterpret_cast<vec*>(o + j) = acc;
      }
      for (; j < n; ++j) o[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j];
    }
  }
  for (; k < k1; ++k) {
    const float* wk = w + k * n;
    for (int64_t m = 0; m < m_rows; ++m) {
      const float a = x[m * k_dim + k];
      float* o = out + m * n;
      for (int64_t j = 0; j < n; ++j) o[j] += a * wk[j];
    }
  }
}

struct Job {
  const float* x;
  const float* w;
  float* y;
  int64_t m, k, n;
  int pieces;
  std::vector<float> partials;  // pieces 1.. write here; piece 0 writes y
  std::atomic<int> next{0};
  std::atomic<int> done{0};

  void Work() {
    for (int p; (p = next.fetch_add(1, std::memory_order_relaxed)) < pieces;) {
      const int64_t k0 = k * p / pieces, k1 = k * (p + 1) / pieces;
      float* out = p == 0 ? y : partials.data() + (p - 1) * m * n;
      Partial(x, w, out, m, k, n, k0, k1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error GemvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("lm_gemv: expected x [M, K] and w [K, N]");
  }
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->w = w.typed_data();
  job->y = y->typed_data();
  job->m = xd[0];
  job->k = wd[0];
  job->n = wd[1];
  // One piece per pool thread, but not below ~128 KiB of w per piece: a handoff costs more than
  // reading a small matrix alone.
  const int64_t bytes = job->k * job->n * static_cast<int64_t>(sizeof(float));
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  job->pieces = static_cast<int>(std::clamp<int64_t>(bytes / (128 << 10), 1, std::min<int64_t>(threads, 8)));
  job->pieces = static_cast<int>(std::min<int64_t>(job->pieces, job->k));
  job->partials.resize((job->pieces - 1) * job->m * job->n);
  for (int i = 1; i < job->pieces; ++i) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->pieces) std::this_thread::yield();
  float* out = job->y;
  const int64_t size = job->m * job->n;
  for (int p = 1; p < job->pieces; ++p) {
    const float* part = job->partials.data() + (p - 1) * size;
    for (int64_t i = 0; i < size; ++i) out[i] += part[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmGemv, GemvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
