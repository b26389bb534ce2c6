// dynnet compiled CPU kernels: the Python module (built by dynnet.kernels.native).
#include "native.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_im2col", &dynnet::gather_im2col, "im2col rows of output positions, input rows through a lookup");
  m.def("gather_im2col_image", &dynnet::gather_im2col_image,
        "im2col rows of output positions of a channels-last image");
  m.def("sliced_pair3x3", &dynnet::sliced_pair3x3, "channel-sliced pair of 3x3 convolutions for one sample");
}

// The pair kernel is also a dispatcher operator (torch.ops.dynnet.sliced_pair3x3), so that dispatch-level tools
// (dynnet's MAC counter, torch.utils.flop_counter rules, profilers) see it as one op.
TORCH_LIBRARY(dynnet, m) {
  m.def("sliced_pair3x3(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor scale, bool binary, int stride) -> (Tensor, int)");
}

TORCH_LIBRARY_IMPL(dynnet, CPU, m) { m.impl("sliced_pair3x3", &dynnet::sliced_pair3x3); }
