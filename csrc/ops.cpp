// The one TORCH_LIBRARY(dcgmm) of the project: schemas of the C++ ops (design.md "Registration").
// CPU kernels attach in csrc/cpu/ with TORCH_LIBRARY_IMPL(dcgmm, CPU, m); Triton and CUDA ops are Python custom ops
// in the same namespace (the CPU torch build cannot link a C++ CUDA implementation).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/isa.h"

extern "C" {
// `import dcgmm_fast._C` loads this library, which registers the ops; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// cgmm_bwd_*: need_param_grads (an addition to design.md's contract, default true) lets a caller that
// differentiates x alone (sharpening) skip the parameter sums; the parameter gradients are then empty tensors.
TORCH_LIBRARY(dcgmm, m) {
  m.def(
      "cgmm_fwd_cpp(Tensor x, Tensor mu, Tensor sigma, Tensor log_pi, int[2] kernel, int[2] stride, str loss, "
      "Tensor? smoothing) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cgmm_bwd_cpp(Tensor? g_resp, Tensor? g_score, Tensor x, Tensor mu, Tensor sigma, Tensor log_pi, int[2] kernel, "
      "int[2] stride, str loss, Tensor? smoothing, Tensor resp, Tensor lse, Tensor kstar, bool need_x_grad, "
      "bool need_param_grads=True) -> (Tensor, Tensor, Tensor, Tensor)");
  // a training step's forward and the parameter gradients of g_score * sum(score) in one pass: the outputs of
  // cgmm_fwd_cpp and the parameter gradients of cgmm_bwd_cpp, bit for bit (csrc/cpu/cgmm.cpp forward_param_grads);
  // with the step sizes s_mu, s_sigma also gmm_update_cpp's update of mu and sigma in place and max |mu| after it
  // (last output; empty without); grads_out=False (with step sizes): d_mu, d_sigma come back empty, never written
  m.def(
      "cgmm_fwd_grads_cpp(Tensor x, Tensor(a!) mu, Tensor(b!) sigma, Tensor log_pi, int[2] kernel, int[2] stride, "
      "str loss, Tensor? smoothing, float g_score, Tensor? s_mu=None, Tensor? s_sigma=None, float sigma_min=0., "
      "float sigma_max=0., bool grads_out=True) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("patch_average_cpp(Tensor v, int[2] image_hw, int[2] kernel, int[2] stride) -> Tensor");
  // the update rule in place, one pass; returns (max |mu|, max |log_pi|) after it (csrc/cpu/update.cpp)
  m.def(
      "gmm_update_cpp(Tensor(a!) mu, Tensor(b!) sigma, Tensor(c!) log_pi, Tensor g_mu, Tensor g_sigma, "
      "Tensor g_pi, Tensor s_mu, Tensor s_sigma, Tensor s_pi, float sigma_min, float sigma_max) -> Tensor");
  // the CUDA backend's fused training step with its arithmetic, on CPU (csrc/cpu/step.cpp; ops.cgmm_step_*)
  m.def(
      "cgmm_step_partials_cpp(Tensor x, Tensor mu, Tensor sigma, Tensor log_pi, int[2] kernel, int[2] stride, "
      "str loss, Tensor? smoothing) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cgmm_step_finalize_cpp(Tensor stats, Tensor mu, Tensor sigma, Tensor pi_logits, Tensor log_pi, "
      "Tensor? smoothing, float scale, Tensor steps, float sigma_min, float sigma_max, bool pi_global) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sample_components_cpp(Tensor topdown, Tensor mu, Tensor sigma, int top_s, float divisor, Tensor u, "
      "Tensor eps, float sigma_ceiling) -> Tensor");
  // (R, M) float32/64 -> (R,) float64 row sums in fixed blocks of 256, level by level (csrc/cpu/row_sums.cpp)
  m.def("fixed_order_sums_cpp(Tensor rows) -> Tensor");
  // one SGD step of the linear classifier on softmax cross-entropy, weight and bias in place; returns (mean loss,
  // accuracy float32) (csrc/cpu/classifier.cpp)
  m.def(
      "classifier_step_cpp(Tensor(a!) weight, Tensor(b!) bias, Tensor features, Tensor y, float lr) -> "
      "(Tensor, Tensor)");
  // the instruction set the CPU kernels run with now: "avx512", "avx2" or "baseline" (csrc/cpu/isa.h)
  m.def("cpu_isa_cpp() -> str", []() -> std::string { return dcgmm::isa_name(dcgmm::cpu_isa()); });
}
