// dynnet compiled CPU kernels: recipe kernels of the channel family, whole decision networks of specific recipes
// for one sample, each with its reference in the recipe (dynnet.methods.channel):
//
//   agent_step, routed_pair3x3 — the recurrent routing agent of RNP (runtime neural pruning) and runtime routing
//                                (reference: dynnet.methods.channel._agent.QAgent); routed_pair3x3 adds the block
//                                it routes (gated_pair3x3 of channel.cpp with given binary multipliers);
//   gater_logits               — GaterNet's gater network (reference: dynnet.methods.channel.gaternet.GaterNetwork).
//
// They are built from the shared direct convolution and helpers of channel_conv.h.
#include "channel_conv.h"

#include <algorithm>
#include <cmath>
#include <vector>

using namespace dynnet::channel_conv;

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
