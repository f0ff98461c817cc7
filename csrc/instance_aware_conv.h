// instance_aware_conv: the op's geometry and input checks, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

namespace pointins_ops {

// Every size a kernel needs, computed once by the checks. All 64-bit: products of these index tensors
// that may exceed 2^31 elements.
struct ConvGeometry {
  int64_t N = 0;  // instances
  int64_t P = 0;  // templates
  int64_t C_in = 0, H = 0, W = 0;
  int64_t C_out = 0, kH = 0, kW = 0;
  int64_t H_out = 0, W_out = 0;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;
  int64_t dilation_h = 1, dilation_w = 1;
  int64_t groups = 1;
  int64_t C_in_per_group = 0, C_out_per_group = 0;

  int64_t kernel_area() const { return kH * kW; }
  // Length of one instance's reduction within a group: (C_in / groups) * kH * kW.
  int64_t reduction_per_group() const { return C_in_per_group * kH * kW; }
  int64_t output_pixels() const { return H_out * W_out; }
};

// Checks everything that does not need to read tensor data (index values are checked by the kernels,
// where they are read) and returns the geometry. Errors name the argument with expected vs actual.
ConvGeometry check_instance_aware_conv_inputs(const at::Tensor& templates, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& index, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// The backward op's extra check: grad_output must have the forward output's shape.
void check_grad_output(const at::Tensor& grad_output, const at::Tensor& templates, const ConvGeometry& geometry);

// The backward op's grad_bias: (N, C_out), or (0,) when the call does not ask for it (compute_grad_bias false:
// the forward had no bias, and the kernels skip its row sums).
inline std::vector<int64_t> grad_bias_shape(const ConvGeometry& g, bool compute_grad_bias) {
  return compute_grad_bias ? std::vector<int64_t>{g.N, g.C_out} : std::vector<int64_t>{0};
}

}  // namespace pointins_ops
