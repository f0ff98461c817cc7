// The op's schema and its shared input checks. Kernels are registered per device in cpu/ and cuda/.
#include "instance_aware_conv.h"

#include "cpu/gemm.h"

#include <Python.h>
#include <torch/library.h>

namespace pointins_ops {
namespace {

bool is_supported_float(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

int64_t output_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  // Written so that a negative numerator stays negative (C++ division truncates toward zero).
  const int64_t span = size + 2 * padding - dilation * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

}  // namespace

ConvGeometry check_instance_aware_conv_inputs(const at::Tensor& templates, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& index, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(templates.dim() == 4,
                    "instance_aware_conv: templates must have 4 dimensions (P, C_in, H, W); got ", templates.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 5,
                    "instance_aware_conv: weight must have 5 dimensions (N, C_out, C_in // groups, kH, kW); got ",
                    weight.sizes());
  TORCH_CHECK_TYPE(is_supported_float(templates.scalar_type()),
                   "instance_aware_conv: templates must be float16, bfloat16, float32 or float64; got ",
                   templates.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == templates.scalar_type(),
                   "instance_aware_conv: weight.dtype must equal templates.dtype (", templates.scalar_type(),
                   "); got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == templates.device(), "instance_aware_conv: weight must be on templates' device (",
                    templates.device(), "); got ", weight.device());
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "instance_aware_conv: stride, padding and dilation must have 2 values each; got ", stride, ", ",
                    padding, ", ", dilation);
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1, "instance_aware_conv: stride must be >= 1; got ", stride);
  TORCH_CHECK_VALUE(dilation[0] >= 1 && dilation[1] >= 1, "instance_aware_conv: dilation must be >= 1; got ",
                    dilation);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, "instance_aware_conv: padding must be >= 0; got ", padding);
  TORCH_CHECK_VALUE(groups >= 1, "instance_aware_conv: groups must be >= 1; got ", groups);

  ConvGeometry g;
  g.P = templates.size(0);
  g.C_in = templates.size(1);
  g.H = templates.size(2);
  g.W = templates.size(3);
  g.N = weight.size(0);
  g.C_out = weight.size(1);
  g.C_in_per_group = weight.size(2);
  g.kH = weight.size(3);
  g.kW = weight.size(4);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
  g.groups = groups;

  TORCH_CHECK_VALUE(g.C_in % groups == 0, "instance_aware_conv: templates.shape[1] (C_in = ", g.C_in,
                    ") must be divisible by groups (", groups, ")");
  TORCH_CHECK_VALUE(g.C_out % groups == 0, "instance_aware_conv: weight.shape[1] (C_out = ", g.C_out,
                    ") must be divisible by groups (", groups, ")");
  TORCH_CHECK_VALUE(g.C_in_per_group * groups == g.C_in,
                    "instance_aware_conv: weight.shape[2] * groups must equal templates.shape[1] (C_in); got ",
                    g.C_in_per_group, " * ", groups, " != ", g.C_in);
  TORCH_CHECK_VALUE(g.kH >= 1 && g.kW >= 1, "instance_aware_conv: the kernel size weight.shape[3:] must be >= 1; got (",
                    g.kH, ", ", g.kW, ")");
  g.C_out_per_group = g.C_out / groups;

  g.H_out = output_size(g.H, g.kH, g.stride_h, g.pad_h, g.dilation_h);
  g.W_out = output_size(g.W, g.kW, g.stride_w, g.pad_w, g.dilation_w);
  TORCH_CHECK_VALUE(g.H_out >= 1 && g.W_out >= 1, "instance_aware_conv: the padded template (", g.H, " x ", g.W,
                    ", padding ", padding, ") is smaller than the dilated kernel (", g.kH, " x ", g.kW, ", dilation ",
                    dilation, "): the output would be empty");

  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == templates.scalar_type(),
                     "instance_aware_conv: bias.dtype must equal templates.dtype (", templates.scalar_type(),
                     "); got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == templates.device(), "instance_aware_conv: bias must be on templates' device (",
                      templates.device(), "); got ", bias->device());
    TORCH_CHECK_VALUE(bias->dim() == 2 && bias->size(0) == g.N && bias->size(1) == g.C_out,
                      "instance_aware_conv: bias must have shape (N, C_out) = (", g.N, ", ", g.C_out, "); got ",
                      bias->sizes());
  }
  if (index.has_value()) {
    TORCH_CHECK_TYPE(index->scalar_type() == at::kInt || index->scalar_type() == at::kLong,
                     "instance_aware_conv: index must be int32 or int64; got ", index->scalar_type());
    TORCH_CHECK_VALUE(index->device() == templates.device(),
                      "instance_aware_conv: index must be on templates' device (", templates.device(), "); got ",
                      index->device());
    TORCH_CHECK_VALUE(index->dim() == 1 && index->size(0) == g.N, "instance_aware_conv: index must have shape (N,) = (",
                      g.N, ",); got ", index->sizes());
  } else {
    TORCH_CHECK_VALUE(g.N == g.P,
                      "instance_aware_conv: without index, weight.shape[0] (N) must equal templates.shape[0] (P); got "
                      "N = ",
                      g.N, ", P = ", g.P);
  }
  return g;
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& templates, const ConvGeometry& g) {
  TORCH_CHECK_VALUE(grad_output.dim() == 4 && grad_output.size(0) == g.N && grad_output.size(1) == g.C_out &&
                        grad_output.size(2) == g.H_out && grad_output.size(3) == g.W_out,
                    "instance_aware_conv_backward: grad_output must have the output's shape (", g.N, ", ", g.C_out,
                    ", ", g.H_out, ", ", g.W_out, "); got ", grad_output.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == templates.scalar_type(),
                   "instance_aware_conv_backward: grad_output.dtype must equal templates.dtype (",
                   templates.scalar_type(), "); got ", grad_output.scalar_type());
  TORCH_CHECK_VALUE(grad_output.device() == templates.device(),
                    "instance_aware_conv_backward: grad_output must be on templates' device (", templates.device(),
                    "); got ", grad_output.device());
}

TORCH_LIBRARY(pointins_ops, m) {
  m.def(
      "instance_aware_conv(Tensor templates, Tensor weight, Tensor? bias, Tensor? index, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "instance_aware_conv_backward(Tensor grad_output, Tensor templates, Tensor weight, Tensor? index, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool compute_grad_bias=True) -> "
      "(Tensor grad_templates, Tensor grad_weight, Tensor grad_bias)");
}

}  // namespace pointins_ops

// An importable Python module: importing pointins_ops._C loads this library, whose static initializers register
// the op and its kernels with the dispatcher. Its one function names the CPU kernels' micro-kernel family.
namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(pointins_ops::cpu::isa_name(pointins_ops::cpu::active_isa()));
  } catch (const std::exception& error) {  // a bad POINTINS_CPU_ISA
    PyErr_SetString(PyExc_ValueError, error.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The micro-kernel family the CPU kernels use now: amx or avx512bf16 (bfloat16 only), avx512, avx2 or generic."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pointins_ops kernels (registered with torch.library)",
                               -1, methods};
  return PyModule_Create(&module);
}
