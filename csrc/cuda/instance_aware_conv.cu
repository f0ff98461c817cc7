// CUDA kernels of instance_aware_conv: the host side. Checks, the decomposition by shape (paths.h), the
// bucketing of instances by template, and the registration of the two ops for the CUDA dispatch key.
//
// Contract kept by every kernel: float16 / bfloat16 / float32 / float64, accumulation in float32 (float64
// for float64), float32 on TF32 tensor cores exactly when torch would run F.conv2d in TF32
// (torch.backends.cudnn.allow_tf32 / cudnn.conv.fp32_precision), 64-bit offsets, bitwise reproducible results
// (no atomics in any sum, every split chosen from shapes only, never from the device or the index values),
// launches on the current stream under a device guard, each one checked, no host synchronisation (a CUDA graph
// captures the whole op), and an index outside [0, P) never dereferenced (its rows are NaN).
#include "paths.h"

#include <torch/library.h>
#include <torch/version.h>

#include <cstdlib>
#include <sstream>
#include <string>

namespace pointins_ops::cuda {

bool conv_allows_tf32() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
#elif TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 9
  return at::globalContext().allowTF32CuDNN("conv");
#else
  return at::globalContext().allowTF32CuDNN();
#endif
}

namespace {

void check_device() {
  TORCH_CHECK(compute_capability() >= 80, "instance_aware_conv (CUDA): the CUDA kernels need compute capability 8.0 "
              "or newer (tensor-core mma.sync, cp.async); this device has ", compute_capability() / 10, ".",
              compute_capability() % 10, ". Use backend='triton' or backend='torch'");
}

std::size_t element_size(at::ScalarType dtype) { return c10::elementSize(dtype); }

// Reduction depth of one k-step of the math the dtype runs on.
int k_step(at::ScalarType dtype, bool tf32) {
  switch (dtype) {
    case at::kBFloat16:
    case at::kHalf:
      return 16;
    case at::kFloat:
      return tf32 ? 8 : 4;
    default:
      return 1;
  }
}

// Rows of a bucket on average (instances per used template times output channels per group): the row-tile
// height follows it, so a template's rows share one tile where they fit.
int average_rows(const Shape& s, bool identity) {
  if (identity) return s.Cog;
  const int64_t templates = std::max<int64_t>(1, std::min<int64_t>(s.N, s.P));
  return static_cast<int>(std::min<int64_t>(1 << 20, (static_cast<int64_t>(s.N) * s.Cog + templates - 1) / templates));
}

// The path a call takes: POINTINS_CUDA_PATH=conv forces the conv path (tests use it to compare the paths on the
// same shapes); otherwise pointwise where it applies.
bool use_pointwise(const Shape& s, const at::Tensor& templates) {
  const char* forced = std::getenv("POINTINS_CUDA_PATH");
  if (forced != nullptr && std::string(forced) == "conv") return false;
  if (forced != nullptr && std::string(forced) == "pointwise") {
    return s.kH == 1 && s.kW == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_h == 0 && s.pad_w == 0 &&
           templates.stride(3) == 1 && templates.stride(2) == s.W && templates.stride(1) == s.in_pixels &&
           templates.scalar_type() != at::kDouble;
  }
  return pointwise_applies(s, templates);
}

bool use_depthwise(const DepthwisePlan& plan) {
  const char* forced = std::getenv("POINTINS_CUDA_PATH");
  return plan.applies && (forced == nullptr || std::string(forced) != "conv");
}

at::Tensor instance_aware_conv_cuda(const at::Tensor& templates, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& index,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups) {
  const ConvGeometry g =
      check_instance_aware_conv_inputs(templates, weight, bias, index, stride, padding, dilation, groups);
  const Shape s = make_shape(g);
  const DeviceGuard device_guard(templates.device());
  check_device();
  at::Tensor output = at::empty({g.N, g.C_out, g.H_out, g.W_out}, templates.options());
  if (output.numel() == 0) return output;
  if (g.C_in_per_group == 0) {  // nothing to convolve: the bias alone
    return bias.has_value() ? output.copy_(bias->view({g.N, g.C_out, 1, 1}).expand_as(output)) : output.zero_();
  }
  PassTensors t;
  t.templates = templates;
  t.weight = weight.contiguous();
  if (bias.has_value()) t.bias = bias->contiguous();
  t.output = output;
  const at::ScalarType dtype = templates.scalar_type();
  const bool tf32 = dtype == at::kFloat && conv_allows_tf32();
  if (const DepthwisePlan dw = plan_depthwise(s, element_size(dtype), false); use_depthwise(dw)) {
    run_depthwise(dw, s, t, bucket_instances(index, g, 16, templates.options()), false);
    return output;
  }
  if (use_pointwise(s, templates)) {
    const PointwisePlan plan = plan_pointwise(kPointwiseForward, s, element_size(dtype), !index.has_value());
    run_pointwise(plan, s, t, bucket_instances(index, g, plan.tile_rows, templates.options()), tf32);
    return output;
  }
  const int tile_rows = std::clamp(round_up(average_rows(s, !index.has_value()), 16), 16, 128);
  const ConvForwardPlan plan = plan_conv_forward(s, element_size(dtype), k_step(dtype, tf32), tile_rows);
  const DeviceBuckets buckets = bucket_instances(index, g, plan.tile_rows, templates.options());
  run_conv_forward(plan, s, t, buckets, tf32);
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_aware_conv_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& templates, const at::Tensor& weight,
    const std::optional<at::Tensor>& index, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, bool compute_grad_bias) {
  const ConvGeometry g =
      check_instance_aware_conv_inputs(templates, weight, std::nullopt, index, stride, padding, dilation, groups);
  check_grad_output(grad_output, templates, g);
  const Shape s = make_shape(g);
  const DeviceGuard device_guard(templates.device());
  check_device();
  if (g.N == 0 || g.C_out == 0) {
    return {at::zeros({g.P, g.C_in, g.H, g.W}, templates.options()),
            at::zeros({g.N, g.C_out, g.C_in_per_group, g.kH, g.kW}, weight.options()),
            at::zeros(grad_bias_shape(g, compute_grad_bias), weight.options())};
  }
  if (g.C_in_per_group == 0) {
    return {at::empty({g.P, 0, g.H, g.W}, templates.options()),
            at::empty({g.N, g.C_out, 0, g.kH, g.kW}, weight.options()),
            compute_grad_bias ? grad_output.to(templates.scalar_type() == at::kDouble ? at::kDouble : at::kFloat)
                                    .sum({2, 3})
                                    .to(templates.scalar_type())
                              : at::empty({0}, weight.options())};
  }
  // Every element of the results is written by exactly one warp; without compute_grad_bias the kernels see no
  // grad_bias (a null pointer) and skip its row sums.
  PassTensors t;
  t.templates = templates;
  t.weight = weight.contiguous();
  t.grad_output = grad_output.contiguous();
  t.grad_templates = at::empty({g.P, g.C_in, g.H, g.W}, templates.options());
  t.grad_weight = at::empty({g.N, g.C_out, g.C_in_per_group, g.kH, g.kW}, weight.options());
  at::Tensor grad_bias = at::empty(grad_bias_shape(g, compute_grad_bias), weight.options());
  if (compute_grad_bias) t.grad_bias = grad_bias;
  const at::ScalarType dtype = templates.scalar_type();
  const bool tf32 = dtype == at::kFloat && conv_allows_tf32();
  if (const DepthwisePlan dw = plan_depthwise(s, element_size(dtype), true); use_depthwise(dw)) {
    run_depthwise(dw, s, t, bucket_instances(index, g, 16, templates.options()), true);
    return {t.grad_templates, t.grad_weight, grad_bias};
  }
  if (use_pointwise(s, templates)) {
    const PointwisePlan weight_plan = plan_pointwise(kPointwiseWeight, s, element_size(dtype), !index.has_value());
    const PointwisePlan templates_plan =
        plan_pointwise(kPointwiseTemplates, s, element_size(dtype), !index.has_value());
    const DeviceBuckets buckets = bucket_instances(index, g, weight_plan.tile_rows, templates.options());
    run_pointwise(weight_plan, s, t, buckets, tf32);
    run_pointwise(templates_plan, s, t, buckets, tf32);
    return {t.grad_templates, t.grad_weight, grad_bias};
  }
  const ConvBackwardPlan plan =
      plan_conv_backward(s, element_size(dtype), k_step(dtype, tf32), average_rows(s, !index.has_value()));
  const DeviceBuckets buckets = bucket_instances(index, g, plan.tile_rows, templates.options());
  run_conv_backward(plan, s, t, buckets, tf32);
  return {t.grad_templates, t.grad_weight, grad_bias};
}

#ifdef POINTINS_EMULATION
// The plans the two ops would run for these arguments, in words (the emulation's tests check which tilings
// their cases reach).
std::string describe_plans(const at::Tensor& templates, const at::Tensor& weight, const std::optional<at::Tensor>& index,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g =
      check_instance_aware_conv_inputs(templates, weight, std::nullopt, index, stride, padding, dilation, groups);
  const Shape s = make_shape(g);
  const at::ScalarType dtype = templates.scalar_type();
  const bool tf32 = dtype == at::kFloat && conv_allows_tf32();
  std::ostringstream out;
  if (const DepthwisePlan dw = plan_depthwise(s, element_size(dtype), true); use_depthwise(dw)) {
    out << "forward depthwise channels=" << dw.channels << " smem=" << plan_depthwise(s, element_size(dtype), false).smem
        << "; backward depthwise smem=" << dw.smem;
    return out.str();
  }
  if (use_pointwise(s, templates)) {
    for (int pass : {kPointwiseForward, kPointwiseWeight, kPointwiseTemplates}) {
      const PointwisePlan p = plan_pointwise(pass, s, element_size(dtype), !index.has_value());
      out << (pass == kPointwiseForward ? "forward pointwise" : pass == kPointwiseWeight ? "; grad_weight" : "; grad_templates")
          << " block=" << p.block_m << "x" << p.block_n << "x" << p.block_k << " warps=" << p.warps_m << "x"
          << p.warps_n << "x" << p.k_split << " tiles=" << p.m_tiles << "x" << p.n_tiles << " splits=" << p.splits
          << " smem=" << p.smem;
    }
    return out.str();
  }
  const int tile_rows = std::clamp(round_up(average_rows(s, !index.has_value()), 16), 16, 128);
  const ConvForwardPlan f = plan_conv_forward(s, element_size(dtype), k_step(dtype, tf32), tile_rows);
  const ConvBackwardPlan b =
      plan_conv_backward(s, element_size(dtype), k_step(dtype, tf32), average_rows(s, !index.has_value()));
  out << "forward conv rows=" << f.tile_rows << " tile=" << f.tile_h << "x" << f.tile_w << " tiles=" << f.tiles_h
      << "x" << f.tiles_w << " chunk=" << f.chunk << " chunks=" << f.chunks << " smem=" << f.smem
      << "; backward conv " << (b.fused ? "fused" : "split") << " rows=" << b.tile_rows << " c_tile=" << b.c_tile
      << " c_tiles=" << b.c_tiles << " tile=" << b.tile_h << "x" << b.tile_w << " tiles=" << b.tiles_h << "x"
      << b.tiles_w << " smem=" << b.smem;
  return out.str();
}
#endif

}  // namespace

#ifdef POINTINS_EMULATION
// The emulation registers its own op library (emulation/emulate.py), for CPU tensors.
TORCH_LIBRARY(emu_ops, m) {
  m.def("forward(Tensor templates, Tensor weight, Tensor? bias, Tensor? index, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor");
  m.def("backward(Tensor grad_output, Tensor templates, Tensor weight, Tensor? index, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool compute_grad_bias=True) -> (Tensor, Tensor, Tensor)");
  m.def("launches() -> int", [] { return static_cast<int64_t>(emu::launch_count()); });
  m.def("record(bool on) -> ()", [](bool on) { emu::set_recording(on); });
  m.def("records() -> str", [] { return emu::take_records(); });
  m.def("describe(Tensor templates, Tensor weight, Tensor? index, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups) -> str");
}
TORCH_LIBRARY_IMPL(emu_ops, CPU, m) {
  m.impl("forward", &instance_aware_conv_cuda);
  m.impl("backward", &instance_aware_conv_backward_cuda);
  m.impl("describe", &describe_plans);
}
#else
TORCH_LIBRARY_IMPL(pointins_ops, CUDA, m) {
  m.impl("instance_aware_conv", &instance_aware_conv_cuda);
  m.impl("instance_aware_conv_backward", &instance_aware_conv_backward_cuda);
}
#endif

}  // namespace pointins_ops::cuda
