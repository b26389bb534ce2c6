// dynnet compiled CPU kernels: the channel-sliced pair of 3x3 convolutions for one sample (batch-1 inference of
// the channel-gating recipes; reference: dynnet.kernels.channel.sliced_pair_single), the same pair with its gate
// computed in the call (gated_pair3x3), and a 3x3 convolution reading only the active input channels (conv3x3_in).
//
//   y = conv2(relu(conv1(x; W1[S], b1[S])) * s[S]; W2[:, S]) + b2,   S = {c : s[c] != 0}
//
// Both convolutions are 3x3 with padding 1; conv1 has stride 1 or 2, conv2 stride 1. They run as the direct
// convolution of channel_conv.h, whose out-of-line helpers are defined here too.
#include "channel_conv.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace dynnet {
namespace channel_conv {

// The out-of-line helpers declared in channel_conv.h (documented there).

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

void check(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dim && t.is_contiguous(),
              "dynnet kernel: ", name, " must be a contiguous float32 CPU tensor of ", dim, " dims, got ",
              t.sizes(), " ", t.scalar_type());
}

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

void matvec(const float* w, const float* v, const float* bias, int64_t R, int64_t C, float* out) {
  for (int64_t r = 0; r < R; ++r) {
    const float* wr = w + r * C;
    float acc = 0.f;
    for (int64_t c = 0; c < C; ++c) acc += wr[c] * v[c];
    out[r] = acc + bias[r];
  }
}

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

void check_gate(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  check(t, cols < 0 ? 1 : 2, name);
  TORCH_CHECK(t.size(0) == rows && (cols < 0 || t.size(1) == cols), "dynnet kernel: ", name, " must have ", rows,
              " rows", cols < 0 ? "" : " and columns: ", cols < 0 ? 0 : cols, ", got ", t.sizes());
}

}  // namespace channel_conv
}  // namespace dynnet

using namespace dynnet::channel_conv;

namespace {

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

// The pair for one sample with the channel multipliers `s` (M floats; kept channels are the non-zero ones), after
// the operand checks. Returns (y, number of kept channels).
// With `instance_ratio` (a per-sample channel-norm threshold), conv1 computes every channel and the kept channels
// are those whose root-mean-square output exceeds ratio x the mean over channels (and is non-zero); conv2 reads
// only those, and `s` receives the 0/1 decision (its input values are ignored). The count returned is then conv2's
// input channels.
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
  // pair_impl writes to its multipliers only for the channel-norm threshold, which this op does not run.
  return pair_impl(x, w1, b1, w2, b2, const_cast<float*>(scale.data_ptr<float>()), binary, stride, residual, relu,
                   "sliced_pair3x3");
}

// The block's decision and the pair in one call (reference: the recipes' Python inference gates, then
// sliced_pair3x3). Gate kinds, on the block input x Tensor[1, C, H, W] (M inner channels):
//   GATE_MLP (0):  h = relu(gw1 mean_hw(x) + gb1) (gw1 Tensor[J, C], BN folded), logits = gw2 h + gb2
//                  (gw2 Tensor[M, J]); channel m is kept (multiplier 1) where logits[m] > 0;
//   GATE_KWTA (1): g = relu(gw1 mean_hw|x| + gb1) (gw1 Tensor[M, C]); the k largest g are kept (ties: lowest index)
//                  with multiplier g (boosting; a kept g of 0 is a channel off). gw2, gb2 unused.
//   GATE_GIVEN (2): the multipliers gw1 Tensor[M] (a decision made outside: a controller, a fixed subset); with
//                  k != 0 they are binary (non-zero = kept, multiplier 1). gb1, gw2, gb2 unused;
//   GATE_INSTANCE (3): conv1 computes every channel; conv2 reads those whose RMS exceeds gw1[0] x their mean
//                  (a per-sample channel-norm threshold; gw1 Tensor[1] the ratio). The count is conv2's inputs.
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
