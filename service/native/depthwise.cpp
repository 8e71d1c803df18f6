// Fused depthwise 3x3 convolution + bias + relu6 as an MLX primitive for the CPU backend.
//
// MLX's CPU backend runs a grouped conv2d, and a compiled sum of nine shifted
// slices with per-channel taps, on single-threaded strided loops: on a 2-core x86
// machine MobileNetV2's depthwise layers ran 5-10x slower than PyTorch's. This
// primitive computes y = relu6(depthwise3x3(x) + b) on NHWC float32 in one pass,
// vectorized over channels and split over rows across threads, with its own
// gradient (the fine-tuning step differentiates through it). On Metal watchtrain
// keeps the pure-MLX formulation; this file is only built and used on Linux.

#include <algorithm>
#include <cstring>
#include <future>
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

struct Geometry {
  int B, H, W, C, Ho, Wo, stride, pad_top, pad_left;
  bool act_in;  // the input is relu6(x + in_bias): the expand convolution's activation, fused
};

Geometry geometry(const mx::array& x, int stride, const std::vector<int>& pads, bool act_in) {
  int H = x.shape(1), W = x.shape(2);
  return {x.shape(0), H, W, x.shape(3), (H + pads[0] + pads[1] - 3) / stride + 1,
          (W + pads[2] + pads[3] - 3) / stride + 1, stride, pads[0], pads[2], act_in};
}

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

inline float relu6(float v) { return std::min(std::max(v, 0.0f), 6.0f); }
inline bool inside(float v) { return v > 0.0f && v < 6.0f; }  // where relu6 passes gradients

// f(tap index k = 3i + j, offset of input pixel (n, h, w) in x) for each tap of output (n, ho, wo)
// that falls inside the image: padding reads as zero.
template <class F>
inline void for_each_tap(const Geometry& g, int n, int ho, int wo, F f) {
  for (int i = 0; i < 3; ++i) {
    const int h = ho * g.stride + i - g.pad_top;
    if (h < 0 || h >= g.H) continue;
    for (int j = 0; j < 3; ++j) {
      const int w = wo * g.stride + j - g.pad_left;
      if (w < 0 || w >= g.W) continue;
      f(i * 3 + j, ((static_cast<size_t>(n) * g.H + h) * g.W + w) * g.C);
    }
  }
}

// y = relu6(b + body(...)) for each output pixel, rows split across threads: body(n, ho, wo, out)
// adds the convolution into out, which starts as the bias.
template <class F>
void conv_bias_relu6(const Geometry& g, int channels, const float* b, float* y, F body) {
  parallel_for(g.B * g.Ho, [&](int begin, int end) {
    for (int row = begin; row < end; ++row) {
      const int n = row / g.Ho, ho = row % g.Ho;
      for (int wo = 0; wo < g.Wo; ++wo) {
        float* out = y + (static_cast<size_t>(row) * g.Wo + wo) * channels;
        std::memcpy(out, b, channels * sizeof(float));
        body(n, ho, wo, out);
        for (int c = 0; c < channels; ++c) out[c] = relu6(out[c]);
      }
    }
  });
}

void forward(const Geometry& g, const float* x, const float* w, const float* b, const float* ib, float* y) {
  const int C = g.C;
  conv_bias_relu6(g, C, b, y, [&](int n, int ho, int wo, float* out) {
    for_each_tap(g, n, ho, wo, [&](int k, size_t at) {
      const float* in = x + at;
      const float* tap = w + k * C;
      if (g.act_in) {
        for (int c = 0; c < C; ++c) out[c] += relu6(in[c] + ib[c]) * tap[c];
      } else {
        for (int c = 0; c < C; ++c) out[c] += in[c] * tap[c];
      }
    });
  });
}

// dz = g where 0 < y < 6 (relu6's gradient), then the gradients of the convolution and, with
// act_in, of the input activation (dx is then the gradient of the pre-activation x).
void backward(const Geometry& g, const float* x, const float* w, const float* ib, const float* y,
              const float* gy, float* dx, float* dw, float* db, float* dib) {
  const int C = g.C;
  const int rows = g.B * g.Ho;
  const int parts = std::min(n_threads(), std::max(1, rows));
  std::vector<std::vector<float>> partial(parts, std::vector<float>(10 * C, 0.0f));  // 9 taps + bias
  // Kept between calls: a fresh 10+ MB buffer each step would be page-faulted in again.
  // (thread_local: one per calling stream thread; the workers below use it through dz_buf.)
  thread_local std::vector<float> dz_all;
  dz_all.resize(static_cast<size_t>(rows) * g.Wo * C);
  float* const dz_buf = dz_all.data();
  const int step = (rows + parts - 1) / parts;
  parallel_for(parts, [&](int first, int last) {
    for (int part = first; part < last; ++part) {
      float* acc = partial[part].data();
      for (int row = part * step; row < std::min(rows, (part + 1) * step); ++row) {
        const int n = row / g.Ho, ho = row % g.Ho;
        for (int wo = 0; wo < g.Wo; ++wo) {
          const size_t o = (static_cast<size_t>(row) * g.Wo + wo) * C;
          float* dz = dz_buf + o;
          for (int c = 0; c < C; ++c) dz[c] = inside(y[o + c]) ? gy[o + c] : 0.0f;
          for (int c = 0; c < C; ++c) acc[9 * C + c] += dz[c];
          for_each_tap(g, n, ho, wo, [&](int k, size_t at) {
            const float* in = x + at;
            float* t = acc + k * C;
            if (g.act_in) {
              for (int c = 0; c < C; ++c) t[c] += dz[c] * relu6(in[c] + ib[c]);
            } else {
              for (int c = 0; c < C; ++c) t[c] += dz[c] * in[c];
            }
          });
        }
      }
    }
  });
  std::fill(dw, dw + 9 * C, 0.0f);
  std::fill(db, db + C, 0.0f);
  for (auto& p : partial) {
    for (int k = 0; k < 9 * C; ++k) dw[k] += p[k];
    for (int c = 0; c < C; ++c) db[c] += p[9 * C + c];
  }
  // dx gathers, for each input pixel, the outputs whose window covers it: no write races.
  parallel_for(g.B * g.H, [&](int begin, int end) {
    for (int row = begin; row < end; ++row) {
      const int n = row / g.H, h = row % g.H;
      for (int ww = 0; ww < g.W; ++ww) {
        float* out = dx + (static_cast<size_t>(row) * g.W + ww) * C;
        std::fill(out, out + C, 0.0f);
        for (int i = 0; i < 3; ++i) {
          const int th = h + g.pad_top - i;
          if (th < 0 || th % g.stride) continue;
          const int ho = th / g.stride;
          if (ho >= g.Ho) continue;
          for (int j = 0; j < 3; ++j) {
            const int tw = ww + g.pad_left - j;
            if (tw < 0 || tw % g.stride) continue;
            const int wo = tw / g.stride;
            if (wo >= g.Wo) continue;
            const float* dz = dz_buf + ((static_cast<size_t>(n) * g.Ho + ho) * g.Wo + wo) * C;
            const float* tap = w + (i * 3 + j) * C;
            for (int c = 0; c < C; ++c) out[c] += dz[c] * tap[c];
          }
        }
        if (g.act_in) {
          const float* in = x + (static_cast<size_t>(row) * g.W + ww) * C;
          for (int c = 0; c < C; ++c) out[c] = inside(in[c] + ib[c]) ? out[c] : 0.0f;
        }
      }
    }
  });
  // The input bias gradient is the sum of dx over every pixel.
  std::fill(dib, dib + C, 0.0f);
  if (g.act_in) {
    const size_t pixels = static_cast<size_t>(g.B) * g.H * g.W;
    for (size_t p = 0; p < pixels; ++p) {
      for (int c = 0; c < C; ++c) dib[c] += dx[p * C + c];
    }
  }
}

// ---- Fused inverted residual block (inference): expand 1x1, depthwise 3x3, project 1x1 ----
//
// Unfused, each block writes its 6x-expanded activation to memory and reads it back twice
// (at 112x112 that is 77 MB per batch of 16, most of the block's time). Here each thread
// walks bands of output rows: it expands just the input rows a band needs into a buffer
// that stays in L2 (keeping the overlap with the previous band), runs the depthwise
// convolution on it, and projects the result straight into the output. The 1x1
// convolutions are register-tiled GEMMs (GCC vector extensions: AVX-512/AVX2/NEON).

typedef float V8 __attribute__((vector_size(32)));
constexpr int kVec = 8;
constexpr int kRows = 6;  // pixels per GEMM tile
#if defined(__AVX512F__)
constexpr int kCols = 4;  // 8-float vectors per GEMM tile: 24 accumulators fit in 32 registers
#else
constexpr int kCols = 2;  // 12 accumulators fit in 16 registers
#endif

inline V8 load(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, V8 v) { std::memcpy(p, &v, sizeof v); }
inline V8 relu6(V8 v) {
  const V8 zero = {}, six = zero + 6.0f;
  v = v > zero ? v : zero;
  return v < six ? v : six;
}

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

// C[M x N] = A[M x K] B[K x N] + bias, with the epilogue; R (residual) is laid out like C.
template <Epilogue E>
void gemm(int M, int N, int K, const float* A, const float* B, const float* bias, float* C, const float* R) {
  const int vector_cols = N - N % kVec;
  for (int j = 0; j < vector_cols; j += kVec * kCols) {
    const int nv = std::min(kCols, (vector_cols - j) / kVec);
    for (int i = 0; i < M; i += kRows) {
      const int mr = std::min(kRows, M - i);
      const size_t at = static_cast<size_t>(i) * N + j;
      tile_for<E>(mr, nv)(K, A + static_cast<size_t>(i) * K, K, B + j, N, bias + j, C + at, N,
                          E == Epilogue::kResidual ? R + at : nullptr);
    }
  }
  for (int i = 0; i < M; ++i) {  // channels past the last multiple of 8 (none in MobileNetV2)
    for (int j = vector_cols; j < N; ++j) {
      float sum = bias[j];
      for (int k = 0; k < K; ++k) sum += A[static_cast<size_t>(i) * K + k] * B[static_cast<size_t>(k) * N + j];
      const size_t at = static_cast<size_t>(i) * N + j;
      C[at] = E == Epilogue::kRelu6 ? relu6(sum) : E == Epilogue::kResidual ? sum + R[at] : sum;
    }
  }
}

struct BlockGeometry {
  int B, H, W, Cin, Ch, Cout, Ho, Wo, stride, pad_top, pad_left;
  bool expand, residual;
};

BlockGeometry block_geometry(const std::vector<mx::array>& in, int stride, const std::vector<int>& pads,
                             bool expand) {
  const mx::array& x = in[0];
  const int H = x.shape(1), W = x.shape(2), Cin = x.shape(3), Cout = in[3].shape(1);
  return {x.shape(0), H, W, Cin, in[1].shape(1), Cout, (H + pads[0] + pads[1] - 3) / stride + 1,
          (W + pads[2] + pads[3] - 3) / stride + 1, stride, pads[0], pads[2], expand,
          stride == 1 && Cin == Cout};
}

// Output rows [ho0, ho1) of relu6(depthwise(band) + bias) into out; band holds input rows from lo,
// zeros a row of zeros (the padding rows). Eight channels at a time with their nine taps in
// registers (one load per multiply-add); only the edge columns check bounds.
void depthwise_band(const BlockGeometry& g, const float* band, const float* zeros, int lo, int ho0, int ho1,
                    const float* taps, const float* bias, float* out) {
  const int C = g.Ch, vector_channels = C - C % kVec, s = g.stride;
  // Output columns whose three input columns are all inside the image.
  const int inner_begin = std::min(g.Wo, (g.pad_left + s - 1) / s);
  const int inner_end = std::max(inner_begin, std::min(g.Wo, (g.W - 3 + g.pad_left) / s + 1));
  for (int ho = ho0; ho < ho1; ++ho) {
    const float* rows[3];
    for (int i = 0; i < 3; ++i) {
      const int h = ho * s + i - g.pad_top;
      rows[i] = h < 0 || h >= g.H ? zeros : band + static_cast<size_t>(h - lo) * g.W * C;
    }
    float* o = out + static_cast<size_t>(ho - ho0) * g.Wo * C;
    for (int c = 0; c < vector_channels; c += kVec) {
      V8 t[9];
      for (int k = 0; k < 9; ++k) t[k] = load(taps + k * C + c);
      const V8 b = load(bias + c);
      auto edge = [&](int wo) {
        V8 acc = b;
        for (int i = 0; i < 3; ++i) {
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
          const float* in = rows[i] + at;
          acc += load(in) * t[i * 3] + load(in + C) * t[i * 3 + 1] + load(in + 2 * C) * t[i * 3 + 2];
        }
        store(o + static_cast<size_t>(wo) * C + c, relu6(acc));
      }
      for (int wo = inner_end; wo < g.Wo; ++wo) edge(wo);
    }
    for (int c = vector_channels; c < C; ++c) {  // channels past the last multiple of 8
      for (int wo = 0; wo < g.Wo; ++wo) {
        float acc = bias[c];
        for (int i = 0; i < 3; ++i) {
          for (int j = 0; j < 3; ++j) {
            const int w = wo * s - g.pad_left + j;
            if (w >= 0 && w < g.W) acc += rows[i][static_cast<size_t>(w) * C + c] * taps[(i * 3 + j) * C + c];
          }
        }
        o[static_cast<size_t>(wo) * C + c] = relu6(acc);
      }
    }
  }
}

// we: [Cin, Ch] and wp: [Ch, Cout] (transposed 1x1 weights); taps: [9, Ch].
void block_forward(const BlockGeometry& g, const float* x, const float* taps, const float* bd, const float* wp,
                   const float* bp, const float* we, const float* be, float* y) {
  const size_t in_row = static_cast<size_t>(g.W) * g.Cin, ex_row = static_cast<size_t>(g.W) * g.Ch;
  // Output rows per band: the expanded input rows it reads should fit in about 384 KB of L2.
  const long budget = (384 << 10) / sizeof(float);
  const int band_rows = static_cast<int>(std::clamp((budget / static_cast<long>(ex_row) - 2) / g.stride, 1L,
                                                    static_cast<long>(g.Ho)));
  parallel_for(g.B * g.Ho, [&](int begin, int end) {
    std::vector<float> ex(g.expand ? (band_rows * g.stride + 2) * ex_row : 0);
    std::vector<float> dw(static_cast<size_t>(band_rows) * g.Wo * g.Ch), zeros(ex_row);
    int held_n = -1, held_lo = 0, held_hi = 0;  // expanded rows [held_lo, held_hi) of image held_n are in ex
    for (int row = begin; row < end;) {
      const int n = row / g.Ho, ho0 = row % g.Ho;
      const int ho1 = std::min({g.Ho, ho0 + band_rows, ho0 + (end - row)});
      const int lo = std::max(0, ho0 * g.stride - g.pad_top);
      const int hi = std::min(g.H, (ho1 - 1) * g.stride - g.pad_top + 3);
      const float* image = x + static_cast<size_t>(n) * g.H * in_row;
      const float* band = image + lo * in_row;
      if (g.expand) {  // relu6(x @ we + be) for rows [lo, hi), reusing the rows the last band shared
        int keep = 0;
        if (held_n == n && held_lo <= lo && held_hi > lo) {
          keep = std::min(held_hi, hi) - lo;
          std::memmove(ex.data(), ex.data() + (lo - held_lo) * ex_row, keep * ex_row * sizeof(float));
        }
        gemm<Epilogue::kRelu6>((hi - lo - keep) * g.W, g.Ch, g.Cin, band + keep * in_row, we, be,
                               ex.data() + keep * ex_row, nullptr);
        held_n = n, held_lo = lo, held_hi = hi;
        band = ex.data();
      }
      depthwise_band(g, band, zeros.data(), lo, ho0, ho1, taps, bd, dw.data());
      const size_t at = (static_cast<size_t>(n) * g.Ho + ho0) * g.Wo;
      const int pixels = (ho1 - ho0) * g.Wo;
      if (g.residual) {
        gemm<Epilogue::kResidual>(pixels, g.Cout, g.Ch, dw.data(), wp, bp, y + at * g.Cout, x + at * g.Cin);
      } else {
        gemm<Epilogue::kNone>(pixels, g.Cout, g.Ch, dw.data(), wp, bp, y + at * g.Cout, nullptr);
      }
      row += ho1 - ho0;
    }
  });
}

// Dense 3x3 convolution (the 3-channel stem) + bias + relu6. w: [cout, 3, 3, C] (OHWI).
// Each output row's 3x3xC patches are gathered (zeros for padding), then multiplied as one GEMM.
void stem_forward(const Geometry& g, int cout, const float* x, const float* w, const float* b, float* y) {
  const int K = 9 * g.C;
  std::vector<float> packed(static_cast<size_t>(K) * cout);  // [tap, in channel] x out channel
  for (int o = 0; o < cout; ++o)
    for (int k = 0; k < K; ++k) packed[static_cast<size_t>(k) * cout + o] = w[static_cast<size_t>(o) * K + k];
  parallel_for(g.B * g.Ho, [&](int begin, int end) {
    std::vector<float> patches(static_cast<size_t>(g.Wo) * K);
    for (int row = begin; row < end; ++row) {
      const int n = row / g.Ho, ho = row % g.Ho;
      std::fill(patches.begin(), patches.end(), 0.0f);
      for (int wo = 0; wo < g.Wo; ++wo) {
        float* p = patches.data() + static_cast<size_t>(wo) * K;
        for_each_tap(g, n, ho, wo, [&](int k, size_t at) { std::memcpy(p + k * g.C, x + at, g.C * sizeof(float)); });
      }
      gemm<Epilogue::kRelu6>(g.Wo, cout, K, patches.data(), packed.data(), b,
                             y + static_cast<size_t>(row) * g.Wo * cout, nullptr);
    }
  });
}

void allocate(std::vector<mx::array>& outputs) {
  for (auto& out : outputs) out.set_data(mx::allocator::malloc(out.nbytes()));
}

// Parameters shared by the forward and gradient primitives (compared for graph deduplication).
struct Params {
  int stride;
  std::vector<int> pads;
  bool act_in;
  bool operator==(const Params& o) const { return stride == o.stride && pads == o.pads && act_in == o.act_in; }
};

// What both primitives share: the parameters, CPU-only evaluation, deduplication by parameters.
class KernelPrimitive : public mx::Primitive {
 public:
  KernelPrimitive(mx::Stream s, Params p) : Primitive(s), p_(std::move(p)) {}

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("watchtrain depthwise kernel: CPU only");
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
    std::vector<mx::array> picked;
    for (int arg : argnums) picked.push_back(grads[arg]);
    return picked;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    auto g = geometry(in[0], p_.stride, p_.pads, p_.act_in);
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
    auto g = geometry(in[0], p_.stride, p_.pads, false);
    return {{g.B, g.Ho, g.Wo, in[1].shape(0)}};
  }
  const char* name() const override { return "WatchtrainStem3x3"; }
};

mx::array stem3x3_relu6(const mx::array& x, const mx::array& weight, const mx::array& bias, int stride,
                        std::vector<int> pads) {
  if (x.ndim() != 4 || weight.ndim() != 4 || weight.shape(1) != 3 || weight.shape(2) != 3 ||
      weight.shape(3) != x.shape(3) || bias.shape() != mx::Shape{weight.shape(0)} || pads.size() != 4) {
    throw std::invalid_argument("stem3x3_relu6: expected x [B,H,W,C], weight [O,3,3,C], bias [O], four pads");
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
  if (C < 0 || taps.shape() != mx::Shape{9, C} || bias.shape() != mx::Shape{C} ||
      (in_bias && in_bias->shape() != mx::Shape{C})) {
    throw std::invalid_argument("depthwise3x3_relu6: expected x [B,H,W,C], taps [9,C], bias and in_bias [C]");
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


// relu6 of x @ expand_t + expand_bias (when expanding), the depthwise step, then the projection
// (+ x when the block is residual), from the primitives above: what the fused block computes.
mx::array inverted_residual_unfused(const std::vector<mx::array>& in, const Params& p) {
  auto s = mx::default_stream(mx::Device::cpu);
  const mx::array& x = in[0];
  std::optional<mx::array> in_bias;
  mx::array hidden = x;
  if (p.act_in) {
    hidden = mx::matmul(x, in[5], s);
    in_bias = in[6];
  }
  auto y = mx::add(mx::matmul(depthwise3x3_relu6(hidden, in[1], in[2], p.stride, p.pads, in_bias), in[3], s), in[4], s);
  return p.stride == 1 && x.shape(3) == y.shape(3) ? mx::add(y, x, s) : y;
}

// inputs: x, taps [9, Ch], bias [Ch], project_t [Ch, Cout], project_bias [Cout] (, expand_t [Cin, Ch],
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
    std::vector<mx::array> picked;
    for (int arg : argnums) picked.push_back(grads[arg]);
    return picked;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    auto g = block_geometry(in, p_.stride, p_.pads, p_.act_in);
    return {{g.B, g.Ho, g.Wo, g.Cout}};
  }
  const char* name() const override { return "WatchtrainInvertedResidual"; }
};

// A whole MobileNetV2 block in one pass (see block_forward); the 1x1 weights come transposed.
mx::array inverted_residual(const mx::array& x, const mx::array& taps, const mx::array& bias,
                            const mx::array& project_t, const mx::array& project_bias, int stride,
                            std::vector<int> pads, std::optional<mx::array> expand_t,
                            std::optional<mx::array> expand_bias) {
  const int cin = x.ndim() == 4 ? x.shape(3) : -1;
  const int ch = expand_t ? (expand_t->ndim() == 2 ? expand_t->shape(1) : -1) : cin;
  const bool expand = expand_t.has_value();
  if (cin < 0 || ch < 0 || expand != expand_bias.has_value() ||
      (expand && (expand_t->shape(0) != cin || expand_bias->shape() != mx::Shape{ch})) ||
      taps.shape() != mx::Shape{9, ch} || bias.shape() != mx::Shape{ch} || project_t.ndim() != 2 ||
      project_t.shape(0) != ch || project_bias.shape() != mx::Shape{project_t.shape(1)}) {
    throw std::invalid_argument(
        "inverted_residual: expected x [B,H,W,Cin], taps [9,Ch], bias [Ch], project_t [Ch,Cout], "
        "project_bias [Cout], and expand_t [Cin,Ch] with expand_bias [Ch] together or not at all");
  }
  if (pads.size() != 4 || (stride != 1 && stride != 2)) {
    throw std::invalid_argument("inverted_residual: stride 1 or 2 and four pads");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs;
  for (const auto& a : {x, taps, bias, project_t, project_bias}) inputs.push_back(mx::contiguous(mx::astype(a, mx::float32, s), false, s));
  if (expand) {
    for (const auto& a : {*expand_t, *expand_bias}) inputs.push_back(mx::contiguous(mx::astype(a, mx::float32, s), false, s));
  }
  Params p{stride, pads, expand};
  auto g = block_geometry(inputs, stride, pads, expand);
  return mx::array({g.B, g.Ho, g.Wo, g.Cout}, mx::float32, std::make_shared<InvertedResidual>(s, p), inputs);
}

}  // namespace

NB_MODULE(_watchtrain_native, m) {
  m.doc() = "watchtrain's fused inverted residual block, depthwise and stem 3x3 convolutions for MLX's CPU backend";
  m.def("depthwise3x3_relu6", &depthwise3x3_relu6, nb::arg("x"), nb::arg("taps"), nb::arg("bias"),
        nb::arg("stride"), nb::arg("pads"), nb::arg("in_bias") = nb::none(),
        "relu6(depthwise 3x3 convolution of a(x) + bias), NHWC; pads = (top, bottom, left, right);\n"
        "a(x) = relu6(x + in_bias) when in_bias is given, else x");
  m.def("stem3x3_relu6", &stem3x3_relu6, nb::arg("x"), nb::arg("weight"), nb::arg("bias"), nb::arg("stride"),
        nb::arg("pads"), "relu6(dense 3x3 convolution of NHWC x + bias), forward only; weight OHWI");
  m.def("inverted_residual", &inverted_residual, nb::arg("x"), nb::arg("taps"), nb::arg("bias"),
        nb::arg("project_t"), nb::arg("project_bias"), nb::arg("stride"), nb::arg("pads"),
        nb::arg("expand_t") = nb::none(), nb::arg("expand_bias") = nb::none(),
        "a MobileNetV2 inverted residual block in one pass, NHWC: relu6(x @ expand_t + expand_bias)\n"
        "(without expand_t: x), relu6(depthwise 3x3 + bias), @ project_t + project_bias, + x when\n"
        "stride is 1 and the channels match; pads = (top, bottom, left, right)");
  m.def("threads", &n_threads, "worker threads the kernel splits rows over");
}
