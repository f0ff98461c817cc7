// Autograd for the compiled op (CPU and CUDA kernels): one C++ function node, so a call pays no Python on
// the way in or out. The backward is its own registered op (instance_aware_conv_backward), dispatched per
// device like the forward; it is not itself differentiable, so a double backward raises.
#include <torch/autograd.h>
#include <torch/library.h>

namespace pointins_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor forward_op(const at::Tensor& templates, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& index, c10::IntArrayRef stride, c10::IntArrayRef padding,
                      c10::IntArrayRef dilation, int64_t groups) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pointins_ops::instance_aware_conv", "")
                       .typed<decltype(forward_op)>();
  return op.call(templates, weight, bias, index, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& grad_output, const at::Tensor& templates,
                                                           const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& index,
                                                           c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                           c10::IntArrayRef dilation, int64_t groups,
                                                           bool compute_grad_bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pointins_ops::instance_aware_conv_backward", "")
                       .typed<decltype(backward_op)>();
  return op.call(grad_output, templates, weight, index, stride, padding, dilation, groups, compute_grad_bias);
}

class InstanceAwareConvFunction : public torch::autograd::Function<InstanceAwareConvFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& templates, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& index,
                            c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                            int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor output = forward_op(templates, weight, bias, index, stride, padding, dilation, groups);
    ctx->save_for_backward({templates, weight, index.value_or(at::Tensor())});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["has_bias"] = bias.has_value();
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> index = saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    auto [grad_templates, grad_weight, grad_bias] =
        backward_op(grad_outputs[0].contiguous(), saved[0], saved[1], index, ctx->saved_data["stride"].toIntVector(),
                    ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(),
                    ctx->saved_data["groups"].toInt(), has_bias);
    // One gradient per forward input: templates, weight, bias, then none for index and the conv arguments.
    return {grad_templates, grad_weight, has_bias ? grad_bias : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(),   at::Tensor()};
  }
};

at::Tensor instance_aware_conv_autograd(const at::Tensor& templates, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& index,
                                        c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                        int64_t groups) {
  return InstanceAwareConvFunction::apply(templates, weight, bias, index, stride, padding, dilation, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(pointins_ops, Autograd, m) { m.impl("instance_aware_conv", &instance_aware_conv_autograd); }

}  // namespace pointins_ops
