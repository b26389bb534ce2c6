// dynnet compiled CPU kernels: the Python module (built by dynnet.kernels.native).
#include "native.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_im2col", &dynnet::gather_im2col, "im2col rows of output positions, input rows through a lookup");
  m.def("gather_im2col_image", &dynnet::gather_im2col_image,
        "im2col rows of output positions of a channels-last image");
}

// The convolution kernels are dispatcher operators (torch.ops.dynnet.*), so that dispatch-level tools (dynnet's
// MAC counter, profilers) see them as ops. The gathers above are plain copies (0 MACs).
TORCH_LIBRARY(dynnet, m) {
  m.def("sliced_pair3x3(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor scale, bool binary, int stride, Tensor? residual=None, bool relu=False) -> (Tensor, int)");
  m.def("conv3x3_in(Tensor x, Tensor w, Tensor b, Tensor active, int stride) -> (Tensor, int)");
}

TORCH_LIBRARY_IMPL(dynnet, CPU, m) {
  m.impl("sliced_pair3x3", &dynnet::sliced_pair3x3);
  m.impl("conv3x3_in", &dynnet::conv3x3_in);
}
