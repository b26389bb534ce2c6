// dynnet compiled CPU kernels: channel gating (Hua et al.) for one sample, per (output channel, 4x4 tile) decisions
// on a partial sum: tile_gated_pair3x3, a whole basic residual block (Python: dynnet.kernels.channel.
// tile_gated_pair_op; references: tile_gated_pair_reference there, and dynnet.methods.channel.channel_gating.GatedConv
// (tile = 4) inside a basic residual block).
//
// Each 3x3 convolution (padding 1) is split over its input channels: the base group [0, base) is always computed
// (p = conv(x_base; W_base) + b); channel o's tile of 4x4 output positions is *on* when the mean of p over the
// tile's positions inside the output exceeds thr[o]; only on tiles receive the rest, conv(x_rest; W_rest).
// Everything runs tile by tile on one 16-float vector per (channel, tile): an im2col of the tile's receptive field
// (Tensor[K, 16], one row per input channel and tap) times weight rows, 8 output channels at a time, one vector FMA
// per row and channel and no wasted lanes. The base rows go to every output channel; the tile sums decide; the
// rest rows are gathered only when some channel is on, and multiplied only by the on channels' rows. Results stay
// tile-major (Tensor[C_out, tiles, 16]) until the epilogue writes them out.
#include "channel_conv.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

using namespace dynnet::channel_conv;

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
