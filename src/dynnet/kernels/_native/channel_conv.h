// dynnet compiled CPU kernels: the direct 3x3 convolution that the channel kernels share (channel.cpp,
// channel_tile.cpp, recipe_channel.cpp), for one sample at a time.
//
// A 3x3 convolution (padding 1, stride 1 or 2) runs over a zero-padded, flattened copy of each input plane:
// output position p = r * (W + 2) + c reads input p + ky * (W + 2) + kx, so every tap is a contiguous run of
// positions and a register block of 4 output channels x 64 positions is updated by vector FMAs with broadcast
// weights. The cost is linear in the channels computed or read (no im2col of the input, no GEMM whose efficiency
// falls with a narrow matrix), which is what batch-1 channel gating needs. The two columns per row that fall on
// the padding are computed and discarded (or zeroed in a padded destination, where they land on its padding).
//
// The templates and small types are defined here (inlined where they are used); the functions declared at the end
// are defined in channel.cpp.
#pragma once
#include "native.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

namespace dynnet {
namespace channel_conv {

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
// saves on small convolutions, and more between calls separated by Python than back to back. One value for the
// whole extension (an inline variable), set by dynnet::set_parallel_min_macs. Default measured: ResNet-20 blocks at
// batch 1 ran fastest on one thread.
inline std::atomic<int64_t> parallel_min{int64_t{1} << 22};

inline int64_t parallel_min_macs() { return parallel_min.load(std::memory_order_relaxed); }

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

// A zero-initialised scratch buffer of `channels` regions of geometry g, kept per thread and per geometry (slot:
// which of a call's buffers). Only interior positions are ever written (input copies, epilogues), so the padding
// stays zero across calls and the buffer is not cleared again.
float* scratch(const Geometry& g, int64_t channels, int slot);

// Copies input planes into zero-padded regions of `dst` (phases for stride 2): region i <- plane channels[i]
// (plane i when `channels` is null) of the Tensor[C, H, W] data at `xs`.
void fill_padded(float* dst, const Geometry& g, const float* xs, const int64_t* channels, int64_t count);

// Checks that t is a contiguous float32 CPU tensor of `dim` dimensions (name: the operand, for the message).
void check(const at::Tensor& t, int64_t dim, const char* name);

// A gate operand: Tensor[rows, cols] (cols < 0: Tensor[rows]).
void check_gate(const at::Tensor& t, const char* name, int64_t rows, int64_t cols);

// Per-channel spatial means of one sample's planes (of |x| when `absolute`): x Tensor[1, C, H, W] -> out[C].
void channel_means(const at::Tensor& x, bool absolute, float* out);

// out[r] = bias[r] + sum_c w[r, c] * v[c] for a row-major Tensor[R, C] at w.
void matvec(const float* w, const float* v, const float* bias, int64_t R, int64_t C, float* out);

// The projection shortcut of a downsampling block, BN folded: a 1x1 convolution of stride s (padding 0),
// Tensor[1, C, H, W] -> Tensor[1, C_out, Ho, Wo] with w Tensor[C_out, C], b Tensor[C_out].
at::Tensor shortcut1x1(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t s);

}  // namespace channel_conv
}  // namespace dynnet
