// dynnet compiled CPU kernels: a channel-sliced pair of 3x3 convolutions for one sample (batch-1 inference of
// the channel-gating recipes; reference: dynnet.kernels.channel.sliced_pair_single).
//
//   y = conv2(relu(conv1(x; W1[S], b1[S])) * s[S]; W2[:, S]) + b2,   S = {c : s[c] != 0}
//
// Both convolutions are 3x3 with padding 1; conv1 has stride 1 or 2, conv2 stride 1. They run as a direct convolution over a zero-padded,
// flattened copy of each input plane: output position p = r * (W + 2) + c reads input p + ky * (W + 2) + kx, so
// every tap is a contiguous run of positions and a register block of 4 output channels x 64 positions is
// updated by vector FMAs with broadcast weights. The cost is linear in the kept channels (no im2col of the
// input, no GEMM whose efficiency falls with a narrow matrix), which is what batch-1 channel gating needs.
// The two columns per row that fall on the padding are computed and discarded (or zeroed in the hidden
// buffer, where they land exactly on its padding).
#include "native.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));
constexpr int64_t NV = 4;         // vectors per register block
constexpr int64_t VB = 16 * NV;   // positions per register block
constexpr int64_t OB = 4;         // output channels per register block

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// acc[o][v] = sum over input channels c and taps t of w[o](c, t) * x[c][p0 + 16 v + toff[t]].
// wrow[o] points at output channel o's weights; coff[c] is the offset of input channel c's 9 taps in it.
template <int64_t NO>
inline void conv_block(const float* x, int64_t plane, const int64_t* toff, int64_t cin, const int64_t* coff,
                       const float* const* wrow, int64_t p0, v16 acc[NO][NV]) {
  for (int64_t o = 0; o < NO; ++o)
    for (int64_t v = 0; v < NV; ++v) acc[o][v] = v16{} ;
  for (int64_t c = 0; c < cin; ++c) {
    const float* xc = x + c * plane + p0;
    const int64_t co = coff[c];
    for (int64_t t = 0; t < 9; ++t) {
      const float* xs = xc + toff[t];
      v16 xv[NV];
      for (int64_t v = 0; v < NV; ++v) xv[v] = load(xs + 16 * v);
      for (int64_t o = 0; o < NO; ++o) {
        const float w = wrow[o][co + t];
        for (int64_t v = 0; v < NV; ++v) acc[o][v] += w * xv[v];
      }
    }
  }
}

// Where a 3x3 convolution (padding 1, stride 1 or 2) reads its zero-padded input and writes its outputs.
// Output (r, c) is position p = r * rowlen + c; columns c >= Wo of a row are computed and discarded. Tap t reads
// input element p + toff[t] of the channel's region (region floats per channel).
//   stride 1: the region is the padded plane, rowlen = W + 2, toff = ky * rowlen + kx;
//   stride 2: the region holds the four phases (even/odd padded row x even/odd padded column) of the padded
//             plane, each rowlen = ceil((W + 2) / 2) wide, so that every tap is again a contiguous run.
struct Geometry {
  int64_t stride, H, W, Ho, Wo, rowlen, L, phase, region;
  int64_t toff[9];
  Geometry(int64_t h, int64_t w, int64_t s) : stride(s), H(h), W(w) {
    Ho = (H - 1) / s + 1;
    Wo = (W - 1) / s + 1;
    rowlen = s == 1 ? W + 2 : (W + 3) / 2;
    L = Ho * rowlen;
    const int64_t blocks_end = (L + VB - 1) / VB * VB;
    if (s == 1) {
      phase = blocks_end + 2 * rowlen + 2 + 16;  // every read of every block stays inside the region
      region = phase;
      for (int64_t t = 0; t < 9; ++t) toff[t] = (t / 3) * rowlen + (t % 3);
    } else {
      const int64_t hq = (H + 3) / 2;
      phase = std::max(hq * rowlen, blocks_end + rowlen + 1 + 16);
      region = 4 * phase;
      for (int64_t t = 0; t < 9; ++t) {
        const int64_t ky = t / 3, kx = t % 3;
        toff[t] = ((ky % 2) * 2 + kx % 2) * phase + (ky / 2) * rowlen + kx / 2;
      }
    }
  }
  // Index in a channel's region of padded input position (i, j) (0 <= i < H + 2, 0 <= j < W + 2).
  int64_t at(int64_t i, int64_t j) const {
    return stride == 1 ? i * rowlen + j : ((i % 2) * 2 + j % 2) * phase + (i / 2) * rowlen + j / 2;
  }
};

// The runs of a block's positions [p0, p0 + VB) ∩ [0, L) that fall inside the output (column < Wo): run i covers
// block entries [j0[i], j1[i]) and starts at output (r[i], col[i]). Computed once per block (two divisions) and
// shared by all the block's output channels.
struct RowRuns {
  int64_t n = 0;
  int64_t j0[VB], j1[VB], r[VB], col[VB];
  RowRuns(const Geometry& g, int64_t p0) {
    const int64_t end = std::min(VB, g.L - p0);
    int64_t j = 0, row = p0 / g.rowlen, c = p0 % g.rowlen;
    while (j < end) {
      const bool inside = c < g.Wo;
      const int64_t len = std::min(end - j, inside ? g.Wo - c : g.rowlen - c);
      if (inside) {
        j0[n] = j, j1[n] = j + len, r[n] = row, col[n] = c;
        ++n;
      }
      j += len;
      c += len;
      if (c == g.rowlen) c = 0, ++row;
    }
  }
};

// The work (MACs) from which a convolution is split over threads: waking a second thread costs more than it
// saves on small convolutions, and more between calls separated by Python than back to back.
std::atomic<int64_t> parallel_min{int64_t{1} << 22};  // measured: ResNet-20 blocks at batch 1 ran fastest on one thread

int64_t parallel_min_macs() { return parallel_min.load(std::memory_order_relaxed); }

// One convolution over all register blocks. store(o_first, count, p0, acc) writes a block's results.
template <typename Store>
void conv_all(const Geometry& g, const float* x, int64_t cin, const int64_t* coff, const std::vector<const float*>& rows,
              Store store) {
  const int64_t cout = static_cast<int64_t>(rows.size());
  const int64_t pblocks = (g.L + VB - 1) / VB, oblocks = (cout + OB - 1) / OB;
  const int64_t work = cout * cin * 9 * g.L;  // MACs; below parallel_min_macs() one thread runs them all
  const int64_t grain = work < parallel_min_macs() ? pblocks * oblocks : 1;
  at::parallel_for(0, pblocks * oblocks, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t ob = i / pblocks, p0 = (i % pblocks) * VB, o0 = ob * OB;
      const int64_t no = std::min(OB, cout - o0);
      const float* const* wr = rows.data() + o0;
      if (no == OB) {
        v16 acc[OB][NV];
        conv_block<OB>(x, g.region, g.toff, cin, coff, wr, p0, acc);
        store(o0, OB, p0, &acc[0][0]);
      } else {
        v16 acc[1][NV];
        for (int64_t o = 0; o < no; ++o) {
          conv_block<1>(x, g.region, g.toff, cin, coff, wr + o, p0, acc);
          store(o0 + o, 1, p0, &acc[0][0]);
        }
      }
    }
  });
}

// A zero-initialised scratch buffer of `channels` regions of geometry g, kept per thread and per geometry. Only
// interior positions are ever written (input copies, conv1's epilogue), so the padding stays zero across calls
// and the buffer is not cleared again.
float* scratch(const Geometry& g, int64_t channels, int slot) {
  struct Key {
    int64_t stride, H, W, channels;
    int slot;
    bool operator==(const Key& o) const {
      return stride == o.stride && H == o.H && W == o.W && channels == o.channels && slot == o.slot;
    }
  };
  thread_local std::vector<std::pair<Key, std::vector<float>>> buffers;
  const Key key{g.stride, g.H, g.W, channels, slot};
  // Least recently used first: a hit moves to the back, so that evicting the front never frees a buffer the
  // current call is still using (a call takes at most two, and moving the vectors keeps their data in place).
  for (size_t i = 0; i < buffers.size(); ++i)
    if (buffers[i].first == key) {
      std::rotate(buffers.begin() + i, buffers.begin() + i + 1, buffers.end());
      return buffers.back().second.data();
    }
  if (buffers.size() >= 64) buffers.erase(buffers.begin());  // many shapes: drop the least recently used
  buffers.emplace_back(key, std::vector<float>(static_cast<size_t>(channels * g.region), 0.f));
  return buffers.back().second.data();
}

// Copies input planes into zero-padded regions of `dst` (phases for stride 2): region i <- plane channels[i]
// (plane i when `channels` is null) of the Tensor[C, H, W] data at `xs`.
void fill_padded(float* dst, const Geometry& g, const float* xs, const int64_t* channels, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    float* region = dst + i * g.region;
    const int64_t c = channels == nullptr ? i : channels[i];
    for (int64_t r = 0; r < g.H; ++r) {
      const float* src = xs + (c * g.H + r) * g.W;
      if (g.stride == 1) {
        std::memcpy(region + g.at(r + 1, 1), src, g.W * sizeof(float));
      } else {  // input column q is padded column q + 1: even q to the odd-column phase, odd q to the even one
        float* __restrict odd = region + g.at(r + 1, 1);   // padded columns 1, 3, 5, ...
        float* __restrict even = region + g.at(r + 1, 2);  // padded columns 2, 4, ...
        for (int64_t q = 0; q < g.W; q += 2) odd[q / 2] = src[q];
        for (int64_t q = 1; q < g.W; q += 2) even[q / 2] = src[q];
      }
    }
  }
}

// y[o] = bias[o] everywhere (no input channel kept): Tensor[C_out, plane] at `y`.
void fill_bias(float* y, int64_t cout, int64_t plane, const float* bias) {
  for (int64_t o = 0; o < cout; ++o) std::fill(y + o * plane, y + (o + 1) * plane, bias[o]);
}

// The block's epilogue on an output Tensor[C_out, plane] at `y` that already holds conv + bias: add the residual
// (Tensor[C_out, plane], may be null), then the ReLU if asked.
void residual_relu(float* y, int64_t count, const float* res, bool relu) {
  if (res != nullptr)
    for (int64_t i = 0; i < count; ++i) y[i] += res[i];
  if (relu)
    for (int64_t i = 0; i < count; ++i) y[i] = std::max(y[i], 0.f);
}

// A convolution written to the NCHW output `y` (Tensor[C_out, Ho, Wo]) with its bias added, then the residual
// `res` (same layout, may be null) and the ReLU if asked: the end of a residual block in one pass.
void conv_to_output(const Geometry& g, const float* in, int64_t cin, const int64_t* coff,
                    const std::vector<const float*>& rows, const float* bias, float* y, const float* res = nullptr,
                    bool relu = false) {
  conv_all(g, in, cin, coff, rows, [&](int64_t o0, int64_t no, int64_t p0, const v16* acc) {
    const RowRuns runs(g, p0);
    for (int64_t o = 0; o < no; ++o) {
      const float b = bias[o0 + o];
      const float* a = reinterpret_cast<const float*>(acc + o * NV);
      const int64_t base = (o0 + o) * g.Ho * g.Wo;
      for (int64_t i = 0; i < runs.n; ++i) {
        const int64_t j0 = runs.j0[i], j1 = runs.j1[i], at = base + runs.r[i] * g.Wo + runs.col[i] - j0;
        float* d = y + at;
        const float* rr = res == nullptr ? nullptr : res + at;
        // One pass per run, each variant a plain vectorisable loop.
        if (rr != nullptr && relu) {
          for (int64_t j = j0; j < j1; ++j) d[j] = std::max(a[j] + b + rr[j], 0.f);
        } else if (rr != nullptr) {
          for (int64_t j = j0; j < j1; ++j) d[j] = a[j] + b + rr[j];
        } else if (relu) {
          for (int64_t j = j0; j < j1; ++j) d[j] = std::max(a[j] + b, 0.f);
        } else {
          for (int64_t j = j0; j < j1; ++j) d[j] = a[j] + b;
        }
      }
    }
  });
}

void check(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dim && t.is_contiguous(),
              "dynnet kernel: ", name, " must be a contiguous float32 CPU tensor of ", dim, " dims, got ",
              t.sizes(), " ", t.scalar_type());
}

// The pair for one sample with the channel multipliers `s` (M floats; kept channels are the non-zero ones), after
// the operand checks. Returns (y, number of kept channels).
// With `instance_ratio` (instance-wise sparsity), conv1 computes every channel and the kept channels are those whose
// root-mean-square output exceeds ratio x the mean over channels (and is non-zero); conv2 reads only those, and `s`
// receives the 0/1 decision (its input values are ignored). The count returned is then conv2's input channels.
std::tuple<at::Tensor, int64_t> pair_impl(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                          const at::Tensor& w2, const at::Tensor& b2, float* s, bool binary,
                                          int64_t stride, const c10::optional<at::Tensor>& residual, bool relu,
                                          const char* op, const float* instance_ratio = nullptr) {
  check(x, 4, "x");
  check(w1, 4, "w1");
  check(b1, 1, "b1");
  check(w2, 4, "w2");
  check(b2, 1, "b2");
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), M = w1.size(0), CO = w2.size(0);
  TORCH_CHECK(x.size(0) == 1, op, ": one sample, got a batch of ", x.size(0));
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  TORCH_CHECK(H > 0 && W > 0, op, ": empty input ", x.sizes());
  TORCH_CHECK(w1.size(1) == C && w1.size(2) == 3 && w1.size(3) == 3, op, ": w1 must be [M, ", C,
              ", 3, 3], got ", w1.sizes());
  TORCH_CHECK(w2.size(1) == M && w2.size(2) == 3 && w2.size(3) == 3, op, ": w2 must be [C_out, ", M,
              ", 3, 3], got ", w2.sizes());
  TORCH_CHECK(b1.size(0) == M && b2.size(0) == CO, op, ": b1 needs ", M, " entries and b2 ", CO);
  const Geometry g1(H, W, stride);
  const int64_t Ho = g1.Ho, Wo = g1.Wo;
  const float* res = nullptr;
  if (residual.has_value() && residual->defined()) {
    check(*residual, 4, "residual");
    TORCH_CHECK(residual->size(0) == 1 && residual->size(1) == CO && residual->size(2) == Ho && residual->size(3) == Wo,
                op, ": residual must be [1, ", CO, ", ", Ho, ", ", Wo, "], got ", residual->sizes());
    res = residual->data_ptr<float>();
  }
  const Geometry g2(Ho, Wo, 1);
  std::vector<int64_t> kept;
  kept.reserve(M);
  for (int64_t m = 0; m < M; ++m)
    if (instance_ratio != nullptr || s[m] != 0.f) kept.push_back(m);
  int64_t K = static_cast<int64_t>(kept.size());
  at::Tensor y = at::empty({1, CO, Ho, Wo}, x.options());
  float* yp = y.data_ptr<float>();
  const float* b2p = b2.data_ptr<float>();
  if (K == 0) {
    fill_bias(yp, CO, Ho * Wo, b2p);
    residual_relu(yp, CO * Ho * Wo, res, relu);
    return {y, 0};
  }
  // Zero-padded input (phases for stride 2).
  float* xp = scratch(g1, C, 0);
  fill_padded(xp, g1, x.data_ptr<float>(), nullptr, C);
  // conv1 over the kept output channels into the zero-padded hidden planes (relu, scale).
  float* hp = scratch(g2, M, 1);
  const float* w1p = w1.data_ptr<float>();
  const float* b1p = b1.data_ptr<float>();
  std::vector<const float*> rows1(K);
  std::vector<int64_t> coff1(C);
  for (int64_t i = 0; i < K; ++i) rows1[i] = w1p + kept[i] * C * 9;
  for (int64_t c = 0; c < C; ++c) coff1[c] = c * 9;
  conv_all(g1, xp, C, coff1.data(), rows1, [&](int64_t o0, int64_t no, int64_t p0, const v16* acc) {
    const RowRuns runs(g1, p0);
    for (int64_t o = 0; o < no; ++o) {
      const int64_t m = kept[o0 + o];
      const float bias = b1p[m], mult = binary || instance_ratio != nullptr ? 1.f : s[m];
      const float* a = reinterpret_cast<const float*>(acc + o * NV);
      float* dst = hp + (o0 + o) * g2.region;
      for (int64_t i = 0; i < runs.n; ++i) {
        const int64_t j0 = runs.j0[i], j1 = runs.j1[i];
        float* d = dst + g2.at(runs.r[i] + 1, runs.col[i] + 1) - j0;
        for (int64_t j = j0; j < j1; ++j) d[j] = std::max(a[j] + bias, 0.f) * mult;
      }
    }
  });
  if (instance_ratio != nullptr) {
    // Channel norms of the hidden planes (interior rows only: the padding is zero), the decision, and the kept
    // planes moved to the front (kept2[i] >= i: a forward copy never overwrites a plane still to be read).
    std::vector<float> norms(M);
    float total = 0.f;
    for (int64_t m = 0; m < M; ++m) {
      const float* region = hp + m * g2.region;
      float acc = 0.f;
      for (int64_t r = 0; r < Ho; ++r) {
        const float* row = region + g2.at(r + 1, 1);
        for (int64_t c = 0; c < Wo; ++c) acc += row[c] * row[c];
      }
      norms[m] = std::sqrt(std::max(acc / static_cast<float>(Ho * Wo), 0.f));
      total += norms[m];
    }
    const float bar = *instance_ratio * (total / static_cast<float>(M));
    kept.clear();
    for (int64_t m = 0; m < M; ++m) {
      const bool keep = norms[m] > bar && norms[m] > 0.f;
      s[m] = keep ? 1.f : 0.f;
      if (keep) kept.push_back(m);
    }
    K = static_cast<int64_t>(kept.size());
    if (K == 0) {
      fill_bias(yp, CO, Ho * Wo, b2p);
      residual_relu(yp, CO * Ho * Wo, res, relu);
      return {y, 0};
    }
    for (int64_t i = 0; i < K; ++i)
      if (kept[i] != i) std::memcpy(hp + i * g2.region, hp + kept[i] * g2.region, g2.region * sizeof(float));
  }
  // conv2 reads the kept hidden channels (input channel i = inner channel kept[i]).
  const float* w2p = w2.data_ptr<float>();
  std::vector<const float*> rows2(CO);
  std::vector<int64_t> coff2(K);
  for (int64_t o = 0; o < CO; ++o) rows2[o] = w2p + o * M * 9;
  for (int64_t i = 0; i < K; ++i) coff2[i] = kept[i] * 9;
  conv_to_output(g2, hp, K, coff2.data(), rows2, b2p, yp, res, relu);
  return {y, K};
}

// Per-channel spatial means of one sample's planes (of |x| when `absolute`): x Tensor[1, C, H, W] → out[C].
// Vector partial sums, then a scalar tail: the summation order differs from PyTorch's mean by rounding only.
void channel_means(const at::Tensor& x, bool absolute, float* out) {
  const int64_t C = x.size(1), HW = x.size(2) * x.size(3), body = HW / 16 * 16;
  const float* xp = x.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    const float* p = xp + c * HW;
    v16 acc = v16{};
    float tail = 0.f;
    if (absolute) {
      typedef int32_t i16 __attribute__((vector_size(64), aligned(4)));
      const i16 magnitude = i16{} + 0x7fffffff;  // every bit but the sign
      for (int64_t i = 0; i < body; i += 16) acc += reinterpret_cast<v16>(reinterpret_cast<i16>(load(p + i)) & magnitude);
      for (int64_t i = body; i < HW; ++i) tail += std::abs(p[i]);
    } else {
      for (int64_t i = 0; i < body; i += 16) acc += load(p + i);
      for (int64_t i = body; i < HW; ++i) tail += p[i];
    }
    for (int64_t l = 0; l < 16; ++l) tail += acc[l];
    out[c] = tail / static_cast<float>(HW);
  }
}

// out[r] = bias[r] + sum_c w[r, c] * v[c] for a row-major Tensor[R, C] at w.
void matvec(const float* w, const float* v, const float* bias, int64_t R, int64_t C, float* out) {
  for (int64_t r = 0; r < R; ++r) {
    const float* wr = w + r * C;
    float acc = 0.f;
    for (int64_t c = 0; c < C; ++c) acc += wr[c] * v[c];
    out[r] = acc + bias[r];
  }
}

// The projection shortcut of a downsampling block, BN folded: a 1x1 convolution of stride s (padding 0),
// Tensor[1, C, H, W] -> Tensor[1, C_out, Ho, Wo] with w Tensor[C_out, C], b Tensor[C_out].
at::Tensor shortcut1x1(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t s) {
  check(w, 2, "shortcut_w");
  check(b, 1, "shortcut_b");
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), CO = w.size(0);
  TORCH_CHECK(w.size(1) == C && b.size(0) == CO, "dynnet kernel: shortcut_w must be [C_out, ", C,
              "] and shortcut_b [C_out], got ", w.sizes(), " and ", b.sizes());
  const int64_t Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1, P = Ho * Wo;
  std::vector<float> sub;  // the input positions the shortcut reads, Tensor[C, Ho * Wo]
  const float* xs = x.data_ptr<float>();
  if (s != 1) {
    sub.resize(C * P);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t r = 0; r < Ho; ++r)
        for (int64_t q = 0; q < Wo; ++q) sub[(c * Ho + r) * Wo + q] = xs[(c * H + r * s) * W + q * s];
    xs = sub.data();
  }
  at::Tensor y = at::empty({1, CO, Ho, Wo}, x.options());
  float* yp = y.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  for (int64_t o = 0; o < CO; ++o) {
    float* dst = yp + o * P;
    std::fill(dst, dst + P, bp[o]);
    for (int64_t c = 0; c < C; ++c) {
      const float wc = wp[o * C + c];
      const float* src = xs + c * P;
      for (int64_t p = 0; p < P; ++p) dst[p] += wc * src[p];
    }
  }
  return y;
}

// A gate operand: Tensor[rows, cols] (cols < 0: Tensor[rows]).
void check_gate(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  check(t, cols < 0 ? 1 : 2, name);
  TORCH_CHECK(t.size(0) == rows && (cols < 0 || t.size(1) == cols), "dynnet kernel: ", name, " must have ", rows,
              " rows", cols < 0 ? "" : " and columns: ", cols < 0 ? 0 : cols, ", got ", t.sizes());
}

}  // namespace

namespace dynnet {

int64_t set_parallel_min_macs(int64_t value) {
  TORCH_CHECK(value >= 0, "parallel_min_macs must be >= 0, got ", value);
  return parallel_min.exchange(value);
}

// Returns (y: Tensor[1, C_out, Ho, Wo], k: number of kept inner channels). conv1 has the given stride (1 or 2).
// With `residual` (Tensor[1, C_out, Ho, Wo]) and `relu`, y = relu(residual + pair): a whole residual block.
std::tuple<at::Tensor, int64_t> sliced_pair3x3(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                               const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& scale,
                                               bool binary, int64_t stride,
                                               const c10::optional<at::Tensor>& residual, bool relu) {
  check(scale, 1, "scale");
  TORCH_CHECK(scale.size(0) == w1.size(0), "sliced_pair3x3: scale needs ", w1.size(0), " entries, got ", scale.size(0));
  // pair_impl writes to its multipliers only for instance sparsity, which this op does not run.
  return pair_impl(x, w1, b1, w2, b2, const_cast<float*>(scale.data_ptr<float>()), binary, stride, residual, relu,
                   "sliced_pair3x3");
}

// The block's decision and the pair in one call (reference: the recipes' Python inference gates, then
// sliced_pair3x3). Gate kinds, on the block input x Tensor[1, C, H, W] (M inner channels):
//   GATE_MLP (0):  h = relu(gw1 mean_hw(x) + gb1) (gw1 Tensor[J, C], BN folded), logits = gw2 h + gb2
//                  (gw2 Tensor[M, J]); channel m is kept (multiplier 1) where logits[m] > 0;
//   GATE_KWTA (1): g = relu(gw1 mean_hw|x| + gb1) (gw1 Tensor[M, C]); the k largest g are kept (ties: lowest index)
//                  with multiplier g (FBS boosting; a kept g of 0 is a channel off). gw2, gb2 unused.
//   GATE_GIVEN (2): the multipliers gw1 Tensor[M] (a decision made outside: a controller, a fixed subset); with
//                  k != 0 they are binary (non-zero = kept, multiplier 1). gb1, gw2, gb2 unused;
//   GATE_INSTANCE (3): conv1 computes every channel; conv2 reads those whose RMS exceeds gw1[0] x their mean
//                  (Liu et al.'s instance-wise sparsity; gw1 Tensor[1] the ratio). The count is conv2's inputs.
// Returns (y, scale: Tensor[M] the multipliers used (the 0/1 decision for GATE_INSTANCE), k: kept channels).
std::tuple<at::Tensor, at::Tensor, int64_t> gated_pair3x3(
    const at::Tensor& x, int64_t gate, const at::Tensor& gw1, const at::Tensor& gb1, const at::Tensor& gw2,
    const at::Tensor& gb2, int64_t k, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, int64_t stride, const c10::optional<at::Tensor>& residual_in, bool relu,
    const c10::optional<at::Tensor>& shortcut_w, const c10::optional<at::Tensor>& shortcut_b) {
  check(x, 4, "x");
  check(w1, 4, "w1");
  TORCH_CHECK(x.size(0) == 1, "gated_pair3x3: one sample, got a batch of ", x.size(0));
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, "gated_pair3x3: empty input ", x.sizes());
  const int64_t C = x.size(1), M = w1.size(0);
  c10::optional<at::Tensor> residual = residual_in;
  if (shortcut_w.has_value() && shortcut_w->defined()) {
    TORCH_CHECK(!(residual_in.has_value() && residual_in->defined()) && shortcut_b.has_value() &&
                    shortcut_b->defined(), "gated_pair3x3: a shortcut needs shortcut_b and no residual");
    TORCH_CHECK(stride == 1 || stride == 2, "gated_pair3x3: stride must be 1 or 2, got ", stride);
    residual = shortcut1x1(x, *shortcut_w, *shortcut_b, stride);
  }
  at::Tensor scale = at::zeros({M}, x.options());
  float* s = scale.data_ptr<float>();
  std::vector<float> mean(C);
  if (gate == 0) {
    check(gw1, 2, "gw1");
    const int64_t J = gw1.size(0);
    check_gate(gw1, "gw1", J, C);
    check_gate(gb1, "gb1", J, -1);
    check_gate(gw2, "gw2", M, J);
    check_gate(gb2, "gb2", M, -1);
    channel_means(x, false, mean.data());
    std::vector<float> h(J), logits(M);
    matvec(gw1.data_ptr<float>(), mean.data(), gb1.data_ptr<float>(), J, C, h.data());
    for (auto& v : h) v = std::max(v, 0.f);
    matvec(gw2.data_ptr<float>(), h.data(), gb2.data_ptr<float>(), M, J, logits.data());
    for (int64_t m = 0; m < M; ++m) s[m] = logits[m] > 0.f ? 1.f : 0.f;
    auto [y, K] = pair_impl(x, w1, b1, w2, b2, s, true, stride, residual, relu, "gated_pair3x3");
    return {y, scale, K};
  }
  if (gate == 2) {
    check_gate(gw1, "gw1", M, -1);
    std::memcpy(s, gw1.data_ptr<float>(), M * sizeof(float));
    auto [y, K] = pair_impl(x, w1, b1, w2, b2, s, k != 0, stride, residual, relu, "gated_pair3x3");
    return {y, scale, K};
  }
  if (gate == 3) {
    check_gate(gw1, "gw1", 1, -1);
    const float ratio = gw1.data_ptr<float>()[0];
    auto [y, K] = pair_impl(x, w1, b1, w2, b2, s, true, stride, residual, relu, "gated_pair3x3", &ratio);
    return {y, scale, K};
  }
  TORCH_CHECK(gate == 1, "gated_pair3x3: gate must be 0 (pooled MLP), 1 (k-winners-take-all), 2 (given multipliers) "
              "or 3 (instance-wise sparsity), got ", gate);
  check_gate(gw1, "gw1", M, C);
  check_gate(gb1, "gb1", M, -1);
  TORCH_CHECK(k >= 1 && k <= M, "gated_pair3x3: k must be in [1, ", M, "], got ", k);
  channel_means(x, true, mean.data());
  std::vector<float> g(M);
  matvec(gw1.data_ptr<float>(), mean.data(), gb1.data_ptr<float>(), M, C, g.data());
  for (auto& v : g) v = std::max(v, 0.f);
  if (k == M) {
    std::copy(g.begin(), g.end(), s);
  } else {
    std::vector<int64_t> order(M);
    for (int64_t m = 0; m < M; ++m) order[m] = m;
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int64_t a, int64_t b) { return g[a] > g[b] || (g[a] == g[b] && a < b); });
    for (int64_t i = 0; i < k; ++i) s[order[i]] = g[order[i]];
  }
  auto [y, K] = pair_impl(x, w1, b1, w2, b2, s, false, stride, residual, relu, "gated_pair3x3");
  return {y, scale, K};
}

// y = conv(x; W[:, S]) + b for S = {c : active[c] != 0}: one 3x3 convolution (padding 1, stride 1 or 2) reading
// only the active input channels of one sample. Returns (y: Tensor[1, C_out, Ho, Wo], |S|).
std::tuple<at::Tensor, int64_t> conv3x3_in(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                           const at::Tensor& active, int64_t stride) {
  check(x, 4, "x");
  check(w, 4, "w");
  check(b, 1, "b");
  check(active, 1, "active");
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), CO = w.size(0);
  TORCH_CHECK(x.size(0) == 1, "conv3x3_in: one sample, got a batch of ", x.size(0));
  TORCH_CHECK(stride == 1 || stride == 2, "conv3x3_in: stride must be 1 or 2, got ", stride);
  TORCH_CHECK(H > 0 && W > 0, "conv3x3_in: empty input ", x.sizes());
  TORCH_CHECK(w.size(1) == C && w.size(2) == 3 && w.size(3) == 3, "conv3x3_in: w must be [C_out, ", C,
              ", 3, 3], got ", w.sizes());
  TORCH_CHECK(b.size(0) == CO && active.size(0) == C, "conv3x3_in: b needs ", CO, " entries and active ", C);
  const Geometry g(H, W, stride);
  const float* a = active.data_ptr<float>();
  std::vector<int64_t> kept;
  kept.reserve(C);
  for (int64_t c = 0; c < C; ++c)
    if (a[c] != 0.f) kept.push_back(c);
  const int64_t K = static_cast<int64_t>(kept.size());
  at::Tensor y = at::empty({1, CO, g.Ho, g.Wo}, x.options());
  float* yp = y.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  if (K == 0) {
    fill_bias(yp, CO, g.Ho * g.Wo, bp);
    return {y, 0};
  }
  // The kept input planes, zero-padded, one region each.
  float* xp = scratch(g, C, 2);
  fill_padded(xp, g, x.data_ptr<float>(), kept.data(), K);
  const float* wp = w.data_ptr<float>();
  std::vector<const float*> rows(CO);
  std::vector<int64_t> coff(K);
  for (int64_t o = 0; o < CO; ++o) rows[o] = wp + o * C * 9;
  for (int64_t i = 0; i < K; ++i) coff[i] = kept[i] * 9;
  conv_to_output(g, xp, K, coff.data(), rows, bp, yp);
  return {y, K};
}

}  // namespace dynnet

namespace {

void check_agent(const at::Tensor& x, const at::Tensor& enc_w, const at::Tensor& enc_b, const at::Tensor& w_ih,
                 const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& dec_w,
                 const at::Tensor& dec_b, const at::Tensor& state) {
  check(x, 4, "x");
  TORCH_CHECK(x.size(0) == 1 && x.size(2) > 0 && x.size(3) > 0, "agent_step: one non-empty sample, got ", x.sizes());
  const int64_t C = x.size(1), J = enc_w.size(0), A = dec_w.size(0);
  check_gate(enc_w, "enc_w", J, C);
  check_gate(enc_b, "enc_b", J, -1);
  check_gate(w_ih, "w_ih", 3 * J, J);
  check_gate(w_hh, "w_hh", 3 * J, J);
  check_gate(b_ih, "b_ih", 3 * J, -1);
  check_gate(b_hh, "b_hh", 3 * J, -1);
  check_gate(dec_w, "dec_w", A, J);
  check_gate(dec_b, "dec_b", A, -1);
  check(state, 2, "state");
  TORCH_CHECK(state.size(0) == 1 && state.size(1) == J, "agent_step: state must be [1, ", J, "], got ", state.sizes());
}

// The agent's step after check_agent: the next state into hn[J] (may alias h), the Q-values into q[A]; returns the
// greedy action (the first maximum).
int64_t agent_impl(const at::Tensor& x, const at::Tensor& enc_w, const at::Tensor& enc_b, const at::Tensor& w_ih,
                   const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& dec_w,
                   const at::Tensor& dec_b, const float* h, float* hn, float* q) {
  const int64_t C = x.size(1), J = enc_w.size(0), A = dec_w.size(0);
  std::vector<float> mean(C), z(J), gi(3 * J), gh(3 * J);
  channel_means(x, false, mean.data());
  matvec(enc_w.data_ptr<float>(), mean.data(), enc_b.data_ptr<float>(), J, C, z.data());
  for (auto& v : z) v = std::max(v, 0.f);
  matvec(w_ih.data_ptr<float>(), z.data(), b_ih.data_ptr<float>(), 3 * J, J, gi.data());
  matvec(w_hh.data_ptr<float>(), h, b_hh.data_ptr<float>(), 3 * J, J, gh.data());
  std::vector<float> next(J);
  for (int64_t j = 0; j < J; ++j) {
    const float r = 1.f / (1.f + std::exp(-(gi[j] + gh[j])));
    const float u = 1.f / (1.f + std::exp(-(gi[J + j] + gh[J + j])));
    const float n = std::tanh(gi[2 * J + j] + r * gh[2 * J + j]);
    next[j] = (1.f - u) * n + u * h[j];
  }
  std::copy(next.begin(), next.end(), hn);
  matvec(dec_w.data_ptr<float>(), hn, dec_b.data_ptr<float>(), A, J, q);
  int64_t action = 0;
  for (int64_t a = 1; a < A; ++a)
    if (q[a] > q[action]) action = a;
  return action;
}

}  // namespace

namespace dynnet {

// One step of a recurrent channel-routing agent (RNP, runtime routing; reference: dynnet.methods.channel._agent.
// QAgent.step and epsilon_greedy without exploration) for one sample:
//   z = relu(enc_w mean_hw(x) + enc_b)                      enc_w Tensor[J, C]
//   h' = GRUCell(z, h)                                       w_ih, w_hh Tensor[3J, J] (r, z, n), b_ih, b_hh [3J]
//   q = dec_w h' + dec_b, action = argmax q (first maximum)  dec_w Tensor[A, J]
// Returns (q: Tensor[1, A], h': Tensor[1, J], action).
std::tuple<at::Tensor, at::Tensor, int64_t> agent_step(const at::Tensor& x, const at::Tensor& enc_w,
                                                       const at::Tensor& enc_b, const at::Tensor& w_ih,
                                                       const at::Tensor& w_hh, const at::Tensor& b_ih,
                                                       const at::Tensor& b_hh, const at::Tensor& dec_w,
                                                       const at::Tensor& dec_b, const at::Tensor& state) {
  check_agent(x, enc_w, enc_b, w_ih, w_hh, b_ih, b_hh, dec_w, dec_b, state);
  at::Tensor next = at::empty({1, enc_w.size(0)}, x.options());
  at::Tensor q = at::empty({1, dec_w.size(0)}, x.options());
  const int64_t action = agent_impl(x, enc_w, enc_b, w_ih, w_hh, b_ih, b_hh, dec_w, dec_b, state.data_ptr<float>(),
                                    next.data_ptr<float>(), q.data_ptr<float>());
  return {q, next, action};
}

// The agent's step and the block it routes in one call (RNP / runtime routing at batch 1): the step as agent_step,
// its next state written into `state` (in place), then the block with the action's channel mask
// (masks Tensor[A, M] of 0/1) as gated_pair3x3 with given binary multipliers. Returns (y, action, kept channels).
std::tuple<at::Tensor, int64_t, int64_t> routed_pair3x3(
    const at::Tensor& x, at::Tensor& state, const at::Tensor& enc_w, const at::Tensor& enc_b, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& dec_w,
    const at::Tensor& dec_b, const at::Tensor& masks, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, int64_t stride, const c10::optional<at::Tensor>& residual, bool relu,
    const c10::optional<at::Tensor>& shortcut_w, const c10::optional<at::Tensor>& shortcut_b) {
  check_agent(x, enc_w, enc_b, w_ih, w_hh, b_ih, b_hh, dec_w, dec_b, state);
  check(masks, 2, "masks");
  TORCH_CHECK(masks.size(0) == dec_w.size(0) && masks.size(1) == w1.size(0), "routed_pair3x3: masks must be [",
              dec_w.size(0), ", ", w1.size(0), "], got ", masks.sizes());
  std::vector<float> q(dec_w.size(0));
  float* h = state.data_ptr<float>();
  const int64_t action = agent_impl(x, enc_w, enc_b, w_ih, w_hh, b_ih, b_hh, dec_w, dec_b, h, h, q.data());
  const at::Tensor row = masks.select(0, action);
  auto [y, scale, kept] =
      gated_pair3x3(x, 2, row, row, row, row, 1, w1, b1, w2, b2, stride, residual, relu, shortcut_w, shortcut_b);
  return {y, action, kept};
}

}  // namespace dynnet

// ---------------------------------------------------------------------------------------------------------------
// Channel gating (Hua et al.) for one sample: per (output channel, 4x4 tile) decisions on a partial sum.
// Reference: dynnet.methods.channel.channel_gating.GatedConv (tile = 4) inside a basic residual block.
//
// Each 3x3 convolution (padding 1) is split over its input channels: the base group [0, base) is always computed
// (p = conv(x_base; W_base) + b); channel o's tile of 4x4 output positions is *on* when the mean of p over the
// tile's positions inside the output exceeds thr[o]; only on tiles receive the rest, conv(x_rest; W_rest).
// Everything runs tile by tile on one 16-float vector per (channel, tile): an im2col of the tile's receptive field
// (Tensor[K, 16], one row per input channel and tap) times weight rows, 8 output channels at a time, one vector FMA
// per row and channel and no wasted lanes. The base rows go to every output channel; the tile sums decide; the
// rest rows are gathered only when some channel is on, and multiplied only by the on channels' rows. Results stay
// tile-major (Tensor[C_out, tiles, 16]) until the epilogue writes them out.
namespace {

constexpr int64_t TILE = 4;

// acc[o] = sum_k w[o][k] T[k] for NO weight rows (K rows of 16 floats at T); U partial sums per channel hide the
// FMA latency when few channels share the tile.
template <int NO, int U>
inline void tile_gemm(const float* T, int64_t K, const float* const* w, v16* acc) {
  v16 a[NO][U];
  for (int o = 0; o < NO; ++o)
    for (int u = 0; u < U; ++u) a[o][u] = v16{};
  int64_t k = 0;
  for (; k + U <= K; k += U)
    for (int u = 0; u < U; ++u) {
      const v16 t = load(T + 16 * (k + u));
      for (int o = 0; o < NO; ++o) a[o][u] += w[o][k + u] * t;
    }
  for (; k < K; ++k) {
    const v16 t = load(T + 16 * k);
    for (int o = 0; o < NO; ++o) a[o][0] += w[o][k] * t;
  }
  for (int o = 0; o < NO; ++o) {
    acc[o] = a[o][0];
    for (int u = 1; u < U; ++u) acc[o] += a[o][u];
  }
}

// Runs rows [0, n) in register blocks: run(NO, i) for rows [i, i + NO), NO a compile-time std::integral_constant —
// First rows at a time while they last, then one block each of 8 (when First > 8), 4, 2 and 1 as the rest allows.
template <int First, typename Run>
inline void in_row_blocks(int64_t n, Run run) {
  int64_t i = 0;
  for (; i + First <= n; i += First) run(std::integral_constant<int, First>{}, i);
  if constexpr (First > 8) {
    if (n - i >= 8) run(std::integral_constant<int, 8>{}, i), i += 8;
  }
  if (n - i >= 4) run(std::integral_constant<int, 4>{}, i), i += 4;
  if (n - i >= 2) run(std::integral_constant<int, 2>{}, i), i += 2;
  if (n - i == 1) run(std::integral_constant<int, 1>{}, i);
}

// For the n weight rows w[0..n) (K floats each): f(i0, count, acc) with acc[j] = w[i0 + j] . T, in register blocks
// of 8/4/2/1 rows (8 / NO partial sums per row).
template <typename F>
inline void tile_gemm_rows(const float* T, int64_t K, const float* const* w, int64_t n, F f) {
  v16 acc[8];
  in_row_blocks<8>(n, [&](auto no, int64_t i) {
    constexpr int NO = decltype(no)::value;
    tile_gemm<NO, 8 / NO>(T, K, w + i, acc);
    f(i, NO, acc);
  });
}

// The lane sums of 8 vectors: out[i] = sum of a[i]'s 16 lanes (a shuffle tree, ~3 instructions per vector).
inline void hsum8(const v16* a, float* out) {
  typedef int32_t i16 __attribute__((vector_size(64)));
  const i16 lo8{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const i16 hi8{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const i16 lo4{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const i16 hi4{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const i16 lo2{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const i16 hi2{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  v16 t[4], u[2];
  for (int i = 0; i < 4; ++i)
    t[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], lo8) + __builtin_shuffle(a[2 * i], a[2 * i + 1], hi8);
  for (int i = 0; i < 2; ++i)
    u[i] = __builtin_shuffle(t[2 * i], t[2 * i + 1], lo4) + __builtin_shuffle(t[2 * i], t[2 * i + 1], hi4);
  const v16 v = __builtin_shuffle(u[0], u[1], lo2) + __builtin_shuffle(u[0], u[1], hi2);
  const v16 w = v + __builtin_shuffle(v, i16{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  float lanes[16];
  std::memcpy(lanes, &w, sizeof(w));
  for (int i = 0; i < 8; ++i) out[i] = lanes[2 * i];
}

struct TileGrid {
  int64_t Ho, Wo, th, tw;
  TileGrid(int64_t ho, int64_t wo) : Ho(ho), Wo(wo), th((ho + TILE - 1) / TILE), tw((wo + TILE - 1) / TILE) {}
  int64_t rows(int64_t ti) const { return std::min(TILE, Ho - ti * TILE); }
  int64_t cols(int64_t tj) const { return std::min(TILE, Wo - tj * TILE); }
};

// im2col of one tile for input channels [c0, c1) of `in` (zero-padded regions of geometry g) into T (row
// (c - c0) * 9 + tap, 16 floats: lane r * 4 + q = output (4 ti + r, 4 tj + q)). Rows of the tile below the output
// are zero; columns right of it hold whatever the padded input has there (read, never stored).
void tile_im2col(const Geometry& g, const float* in, int64_t c0, int64_t c1, int64_t ti, int64_t tj, int64_t nr,
                 float* T) {
  const int64_t origin = ti * TILE * g.rowlen + tj * TILE;
#if defined(__AVX512F__)
  if (g.stride == 1) {
    // Rows r of tap (ky, kx) are the 4 floats at kx of padded row 4 ti + r + ky: two rows per 512-bit register
    // (8 floats each), one two-source permute per tap.
    const __m512i idx[3] = {
        _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
        _mm512_setr_epi32(1, 2, 3, 4, 9, 10, 11, 12, 17, 18, 19, 20, 25, 26, 27, 28),
        _mm512_setr_epi32(2, 3, 4, 5, 10, 11, 12, 13, 18, 19, 20, 21, 26, 27, 28, 29)};
    for (int64_t c = c0; c < c1; ++c) {
      const float* region = in + c * g.region + origin;
      float* dst = T + (c - c0) * 9 * 16;
      for (int64_t ky = 0; ky < 3; ++ky) {
        const float* s = region + ky * g.rowlen;
        __m256 row[4];
        for (int64_t r = 0; r < TILE; ++r) row[r] = r < nr ? _mm256_loadu_ps(s + r * g.rowlen) : _mm256_setzero_ps();
        const __m512 a = _mm512_insertf32x8(_mm512_castps256_ps512(row[0]), row[1], 1);
        const __m512 b = _mm512_insertf32x8(_mm512_castps256_ps512(row[2]), row[3], 1);
        for (int64_t kx = 0; kx < 3; ++kx) _mm512_storeu_ps(dst + (ky * 3 + kx) * 16, _mm512_permutex2var_ps(a, idx[kx], b));
      }
    }
    return;
  }
#endif
  // Both layouts (stride 1, stride-2 phases) hold each tile row of a tap as 4 contiguous floats.
  for (int64_t c = c0; c < c1; ++c) {
    const float* region = in + c * g.region + origin;
    for (int64_t tap = 0; tap < 9; ++tap) {
      float* dst = T + ((c - c0) * 9 + tap) * 16;
      const float* src = region + g.toff[tap];
      int64_t r = 0;
      for (; r < nr; ++r) std::memcpy(dst + r * TILE, src + r * g.rowlen, TILE * sizeof(float));
      for (; r < TILE; ++r) std::memset(dst + r * TILE, 0, TILE * sizeof(float));
    }
  }
}

#if defined(__AVX512F__)
// The tile's four input rows at s (row stride rowlen, 8 floats each; rows at or past nr are zero) as two registers.
inline void tile_rows(const float* s, int64_t rowlen, int64_t nr, __m512& a, __m512& b) {
  const __m256 z = _mm256_setzero_ps();
  const __m256 r0 = _mm256_loadu_ps(s);
  const __m256 r1 = nr > 1 ? _mm256_loadu_ps(s + rowlen) : z;
  const __m256 r2 = nr > 2 ? _mm256_loadu_ps(s + 2 * rowlen) : z;
  const __m256 r3 = nr > 3 ? _mm256_loadu_ps(s + 3 * rowlen) : z;
  a = _mm512_insertf32x8(_mm512_castps256_ps512(r0), r1, 1);
  b = _mm512_insertf32x8(_mm512_castps256_ps512(r2), r3, 1);
}

// acc[o] = sum over input channels c in [c0, c1) and taps of w[o][(c - c0) * 9 + tap] x the tile's input for that
// tap, for NO weight rows, without materialising the im2col: per (channel, kernel row) the tile's input rows are
// loaded once and the three taps' vectors are two-source permutes of them (lane r * 4 + q of tap kx is float
// q + kx of row r). Stride 2 reads the phase layout: kx = 0 and 2 from the even-column phase (kx = 2 one float
// on), kx = 1 from the odd one. U = 3 keeps one accumulator per kernel column (few rows: the FMA latency).
template <int NO, int U>
inline void tile_conv_fused(const Geometry& g, const float* in, int64_t c0, int64_t c1, int64_t origin, int64_t nr,
                            const float* const* w, v16* out) {
  const __m512i idx0 = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i idx1 = _mm512_setr_epi32(1, 2, 3, 4, 9, 10, 11, 12, 17, 18, 19, 20, 25, 26, 27, 28);
  const __m512i idx2 = _mm512_setr_epi32(2, 3, 4, 5, 10, 11, 12, 13, 18, 19, 20, 21, 26, 27, 28, 29);
  __m512 acc[NO][U];
  for (int o = 0; o < NO; ++o)
    for (int u = 0; u < U; ++u) acc[o][u] = _mm512_setzero_ps();
  for (int64_t c = c0; c < c1; ++c) {
    const float* base = in + c * g.region + origin;
    const int64_t k0 = (c - c0) * 9;
    for (int64_t ky = 0; ky < 3; ++ky) {
      __m512 a, b, t0, t1, t2;
      tile_rows(base + g.toff[ky * 3], g.rowlen, nr, a, b);
      t0 = _mm512_permutex2var_ps(a, idx0, b);
      if (g.stride == 1) {
        t1 = _mm512_permutex2var_ps(a, idx1, b);
        t2 = _mm512_permutex2var_ps(a, idx2, b);
      } else {
        t2 = _mm512_permutex2var_ps(a, idx1, b);
        tile_rows(base + g.toff[ky * 3 + 1], g.rowlen, nr, a, b);
        t1 = _mm512_permutex2var_ps(a, idx0, b);
      }
      const int64_t k = k0 + ky * 3;
      for (int o = 0; o < NO; ++o) {
        const float* wo = w[o] + k;
        acc[o][0] = _mm512_fmadd_ps(_mm512_set1_ps(wo[0]), t0, acc[o][0]);
        acc[o][U == 3 ? 1 : 0] = _mm512_fmadd_ps(_mm512_set1_ps(wo[1]), t1, acc[o][U == 3 ? 1 : 0]);
        acc[o][U == 3 ? 2 : 0] = _mm512_fmadd_ps(_mm512_set1_ps(wo[2]), t2, acc[o][U == 3 ? 2 : 0]);
      }
    }
  }
  for (int o = 0; o < NO; ++o) {
    __m512 sum = acc[o][0];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[o][u]);
    std::memcpy(out + o, &sum, sizeof(v16));
  }
}
#endif

// For the n weight rows w[0..n) (each at input channel c0's 9 taps): f(i0, count, acc) with acc[j] = the tile's
// convolution over input channels [c0, c1) with row w[i0 + j], in blocks of up to 16 rows. With AVX-512 the input
// is permuted in registers (tile_conv_fused); otherwise the tile's im2col is written to T once and multiplied.
template <typename F>
inline void tile_conv_rows(const Geometry& g, const float* in, int64_t c0, int64_t c1, int64_t ti, int64_t tj,
                           int64_t nr, const float* const* w, int64_t n, float* T, F f) {
#if defined(__AVX512F__)
  const int64_t origin = ti * TILE * g.rowlen + tj * TILE;
  v16 acc[16];
  in_row_blocks<16>(n, [&](auto no, int64_t i) {  // few rows: one accumulator per kernel column (U = 3)
    constexpr int NO = decltype(no)::value;
    tile_conv_fused<NO, (NO <= 4 ? 3 : 1)>(g, in, c0, c1, origin, nr, w + i, acc);
    f(i, NO, acc);
  });
  return;
#endif
  tile_im2col(g, in, c0, c1, ti, tj, nr, T);
  tile_gemm_rows(T, (c1 - c0) * 9, w, n, f);
}

// A tile's lanes (row r = lanes 4r..4r+3) from / to the plane rows at src / dst (row stride `stride`): nr rows of nc
// floats; lanes outside are zero when loading and not written when storing.
inline v16 load_tile(const float* src, int64_t stride, int64_t nr, int64_t nc) {
#if defined(__AVX512F__)
  if (nr == TILE && nc == TILE) {
    __m512 v = _mm512_castps128_ps512(_mm_loadu_ps(src));
    v = _mm512_insertf32x4(v, _mm_loadu_ps(src + stride), 1);
    v = _mm512_insertf32x4(v, _mm_loadu_ps(src + 2 * stride), 2);
    v = _mm512_insertf32x4(v, _mm_loadu_ps(src + 3 * stride), 3);
    v16 out;
    std::memcpy(&out, &v, sizeof(out));
    return out;
  }
#endif
  float a[16] = {};
  for (int64_t r = 0; r < nr; ++r) std::memcpy(a + r * TILE, src + r * stride, nc * sizeof(float));
  return load(a);
}

inline void store_tile(const v16& v, float* dst, int64_t stride, int64_t nr, int64_t nc) {
#if defined(__AVX512F__)
  if (nr == TILE && nc == TILE) {
    __m512 x;
    std::memcpy(&x, &v, sizeof(x));
    _mm_storeu_ps(dst, _mm512_castps512_ps128(x));
    _mm_storeu_ps(dst + stride, _mm512_extractf32x4_ps(x, 1));
    _mm_storeu_ps(dst + 2 * stride, _mm512_extractf32x4_ps(x, 2));
    _mm_storeu_ps(dst + 3 * stride, _mm512_extractf32x4_ps(x, 3));
    return;
  }
#endif
  float a[16];
  std::memcpy(a, &v, sizeof(v));
  for (int64_t r = 0; r < nr; ++r) std::memcpy(dst + r * stride, a + r * TILE, nc * sizeof(float));
}

// One gated convolution of one sample into P (tile-major Tensor[C_out, tiles, 16]; lanes outside the output are
// unspecified): the base conv plus bias, the decisions (mask Tensor[C_out, th, tw] of 0/1) and the rest on the on
// tiles. `in` holds the cin input channels as zero-padded regions of geometry g; w is Tensor[C_out, cin, 3, 3].
// Returns the gated-on output entries (positions of on tiles inside the output, summed over channels).
int64_t tile_gated_conv(const Geometry& g, const float* in, int64_t cin, int64_t base, const float* w,
                        const float* bias, int64_t cout, const float* thr, float* P, float* mask) {
  const TileGrid tg(g.Ho, g.Wo);
  const int64_t tiles = tg.th * tg.tw, Kb = base * 9, Kr = (cin - base) * 9;
  thread_local std::vector<float> im2col;
  im2col.resize(static_cast<size_t>(cin * 9 * 16));
  float* T = im2col.data();
  std::vector<const float*> wb(cout), wr(cout);
  std::vector<int64_t> on(cout);
  for (int64_t o = 0; o < cout; ++o) wb[o] = w + o * cin * 9;
  int64_t entries = 0;
  for (int64_t ti = 0; ti < tg.th; ++ti)
    for (int64_t tj = 0; tj < tg.tw; ++tj) {
      const int64_t t = ti * tg.tw + tj, nr = tg.rows(ti), nc = tg.cols(tj);
      const bool partial = nr < TILE || nc < TILE;
      v16 valid;  // 1 on the tile's lanes inside the output (partial tiles only)
      for (int64_t l = 0; partial && l < 16; ++l) valid[l] = (l / TILE < nr && l % TILE < nc) ? 1.f : 0.f;
      const float count = static_cast<float>(nr * nc);
      int64_t n = 0;
      tile_conv_rows(g, in, 0, base, ti, tj, nr, wb.data(), cout, T, [&](int64_t o0, int64_t no, v16* acc) {
        for (int64_t j0 = 0; j0 < no; j0 += 8) {  // the tile sums of 8 channels at a time
          const int64_t nj = std::min<int64_t>(8, no - j0);
          v16 summed[8];
          for (int64_t j = 0; j < nj; ++j) {
            v16& a = acc[j0 + j];
            a += bias[o0 + j0 + j];
            std::memcpy(P + ((o0 + j0 + j) * tiles + t) * 16, &a, sizeof(v16));
            summed[j] = partial ? a * valid : a;
          }
          for (int64_t j = nj; j < 8; ++j) summed[j] = v16{};
          float sums[8];
          hsum8(summed, sums);
          for (int64_t j = 0; j < nj; ++j) {
            const int64_t o = o0 + j0 + j;
            const bool keep = sums[j] > thr[o] * count;
            mask[o * tiles + t] = keep ? 1.f : 0.f;
            if (keep) on[n] = o, wr[n] = wb[o] + Kb, ++n;
          }
        }
      });
      if (n == 0 || Kr == 0) continue;
      entries += n * nr * nc;
      tile_conv_rows(g, in, base, cin, ti, tj, nr, wr.data(), n, T, [&](int64_t i0, int64_t ni, v16* acc) {
        for (int64_t j = 0; j < ni; ++j) {
          float* dst = P + (on[i0 + j] * tiles + t) * 16;
          const v16 sum = acc[j] + load(dst);
          std::memcpy(dst, &sum, sizeof(sum));
        }
      });
    }
  return entries;
}


}  // namespace

namespace dynnet {

// A basic residual block whose two 3x3 convolutions are channel-gated (tile 4), for one sample:
//   h = relu(k1 (p1 + s1 rest1) + c1),  y = relu(k2 (p2 + s2 rest2) + c2 + shortcut(x))
// with p = conv(x_base; W_base) + b, the decision s per (channel, 4x4 tile) = [mean_tile p > thr], and (k, c) the
// following batch norm as a per-channel affine map; a1 = Tensor[4, M] and a2 = Tensor[4, C_out] hold the rows
// (b, thr, k, c) of each convolution. conv1 has the given stride (1 or 2), conv2 stride 1; both pad 1.
// The shortcut is `residual` (Tensor[1, C_out, Ho, Wo]), the BN-folded 1x1 projection (shortcut_w Tensor[C_out,
// C_in], shortcut_b) of the given stride, or none.
// Returns (y Tensor[1, C_out, Ho, Wo], mask1 Tensor[M, th, tw], mask2 Tensor[C_out, th, tw], entries1, entries2):
// the decisions and each convolution's gated-on output entries.
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t> tile_gated_pair3x3(
    const at::Tensor& x, const at::Tensor& w1, const at::Tensor& a1, int64_t base1, const at::Tensor& w2,
    const at::Tensor& a2, int64_t base2, int64_t stride, const c10::optional<at::Tensor>& residual_in,
    const c10::optional<at::Tensor>& shortcut_w, const c10::optional<at::Tensor>& shortcut_b) {
  check(x, 4, "x");
  check(w1, 4, "w1");
  check(w2, 4, "w2");
  check(a1, 2, "a1");
  check(a2, 2, "a2");
  const char* op = "tile_gated_pair3x3";
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), M = w1.size(0), CO = w2.size(0);
  TORCH_CHECK(x.size(0) == 1, op, ": one sample, got a batch of ", x.size(0));
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  TORCH_CHECK(H > 0 && W > 0, op, ": empty input ", x.sizes());
  TORCH_CHECK(w1.size(1) == C && w1.size(2) == 3 && w1.size(3) == 3, op, ": w1 must be [M, ", C, ", 3, 3], got ",
              w1.sizes());
  TORCH_CHECK(w2.size(1) == M && w2.size(2) == 3 && w2.size(3) == 3, op, ": w2 must be [C_out, ", M,
              ", 3, 3], got ", w2.sizes());
  TORCH_CHECK(base1 >= 1 && base1 <= C && base2 >= 1 && base2 <= M, op, ": base groups must be in [1, C_in], got ",
              base1, " of ", C, " and ", base2, " of ", M);
  TORCH_CHECK(a1.size(0) == 4 && a1.size(1) == M, op, ": a1 must be [4, ", M, "] (bias, threshold, scale, shift), got ",
              a1.sizes());
  TORCH_CHECK(a2.size(0) == 4 && a2.size(1) == CO, op, ": a2 must be [4, ", CO,
              "] (bias, threshold, scale, shift), got ", a2.sizes());
  const float* a1p = a1.data_ptr<float>();
  const float* a2p = a2.data_ptr<float>();
  const float *b1 = a1p, *thr1 = a1p + M, *k1p = a1p + 2 * M, *c1p = a1p + 3 * M;
  const float *b2 = a2p, *thr2 = a2p + CO, *k2p = a2p + 2 * CO, *c2p = a2p + 3 * CO;
  const Geometry g1(H, W, stride);
  const Geometry g2(g1.Ho, g1.Wo, 1);
  const int64_t Ho = g1.Ho, Wo = g1.Wo;
  at::Tensor residual;
  if (shortcut_w.has_value() && shortcut_w->defined()) {
    TORCH_CHECK(!(residual_in.has_value() && residual_in->defined()) && shortcut_b.has_value() &&
                    shortcut_b->defined(), op, ": a shortcut needs shortcut_b and no residual");
    residual = shortcut1x1(x, *shortcut_w, *shortcut_b, stride);
  } else if (residual_in.has_value() && residual_in->defined()) {
    residual = *residual_in;
    check(residual, 4, "residual");
    TORCH_CHECK(residual.size(0) == 1 && residual.size(1) == CO && residual.size(2) == Ho && residual.size(3) == Wo,
                op, ": residual must be [1, ", CO, ", ", Ho, ", ", Wo, "], got ", residual.sizes());
  }
  const TileGrid tg(Ho, Wo);
  at::Tensor mask1 = at::empty({M, tg.th, tg.tw}, x.options());
  at::Tensor mask2 = at::empty({CO, tg.th, tg.tw}, x.options());
  at::Tensor y = at::empty({1, CO, Ho, Wo}, x.options());
  // conv1 from the zero-padded input into p1, its epilogue (bn1, relu) into conv2's zero-padded input planes.
  float* xp = scratch(g1, C, 0);
  fill_padded(xp, g1, x.data_ptr<float>(), nullptr, C);
  const int64_t tiles = tg.th * tg.tw;
  thread_local std::vector<float> p1buf, p2buf;
  p1buf.resize(static_cast<size_t>(M * tiles * 16));
  p2buf.resize(static_cast<size_t>(CO * tiles * 16));
  float* p1 = p1buf.data();
  const int64_t e1 = tile_gated_conv(g1, xp, C, base1, w1.data_ptr<float>(), b1, M, thr1, p1, mask1.data_ptr<float>());
  float* hp = scratch(g2, M, 1);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t ti = 0; ti < tg.th; ++ti)
      for (int64_t tj = 0; tj < tg.tw; ++tj) {
        v16 h = load(p1 + (m * tiles + ti * tg.tw + tj) * 16) * k1p[m] + c1p[m];
        h = h > 0.f ? h : 0.f;
        const int64_t nr = tg.rows(ti), nc = tg.cols(tj);
        float* dst = hp + m * g2.region + g2.at(ti * TILE + 1, tj * TILE + 1);
        store_tile(h, dst, g2.rowlen, nr, nc);
      }
  // conv2, then bn2, the shortcut and the ReLU into y.
  float* p2 = p2buf.data();
  const int64_t e2 = tile_gated_conv(g2, hp, M, base2, w2.data_ptr<float>(), b2, CO, thr2, p2, mask2.data_ptr<float>());
  float* yp = y.data_ptr<float>();
  const float* res = residual.defined() ? residual.data_ptr<float>() : nullptr;
  for (int64_t o = 0; o < CO; ++o)
    for (int64_t ti = 0; ti < tg.th; ++ti)
      for (int64_t tj = 0; tj < tg.tw; ++tj) {
        const int64_t nr = tg.rows(ti), nc = tg.cols(tj), at = (o * Ho + ti * TILE) * Wo + tj * TILE;
        v16 v = load(p2 + (o * tiles + ti * tg.tw + tj) * 16) * k2p[o] + c2p[o];
        if (res != nullptr) v += load_tile(res + at, Wo, nr, nc);
        v = v > 0.f ? v : 0.f;
        store_tile(v, yp + at, Wo, nr, nc);
      }
  return {y, mask1, mask2, e1, e2};
}

}  // namespace dynnet

namespace dynnet {

// GaterNet's gater network for one sample, batch norms folded (reference: GaterNetwork.inference_logits):
//   h1 = relu(conv3x3(x; w1, b1, stride s1)), h2 = relu(conv3x3(h1; w2, b2, stride s2)) (padding 1),
//   z = relu(wl mean_hw(h2) + bl), logits = wf z + bf.
// x Tensor[1, C, H, W], w1 Tensor[C1, C, 3, 3], w2 Tensor[C2, C1, 3, 3], wl Tensor[J, C2], wf Tensor[F, J].
// Returns logits Tensor[1, F].
at::Tensor gater_logits(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, int64_t s1,
                        const at::Tensor& w2, const at::Tensor& b2, int64_t s2, const at::Tensor& wl,
                        const at::Tensor& bl, const at::Tensor& wf, const at::Tensor& bf) {
  const char* op = "gater_logits";
  check(x, 4, "x");
  check(w1, 4, "w1");
  check(w2, 4, "w2");
  TORCH_CHECK(x.size(0) == 1 && x.size(2) > 0 && x.size(3) > 0, op, ": one non-empty sample, got ", x.sizes());
  TORCH_CHECK((s1 == 1 || s1 == 2) && (s2 == 1 || s2 == 2), op, ": strides must be 1 or 2, got ", s1, " and ", s2);
  const int64_t C = x.size(1), C1 = w1.size(0), C2 = w2.size(0), J = wl.size(0), F = wf.size(0);
  TORCH_CHECK(w1.size(1) == C && w1.size(2) == 3 && w1.size(3) == 3, op, ": w1 must be [C1, ", C, ", 3, 3], got ",
              w1.sizes());
  TORCH_CHECK(w2.size(1) == C1 && w2.size(2) == 3 && w2.size(3) == 3, op, ": w2 must be [C2, ", C1,
              ", 3, 3], got ", w2.sizes());
  check_gate(b1, "b1", C1, -1);
  check_gate(b2, "b2", C2, -1);
  check_gate(wl, "wl", J, C2);
  check_gate(bl, "bl", J, -1);
  check_gate(wf, "wf", F, J);
  check_gate(bf, "bf", F, -1);
  const Geometry g1(x.size(2), x.size(3), s1);
  const Geometry g2(g1.Ho, g1.Wo, s2);
  float* xp = scratch(g1, C, 0);
  fill_padded(xp, g1, x.data_ptr<float>(), nullptr, C);
  float* hp = scratch(g2, C1, 1);
  const float* w1p = w1.data_ptr<float>();
  const float* b1p = b1.data_ptr<float>();
  std::vector<const float*> rows1(C1), rows2(C2);
  std::vector<int64_t> coff1(C), coff2(C1);
  for (int64_t o = 0; o < C1; ++o) rows1[o] = w1p + o * C * 9;
  for (int64_t c = 0; c < C; ++c) coff1[c] = c * 9;
  conv_all(g1, xp, C, coff1.data(), rows1, [&](int64_t o0, int64_t no, int64_t p0, const v16* acc) {
    const RowRuns runs(g1, p0);
    for (int64_t o = 0; o < no; ++o) {
      const float bias = b1p[o0 + o];
      const float* a = reinterpret_cast<const float*>(acc + o * NV);
      float* dst = hp + (o0 + o) * g2.region;
      for (int64_t i = 0; i < runs.n; ++i) {
        if (g2.stride == 1) {  // a run of output columns is a run of padded columns
          float* d = dst + g2.at(runs.r[i] + 1, runs.col[i] + 1) - runs.j0[i];
          for (int64_t j = runs.j0[i]; j < runs.j1[i]; ++j) d[j] = std::max(a[j] + bias, 0.f);
        } else {  // stride 2 reads phases: consecutive columns alternate between two of them
          for (int64_t j = runs.j0[i]; j < runs.j1[i]; ++j)
            dst[g2.at(runs.r[i] + 1, runs.col[i] + j - runs.j0[i] + 1)] = std::max(a[j] + bias, 0.f);
        }
      }
    }
  });
  const float* w2p = w2.data_ptr<float>();
  const float* b2p = b2.data_ptr<float>();
  for (int64_t o = 0; o < C2; ++o) rows2[o] = w2p + o * C1 * 9;
  for (int64_t c = 0; c < C1; ++c) coff2[c] = c * 9;
  // Per (position block, channel) partial sums (blocks may run on different threads), then the means.
  const int64_t pblocks = (g2.L + VB - 1) / VB;
  std::vector<float> partial(pblocks * C2, 0.f), mean(C2, 0.f);
  conv_all(g2, hp, C1, coff2.data(), rows2, [&](int64_t o0, int64_t no, int64_t p0, const v16* acc) {
    const RowRuns runs(g2, p0);
    for (int64_t o = 0; o < no; ++o) {
      const float bias = b2p[o0 + o];
      const float* a = reinterpret_cast<const float*>(acc + o * NV);
      float sum = 0.f;
      for (int64_t i = 0; i < runs.n; ++i)
        for (int64_t j = runs.j0[i]; j < runs.j1[i]; ++j) sum += std::max(a[j] + bias, 0.f);
      partial[(p0 / VB) * C2 + o0 + o] = sum;
    }
  });
  for (int64_t b = 0; b < pblocks; ++b)
    for (int64_t o = 0; o < C2; ++o) mean[o] += partial[b * C2 + o];
  for (auto& m : mean) m /= static_cast<float>(g2.Ho * g2.Wo);
  std::vector<float> z(J);
  matvec(wl.data_ptr<float>(), mean.data(), bl.data_ptr<float>(), J, C2, z.data());
  for (auto& v : z) v = std::max(v, 0.f);
  at::Tensor logits = at::empty({1, F}, x.options());
  matvec(wf.data_ptr<float>(), z.data(), bf.data_ptr<float>(), F, J, logits.data_ptr<float>());
  return logits;
}

}  // namespace dynnet
