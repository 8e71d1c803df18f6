// watchtrain's MobileNetV2 kernels for MLX's CPU backend, as MLX primitives.
//
// MLX's CPU backend runs a grouped conv2d, and a compiled sum of nine shifted slices with
// per-channel taps, on single-threaded strided loops, and every elementwise op on one thread:
// on a 2-core x86 machine MobileNetV2's depthwise layers ran 5-10x slower than PyTorch's.
// Here, on NHWC float32, vectorized over channels and split over rows across threads:
//   - the depthwise 3x3 convolution + bias + relu6, optionally reading relu6(x + in_bias) (the
//     expand convolution's activation), with its gradient: what fine-tuning differentiates;
//   - a whole inverted residual block in one pass for inference (expand, depthwise, project:
//     the 6x-wide activation never leaves the cache), its gradient by the separate steps;
//   - the final 1x1 convolution + bias + relu6, with its gradient, and the stem (forward only).
// On Metal watchtrain keeps the pure-MLX formulation; this file is only built and used on Linux.

#include <algorithm>
#include <array>
#include <cstring>
#include <future>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "mlx/threadpool.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

// ---- Threads ----

ThreadPool& pool() {
  static ThreadPool instance(std::max(1u, std::thread::hardware_concurrency()));
  return instance;
}

int n_threads() {
  static int n = std::max(1u, std::thread::hardware_concurrency());
  return n;
}

// Run body(begin, end) over [0, n) split into one contiguous range per thread.
template <class F>
void parallel_for(int n, F body) {
  int parts = std::min(n_threads(), std::max(1, n));
  if (parts == 1) {
    body(0, n);
    return;
  }
  std::vector<std::future<void>> done;
  int step = (n + parts - 1) / parts;
  for (int begin = step; begin < n; begin += step) {
    done.push_back(pool().enqueue(body, begin, std::min(n, begin + step)));
  }
  body(0, std::min(n, step));
  for (auto& f : done) f.get();
}

// parallel_for where each thread's part also sums into its own zeroed buffer of `size` floats:
// body(begin, end, sums); then fold(sums) adds a part's sums into the result, one part at a time.
template <class Body, class Fold>
void parallel_sums(int n, size_t size, Body body, Fold fold) {
  std::mutex lock;
  parallel_for(n, [&](int begin, int end) {
    std::vector<float> sums(size, 0.0f);
    body(begin, end, sums.data());
    std::lock_guard<std::mutex> hold(lock);
    fold(sums.data());
  });
}

// ---- Eight channels at a time (GCC vector extensions: AVX-512/AVX2 on x86, NEON on ARM) ----
// Every channel count must be a multiple of 8, as all of MobileNetV2's are; the entry points check.

typedef float V8 __attribute__((vector_size(32)));
typedef int V8i __attribute__((vector_size(32)));
constexpr int kVec = 8;

inline V8 load(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, V8 v) { std::memcpy(p, &v, sizeof v); }
inline void add_to(float* p, V8 v) { store(p, load(p) + v); }
inline V8 relu6(V8 v) {
  const V8 zero = {}, six = zero + 6.0f;
  v = v > zero ? v : zero;
  return v < six ? v : six;
}
// v where relu6 passes gradients (0 < a < 6), else 0.
inline V8 where_inside(V8 a, V8 v) {
  const V8 zero = {}, six = zero + 6.0f;
  const V8i inside = (a > zero) & (a < six);
  return inside ? v : zero;
}

// ---- Depthwise 3x3 convolution + bias + relu6 ----

struct Geometry {
  int B, H, W, C, Ho, Wo, stride, pad_top, pad_left;
  bool act_in;  // the input is relu6(x + in_bias): the expand convolution's activation, fused
};

Geometry geometry(const mx::array& x, int stride, const std::vector<int>& pads, bool act_in) {
  int H = x.shape(1), W = x.shape(2);
  return {x.shape(0), H, W, x.shape(3), (H + pads[0] + pads[1] - 3) / stride + 1,
          (W + pads[2] + pads[3] - 3) / stride + 1, stride, pads[0], pads[2], act_in};
}

// Output rows [ho0, ho1) of relu6(depthwise(input) + bias) into out (rows of Wo x C); row(h) points
// at input row h of the image. Per eight channels the nine taps stay in registers (one load per
// multiply-add); only the edge columns check bounds.
template <class Rows>
void depthwise_rows(const Geometry& g, Rows&& row, int ho0, int ho1, const float* taps, const float* bias,
                    float* out) {
  const int C = g.C, s = g.stride;
  // Output columns whose three input columns are all inside the image.
  const int inner_begin = std::min(g.Wo, (g.pad_left + s - 1) / s);
  const int inner_end = std::max(inner_begin, std::min(g.Wo, (g.W - 3 + g.pad_left) / s + 1));
  for (int ho = ho0; ho < ho1; ++ho) {
    const float* rows[3];  // nullptr where the window is over padding
    for (int i = 0; i < 3; ++i) {
      const int h = ho * s + i - g.pad_top;
      rows[i] = h < 0 || h >= g.H ? nullptr : row(h);
    }
    float* o = out + static_cast<size_t>(ho - ho0) * g.Wo * C;
    for (int c = 0; c < C; c += kVec) {
      V8 t[9];
      for (int k = 0; k < 9; ++k) t[k] = load(taps + k * C + c);
      const V8 b = load(bias + c);
      auto edge = [&](int wo) {
        V8 acc = b;
        for (int i = 0; i < 3; ++i) {
          if (!rows[i]) continue;
          for (int j = 0; j < 3; ++j) {
            const int w = wo * s - g.pad_left + j;
            if (w >= 0 && w < g.W) acc += load(rows[i] + static_cast<size_t>(w) * C + c) * t[i * 3 + j];
          }
        }
        store(o + static_cast<size_t>(wo) * C + c, relu6(acc));
      };
      for (int wo = 0; wo < inner_begin; ++wo) edge(wo);
      for (int wo = inner_begin; wo < inner_end; ++wo) {
        const size_t at = static_cast<size_t>(wo * s - g.pad_left) * C + c;
        V8 acc = b;
        for (int i = 0; i < 3; ++i) {
          if (!rows[i]) continue;
          const float* in = rows[i] + at;
          acc += load(in) * t[i * 3] + load(in + C) * t[i * 3 + 1] + load(in + 2 * C) * t[i * 3 + 2];
        }
        store(o + static_cast<size_t>(wo) * C + c, relu6(acc));
      }
      for (int wo = inner_end; wo < g.Wo; ++wo) edge(wo);
    }
  }
}

// Input rows of one image as the kernel reads them: x itself, or with act_in relu6(x + in_bias)
// computed once per row, reading x in order, into a ring of three rows (what the windows of
// consecutive output rows cover) instead of nine strided times.
class InputRows {
 public:
  InputRows(const Geometry& g, const float* ib)
      : ib_(g.act_in ? ib : nullptr), C_(g.C), row_(static_cast<size_t>(g.W) * g.C), ring_(ib_ ? 3 * row_ : 0) {}
  void start(const float* image) {
    image_ = image;
    std::fill(held_, held_ + 3, -1);
  }
  const float* operator()(int h) {
    const float* x = image_ + h * row_;
    if (!ib_) return x;
    float* a = ring_.data() + (h % 3) * row_;
    if (held_[h % 3] != h) {
      for (size_t at = 0; at < row_; at += kVec) store(a + at, relu6(load(x + at) + load(ib_ + at % C_)));
      held_[h % 3] = h;
    }
    return a;
  }
  // a(x) of row h if it is still in the ring, else nullptr.
  const float* held(int h) const { return ib_ && held_[h % 3] == h ? ring_.data() + (h % 3) * row_ : nullptr; }

 private:
  const float* ib_;
  int C_;
  size_t row_;
  std::vector<float> ring_;
  const float* image_ = nullptr;
  int held_[3] = {-1, -1, -1};
};

void forward(const Geometry& g, const float* x, const float* w, const float* b, const float* ib, float* y) {
  const size_t image = static_cast<size_t>(g.H) * g.W * g.C, out_image = static_cast<size_t>(g.Ho) * g.Wo * g.C;
  parallel_for(g.B, [&](int first, int last) {
    InputRows rows(g, ib);
    for (int n = first; n < last; ++n) {
      rows.start(x + n * image);
      depthwise_rows(g, rows, 0, g.Ho, w, b, y + n * out_image);
    }
  });
}

// The gradients, one image per thread at a time, walking its output rows top to bottom: for each
// row, dz = dy where 0 < y < 6 (relu6's gradient) into a ring of three rows, summed into the
// taps' and bias' gradients (dz times the input under each tap); then every input row whose
// covering output rows are all done gathers its dx from the ring (no write races, and dz never
// goes to memory). With act_in dx is the gradient of the pre-activation x and din_bias its sum.
void backward(const Geometry& g, const float* x, const float* w, const float* ib, const float* y,
              const float* dy, float* dx, float* dw, float* db, float* dib) {
  const int C = g.C, s = g.stride;
  const size_t in_row = static_cast<size_t>(g.W) * C, out_row = static_cast<size_t>(g.Wo) * C;
  std::fill(dw, dw + 9 * C, 0.0f);
  std::fill(db, db + C, 0.0f);
  std::fill(dib, dib + C, 0.0f);
  // Per thread, tap_sums holds the gradients of the 9 taps, the bias and the input bias.
  parallel_sums(g.B, 11 * C, [&](int first, int last, float* const tap_sums) {
    std::vector<float> ring(3 * out_row);  // dz of the last three output rows
    InputRows rows(g, ib);
    for (int n = first; n < last; ++n) {
      const float* const image = x + static_cast<size_t>(n) * g.H * in_row;
      rows.start(image);
      int next_h = 0;  // the next input row whose dx is due
      for (int ho = 0; ho < g.Ho; ++ho) {
        const size_t o = (static_cast<size_t>(n) * g.Ho + ho) * out_row;
        float* const dz = ring.data() + (ho % 3) * out_row;
        for (size_t at = 0; at < out_row; at += kVec) {  // in order: y and dy stream from memory
          const V8 d = where_inside(load(y + o + at), load(dy + o + at));
          store(dz + at, d);
          add_to(tap_sums + 9 * C + at % C, d);
        }
        const float* in_rows[3];
        for (int i = 0; i < 3; ++i) {
          const int h = ho * s + i - g.pad_top;
          in_rows[i] = h < 0 || h >= g.H ? nullptr : rows(h);
        }
        for (int c = 0; c < C; c += kVec) {
          V8 t[9] = {};
          for (int wo = 0; wo < g.Wo; ++wo) {
            const V8 d = load(dz + static_cast<size_t>(wo) * C + c);
            for (int i = 0; i < 3; ++i) {
              if (!in_rows[i]) continue;
              for (int j = 0; j < 3; ++j) {
                const int ww = wo * s - g.pad_left + j;
                if (ww >= 0 && ww < g.W) t[i * 3 + j] += d * load(in_rows[i] + static_cast<size_t>(ww) * C + c);
              }
            }
          }
          for (int k = 0; k < 9; ++k) add_to(tap_sums + k * C + c, t[k]);
        }
        // Input rows h whose last covering output row, (h + pad_top) / s, is this one (or all, at the end).
        const int due = ho == g.Ho - 1 ? g.H - 1 : std::min(g.H - 1, ho * s - g.pad_top + s - 1);
        for (; next_h <= due; ++next_h) {
          const int h = next_h;
          const float* dz_rows[3];  // the ring rows of the outputs whose window row i covers row h
          for (int i = 0; i < 3; ++i) {
            const int th = h + g.pad_top - i;
            const bool hit = th >= 0 && th % s == 0 && th / s < g.Ho;
            dz_rows[i] = hit ? ring.data() + ((th / s) % 3) * out_row : nullptr;
          }
          // relu6 passes gradients where its output a(x) is strictly inside (0, 6).
          const float* const held = rows.held(h);
          const float* const xr = held ? held : image + h * in_row;
          float* const dxr = dx + (static_cast<size_t>(n) * g.H + h) * in_row;
          for (int c = 0; c < C; c += kVec) {
            V8 t[9];
            for (int k = 0; k < 9; ++k) t[k] = load(w + k * C + c);
            const V8 in_b = g.act_in && !held ? load(ib + c) : V8{};  // a(x) is already shifted
            V8 sum = {};
            for (int ww = 0; ww < g.W; ++ww) {
              V8 acc = {};
              for (int j = 0; j < 3; ++j) {
                const int tw = ww + g.pad_left - j;
                if (tw < 0 || tw % s || tw / s >= g.Wo) continue;
                const size_t at = static_cast<size_t>(tw / s) * C + c;
                for (int i = 0; i < 3; ++i) {
                  if (dz_rows[i]) acc += load(dz_rows[i] + at) * t[i * 3 + j];
                }
              }
              const size_t at = static_cast<size_t>(ww) * C + c;
              if (g.act_in) {
                acc = where_inside(load(xr + at) + in_b, acc);
                sum += acc;
              }
              store(dxr + at, acc);
            }
            if (g.act_in) add_to(tap_sums + 10 * C + c, sum);
          }
        }
      }
    }
  }, [&](const float* sums) {
    for (int k = 0; k < 9 * C; ++k) dw[k] += sums[k];
    for (int c = 0; c < C; ++c) db[c] += sums[9 * C + c], dib[c] += sums[10 * C + c];
  });
}

// ---- GEMM for the 1x1 convolutions: register tiles of kRows pixels x kCols vectors ----

constexpr int kRows = 6;
#if defined(__AVX512F__)
constexpr int kCols = 4;  // 24 accumulators fit in 32 vector registers
#else
constexpr int kCols = 2;  // 12 accumulators fit in 16
#endif

enum class Epilogue { kRelu6, kNone, kResidual };

// C[MR x 8NV] = A[MR x K] B[K x 8NV] + bias, then relu6 or + R (row strides lda, ldb, ldc).
template <int MR, int NV, Epilogue E>
void tile(int K, const float* A, int lda, const float* B, int ldb, const float* bias, float* C, int ldc,
          const float* R) {
  V8 acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    const V8 b = load(bias + kVec * v);
    for (int m = 0; m < MR; ++m) acc[m][v] = b;
  }
  for (int k = 0; k < K; ++k) {
    V8 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + static_cast<size_t>(k) * ldb + kVec * v);
    for (int m = 0; m < MR; ++m) {
      const float a = A[static_cast<size_t>(m) * lda + k];
      for (int v = 0; v < NV; ++v) acc[m][v] += a * b[v];
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < NV; ++v) {
      V8 r = acc[m][v];
      if constexpr (E == Epilogue::kRelu6) r = relu6(r);
      if constexpr (E == Epilogue::kResidual) r += load(R + static_cast<size_t>(m) * ldc + kVec * v);
      store(C + static_cast<size_t>(m) * ldc + kVec * v, r);
    }
  }
}

using TileFn = void (*)(int, const float*, int, const float*, int, const float*, float*, int, const float*);

template <Epilogue E, int MR>
TileFn tile_for(int nv) {
  switch (nv) {
    case 1: return tile<MR, 1, E>;
    case 2: return tile<MR, 2, E>;
    case 3: return tile<MR, 3, E>;
    default: return tile<MR, kCols, E>;
  }
}

template <Epilogue E>
TileFn tile_for(int mr, int nv) {
  switch (mr) {
    case 1: return tile_for<E, 1>(nv);
    case 2: return tile_for<E, 2>(nv);
    case 3: return tile_for<E, 3>(nv);
    case 4: return tile_for<E, 4>(nv);
    case 5: return tile_for<E, 5>(nv);
    default: return tile_for<E, kRows>(nv);
  }
}

// A 1x1 convolution's weight [N][K] (out x in) as B = weight^T [K][N] cut into panels of a tile's
// width, each contiguous (panel j holds columns [j, j + w) as K rows of w): a tile then reads its
// panel sequentially instead of K rows N floats apart, which thrash the L1 cache.
std::vector<float> pack(const float* weight, int N, int K) {
  std::vector<float> panels(static_cast<size_t>(N) * K);
  for (int j = 0; j < N; j += kVec * kCols) {
    const int w = std::min(kVec * kCols, N - j);
    float* panel = panels.data() + static_cast<size_t>(j) * K;
    for (int jj = 0; jj < w; ++jj) {
      const float* row = weight + static_cast<size_t>(j + jj) * K;
      for (int k = 0; k < K; ++k) panel[static_cast<size_t>(k) * w + jj] = row[k];
    }
  }
  return panels;
}

// C[M x N] = A[M x K] B[K x N] + bias, then the epilogue; B packed by pack(); R (the residual) is
// laid out like C.
template <Epilogue E>
void gemm(int M, int N, int K, const float* A, const float* B, const float* bias, float* C, const float* R) {
  for (int j = 0; j < N; j += kVec * kCols) {
    const int nv = std::min(kCols, (N - j) / kVec);
    const float* panel = B + static_cast<size_t>(j) * K;
    for (int i = 0; i < M; i += kRows) {
      const size_t at = static_cast<size_t>(i) * N + j;
      tile_for<E>(std::min(kRows, M - i), nv)(K, A + static_cast<size_t>(i) * K, K, panel, kVec * nv, bias + j,
                                              C + at, N, E == Epilogue::kResidual ? R + at : nullptr);
    }
  }
}

// ---- Fused inverted residual block (inference): expand 1x1, depthwise 3x3, project 1x1 ----
//
// Unfused, each block writes its 6x-expanded activation to memory and reads it back twice
// (at 112x112 that is 77 MB per batch of 16, most of the block's time). Here each thread
// walks bands of output rows: it expands just the input rows a band needs into a buffer
// that stays in L2 (keeping the overlap with the previous band), runs the depthwise
// convolution on it, and projects the result straight into the output.

struct BlockGeometry {
  Geometry dw;  // of the depthwise step, over the expanded channels
  int Cin, Cout;
  bool expand, residual;
};

BlockGeometry block_geometry(const std::vector<mx::array>& in, int stride, const std::vector<int>& pads,
                             bool expand) {
  const mx::array& x = in[0];
  const int H = x.shape(1), W = x.shape(2), Cin = x.shape(3), Cout = in[3].shape(0);
  const Geometry dw{x.shape(0), H, W, in[1].shape(1), (H + pads[0] + pads[1] - 3) / stride + 1,
                    (W + pads[2] + pads[3] - 3) / stride + 1, stride, pads[0], pads[2], false};
  return {dw, Cin, Cout, expand, stride == 1 && Cin == Cout};
}

// ew: [Ch, Cin] and pw: [Cout, Ch] (the 1x1 weights, out x in); taps: [9, Ch].
void block_forward(const BlockGeometry& bg, const float* x, const float* taps, const float* bd, const float* pw,
                   const float* bp, const float* ew, const float* be, float* y) {
  const Geometry& g = bg.dw;
  const std::vector<float> we = bg.expand ? pack(ew, g.C, bg.Cin) : std::vector<float>(),
                           wp = pack(pw, bg.Cout, g.C);
  const size_t in_row = static_cast<size_t>(g.W) * bg.Cin, ex_row = static_cast<size_t>(g.W) * g.C;
  // Output rows per band: the expanded input rows it reads should fit in about 384 KB of L2.
  const long budget = (384 << 10) / sizeof(float);
  const int band_rows = static_cast<int>(std::clamp((budget / static_cast<long>(ex_row) - 2) / g.stride, 1L,
                                                    static_cast<long>(g.Ho)));
  parallel_for(g.B * g.Ho, [&](int begin, int end) {
    std::vector<float> ex(bg.expand ? (band_rows * g.stride + 2) * ex_row : 0);
    std::vector<float> dw(static_cast<size_t>(band_rows) * g.Wo * g.C);
    int held_n = -1, held_lo = 0, held_hi = 0;  // expanded rows [held_lo, held_hi) of image held_n are in ex
    for (int row = begin; row < end;) {
      const int n = row / g.Ho, ho0 = row % g.Ho;
      const int ho1 = std::min({g.Ho, ho0 + band_rows, ho0 + (end - row)});
      const int lo = std::max(0, ho0 * g.stride - g.pad_top);
      const int hi = std::min(g.H, (ho1 - 1) * g.stride - g.pad_top + 3);
      const float* band = x + (static_cast<size_t>(n) * g.H + lo) * in_row;
      if (bg.expand) {  // relu6(x @ we + be) for rows [lo, hi), reusing the rows the last band shared
        int keep = 0;
        if (held_n == n && held_lo <= lo && held_hi > lo) {
          keep = std::min(held_hi, hi) - lo;
          std::memmove(ex.data(), ex.data() + (lo - held_lo) * ex_row, keep * ex_row * sizeof(float));
        }
        gemm<Epilogue::kRelu6>((hi - lo - keep) * g.W, g.C, bg.Cin, band + keep * in_row, we.data(), be,
                               ex.data() + keep * ex_row, nullptr);
        held_n = n, held_lo = lo, held_hi = hi;
        band = ex.data();
      }
      depthwise_rows(g, [band, lo, ex_row](int h) { return band + (h - lo) * ex_row; }, ho0, ho1, taps, bd, dw.data());
      const size_t at = (static_cast<size_t>(n) * g.Ho + ho0) * g.Wo;
      const int pixels = (ho1 - ho0) * g.Wo;
      if (bg.residual) {
        gemm<Epilogue::kResidual>(pixels, bg.Cout, g.C, dw.data(), wp.data(), bp, y + at * bg.Cout, x + at * bg.Cin);
      } else {
        gemm<Epilogue::kNone>(pixels, bg.Cout, g.C, dw.data(), wp.data(), bp, y + at * bg.Cout, nullptr);
      }
      row += ho1 - ho0;
    }
  });
}

// ---- 1x1 convolution + bias + relu6 over many pixels (the final 1280-channel convolution) ----

// y = relu6(x @ w^T + b) for M pixels, w [N][K]: blocks of rows split across threads, each block
// small enough that its rows stay in L2 while every column panel passes over them. With pooled
// (P pixels per image), also the mean of y over each image's pixels, summed per thread as each
// block is written.
void pointwise_relu6_forward(int M, int N, int K, int P, const float* x, const float* w, const float* b, float* y,
                             float* pooled) {
  constexpr int kBlock = 16 * kRows;
  const std::vector<float> wt = pack(w, N, K);
  const size_t pooled_size = pooled ? static_cast<size_t>(M / P) * N : 0;
  std::fill(pooled, pooled + pooled_size, 0.0f);
  parallel_sums((M + kBlock - 1) / kBlock, pooled_size, [&](int begin, int end, float* sums) {
    for (int block = begin; block < end; ++block) {
      const int i = block * kBlock, rows = std::min(kBlock, M - i);
      float* out = y + static_cast<size_t>(i) * N;
      gemm<Epilogue::kRelu6>(rows, N, K, x + static_cast<size_t>(i) * K, wt.data(), b, out, nullptr);
      for (int r = 0; pooled && r < rows; ++r) {
        float* sum = sums + static_cast<size_t>((i + r) / P) * N;
        for (int c = 0; c < N; c += kVec) add_to(sum + c, load(out + static_cast<size_t>(r) * N + c));
      }
    }
  }, [&](const float* sums) {
    for (size_t k = 0; k < pooled_size; ++k) pooled[k] += sums[k] / P;
  });
}

// relu6's gradient given its output y [M, N]: dz = g where 0 < y < 6, else 0, with g's row
// r / P (and a factor 1 / P: the gradient of a mean over P pixels) serving pixel row r; db is
// the sum of dz over rows.
void relu6_grad(int M, int N, int P, const float* y, const float* g, float* dz, float* db) {
  std::fill(db, db + N, 0.0f);
  parallel_sums(M, N, [&](int begin, int end, float* sum) {
    for (int r = begin; r < end; ++r) {
      const float* gr = g + static_cast<size_t>(r / P) * N;
      for (int c = 0; c < N; c += kVec) {
        const size_t at = static_cast<size_t>(r) * N + c;
        const V8 d = where_inside(load(y + at), load(gr + c) * (1.0f / P));
        store(dz + at, d);
        add_to(sum + c, d);
      }
    }
  }, [&](const float* sum) {
    for (int c = 0; c < N; ++c) db[c] += sum[c];
  });
}

// ---- Dense 3x3 convolution (the 3-channel stem) + bias + relu6. w: [cout, 3, 3, C] (OHWI) ----
// Each output row's 3x3xC patches are gathered (zeros for padding), then multiplied as one GEMM.
void stem_forward(const Geometry& g, int cout, const float* x, const float* w, const float* b, float* y) {
  const int K = 9 * g.C;
  const std::vector<float> packed = pack(w, cout, K);  // w is [cout][tap, in channel]
  parallel_for(g.B * g.Ho, [&](int begin, int end) {
    std::vector<float> patches(static_cast<size_t>(g.Wo) * K);
    for (int row = begin; row < end; ++row) {
      const int n = row / g.Ho, ho = row % g.Ho;
      std::fill(patches.begin(), patches.end(), 0.0f);
      for (int wo = 0; wo < g.Wo; ++wo) {
        float* p = patches.data() + static_cast<size_t>(wo) * K;
        for (int i = 0; i < 3; ++i) {
          const int h = ho * g.stride + i - g.pad_top;
          if (h < 0 || h >= g.H) continue;
          for (int j = 0; j < 3; ++j) {
            const int ww = wo * g.stride + j - g.pad_left;
            if (ww < 0 || ww >= g.W) continue;
            std::memcpy(p + (i * 3 + j) * g.C, x + ((static_cast<size_t>(n) * g.H + h) * g.W + ww) * g.C,
                        g.C * sizeof(float));
          }
        }
      }
      gemm<Epilogue::kRelu6>(g.Wo, cout, K, patches.data(), packed.data(), b,
                             y + static_cast<size_t>(row) * g.Wo * cout, nullptr);
    }
  });
}

void allocate(std::vector<mx::array>& outputs) {
  for (auto& out : outputs) out.set_data(mx::allocator::malloc(out.nbytes()));
}

// The gradients a vjp was asked for, from all of them.
std::vector<mx::array> pick(const std::vector<mx::array>& grads, const std::vector<int>& argnums) {
  std::vector<mx::array> picked;
  for (int arg : argnums) picked.push_back(grads[arg]);
  return picked;
}

// Parameters shared by the forward and gradient primitives (compared for graph deduplication).
struct Params {
  int stride;
  std::vector<int> pads;
  bool act_in;
  bool operator==(const Params& o) const { return stride == o.stride && pads == o.pads && act_in == o.act_in; }
};

// What every primitive here shares: the parameters, CPU-only evaluation, deduplication by parameters.
class KernelPrimitive : public mx::Primitive {
 public:
  KernelPrimitive(mx::Stream s, Params p) : Primitive(s), p_(std::move(p)) {}

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("watchtrain kernel: CPU only");
  }
  bool is_equivalent(const Primitive& other) const override {
    auto* o = dynamic_cast<const KernelPrimitive*>(&other);
    return o && std::string(name()) == o->name() && p_ == o->p_;
  }

 protected:
  // Allocate the outputs, then run kernel(geom, inputs' then outputs' data) on the CPU stream.
  template <class G, class F>
  void run(const std::vector<mx::array>& in, std::vector<mx::array>& out, G geom, F kernel) {
    allocate(out);
    auto& enc = mx::cpu::get_command_encoder(stream());
    std::vector<mx::array> io;
    for (auto& a : in) {
      enc.set_input_array(a);
      io.push_back(mx::array::unsafe_weak_copy(a));
    }
    for (auto& a : out) {
      enc.set_output_array(a);
      io.push_back(mx::array::unsafe_weak_copy(a));
    }
    enc.dispatch([g = std::move(geom), io = std::move(io), kernel]() mutable {
      std::vector<float*> data;
      for (auto& a : io) data.push_back(a.data<float>());
      kernel(g, data);
    });
  }

  Geometry own_geometry(const std::vector<mx::array>& in) const {
    return geometry(in[0], p_.stride, p_.pads, p_.act_in);
  }

  Params p_;
};

// inputs: x, taps, in_bias, y, dy; outputs: dx, dtaps, dbias, din_bias
class DepthwiseGrad : public KernelPrimitive {
 public:
  using KernelPrimitive::KernelPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    run(in, out, own_geometry(in), [](const Geometry& g, const std::vector<float*>& d) {
      backward(g, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8]);
    });
  }
  const char* name() const override { return "WatchtrainDepthwise3x3Grad"; }
};

// inputs: x, taps [9, C], bias [C], in_bias [C]; output: relu6(depthwise(a(x)) + bias)
class Depthwise : public KernelPrimitive {
 public:
  using KernelPrimitive::KernelPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    run(in, out, own_geometry(in), [](const Geometry& g, const std::vector<float*>& d) { forward(g, d[0], d[1], d[2], d[3], d[4]); });
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override {
    std::vector<mx::Shape> shapes;
    for (const auto& a : primals) shapes.push_back(a.shape());
    auto grads = mx::array::make_arrays(
        shapes, {mx::float32, mx::float32, mx::float32, mx::float32}, std::make_shared<DepthwiseGrad>(stream(), p_),
        {primals[0], primals[1], primals[3], outputs[0], mx::contiguous(cotangents[0], false, stream())});
    return pick(grads, argnums);
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    auto g = own_geometry(in);
    return {{g.B, g.Ho, g.Wo, g.C}};
  }
  const char* name() const override { return "WatchtrainDepthwise3x3"; }
};

// inputs: x [B, H, W, C], weight [cout, 3, 3, C], bias [cout]; output: relu6(conv3x3(x) + bias).
// Forward only: watchtrain never trains the stem (the nightly fine-tune trains the last blocks).
class Stem : public KernelPrimitive {
 public:
  using KernelPrimitive::KernelPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const int cout = in[1].shape(0);
    run(in, out, own_geometry(in), [cout](const Geometry& g, const std::vector<float*>& d) { stem_forward(g, cout, d[0], d[1], d[2], d[3]); });
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>&, const std::vector<mx::array>&, const std::vector<int>&,
                             const std::vector<mx::array>&) override {
    throw std::runtime_error("stem3x3_relu6 has no gradient: watchtrain keeps the stem frozen");
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    auto g = own_geometry(in);
    return {{g.B, g.Ho, g.Wo, in[1].shape(0)}};
  }
  const char* name() const override { return "WatchtrainStem3x3"; }
};

mx::array stem3x3_relu6(const mx::array& x, const mx::array& weight, const mx::array& bias, int stride,
                        std::vector<int> pads) {
  if (x.ndim() != 4 || weight.ndim() != 4 || weight.shape(1) != 3 || weight.shape(2) != 3 ||
      weight.shape(3) != x.shape(3) || bias.shape() != mx::Shape{weight.shape(0)} || pads.size() != 4 ||
      weight.shape(0) % kVec) {
    throw std::invalid_argument(
        "stem3x3_relu6: expected x [B,H,W,C], weight [O,3,3,C], bias [O] with O a multiple of 8, four pads");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs;
  for (const auto& a : {x, weight, bias}) inputs.push_back(mx::contiguous(mx::astype(a, mx::float32, s), false, s));
  auto g = geometry(x, stride, pads, false);
  return mx::array({g.B, g.Ho, g.Wo, weight.shape(0)}, mx::float32,
                   std::make_shared<Stem>(s, Params{stride, pads, false}), inputs);
}

// x: [B, H, W, C] float32; taps: [9, C] in (kh, kw) order; bias: [C]; pads: top, bottom, left, right.
// With in_bias, the input is activated as it is read: relu6(x + in_bias).
mx::array depthwise3x3_relu6(const mx::array& x, const mx::array& taps, const mx::array& bias, int stride,
                             std::vector<int> pads, std::optional<mx::array> in_bias) {
  const int C = x.ndim() == 4 ? x.shape(3) : -1;
  if (C < 0 || C % kVec || taps.shape() != mx::Shape{9, C} || bias.shape() != mx::Shape{C} ||
      (in_bias && in_bias->shape() != mx::Shape{C})) {
    throw std::invalid_argument(
        "depthwise3x3_relu6: expected x [B,H,W,C] with C a multiple of 8, taps [9,C], bias and in_bias [C]");
  }
  if (pads.size() != 4 || (stride != 1 && stride != 2)) {
    throw std::invalid_argument("depthwise3x3_relu6: stride 1 or 2 and four pads");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs;
  for (const auto& a : {x, taps, bias, in_bias ? *in_bias : mx::zeros({C}, mx::float32, s)}) {
    inputs.push_back(mx::contiguous(mx::astype(a, mx::float32, s), false, s));
  }
  Params p{stride, pads, in_bias.has_value()};
  auto g = geometry(x, stride, pads, p.act_in);
  return mx::array({g.B, g.Ho, g.Wo, g.C}, mx::float32, std::make_shared<Depthwise>(s, p), inputs);
}


// relu6 of x @ expand^T + expand_bias (when expanding), the depthwise step, then the projection
// (+ x when the block is residual), from the primitives above: what the fused block computes.
mx::array inverted_residual_unfused(const std::vector<mx::array>& in, const Params& p) {
  auto s = mx::default_stream(mx::Device::cpu);
  const mx::array& x = in[0];
  std::optional<mx::array> in_bias;
  mx::array hidden = x;
  if (p.act_in) {
    hidden = mx::matmul(x, mx::transpose(in[5], s), s);
    in_bias = in[6];
  }
  auto y = depthwise3x3_relu6(hidden, in[1], in[2], p.stride, p.pads, in_bias);
  y = mx::add(mx::matmul(y, mx::transpose(in[3], s), s), in[4], s);
  return p.stride == 1 && x.shape(3) == y.shape(3) ? mx::add(y, x, s) : y;
}

// inputs: x, taps [9, Ch], bias [Ch], project [Cout, Ch], project_bias [Cout] (, expand [Ch, Cin],
// expand_bias [Ch]); output: the block's output. Params::act_in says whether it expands.
class InvertedResidual : public KernelPrimitive {
 public:
  using KernelPrimitive::KernelPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    run(in, out, block_geometry(in, p_.stride, p_.pads, p_.act_in), [](const BlockGeometry& g, const std::vector<float*>& d) {
      const bool e = g.expand;
      block_forward(g, d[0], d[1], d[2], d[3], d[4], e ? d[5] : nullptr, e ? d[6] : nullptr, d[e ? 7 : 5]);
    });
  }
  // Gradients by differentiating the unfused formulation (training runs that formulation anyway).
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    const Params p = p_;
    auto unfused = [p](const std::vector<mx::array>& in) { return std::vector<mx::array>{inverted_residual_unfused(in, p)}; };
    auto grads = mx::vjp(unfused, primals, cotangents).second;
    return pick(grads, argnums);
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    auto g = block_geometry(in, p_.stride, p_.pads, p_.act_in);
    return {{g.dw.B, g.dw.Ho, g.dw.Wo, g.Cout}};
  }
  const char* name() const override { return "WatchtrainInvertedResidual"; }
};

// A whole MobileNetV2 block in one pass (see block_forward); 1x1 weights [out, in] as in the model.
mx::array inverted_residual(const mx::array& x, const mx::array& taps, const mx::array& bias,
                            const mx::array& project, const mx::array& project_bias, int stride,
                            std::vector<int> pads, std::optional<mx::array> expand,
                            std::optional<mx::array> expand_bias) {
  const int cin = x.ndim() == 4 ? x.shape(3) : -1;
  const int ch = expand ? (expand->ndim() == 2 ? expand->shape(0) : -1) : cin;
  if (cin < 0 || ch < 0 || expand.has_value() != expand_bias.has_value() ||
      (expand && (expand->shape(1) != cin || expand_bias->shape() != mx::Shape{ch})) ||
      taps.shape() != mx::Shape{9, ch} || bias.shape() != mx::Shape{ch} || project.ndim() != 2 ||
      project.shape(1) != ch || project_bias.shape() != mx::Shape{project.shape(0)} ||
      ch % kVec || project.shape(0) % kVec) {
    throw std::invalid_argument(
        "inverted_residual: expected x [B,H,W,Cin], taps [9,Ch], bias [Ch], project [Cout,Ch], "
        "project_bias [Cout], and expand [Ch,Cin] with expand_bias [Ch] together or not at all; "
        "Ch and Cout multiples of 8");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs;
  for (const auto& a : {x, taps, bias, project, project_bias}) inputs.push_back(mx::contiguous(mx::astype(a, mx::float32, s), false, s));
  if (expand) {
    for (const auto& a : {*expand, *expand_bias}) inputs.push_back(mx::contiguous(mx::astype(a, mx::float32, s), false, s));
  }
  Params p{stride, pads, expand.has_value()};
  auto g = block_geometry(inputs, stride, pads, p.act_in);
  return mx::array({g.dw.B, g.dw.Ho, g.dw.Wo, g.Cout}, mx::float32, std::make_shared<InvertedResidual>(s, p), inputs);
}

// inputs: y [..., N], g (y's rows, or one row per P of them); outputs: dz (like y), db [N] (relu6_grad).
class Relu6Grad : public KernelPrimitive {
 public:
  using KernelPrimitive::KernelPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const int N = in[0].shape(-1), M = static_cast<int>(in[0].size() / N), P = static_cast<int>(in[0].size() / in[1].size());
    run(in, out, std::array<int, 3>{M, N, P}, [](std::array<int, 3> g, const std::vector<float*>& d) {
      relu6_grad(g[0], g[1], g[2], d[0], d[1], d[2], d[3]);
    });
  }
  const char* name() const override { return "WatchtrainRelu6Grad"; }
};

// inputs: x [..., K], weight [N, K], bias [N]; output: y = relu6(x @ weight^T + bias) [..., N], or with
// Params::act_in (here: pool) the mean of y over each image's pixels [B, N] and y itself.
class PointwiseRelu6 : public KernelPrimitive {
 public:
  using KernelPrimitive::KernelPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const int N = in[1].shape(0), K = in[1].shape(1), M = static_cast<int>(in[0].size() / K);
    const int P = pool() ? in[0].shape(1) * in[0].shape(2) : 1;
    run(in, out, std::array<int, 4>{M, N, K, P}, [pool = pool()](std::array<int, 4> g, const std::vector<float*>& d) {
      pointwise_relu6_forward(g[0], g[1], g[2], g[3], d[0], d[1], d[2], pool ? d[4] : d[3], pool ? d[3] : nullptr);
    });
  }
  // relu6's mask (and the mean's spread) natively, then the GEMMs of the gradient through MLX's
  // matmul (the BLAS).
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override {
    auto s = stream();
    const mx::array& x = primals[0];
    const mx::array& y = outputs[pool() ? 1 : 0];
    const int N = primals[1].shape(0), K = primals[1].shape(1);
    auto grads = mx::array::make_arrays({y.shape(), {N}}, {mx::float32, mx::float32}, std::make_shared<Relu6Grad>(s, p_),
                                        {y, mx::contiguous(cotangents[0], false, s)});
    auto dz = mx::reshape(grads[0], {-1, N}, s);
    std::vector<mx::array> picked;
    for (int arg : argnums) {
      if (arg == 0) picked.push_back(mx::reshape(mx::matmul(dz, primals[1], s), x.shape(), s));
      if (arg == 1) picked.push_back(mx::matmul(mx::transpose(dz, s), mx::reshape(x, {-1, K}, s), s));
      if (arg == 2) picked.push_back(grads[1]);
    }
    return picked;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    auto shape = in[0].shape();
    shape.back() = in[1].shape(0);
    if (!pool()) return {shape};
    return {{shape[0], shape[3]}, shape};
  }
  const char* name() const override { return "WatchtrainPointwiseRelu6"; }

 private:
  bool pool() const { return p_.act_in; }
};

// relu6(x @ weight^T + bias) over the last axis; weight [N, K] with N a multiple of 8. With pool,
// x is [B, H, W, K] and the result its mean over H and W, [B, N].
mx::array pointwise_relu6(const mx::array& x, const mx::array& weight, const mx::array& bias, bool pool) {
  if (x.ndim() < 1 || weight.ndim() != 2 || x.shape(-1) != weight.shape(1) ||
      bias.shape() != mx::Shape{weight.shape(0)} || weight.shape(0) % kVec || (pool && x.ndim() != 4)) {
    throw std::invalid_argument(
        "pointwise_relu6: expected x [..., K] ([B, H, W, K] to pool), weight [N, K], bias [N], N a multiple of 8");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs;
  for (const auto& a : {x, weight, bias}) inputs.push_back(mx::contiguous(mx::astype(a, mx::float32, s), false, s));
  auto primitive = std::make_shared<PointwiseRelu6>(s, Params{1, {}, pool});
  auto shapes = primitive->output_shapes(inputs);
  return mx::array::make_arrays(shapes, std::vector<mx::Dtype>(shapes.size(), mx::float32), primitive, inputs)[0];
}

}  // namespace

NB_MODULE(_watchtrain_native, m) {
  m.doc() = "watchtrain's MobileNetV2 kernels for MLX's CPU backend: inverted residual block, depthwise and stem 3x3, 1x1 + relu6";
  m.def("depthwise3x3_relu6", &depthwise3x3_relu6, nb::arg("x"), nb::arg("taps"), nb::arg("bias"),
        nb::arg("stride"), nb::arg("pads"), nb::arg("in_bias") = nb::none(),
        "relu6(depthwise 3x3 convolution of a(x) + bias), NHWC; pads = (top, bottom, left, right);\n"
        "a(x) = relu6(x + in_bias) when in_bias is given, else x");
  m.def("stem3x3_relu6", &stem3x3_relu6, nb::arg("x"), nb::arg("weight"), nb::arg("bias"), nb::arg("stride"),
        nb::arg("pads"), "relu6(dense 3x3 convolution of NHWC x + bias), forward only; weight OHWI");
  m.def("inverted_residual", &inverted_residual, nb::arg("x"), nb::arg("taps"), nb::arg("bias"),
        nb::arg("project"), nb::arg("project_bias"), nb::arg("stride"), nb::arg("pads"),
        nb::arg("expand") = nb::none(), nb::arg("expand_bias") = nb::none(),
        "a MobileNetV2 inverted residual block in one pass, NHWC: relu6(x @ expand^T + expand_bias)\n"
        "(without expand: x), relu6(depthwise 3x3 + bias), @ project^T + project_bias, + x when\n"
        "stride is 1 and the channels match; pads = (top, bottom, left, right)");
  m.def("pointwise_relu6", &pointwise_relu6, nb::arg("x"), nb::arg("weight"), nb::arg("bias"),
        nb::arg("pool") = false,
        "relu6(x @ weight^T + bias) over the last axis (a 1x1 convolution of NHWC x, weight [out, in]),\n"
        "with pool its mean over each image's pixels; differentiable");
  m.def("threads", &n_threads, "worker threads the kernel splits rows over");
}
