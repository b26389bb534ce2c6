// dynnet compiled CPU kernels (built on first use by dynnet.kernels.native through torch.utils.cpp_extension).
//
// gather_im2col: the im2col rows of a convolution at chosen output positions, read from channels-last input
// rows through a position -> row lookup. It replaces, in one pass, the padded lookup, the tap index arithmetic,
// the validity mask and the row index_select of the pure-PyTorch path (dynnet.kernels.spatial.gather_conv_rows),
// which is the reference it is tested against.
#include "native.h"
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <string>

#include <atomic>
#include <cstring>
#include <functional>

namespace {

void check_positions(const at::Tensor& positions, int64_t start, int64_t stop, int64_t kernel, int64_t stride,
                     int64_t padding, int64_t dilation) {
  TORCH_CHECK(positions.device().is_cpu() && positions.dim() == 2 && positions.size(1) == 3 &&
                  positions.scalar_type() == at::kLong,
              "gather_im2col: positions must be an int64 CPU Tensor[P, 3], got ", positions.sizes());
  TORCH_CHECK(0 <= start && start <= stop && stop <= positions.size(0), "gather_im2col: bad range [", start, ", ",
              stop, ") of ", positions.size(0), " positions");
  TORCH_CHECK(kernel > 0 && stride > 0 && padding >= 0 && dilation > 0, "gather_im2col: bad geometry");
}

constexpr int64_t kPrefetch = 2;  // positions ahead whose source rows are prefetched

// The shared loop: row_of(n, ih, iw) gives the source row of an in-image input position (< 0: zero).
template <typename RowOf>
at::Tensor gather_loop(const at::Tensor& rows, int64_t N, int64_t H, int64_t W, const at::Tensor& positions,
                       int64_t start, int64_t stop, int64_t kernel, int64_t stride, int64_t padding,
                       int64_t dilation, RowOf row_of) {
  const int64_t R = rows.size(0), C = rows.size(1);
  const int64_t taps = kernel * kernel, P = stop - start, width = taps * C;
  at::Tensor out = at::empty({P, width}, rows.options());
  if (P == 0 || C == 0) return out;
  const float* src = rows.data_ptr<float>();
  // Any strides (nonzero() returns a column-major Tensor[P, 3]).
  const int64_t ps = positions.stride(0), pc = positions.stride(1);
  const int64_t* pos = positions.data_ptr<int64_t>() + ps * start;
  float* dst = out.data_ptr<float>();
  const size_t row_bytes = static_cast<size_t>(C) * sizeof(float);
  std::atomic<int> bad{0};
  // About 64 KiB of output per task: small gathers stay on the calling thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / width);
  at::parallel_for(0, P, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (i + kPrefetch < e) {  // the source rows of a later position, towards L1 while this one is copied
        const int64_t q = i + kPrefetch, pn = pos[ps * q], ph = pos[ps * q + pc] * stride - padding,
                      pw = pos[ps * q + 2 * pc] * stride - padding;
        if (pn >= 0 && pn < N)
          for (int64_t ky = 0; ky < kernel; ++ky) {
            const int64_t ih = ph + ky * dilation;
            if (ih < 0 || ih >= H) continue;
            for (int64_t kx = 0; kx < kernel; ++kx) {
              const int64_t iw = pw + kx * dilation;
              if (iw < 0 || iw >= W) continue;
              const int64_t r = row_of(pn, ih, iw);
              if (r < 0 || r >= R) continue;
              const char* line = reinterpret_cast<const char*>(src + r * C);
              for (size_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(line + off);
            }
          }
      }
      const int64_t n = pos[ps * i], oh = pos[ps * i + pc], ow = pos[ps * i + 2 * pc];
      float* o = dst + i * width;
      if (n < 0 || n >= N) {
        bad.store(1);
        std::memset(o, 0, width * sizeof(float));
        continue;
      }
      for (int64_t ky = 0; ky < kernel; ++ky) {
        const int64_t ih = oh * stride - padding + ky * dilation;
        // Taps whose source rows follow each other (neighbouring pixels of one image row) are copied as one run.
        int64_t run_start = -1, run_len = 0;
        for (int64_t kx = 0; kx < kernel; ++kx, o += C) {
          const int64_t iw = ow * stride - padding + kx * dilation;
          int64_t r = -1;
          if (ih >= 0 && ih < H && iw >= 0 && iw < W) r = row_of(n, ih, iw);
          if (r >= 0 && r < R) {
            if (run_len > 0 && r == run_start + run_len) {
              ++run_len;
              continue;
            }
            if (run_len > 0) std::memcpy(o - run_len * C, src + run_start * C, run_len * row_bytes);
            run_start = r, run_len = 1;
          } else {
            if (run_len > 0) std::memcpy(o - run_len * C, src + run_start * C, run_len * row_bytes);
            run_len = 0;
            if (r >= R) bad.store(2);
            std::memset(o, 0, row_bytes);
          }
        }
        if (run_len > 0) std::memcpy(o - run_len * C, src + run_start * C, run_len * row_bytes);
      }
    }
  });
  TORCH_CHECK(bad.load() != 1, "gather_im2col: a position's batch index is outside [0, ", N, ")");
  TORCH_CHECK(bad.load() != 2, "gather_im2col: the lookup names a row outside [0, ", R, ")");
  return out;
}

void check_rows(const at::Tensor& rows) {
  TORCH_CHECK(rows.device().is_cpu() && rows.dim() == 2 && rows.scalar_type() == at::kFloat && rows.is_contiguous(),
              "gather_im2col: rows must be a contiguous float32 CPU Tensor[R, C], got ", rows.sizes(), " ",
              rows.scalar_type());
}

}  // namespace

namespace dynnet {

// Rows reached through lookup: Tensor[N, H, W] int64, the row of each input position (< 0: reads zero).
at::Tensor gather_im2col(const at::Tensor& rows, const at::Tensor& lookup, const at::Tensor& positions,
                         int64_t start, int64_t stop, int64_t kernel, int64_t stride, int64_t padding,
                         int64_t dilation) {
  check_rows(rows);
  TORCH_CHECK(lookup.device().is_cpu() && lookup.dim() == 3 && lookup.scalar_type() == at::kLong &&
                  lookup.is_contiguous(),
              "gather_im2col: lookup must be a contiguous int64 CPU Tensor[N, H, W], got ", lookup.sizes());
  check_positions(positions, start, stop, kernel, stride, padding, dilation);
  const int64_t N = lookup.size(0), H = lookup.size(1), W = lookup.size(2);
  const int64_t* lk = lookup.data_ptr<int64_t>();
  return gather_loop(rows, N, H, W, positions, start, stop, kernel, stride, padding, dilation,
                     [=](int64_t n, int64_t ih, int64_t iw) { return lk[(n * H + ih) * W + iw]; });
}

// Rows of a whole channels-last image: Tensor[N, H, W, C] contiguous (row of (n, h, w) = (n·H + h)·W + w).
at::Tensor gather_im2col_image(const at::Tensor& image, const at::Tensor& positions, int64_t start, int64_t stop,
                               int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  TORCH_CHECK(image.dim() == 4, "gather_im2col_image: image must be Tensor[N, H, W, C], got ", image.sizes());
  const int64_t N = image.size(0), H = image.size(1), W = image.size(2), C = image.size(3);
  const at::Tensor rows = image.view({N * H * W, C});
  check_rows(rows);
  check_positions(positions, start, stop, kernel, stride, padding, dilation);
  return gather_loop(rows, N, H, W, positions, start, stop, kernel, stride, padding, dilation,
                     [=](int64_t n, int64_t ih, int64_t iw) { return (n * H + ih) * W + iw; });
}

}  // namespace dynnet

namespace dynnet {

at::Tensor onednn_matmul(const at::Tensor& cols, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         bool relu) {
  static const c10::OperatorHandle linear =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{cols, weight, bias.has_value() && bias->defined() ? c10::IValue(*bias) : c10::IValue(),
                          c10::IValue(std::string(relu ? "relu" : "none")),
                          c10::IValue(c10::List<c10::optional<at::Scalar>>()), c10::IValue()};
  linear.callBoxed(stack);
  return stack[0].toTensor();
}

void gather_chunks(const at::Tensor& src, const at::Tensor* lookup, const at::Tensor& positions, int64_t kernel,
                   int64_t stride, int64_t padding, int64_t dilation, int64_t chunk,
                   const std::function<void(const at::Tensor&, int64_t, int64_t)>& multiply) {
  const int64_t P = positions.size(0), chunks = (P + chunk - 1) / chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t i = c * chunk, j = std::min(P, i + chunk);
      const at::Tensor cols = lookup ? gather_im2col(src, *lookup, positions, i, j, kernel, stride, padding, dilation)
                                     : gather_im2col_image(src, positions, i, j, kernel, stride, padding, dilation);
      multiply(cols, i, j);
    }
  });
}

// oneDNN's matmul of one chunk of gathered rows, copied into rows [i, j) of dst (Tensor[P, out_channels] data).
void onednn_chunk(const at::Tensor& cols, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool relu,
                  int64_t i, int64_t j, int64_t out_channels, float* dst, const char* who) {
  const at::Tensor y = onednn_matmul(cols, weight, bias, relu).contiguous();
  TORCH_CHECK(y.size(0) == j - i && y.size(1) == out_channels, who, ": the matmul returned ", y.sizes(),
              ", expected [", j - i, ", ", out_channels, "]");
  std::memcpy(dst + i * out_channels, y.data_ptr<float>(), (j - i) * out_channels * sizeof(float));
}

// The pixel gather-GEMM of dynnet.kernels.spatial (gather_conv_rows / gather_conv_image) with its chunks run in
// parallel: each thread gathers an L2-sized chunk of im2col rows (as gather_im2col, or gather_im2col_image when
// lookup is None: rows is then a channels-last image Tensor[N, H, W, C]) and multiplies it by `weight` with oneDNN's
// matmul (mkldnn::_linear_pointwise, single-threaded inside the parallel region), writing its rows of the output.
// Splitting each chunk's gather and GEMM over the threads instead (one chunk at a time) synchronises every chunk
// and shares each chunk's cache lines between cores. weight: oneDNN's Tensor[C_out, K] (plain or prepacked).
// Returns Tensor[P, C_out] (P = positions.size(0)), exactly P * K * C_out MACs.
at::Tensor gather_gemm(const at::Tensor& rows, const c10::optional<at::Tensor>& lookup, const at::Tensor& positions,
                       const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t out_channels,
                       int64_t kernel, int64_t stride, int64_t padding, int64_t dilation, int64_t chunk) {
  TORCH_CHECK(chunk >= 1 && out_channels >= 1, "gather_gemm: chunk and out_channels must be >= 1");
  TORCH_CHECK(positions.dim() == 2, "gather_gemm: positions must be Tensor[P, 3], got ", positions.sizes());
  const int64_t P = positions.size(0);
  at::Tensor out = at::empty({P, out_channels}, rows.options());
  if (P == 0) return out;
  float* dst = out.data_ptr<float>();
  const at::Tensor* lk = lookup.has_value() && lookup->defined() ? &*lookup : nullptr;
  gather_chunks(rows, lk, positions, kernel, stride, padding, dilation, chunk,
                [&](const at::Tensor& cols, int64_t i, int64_t j) {
                  onednn_chunk(cols, weight, bias, false, i, j, out_channels, dst, "gather_gemm");
                });
  return out;
}

}  // namespace dynnet
