// Python bindings of the compiled inference plans (see native.h).
#include "native.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<native::DynamicConvPlan>(m, "DynamicConvPlan")
      .def(pybind11::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>,
                          int64_t, double, std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                          int64_t>())
      .def("forward", &native::DynamicConvPlan::forward)
      .def("watch", &native::DynamicConvPlan::watch)
      .def("current", &native::DynamicConvPlan::current)
      .def("mixing", &native::DynamicConvPlan::mixing)
      .def("aggregate", &native::DynamicConvPlan::aggregate);
  m.def("conv3x3_direct", &native::conv3x3_direct, "3x3 conv (stride 1, padding 1) as direct row GEMMs");
  m.def("dynamic_conv3x3", &native::dynamic_conv3x3, "dynamic 3x3 conv with given coefficients");
  m.def("dynamic_conv3x3_backward", &native::dynamic_conv3x3_backward, "gradients of dynamic_conv3x3");
  pybind11::class_<native::ModelPlan>(m, "ModelPlan")
      .def(pybind11::init<int64_t, int64_t, int64_t>())
      .def("buffer", &native::ModelPlan::buffer)
      .def("gather", &native::ModelPlan::gather)
      .def("gather_window", &native::ModelPlan::gather_window)
      .def("max_pool", &native::ModelPlan::max_pool)
      .def("fixed_conv", &native::ModelPlan::fixed_conv)
      .def("dynamic_conv", &native::ModelPlan::dynamic_conv)
      .def("depthwise_conv", &native::ModelPlan::depthwise_conv)
      .def("head", &native::ModelPlan::head)
      .def("rows_buffer", &native::ModelPlan::rows_buffer)
      .def("to_rows", &native::ModelPlan::to_rows)
      .def("rows_gate", &native::ModelPlan::rows_gate)
      .def("rows_conv", &native::ModelPlan::rows_conv)
      .def("rows_depthwise", &native::ModelPlan::rows_depthwise)
      .def("to_planes", &native::ModelPlan::to_planes)
      .def("forward", &native::ModelPlan::forward)
      .def("outputs", &native::ModelPlan::outputs)
      .def("forward_maps", &native::ModelPlan::forward_maps)
      .def("set_team_policy", &native::ModelPlan::set_team_policy)
      .def("team", &native::ModelPlan::team)
      .def("kept_entries", &native::ModelPlan::kept_entries)
      .def("set_profiling", &native::ModelPlan::set_profiling)
      .def("profile", &native::ModelPlan::profile)
      .def("watch", &native::ModelPlan::watch)
      .def("current", &native::ModelPlan::current);
}
