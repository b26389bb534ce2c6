// dynnet compiled CPU kernels: the functions each source file exports (bound in module.cpp).
#pragma once
#include <torch/extension.h>

#include <functional>
#include <tuple>

namespace dynnet {

// gather.cpp
at::Tensor gather_im2col(const at::Tensor& rows, const at::Tensor& lookup, const at::Tensor& positions,
                         int64_t start, int64_t stop, int64_t kernel, int64_t stride, int64_t padding,
                         int64_t dilation);
at::Tensor gather_im2col_image(const at::Tensor& image, const at::Tensor& positions, int64_t start, int64_t stop,
                               int64_t kernel, int64_t stride, int64_t padding, int64_t dilation);
// cols @ weight^T + bias (ReLU'd when relu) with oneDNN's matmul (mkldnn::_linear_pointwise, called through the
// dispatcher); weight is oneDNN's Tensor[C_out, K], plain or prepacked.
at::Tensor onednn_matmul(const at::Tensor& cols, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         bool relu);
// The chunks [i, j) of `chunk` positions, in parallel (whole chunks per thread): each chunk's im2col rows are gathered
// (from rows `src` through `lookup`, or from a channels-last image `src` when lookup is null) and handed to
// multiply(cols, i, j).
void gather_chunks(const at::Tensor& src, const at::Tensor* lookup, const at::Tensor& positions, int64_t kernel,
                   int64_t stride, int64_t padding, int64_t dilation, int64_t chunk,
                   const std::function<void(const at::Tensor&, int64_t, int64_t)>& multiply);
// onednn_matmul of one chunk, copied into rows [i, j) of dst (the data of a Tensor[P, out_channels]).
void onednn_chunk(const at::Tensor& cols, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool relu,
                  int64_t i, int64_t j, int64_t out_channels, float* dst, const char* who);
at::Tensor gather_gemm(const at::Tensor& rows, const c10::optional<at::Tensor>& lookup, const at::Tensor& positions,
                       const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t out_channels,
                       int64_t kernel, int64_t stride, int64_t padding, int64_t dilation, int64_t chunk);

// sparse.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_chain(
    const at::Tensor& image, at::TensorList masks, at::TensorList weights,
    const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef out_channels, at::IntArrayRef geometry,
    at::IntArrayRef flags, int64_t chunk_elements, int64_t min_rows);
at::Tensor gather_tile_regions(const at::Tensor& image, const at::Tensor& tiles, int64_t region, int64_t offset,
                               int64_t step);
void zero_outside_tiles_(at::Tensor& values, const at::Tensor& tiles, int64_t offset, int64_t step, int64_t H,
                         int64_t W);
at::Tensor scatter_tiles_add(const at::Tensor& base, const at::Tensor& values, const at::Tensor& tiles,
                             int64_t tile);
at::Tensor squeeze_logits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t stride,
                          int64_t padding, const at::Tensor& fw, const at::Tensor& fb);

// channel.cpp (the shared direct convolution: channel_conv.h)
// Sets the work (MACs) from which the channel kernels' convolutions use several threads; returns the old value.
int64_t set_parallel_min_macs(int64_t value);
std::tuple<at::Tensor, int64_t> sliced_pair3x3(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                               const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& scale,
                                               bool binary, int64_t stride,
                                               const c10::optional<at::Tensor>& residual, bool relu);
std::tuple<at::Tensor, at::Tensor, int64_t> gated_pair3x3(
    const at::Tensor& x, int64_t gate, const at::Tensor& gw1, const at::Tensor& gb1, const at::Tensor& gw2,
    const at::Tensor& gb2, int64_t k, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, int64_t stride, const c10::optional<at::Tensor>& residual, bool relu,
    const c10::optional<at::Tensor>& shortcut_w, const c10::optional<at::Tensor>& shortcut_b);
std::tuple<at::Tensor, int64_t> conv3x3_in(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                           const at::Tensor& active, int64_t stride);

// channel_tile.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t> tile_gated_pair3x3(
    const at::Tensor& x, const at::Tensor& w1, const at::Tensor& a1, int64_t base1, const at::Tensor& w2,
    const at::Tensor& a2, int64_t base2, int64_t stride, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& shortcut_w, const c10::optional<at::Tensor>& shortcut_b);

// recipe_channel.cpp (recipe kernels: RNP / runtime routing's agent, GaterNet's gater)
std::tuple<at::Tensor, at::Tensor, int64_t> agent_step(const at::Tensor& x, const at::Tensor& enc_w,
                                                       const at::Tensor& enc_b, const at::Tensor& w_ih,
                                                       const at::Tensor& w_hh, const at::Tensor& b_ih,
                                                       const at::Tensor& b_hh, const at::Tensor& dec_w,
                                                       const at::Tensor& dec_b, const at::Tensor& state);
std::tuple<at::Tensor, int64_t, int64_t> routed_pair3x3(
    const at::Tensor& x, at::Tensor& state, const at::Tensor& enc_w, const at::Tensor& enc_b, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& dec_w,
    const at::Tensor& dec_b, const at::Tensor& masks, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, int64_t stride, const c10::optional<at::Tensor>& residual, bool relu,
    const c10::optional<at::Tensor>& shortcut_w, const c10::optional<at::Tensor>& shortcut_b);
at::Tensor gater_logits(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, int64_t s1,
                        const at::Tensor& w2, const at::Tensor& b2, int64_t s2, const at::Tensor& wl,
                        const at::Tensor& bl, const at::Tensor& wf, const at::Tensor& bf);

}  // namespace dynnet
