// CUDA registration of the masked-channel (pruned-expert) ops: the torch glue around the
// torch-free kernels in mmfast/cuda/pruned.cuh (input checks and parameter structs in
// glue/pruned_glue.h, the same rules and messages as the CPU registration).
//
// masked_conv2d and masked_linear run one routing-plan kernel and one grouped implicit-GEMM
// launch over the whole mixed-code batch (fp16 / bf16 on sm_80+: after packing the kept inputs
// and, unless keep_packed_weights() keeps them, the weights of the codes in use); masked_linear is that conv with kh = kw = 1 over the
// (B, Cin, N, 1) view of x (B, N, Cin) and the (B, Cout, N, 1) view of y (B, N, Cout). x is read
// through its strides (no copy); weight, bias, masks and codes are made contiguous; outputs are
// contiguous and written whole by the kernels (at::empty). A sample whose code is outside
// [0, K) gets NaN over its output (no host synchronisation: the ops can be captured in a CUDA
// graph), where the CPU raises IndexError.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "glue/cuda_launch.h"
#include "glue/packed_weight_cache.h"
#include "glue/pruned_glue.h"
#include "mmfast/cuda/pruned.cuh"

namespace {

using mmfast::glue::check_launch;

// The static plan on CUDA (inside mmfast.ops.keep_packed_weights): every code's weights packed
// once as the packed path reads them and kept by PackedWeightCache (glue/packed_weight_cache.h),
// for as long as the weight and both masks are unchanged. Undefined when not kept (off, no room,
// not the packed path, or a CUDA graph being captured: a kept tensor packed by a captured kernel
// would hold nothing until a replay): the op then packs the weights of the codes it uses per
// call. Streams: a new entry is packed and its stream synchronised before it is kept (once per
// layer and run), so any stream may read it; each call records its stream on the entry, so the
// allocator does not reuse its memory under a stream still reading it when it is dropped.
at::Tensor kept_packed_weight(mmfast::MaskedConvParams p, const at::Tensor& weight, const at::Tensor& in_mask,
                              const at::Tensor& out_mask, const char* op) {
  const size_t bytes = mmfast::cuda::masked_conv2d_packed_weight_bytes(p);
  if (bytes == 0 || at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None) return at::Tensor();
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor packed = mmfast::glue::PackedWeightCache::instance().get(
      {weight, in_mask, out_mask}, -1, {}, bytes, [&](bool keep) -> at::Tensor {
        if (!keep) return at::Tensor();
        const auto plan = mmfast::cuda::prunedk::routing_plan(p.routing.num_codes, p.in_channels, p.out_channels);
        const at::Tensor workspace =
            at::empty({static_cast<int64_t>(plan.bytes)}, weight.options().dtype(at::kByte));
        p.workspace = workspace.data_ptr();
        p.workspace_bytes = plan.bytes;
        at::Tensor packed = at::empty({static_cast<int64_t>(bytes)}, weight.options().dtype(at::kByte));
        check_launch(mmfast::cuda::masked_conv2d_pack_weights(p, packed.data_ptr(), stream), op, "weight packing");
        C10_CUDA_CHECK(cudaStreamSynchronize(stream));  // complete before any stream reads it
        return packed;
      });
  if (packed.defined()) packed.record_stream(stream);
  return packed;
}

// The shared part of masked_conv2d / masked_linear: contiguous parameters, the routing, the
// workspace and the launch. x_strides / y_strides describe the (B, C, H, W) views.
void run_masked_conv(mmfast::MaskedConvParams& p, const at::Tensor& x, const at::Tensor& weight_in,
                     const c10::optional<at::Tensor>& bias_in, const at::Tensor& codes_in, const at::Tensor& in_mask_in,
                     const at::Tensor& out_mask_in, const at::Tensor& y, const char* op) {
  const at::Tensor weight = weight_in.contiguous(), codes = codes_in.contiguous();
  const at::Tensor in_mask = in_mask_in.contiguous(), out_mask = out_mask_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  p.dtype = mmfast::glue::to_dtype(x, op, "x");
  p.routing = mmfast::glue::routing_of(codes, in_mask, out_mask);
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.weight_code_stride = weight.size(0) > 1 ? weight[0].numel() : 0;
  p.bias = bias.defined() ? bias.data_ptr() : nullptr;
  p.bias_code_stride = bias.defined() && bias.size(0) > 1 ? bias.size(1) : 0;
  p.y = y.data_ptr();
  TORCH_CHECK_VALUE(mmfast::cuda::masked_conv2d_coordinates_fit(p), "mmfast::", op,
                    " (CUDA): sizes, strides, padding and dilations must each be below 2^29 (the kernel's "
                    "int32 coordinates), got input ", p.height, " x ", p.width, " (masked_linear: tokens x 1), output ",
                    p.out_height, " x ", p.out_width, ", kernel ", p.kernel_h, " x ", p.kernel_w);
  const at::Tensor packed = kept_packed_weight(p, weight_in, in_mask_in, out_mask_in, op);
  p.packed_weight = packed.defined() ? packed.data_ptr() : nullptr;
  const size_t bytes = mmfast::cuda::masked_conv2d_workspace_bytes(p);
  TORCH_CHECK(bytes > 0, "mmfast::", op, " (CUDA): invalid kernel parameters");
  const at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
  p.workspace = workspace.data_ptr();
  p.workspace_bytes = bytes;
  check_launch(mmfast::cuda::masked_conv2d(p, at::cuda::getCurrentCUDAStream()), op, "kernel launch");
}

at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& sample_codes, const at::Tensor& in_mask, const at::Tensor& out_mask,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const auto g =
      mmfast::glue::check_masked(x, weight, bias, sample_codes, in_mask, out_mask, stride, padding, dilation, false);
  const c10::DeviceGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), weight.size(1), g.out_h, g.out_w}, x.options());
  if (y.numel() == 0) return y;
  mmfast::MaskedConvParams p;
  p.batch = x.size(0);
  p.in_channels = x.size(1);
  p.out_channels = weight.size(1);
  p.height = x.size(2);
  p.width = x.size(3);
  p.out_height = g.out_h;
  p.out_width = g.out_w;
  p.kernel_h = weight.size(3);
  p.kernel_w = weight.size(4);
  p.stride_h = stride[0];
  p.stride_w = stride[1];
  p.pad_h = padding[0];
  p.pad_w = padding[1];
  p.dilation_h = dilation[0];
  p.dilation_w = dilation[1];
  for (int d = 0; d < 4; ++d) {
    p.x_strides[d] = x.stride(d);
    p.y_strides[d] = y.stride(d);
  }
  run_masked_conv(p, x, weight, bias, sample_codes, in_mask, out_mask, y, "masked_conv2d");
  return y;
}

at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& sample_codes, const at::Tensor& in_mask, const at::Tensor& out_mask) {
  mmfast::glue::check_masked(x, weight, bias, sample_codes, in_mask, out_mask, {}, {}, {}, true);
  const c10::DeviceGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), x.size(1), weight.size(1)}, x.options());
  if (y.numel() == 0) return y;
  mmfast::MaskedConvParams p;  // a 1x1 conv over (B, Cin, N, 1) -> (B, Cout, N, 1)
  p.batch = x.size(0);
  p.in_channels = x.size(2);
  p.out_channels = weight.size(1);
  p.height = p.out_height = x.size(1);
  p.width = p.out_width = 1;
  const int64_t xs[4] = {x.stride(0), x.stride(2), x.stride(1), 0};
  const int64_t ys[4] = {y.stride(0), y.stride(2), y.stride(1), 0};
  for (int d = 0; d < 4; ++d) {
    p.x_strides[d] = xs[d];
    p.y_strides[d] = ys[d];
  }
  run_masked_conv(p, x, weight, bias, sample_codes, in_mask, out_mask, y, "masked_linear");
  return y;
}

at::Tensor masked_group_norm(const at::Tensor& x_in, const c10::optional<at::Tensor>& weight_in,
                             const c10::optional<at::Tensor>& bias_in, int64_t num_groups,
                             const at::Tensor& codes_in, const at::Tensor& mask_in, double eps, bool silu) {
  mmfast::glue::check_masked_group_norm(x_in, weight_in, bias_in, num_groups, codes_in, mask_in, eps);
  const c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), codes = codes_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor weight = weight_in.has_value() ? weight_in->contiguous() : at::Tensor();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  const auto p = mmfast::glue::group_norm_params(x, y, weight, bias, num_groups, codes, mask, eps, silu);
  check_launch(mmfast::cuda::masked_group_norm(p, at::cuda::getCurrentCUDAStream()), "masked_group_norm",
               "kernel launch");
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("masked_conv2d", &masked_conv2d);
  m.impl("masked_linear", &masked_linear);
  m.impl("masked_group_norm", &masked_group_norm);
}
