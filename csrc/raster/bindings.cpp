// Python bindings of the CUDA rasterizer: the extension module npg._raster_cuda.
#include <torch/extension.h>

#include "raster/rasterizer.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "npg's tile-based Gaussian rasterizer (CUDA). Use npg.rasterize; see npg/raster/cuda.py.";
  m.def("forward", &npg::raster::rasterize_forward, "Rasterize Gaussians (see csrc/raster/rasterizer.h)",
        py::arg("means3d"), py::arg("opacities"), py::arg("shs"), py::arg("colors"), py::arg("scales"),
        py::arg("rotations"), py::arg("cov3d"), py::arg("background"), py::arg("camera"), py::arg("sh_degree"),
        py::arg("scale_modifier"));
  m.def("backward", &npg::raster::rasterize_backward, "Gradients of rasterize (see csrc/raster/rasterizer.h)",
        py::arg("grad_color"), py::arg("grad_depth"), py::arg("grad_alpha"), py::arg("out_color"),
        py::arg("out_depth"), py::arg("final_T"), py::arg("n_contrib"), py::arg("point_list"),
        py::arg("tile_ranges"), py::arg("splats"), py::arg("radii"), py::arg("means3d"), py::arg("opacities"),
        py::arg("shs"), py::arg("colors"), py::arg("scales"), py::arg("rotations"), py::arg("cov3d"),
        py::arg("background"), py::arg("camera"), py::arg("sh_degree"), py::arg("scale_modifier"));
}
