// instance_aware_conv under torch.autocast: the inputs are cast as F.conv2d's are (conv2d is on autocast's
// lower-precision list on CPU and CUDA), then the op runs with autocast excluded.
//
// at::autocast::cached_cast casts a floating-point tensor on the autocast device type that is not float64 to the
// autocast dtype (float16 or bfloat16, whatever torch.autocast was given) and leaves everything else alone, as
// conv2d's autocast kernel does. The casts are ordinary differentiable ops (autocast keys sit above autograd),
// so gradients come back in the inputs' own dtypes. Outside autocast these kernels are never reached: the
// autocast dispatch keys are only active inside torch.autocast.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace pointins_ops {
namespace {

at::Tensor call_instance_aware_conv(const at::Tensor& templates, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& index,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pointins_ops::instance_aware_conv", "")
                             .typed<decltype(call_instance_aware_conv)>();
  return op.call(templates, weight, bias, index, stride, padding, dilation, groups);
}

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor instance_aware_conv_autocast(const at::Tensor& templates, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& index, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  return call_instance_aware_conv(at::autocast::cached_cast(dtype, templates, device_type),
                                  at::autocast::cached_cast(dtype, weight, device_type),
                                  at::autocast::cached_cast(dtype, bias, device_type), index, stride, padding,
                                  dilation, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(pointins_ops, AutocastCPU, m) {
  m.impl("instance_aware_conv",
         TORCH_FN((instance_aware_conv_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>)));
}

TORCH_LIBRARY_IMPL(pointins_ops, AutocastCUDA, m) {
  m.impl("instance_aware_conv",
         TORCH_FN((instance_aware_conv_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>)));
}

}  // namespace pointins_ops
