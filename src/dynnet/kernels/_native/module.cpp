// dynnet compiled CPU kernels: the Python module (built by dynnet.kernels.native).
#include "native.h"

#include <utility>
#include <vector>

namespace {

// The (data pointer, version counter) of a set of tensors at construction; fresh() says whether none of them has
// been edited in place (version bump) or given new storage (``.data =``) since. A cached inference plan built from
// these tensors is valid while it is fresh: one call instead of reading two attributes per tensor in Python.
class Stamp {
 public:
  explicit Stamp(std::vector<at::Tensor> tensors) : tensors_(std::move(tensors)) {
    seen_.reserve(tensors_.size());
    for (const auto& t : tensors_) {
      TORCH_CHECK(t.defined() && !t.is_inference(), "Stamp: tensors must be defined and not inference tensors");
      seen_.emplace_back(t.data_ptr(), t._version());
    }
  }
  bool fresh() const {
    for (size_t i = 0; i < tensors_.size(); ++i)
      if (tensors_[i].data_ptr() != seen_[i].first || tensors_[i]._version() != seen_[i].second) return false;
    return true;
  }

 private:
  std::vector<at::Tensor> tensors_;
  std::vector<std::pair<const void*, uint32_t>> seen_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Stamp>(m, "Stamp")
      .def(pybind11::init<std::vector<at::Tensor>>())
      .def("fresh", &Stamp::fresh, "whether no tensor was edited in place or re-pointed since construction");
  m.def("set_parallel_min_macs", &dynnet::set_parallel_min_macs,
        "the work (MACs) from which a channel-kernel convolution uses several threads; returns the old value");
  // Direct bindings of dispatcher ops below (dynnet.kernels.native.direct): the same functions, ~2 µs a call less.
  m.def("tile_gated_pair3x3", &dynnet::tile_gated_pair3x3, "torch.ops.dynnet.tile_gated_pair3x3 without the dispatcher");
  m.def("gated_pair3x3", &dynnet::gated_pair3x3, "torch.ops.dynnet.gated_pair3x3 without the dispatcher");
  m.def("routed_pair3x3", &dynnet::routed_pair3x3, "torch.ops.dynnet.routed_pair3x3 without the dispatcher");
  m.def("gater_logits", &dynnet::gater_logits, "torch.ops.dynnet.gater_logits without the dispatcher");
  m.def(
      "pixel_chain",
      [](const at::Tensor& image, const std::vector<at::Tensor>& masks, const std::vector<at::Tensor>& weights,
         const std::vector<c10::optional<at::Tensor>>& biases, const std::vector<int64_t>& out_channels,
         const std::vector<int64_t>& geometry, const std::vector<int64_t>& flags, int64_t chunk_elements,
         int64_t min_rows) {
        c10::List<c10::optional<at::Tensor>> b;
        for (const auto& t : biases) b.push_back(t);
        return dynnet::pixel_chain(image, masks, weights, b, out_channels, geometry, flags, chunk_elements, min_rows);
      },
      "torch.ops.dynnet.pixel_chain without the dispatcher");
  m.def("gather_im2col", &dynnet::gather_im2col, "im2col rows of output positions, input rows through a lookup");
  m.def("gather_im2col_image", &dynnet::gather_im2col_image,
        "im2col rows of output positions of a channels-last image");
  m.def("gather_tile_regions", &dynnet::gather_tile_regions,
        "the input regions of active tiles (zeros outside the image) from a channels-last image");
  m.def("zero_outside_tiles_", &dynnet::zero_outside_tiles_, "zero (in place) the tile positions outside the grid");
  m.def("scatter_tiles_add", &dynnet::scatter_tiles_add, "base plus output tiles, as a new tensor");
  m.def("squeeze_logits", &dynnet::squeeze_logits, "DynConv's squeeze mask unit (conv + fc of the mean) at inference");
}

// The convolution kernels are dispatcher operators (torch.ops.dynnet.*), so that dispatch-level tools (dynnet's
// MAC counter, profilers) see them as ops. The gathers above are plain copies (0 MACs).
TORCH_LIBRARY(dynnet, m) {
  m.def("sliced_pair3x3(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor scale, bool binary, int stride, Tensor? residual=None, bool relu=False) -> (Tensor, int)");
  m.def("gated_pair3x3(Tensor x, int gate, Tensor gw1, Tensor gb1, Tensor gw2, Tensor gb2, int k, Tensor w1, Tensor b1, Tensor w2, Tensor b2, int stride, Tensor? residual=None, bool relu=False, Tensor? shortcut_w=None, Tensor? shortcut_b=None) -> (Tensor, Tensor, int)");
  m.def("agent_step(Tensor x, Tensor enc_w, Tensor enc_b, Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh, Tensor dec_w, Tensor dec_b, Tensor state) -> (Tensor, Tensor, int)");
  m.def("routed_pair3x3(Tensor x, Tensor(a!) state, Tensor enc_w, Tensor enc_b, Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh, Tensor dec_w, Tensor dec_b, Tensor masks, Tensor w1, Tensor b1, Tensor w2, Tensor b2, int stride, Tensor? residual=None, bool relu=False, Tensor? shortcut_w=None, Tensor? shortcut_b=None) -> (Tensor, int, int)");
  m.def("tile_gated_pair3x3(Tensor x, Tensor w1, Tensor a1, int base1, Tensor w2, Tensor a2, int base2, int stride, Tensor? residual=None, Tensor? shortcut_w=None, Tensor? shortcut_b=None) -> (Tensor, Tensor, Tensor, int, int)");
  m.def("gater_logits(Tensor x, Tensor w1, Tensor b1, int s1, Tensor w2, Tensor b2, int s2, Tensor wl, Tensor bl, Tensor wf, Tensor bf) -> Tensor");
  m.def("gather_gemm(Tensor rows, Tensor? lookup, Tensor positions, Tensor weight, Tensor? bias, int out_channels, int kernel, int stride, int padding, int dilation, int chunk) -> Tensor");
  m.def("pixel_chain(Tensor image, Tensor[] masks, Tensor[] weights, Tensor?[] biases, int[] out_channels, int[] geometry, int[] flags, int chunk_elements, int min_rows) -> (Tensor, Tensor, Tensor)");
  m.def("conv3x3_in(Tensor x, Tensor w, Tensor b, Tensor active, int stride) -> (Tensor, int)");
}

TORCH_LIBRARY_IMPL(dynnet, CPU, m) {
  m.impl("sliced_pair3x3", &dynnet::sliced_pair3x3);
  m.impl("gated_pair3x3", &dynnet::gated_pair3x3);
  m.impl("agent_step", &dynnet::agent_step);
  m.impl("routed_pair3x3", &dynnet::routed_pair3x3);
  m.impl("conv3x3_in", &dynnet::conv3x3_in);
  m.impl("tile_gated_pair3x3", &dynnet::tile_gated_pair3x3);
  m.impl("gater_logits", &dynnet::gater_logits);
  m.impl("gather_gemm", &dynnet::gather_gemm);
  m.impl("pixel_chain", &dynnet::pixel_chain);
}

// gather_gemm and pixel_chain also take oneDNN's prepacked (opaque MkldnnCPU) weights, which select this key.
TORCH_LIBRARY_IMPL(dynnet, MkldnnCPU, m) {
  m.impl("gather_gemm", &dynnet::gather_gemm);
  m.impl("pixel_chain", &dynnet::pixel_chain);
}
