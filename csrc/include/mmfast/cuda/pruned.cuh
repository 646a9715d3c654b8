// Torch-free CUDA kernels of the masked-channel (pruned-expert) ops of APTP: the public entry
// points. See mmfast/pruned.h for the math and the rules; pruned/conv.cuh (masked_conv2d, and
// masked_linear as a 1x1 conv over a (B, Cin, N, 1) view) and pruned/group_norm.cuh for the
// kernels. Every element of the output is written (kept channels computed, masked channels 0,
// samples with a code outside [0, K) NaN), with no host synchronisation: CUDA-graph safe.
#pragma once

#include "mmfast/cuda/pruned/conv.cuh"
#include "mmfast/cuda/pruned/conv_async.cuh"
#include "mmfast/cuda/pruned/group_norm.cuh"

namespace mmfast {
namespace cuda {

inline bool masked_routing_valid(const CodeRouting& r, bool need_in_mask) {
  return r.num_codes >= 1 && (r.code_bytes == 4 || r.code_bytes == 8) && r.out_mask != nullptr &&
         (!need_in_mask || r.in_mask != nullptr);
}

// Whether the kernel's int32 input coordinates hold this conv: every term of
// ho * stride - pad + r * dilation below prunedk::kCoordLimit (2^29).
inline bool masked_conv2d_coordinates_fit(const MaskedConvParams& p) {
  const int64_t lim = prunedk::kCoordLimit;
  for (int64_t v : {p.height, p.width, p.pad_h, p.pad_w, p.kernel_h, p.kernel_w, p.dilation_h, p.dilation_w,
                    p.stride_h, p.stride_w, p.out_height, p.out_width})
    if (v >= lim) return false;  // each below 2^29: the products below cannot overflow
  return (p.kernel_h - 1) * p.dilation_h < lim && (p.kernel_w - 1) * p.dilation_w < lim &&
         p.out_height * p.stride_h < lim && p.out_width * p.stride_w < lim;
}

inline bool masked_conv2d_valid(const MaskedConvParams& p) {
  if (p.batch < 0 || p.in_channels < 0 || p.out_channels < 0 || p.height < 0 || p.width < 0 || p.out_height < 0 ||
      p.out_width < 0 || p.kernel_h < 1 || p.kernel_w < 1 || p.stride_h < 1 || p.stride_w < 1 || p.pad_h < 0 ||
      p.pad_w < 0 || p.dilation_h < 1 || p.dilation_w < 1 || p.weight_code_stride < 0 || p.bias_code_stride < 0)
    return false;
  if (p.in_channels > INT_MAX || p.out_channels > INT_MAX) return false;  // int32 channel lists
  if (!masked_conv2d_coordinates_fit(p)) return false;
  if (!masked_routing_valid(p.routing, p.in_channels > 0)) return false;  // (K, 0) masks have no data
  const bool empty = p.batch == 0 || p.out_channels == 0 || p.out_height == 0 || p.out_width == 0;
  if (empty) return true;
  if (p.y == nullptr || p.routing.sample_codes == nullptr) return false;
  if (p.in_channels > 0 && p.weight == nullptr) return false;
  if (p.in_channels > 0 && p.height > 0 && p.width > 0 && p.x == nullptr) return false;
  return true;
}

// Whether masked_conv2d takes the packed cp.async path (conv_async.cuh) for p on this device.
inline bool masked_conv2d_uses_async(const MaskedConvParams& p) {
  bool async = false;
  dispatch_dtype(p.dtype, [&](auto t) {
    async = prunedk::use_async_conv<decltype(t)>(p);
    return cudaSuccess;
  });
  return async;
}

inline int64_t dtype_bytes(DType dtype) {
  return dtype == DType::kFloat64 ? 8 : dtype == DType::kFloat32 ? 4 : 2;
}

// Workspace bytes of the packed path (its layout on this device: prunedk::async_conv_layout).
inline size_t masked_conv2d_packed_workspace_bytes(const MaskedConvParams& p) {
  size_t bytes = 0;
  dispatch_dtype(p.dtype, [&](auto t) {
    bytes = prunedk::async_conv_layout<decltype(t)>(p).bytes;
    return cudaSuccess;
  });
  return bytes;
}

// Workspace bytes of masked_conv2d: the per-code routing plan (counts, kept-input lists, output
// permutations and which codes are used, int32), and on the packed path the packed weights
// (K x kh*kw x Cout x round_up(Cin, 8) elements), inputs (B x H x W x round_up(Cin, 8)) and,
// when each tile's reduction is split (few tiles for the device), the splits' fp32 sums.
inline size_t masked_conv2d_workspace_bytes(const MaskedConvParams& p) {
  if (!masked_conv2d_valid(p)) return 0;
  if (masked_conv2d_uses_async(p)) return masked_conv2d_packed_workspace_bytes(p);
  return prunedk::routing_plan(p.routing.num_codes, p.in_channels, p.out_channels).bytes;
}

// y of masked_conv2d / masked_linear (mmfast/pruned.h): a routing-plan kernel, then one grouped
// implicit-GEMM launch over the whole mixed-code batch (fp16 / bf16 on sm_80+: after two packing
// launches, conv_async.cuh; a workspace sized for the routing plan only, or not 16-byte aligned,
// takes masked_conv_kernel).
inline cudaError_t masked_conv2d(const MaskedConvParams& p, cudaStream_t stream) {
  if (!masked_conv2d_valid(p)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.out_channels == 0 || p.out_height == 0 || p.out_width == 0) return cudaSuccess;
  const prunedk::RoutingPlan plan = prunedk::routing_plan(p.routing.num_codes, p.in_channels, p.out_channels);
  if (p.workspace == nullptr || p.workspace_bytes < plan.bytes) return cudaErrorInvalidValue;
  const cudaError_t err = prunedk::launch_routing(p, plan, stream);
  if (err != cudaSuccess) return err;
  const bool aligned = reinterpret_cast<uintptr_t>(p.workspace) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(p.packed_weight) % 16 == 0;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    if (aligned && prunedk::use_async_conv<T>(p) && p.workspace_bytes >= prunedk::async_conv_layout<T>(p).bytes &&
        prunedk::launch_conv_async<T>(p, plan, stream))
      return cudaGetLastError();
    return prunedk::launch_conv_tiled<T>(p, plan, stream);
  });
}

// Bytes of every code's packed weights (masked_conv2d_pack_weights), 0 off the packed path.
inline size_t masked_conv2d_packed_weight_bytes(const MaskedConvParams& p) {
  if (!masked_conv2d_valid(p) || !masked_conv2d_uses_async(p)) return 0;
  return static_cast<size_t>(prunedk::packed_weight_elements(p) * dtype_bytes(p.dtype));
}

// Every code's weights, packed as the packed path reads them, into dst
// (masked_conv2d_packed_weight_bytes(p) bytes, 16-byte aligned): later masked_conv2d calls with
// the same weights and masks take them as p.packed_weight and skip their weight packing (a
// static plan: APTP's experts do not change over a sampling run). p as for masked_conv2d, with
// its workspace (the routing plan goes there); x and y are not read. cudaErrorInvalidValue off
// the packed path.
inline cudaError_t masked_conv2d_pack_weights(const MaskedConvParams& p, void* dst, cudaStream_t stream) {
  if (!masked_conv2d_valid(p) || !masked_conv2d_uses_async(p)) return cudaErrorInvalidValue;
  if (p.out_channels == 0 || p.in_channels == 0) return cudaSuccess;  // nothing to pack
  const prunedk::RoutingPlan plan = prunedk::routing_plan(p.routing.num_codes, p.in_channels, p.out_channels);
  if (dst == nullptr || reinterpret_cast<uintptr_t>(dst) % 16 != 0 || p.workspace == nullptr ||
      reinterpret_cast<uintptr_t>(p.workspace) % 16 != 0 || p.workspace_bytes < plan.bytes)
    return cudaErrorInvalidValue;
  const cudaError_t err = prunedk::launch_routing(p, plan, stream);
  if (err != cudaSuccess) return err;
  return dispatch_dtype(p.dtype, [&](auto t) {
    return prunedk::launch_pack_all_weights<decltype(t)>(p, plan, dst, stream);
  });
}

// y of masked_group_norm (mmfast/pruned.h): one block per (sample, group).
inline cudaError_t masked_group_norm(const MaskedGroupNormParams& p, cudaStream_t stream) {
  if (p.batch < 0 || p.channels < 1 || p.groups < 1 || p.channels % p.groups != 0 || p.plane < 0 ||
      p.affine_code_stride < 0 || !(p.eps > 0) || !masked_routing_valid(p.routing, false))
    return cudaErrorInvalidValue;
  if (p.batch == 0 || p.plane == 0) return cudaSuccess;
  if (p.x == nullptr || p.y == nullptr || p.routing.sample_codes == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) { return prunedk::launch_group_norm<decltype(t)>(p, stream); });
}

}  // namespace cuda
}  // namespace mmfast
