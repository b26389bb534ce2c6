// dynnet compiled CPU kernels: whole spatial (pixel and tile) executions of a residual branch in one call each.
//
// pixel_chain: the gather-GEMM chain of dynnet.kernels.chain.run_pixels (its pure-PyTorch reference). For
// every stage it turns the stage's mask into positions, per-sample counts and a position -> row lookup in one pass
// (no nonzero / full / index_put), gathers the im2col rows of L2-sized chunks and multiplies them on every thread at
// once (oneDNN's matmul with bias and ReLU fused; small chunks of narrow layers: small_gemm), and hands the compact
// rows to the next stage.
//
// gather_tile_regions / zero_outside_tiles_ / scatter_tiles_add: the copies around SBNet's tile convolutions
// (dynnet.kernels.block.gather_tiles / scatter_tiles and the border zeroing of run_tiles), each one pass of
// contiguous pixel rows instead of index tensors built and applied with several ops.
//
// squeeze_logits: DynConv's squeeze mask unit (SACT's halting unit) at inference in one pass.
#include "native.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));  // GCC vector: AVX-512, else split

// Output length of a convolution along one axis (dynnet.kernels.spatial.conv_out_size).
int64_t conv_out(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

// The set entries of a bool mask Tensor[N, H, W]: positions Tensor[P, 3] int64 (n, h, w) in row-major order (that of
// mask.nonzero()), the count per sample and, when asked, the lookup Tensor[N, H, W] int64 from position to row (P,
// the index of the zero row appended to the rows, where the mask is unset).
struct Active {
  at::Tensor positions;
  std::vector<int64_t> counts;
  at::Tensor lookup;
};

Active active_of(const at::Tensor& mask, bool with_lookup) {
  const int64_t N = mask.size(0), H = mask.size(1), W = mask.size(2), HW = H * W;
  const bool* m = mask.data_ptr<bool>();
  Active a;
  a.counts.assign(N, 0);
  int64_t P = 0;
  for (int64_t n = 0; n < N; ++n) {
    int64_t c = 0;
    for (int64_t i = 0; i < HW; ++i) c += m[n * HW + i];
    a.counts[n] = c;
    P += c;
  }
  a.positions = at::empty({P, 3}, mask.options().dtype(at::kLong));
  int64_t* pos = a.positions.data_ptr<int64_t>();
  int64_t* lk = nullptr;
  if (with_lookup) {
    a.lookup = at::empty({N, H, W}, mask.options().dtype(at::kLong));
    lk = a.lookup.data_ptr<int64_t>();
  }
  int64_t r = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const int64_t i = (n * H + h) * W + w;
        if (m[i]) {
          pos[3 * r] = n, pos[3 * r + 1] = h, pos[3 * r + 2] = w;
          if (lk) lk[i] = r;
          ++r;
        } else if (lk) {
          lk[i] = P;
        }
      }
  return a;
}

// How many row chunks to split P rows of `width` gathered elements into: chunks of at most max_elements elements
// (they stay in cache between the gather and the matmul), and, on several threads, a multiple of the thread count
// of at least min_rows rows each (every thread gathers and multiplies whole chunks). One chunk: oneDNN's own
// threads split its matmul.
int64_t row_chunk(int64_t P, int64_t width, int64_t max_elements, int64_t min_rows) {
  const int64_t most = std::max<int64_t>(min_rows, max_elements / std::max<int64_t>(width, 1));
  int64_t chunks = (P + most - 1) / most;
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && P >= 2 * min_rows) {
    chunks = std::min(((chunks + threads - 1) / threads) * threads, P / min_rows);
  }
  chunks = std::max<int64_t>(chunks, 1);
  return (P + chunks - 1) / chunks;
}

// The most MACs of a chunk multiplied by small_gemm (oneDNN's matmul costs ~14 µs a call on top of the arithmetic;
// ours runs narrow layers at a lower rate per MAC, so it pays only for small chunks).
constexpr int64_t kSmallGemmMacs = int64_t{1} << 20;

// dst[M, N] = relu?(a[M, K] @ w + bias) for a narrow layer (N <= NV * 16), w given zero-padded as [K][NV * 16] and
// bias as [NV * 16]: blocks of 4 rows accumulate in 4 * NV vector registers. For the 8-32 output channels of narrow
// networks this takes a few microseconds where oneDNN's matmul spends ~14 µs setting up each call.
template <int NV>
void small_gemm(const float* a, int64_t M, int64_t K, const float* w, const float* bias, bool relu, float* dst,
                int64_t N) {
  constexpr int NR = 4;
  for (int64_t i = 0; i < M; i += NR) {
    const float* rows[NR];
    for (int r = 0; r < NR; ++r) rows[r] = a + std::min<int64_t>(i + r, M - 1) * K;  // past the end: repeat a row
    vfloat acc[NR][NV];
    for (int v = 0; v < NV; ++v) {
      vfloat b0;
      std::memcpy(&b0, bias + v * kLanes, sizeof(vfloat));
      for (int r = 0; r < NR; ++r) acc[r][v] = b0;
    }
    for (int64_t k = 0; k < K; ++k) {
      vfloat wv[NV];
      std::memcpy(wv, w + k * NV * kLanes, sizeof(wv));
      for (int r = 0; r < NR; ++r) {
        const vfloat av = vfloat{} + rows[r][k];
        for (int v = 0; v < NV; ++v) acc[r][v] += av * wv[v];
      }
    }
    for (int r = 0; r < NR && i + r < M; ++r) {
      float lanes[NV * kLanes];
      std::memcpy(lanes, acc[r], sizeof(lanes));
      float* o = dst + (i + r) * N;
      for (int64_t j = 0; j < N; ++j) o[j] = relu ? std::max(lanes[j], 0.f) : lanes[j];
    }
  }
}

void check_tiles(const at::Tensor& tiles, const char* who) {
  TORCH_CHECK(tiles.device().is_cpu() && tiles.dim() == 2 && tiles.size(1) == 3 && tiles.scalar_type() == at::kLong,
              who, ": tiles must be an int64 CPU Tensor[T, 3] (n, ty, tx), got ", tiles.sizes(), " ",
              tiles.scalar_type());
}

}  // namespace

namespace dynnet {

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_chain(
    const at::Tensor& image, at::TensorList masks, at::TensorList weights,
    const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef out_channels, at::IntArrayRef geometry,
    at::IntArrayRef flags, int64_t chunk_elements, int64_t min_rows) {
  const int64_t L = static_cast<int64_t>(masks.size());
  TORCH_CHECK(L >= 1, "pixel_chain: no stages");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L && static_cast<int64_t>(biases.size()) == L &&
                  static_cast<int64_t>(out_channels.size()) == L && static_cast<int64_t>(flags.size()) == L &&
                  static_cast<int64_t>(geometry.size()) == 4 * L,
              "pixel_chain: one weight, bias, out_channels, flags and 4 geometry numbers per stage (", L,
              " masks)");
  TORCH_CHECK(chunk_elements >= 1 && min_rows >= 1, "pixel_chain: chunk_elements and min_rows must be >= 1");
  TORCH_CHECK(image.device().is_cpu() && image.dim() == 4 && image.scalar_type() == at::kFloat &&
                  image.is_contiguous(),
              "pixel_chain: image must be a contiguous float32 CPU Tensor[N, H, W, C] (channels-last pixels), got ",
              image.sizes(), " ", image.scalar_type());
  const int64_t N = image.size(0);
  int64_t H = image.size(1), W = image.size(2), C = image.size(3);
  at::Tensor executed = at::zeros({N}, image.options().dtype(at::kDouble));
  double* ex = executed.data_ptr<double>();
  at::Tensor rows = image.view({N * H * W, C}), lookup, positions;
  for (int64_t s = 0; s < L; ++s) {
    const int64_t k = geometry[4 * s], stride = geometry[4 * s + 1], pad = geometry[4 * s + 2],
                  dil = geometry[4 * s + 3], c_out = out_channels[s];
    TORCH_CHECK(k > 0 && stride > 0 && pad >= 0 && dil > 0 && c_out >= 1, "pixel_chain: bad geometry of stage ", s);
    const int64_t ho = conv_out(H, k, stride, pad, dil), wo = conv_out(W, k, stride, pad, dil);
    const at::Tensor& mask = masks[s];
    TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kBool && mask.is_contiguous() &&
                    mask.dim() == 3 && mask.size(0) == N && mask.size(1) == ho && mask.size(2) == wo,
                "pixel_chain: the mask of stage ", s, " must be a contiguous bool Tensor[", N, ", ", ho, ", ", wo,
                "], got ", mask.sizes(), " ", mask.scalar_type());
    const at::Tensor& weight = weights[s];
    const int64_t width = k * k * C;
    const bool relu = (flags[s] & 1) != 0, own = (flags[s] & 2) != 0;
    const c10::optional<at::Tensor> bias = biases.get(s);
    // A narrow layer may also use our own GEMM (for chunks too small for oneDNN's set-up to pay): the weight
    // transposed to [K][C_out] and zero-padded to whole vectors.
    const int nv = static_cast<int>((c_out + kLanes - 1) / kLanes);
    std::vector<float> wpad, bpad;
    if (own) {
      TORCH_CHECK(nv <= 2 && !weight.is_mkldnn() && weight.device().is_cpu() && weight.scalar_type() == at::kFloat,
                  "pixel_chain: stage ", s, " (own GEMM allowed: at most ", 2 * kLanes,
                  " output channels) needs a plain float32 CPU weight");
      TORCH_CHECK(weight.dim() == 2 && weight.size(0) == c_out && weight.size(1) == width,
                  "pixel_chain: the weight of stage ", s, " must be Tensor[", c_out, ", ", width, "], got ",
                  weight.sizes());
      const at::Tensor wc = weight.contiguous();
      const float* w0 = wc.data_ptr<float>();
      wpad.assign(width * nv * kLanes, 0.f);
      bpad.assign(nv * kLanes, 0.f);
      for (int64_t o = 0; o < c_out; ++o)
        for (int64_t q = 0; q < width; ++q) wpad[q * nv * kLanes + o] = w0[o * width + q];
      if (bias.has_value() && bias->defined()) {
        TORCH_CHECK(bias->numel() == c_out && bias->scalar_type() == at::kFloat && bias->device().is_cpu(),
                    "pixel_chain: the bias of stage ", s, " must be a float32 Tensor[", c_out, "]");
        const at::Tensor bc = bias->contiguous();
        std::memcpy(bpad.data(), bc.data_ptr<float>(), c_out * sizeof(float));
      }
    } else if (!weight.is_mkldnn()) {
      TORCH_CHECK(weight.dim() == 2 && weight.size(0) == c_out && weight.size(1) == width,
                  "pixel_chain: the weight of stage ", s, " must be Tensor[", c_out, ", ", width, "], got ",
                  weight.sizes());
    }
    const bool last = s == L - 1;
    Active act = active_of(mask, !last);
    const int64_t P = act.positions.size(0);
    for (int64_t n = 0; n < N; ++n) ex[n] += static_cast<double>(act.counts[n]) * width * c_out;
    // Rows of this stage, plus (before the last stage) the zero row that the next stage's lookup holes point at.
    at::Tensor out = at::empty({P + (last ? 0 : 1), c_out}, image.options());
    float* dst = out.data_ptr<float>();
    if (!last) std::memset(dst + P * c_out, 0, c_out * sizeof(float));
    if (P > 0) {
      const int64_t chunk = row_chunk(P, width, chunk_elements, min_rows);
      gather_chunks(s == 0 ? image : rows, s == 0 ? nullptr : &lookup, act.positions, k, stride, pad, dil, chunk,
                    [&](const at::Tensor& cols, int64_t i, int64_t j) {
                      if (own && (j - i) * width * c_out <= kSmallGemmMacs) {
                        const float* a = cols.data_ptr<float>();
                        float* o = dst + i * c_out;
                        if (nv == 1) small_gemm<1>(a, j - i, width, wpad.data(), bpad.data(), relu, o, c_out);
                        else small_gemm<2>(a, j - i, width, wpad.data(), bpad.data(), relu, o, c_out);
                      } else {
                        onednn_chunk(cols, weight, bias, relu, i, j, c_out, dst, "pixel_chain");
                      }
                    });
    }
    rows = out, lookup = act.lookup, positions = act.positions;
    H = ho, W = wo, C = c_out;
  }
  return {rows, positions, executed};
}

// The input regions of the active tiles, Tensor[T, region, region, C] (zeros outside the image), cut out of a
// channels-last image Tensor[N, H, W, C]: tile (n, ty, tx) covers rows ty·step + offset + [0, region) and the same
// columns.
at::Tensor gather_tile_regions(const at::Tensor& image, const at::Tensor& tiles, int64_t region, int64_t offset,
                               int64_t step) {
  TORCH_CHECK(image.device().is_cpu() && image.dim() == 4 && image.scalar_type() == at::kFloat &&
                  image.is_contiguous(),
              "gather_tile_regions: image must be a contiguous float32 CPU Tensor[N, H, W, C], got ", image.sizes());
  check_tiles(tiles, "gather_tile_regions");
  TORCH_CHECK(region >= 1 && step >= 1, "gather_tile_regions: region and step must be >= 1");
  const int64_t N = image.size(0), H = image.size(1), W = image.size(2), C = image.size(3), T = tiles.size(0);
  at::Tensor out = at::empty({T, region, region, C}, image.options());
  const int64_t ts = tiles.stride(0), tc = tiles.stride(1);
  const int64_t* tl = tiles.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(tl[ts * t] >= 0 && tl[ts * t] < N, "gather_tile_regions: tile ", t, "'s batch index ", tl[ts * t],
                " is outside [0, ", N, ")");
  const float* src = image.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const size_t row = C * sizeof(float);
  at::parallel_for(0, T * region, std::max<int64_t>(1, 4096 / std::max<int64_t>(region * C, 1)), [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const int64_t t = q / region, y = q % region;
      const int64_t n = tl[ts * t], iy = tl[ts * t + tc] * step + offset + y, x0 = tl[ts * t + 2 * tc] * step + offset;
      float* o = dst + q * region * C;
      if (iy < 0 || iy >= H) {
        std::memset(o, 0, region * row);
        continue;
      }
      const int64_t lo = std::clamp<int64_t>(-x0, 0, region), hi = std::clamp<int64_t>(W - x0, lo, region);
      if (lo > 0) std::memset(o, 0, lo * row);
      if (hi > lo) std::memcpy(o + lo * C, src + ((n * H + iy) * W + x0 + lo) * C, (hi - lo) * row);
      if (hi < region) std::memset(o + hi * C, 0, (region - hi) * row);
    }
  });
  return out;
}

// Zeroes, in place, the positions of each tile's region (Tensor[T, C, region, region], any strides) that lie outside
// an H x W grid: the zero padding the next convolution of the chain would read there.
void zero_outside_tiles_(at::Tensor& values, const at::Tensor& tiles, int64_t offset, int64_t step, int64_t H,
                         int64_t W) {
  check_tiles(tiles, "zero_outside_tiles_");
  TORCH_CHECK(values.device().is_cpu() && values.dim() == 4 && values.scalar_type() == at::kFloat &&
                  values.size(0) == tiles.size(0) && values.size(2) == values.size(3),
              "zero_outside_tiles_: values must be a float32 CPU Tensor[T, C, r, r] with T = ", tiles.size(0),
              ", got ", values.sizes());
  const int64_t T = values.size(0), C = values.size(1), r = values.size(2);
  const int64_t st = values.stride(0), sc = values.stride(1), sy = values.stride(2), sx = values.stride(3);
  const int64_t ts = tiles.stride(0), tc = tiles.stride(1);
  const int64_t* tl = tiles.data_ptr<int64_t>();
  float* v = values.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t y0 = tl[ts * t + tc] * step + offset, x0 = tl[ts * t + 2 * tc] * step + offset;
      if (y0 >= 0 && x0 >= 0 && y0 + r <= H && x0 + r <= W) continue;
      for (int64_t y = 0; y < r; ++y) {
        const bool row_out = y0 + y < 0 || y0 + y >= H;
        for (int64_t x = 0; x < r; ++x) {
          if (!row_out && x0 + x >= 0 && x0 + x < W) continue;
          float* p = v + t * st + y * sy + x * sx;
          if (sc == 1) {
            std::memset(p, 0, C * sizeof(float));
          } else {
            for (int64_t c = 0; c < C; ++c) p[c * sc] = 0.f;
          }
        }
      }
    }
  });
}

// base (Tensor[N, C, H, W]) plus the output tiles values (Tensor[T, C, tile, tile]) at tiles, as a new tensor in
// base's memory format (base is not modified); tile positions outside the image are dropped. Tiles must not
// overlap (distinct (n, ty, tx)).
at::Tensor scatter_tiles_add(const at::Tensor& base, const at::Tensor& values, const at::Tensor& tiles,
                             int64_t tile) {
  check_tiles(tiles, "scatter_tiles_add");
  TORCH_CHECK(base.device().is_cpu() && base.dim() == 4 && base.scalar_type() == at::kFloat,
              "scatter_tiles_add: base must be a float32 CPU Tensor[N, C, H, W], got ", base.sizes());
  TORCH_CHECK(values.device().is_cpu() && values.scalar_type() == at::kFloat && values.dim() == 4 &&
                  values.size(0) == tiles.size(0) && values.size(1) == base.size(1) && values.size(2) == tile &&
                  values.size(3) == tile,
              "scatter_tiles_add: values must be a float32 Tensor[", tiles.size(0), ", ", base.size(1), ", ", tile,
              ", ", tile, "], got ", values.sizes());
  const int64_t N = base.size(0), C = base.size(1), H = base.size(2), W = base.size(3), T = tiles.size(0);
  at::Tensor out = base.clone();
  const int64_t oc = out.stride(1), oy = out.stride(2), ox = out.stride(3), on = out.stride(0);
  const int64_t vt = values.stride(0), vc = values.stride(1), vy = values.stride(2), vx = values.stride(3);
  const int64_t ts = tiles.stride(0), tc = tiles.stride(1);
  const int64_t* tl = tiles.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(tl[ts * t] >= 0 && tl[ts * t] < N && tl[ts * t + tc] >= 0 && tl[ts * t + 2 * tc] >= 0,
                "scatter_tiles_add: tile ", t, " (", tl[ts * t], ", ", tl[ts * t + tc], ", ", tl[ts * t + 2 * tc],
                ") is outside the batch or the grid");
  float* o = out.data_ptr<float>();
  const float* v = values.data_ptr<float>();
  at::parallel_for(0, T, 4, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = tl[ts * t], y0 = tl[ts * t + tc] * tile, x0 = tl[ts * t + 2 * tc] * tile;
      for (int64_t y = 0; y < tile && y0 + y < H; ++y)
        for (int64_t x = 0; x < tile && x0 + x < W; ++x) {
          float* po = o + n * on + (y0 + y) * oy + (x0 + x) * ox;
          const float* pv = v + t * vt + y * vy + x * vx;
          if (oc == 1 && vc == 1) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) po[c] += pv[c];
          } else {
            for (int64_t c = 0; c < C; ++c) po[c * oc] += pv[c * vc];
          }
        }
    }
  });
  return out;
}

}  // namespace dynnet

namespace dynnet {

// DynConv's squeeze mask unit (SACT's halting unit) at inference, Tensor[N, C, H, W] -> Tensor[N, Ho, Wo]:
// conv(x; w Tensor[1, C, k, k], b, stride, padding) + fc(mean_hw(x); fw Tensor[1, C], fb). x is NCHW- or
// channels-last-contiguous float32. One pass per sample instead of a one-output-channel convolution (oneDNN: 50-120 µs
// at 8-32 channels, 64-16 px), a pooling, a linear layer and an addition. The same MACs as those layers.
at::Tensor squeeze_logits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t stride,
                          int64_t padding, const at::Tensor& fw, const at::Tensor& fb) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.scalar_type() == at::kFloat,
              "squeeze_logits: x must be a float32 CPU Tensor[N, C, H, W], got ", x.sizes(), " ", x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(w.device().is_cpu() && b.device().is_cpu() && fw.device().is_cpu() && fb.device().is_cpu(),
              "squeeze_logits: the weights must be CPU tensors");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 4 && w.size(0) == 1 && w.size(1) == C && w.size(2) == w.size(3),
              "squeeze_logits: w must be a float32 Tensor[1, ", C, ", k, k], got ", w.sizes());
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == 1 && fb.scalar_type() == at::kFloat && fb.numel() == 1 &&
                  fw.scalar_type() == at::kFloat && fw.numel() == C,
              "squeeze_logits: b and fb must be float32 with one element, fw float32 with ", C);
  TORCH_CHECK(stride >= 1 && padding >= 0, "squeeze_logits: bad stride or padding");
  const int64_t k = w.size(2);
  const int64_t Ho = conv_out(H, k, stride, padding, 1), Wo = conv_out(W, k, stride, padding, 1);
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "squeeze_logits: the ", k, "x", k, " kernel does not fit the ", H, "x", W, " input");
  // The input as zero-padded planes, split by column phase (column q of a padded row goes to phase q % stride, slot
  // q / stride), so that for every stride the taps of a block of output columns are one contiguous run: the inner
  // step is one vector FMA per (channel, tap) with no bounds, over NR x NV independent accumulators.
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), fwc = fw.contiguous();
  const float bias = *b.contiguous().data_ptr<float>(), fbias = *fb.contiguous().data_ptr<float>();
  const int nv = Wo > 2 * kLanes ? 4 : (Wo > kLanes ? 2 : 1), nr = 4 / nv;  // 4 accumulators
  const int64_t Wob = (Wo + nv * kLanes - 1) / (nv * kLanes) * (nv * kLanes), Hob = (Ho + nr - 1) / nr * nr;
  const int64_t Hp = std::max(H + 2 * padding, (Hob - 1) * stride + k);
  const int64_t Wq = std::max((W + 2 * padding + stride - 1) / stride, Wob + (k - 1) / stride + 1);
  at::Tensor out = at::empty({N, Ho, Wo}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* px = xc.data_ptr<float>();
  const float* pw = wc.data_ptr<float>();
  const float* pf = fwc.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t HW = H * W, KK = k * k, plane = Hp * stride * Wq;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    // Kept per thread between calls: a fresh buffer above glibc's mmap threshold would be faulted in every call.
    thread_local std::vector<float> pad;
    pad.assign(C * plane, 0.f);
    for (int64_t n = n0; n < n1; ++n) {
      const float* xn = px + n * C * HW;
      float* on = po + n * Ho * Wo;
      if (n > n0) std::fill(pad.begin(), pad.end(), 0.f);
      float glob = fbias;
      for (int64_t c = 0; c < C; ++c) {
        float sum = 0.f;
        for (int64_t h = 0; h < H; ++h) {
          const float* src = xn + c * HW + h * W;
          float* dst = pad.data() + (c * Hp + h + padding) * stride * Wq;
#pragma omp simd reduction(+ : sum)
          for (int64_t i = 0; i < W; ++i) sum += src[i];
          if (stride == 1) {
            std::memcpy(dst + padding, src, W * sizeof(float));
            continue;
          }
          for (int64_t ph = 0; ph < stride; ++ph) {  // the input columns of padded column phase ph
            const int64_t i0 = ((ph - padding) % stride + stride) % stride;
            float* d = dst + ph * Wq + (i0 + padding) / stride;
            for (int64_t i = i0; i < W; i += stride) *d++ = src[i];
          }
        }
        glob += pf[c] * (sum / static_cast<float>(HW));  // fc(mean over the image)
      }
      const float base = bias + glob;
      auto run = [&](auto nv_tag, auto nr_tag) {
        constexpr int NV = decltype(nv_tag)::value, NR = decltype(nr_tag)::value;
        for (int64_t oh = 0; oh < Hob; oh += NR)
          for (int64_t ow = 0; ow < Wob; ow += NV * kLanes) {
            vfloat acc[NR][NV];
            for (int r = 0; r < NR; ++r)
              for (int v = 0; v < NV; ++v) acc[r][v] = vfloat{} + base;
            for (int64_t c = 0; c < C; ++c)
              for (int64_t ky = 0; ky < k; ++ky)
                for (int64_t kx = 0; kx < k; ++kx) {
                  const vfloat wv = vfloat{} + pw[c * KK + ky * k + kx];
                  const float* tap = pad.data() + ((c * Hp + oh * stride + ky) * stride + kx % stride) * Wq + kx / stride + ow;
                  for (int r = 0; r < NR; ++r)
                    for (int v = 0; v < NV; ++v) {
                      vfloat xv;
                      std::memcpy(&xv, tap + r * stride * stride * Wq + v * kLanes, sizeof(vfloat));
                      acc[r][v] += wv * xv;
                    }
                }
            for (int r = 0; r < NR && oh + r < Ho; ++r) {
              float lanes[NV * kLanes];
              std::memcpy(lanes, acc[r], sizeof(lanes));
              const int64_t m = std::min<int64_t>(NV * kLanes, Wo - ow);
              for (int64_t j = 0; j < m; ++j) on[(oh + r) * Wo + ow + j] = lanes[j];
            }
          }
      };
      if (nv == 4) run(std::integral_constant<int, 4>{}, std::integral_constant<int, 1>{});
      else if (nv == 2) run(std::integral_constant<int, 2>{}, std::integral_constant<int, 2>{});
      else run(std::integral_constant<int, 1>{}, std::integral_constant<int, 4>{});
    }
  });
  return out;
}

}  // namespace dynnet
