// Torch glue shared by the CPU and CUDA registrations of the VQ ops: input checks, output and
// workspace allocation, filling VQParams / VQLookupParams.
//
// A backend is a struct with static functions
//   size_t  quantize_workspace_bytes(const VQParams&);
//   void    quantize(VQParams&);                 // throws on failure
//   void    dequantize(VQLookupParams&);         // throws on failure (CPU: IndexError)
// and the op functions below are instantiated once per backend.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "glue/common.h"
#include "mmfast/vq.h"

namespace mmfast {
namespace glue {

inline void check_codebook(const at::Tensor& codebook, const char* op) {
  TORCH_CHECK_VALUE(codebook.dim() == 2, op, ": codebook must be a 2-D (K, D) tensor, got shape ", codebook.sizes());
  TORCH_CHECK_VALUE(codebook.size(0) > 0 && codebook.size(1) > 0, op,
                    ": codebook must hold at least one code of at least one dim, got shape ", codebook.sizes());
  to_dtype(codebook, op, "codebook");
}

inline void check_quantize(const at::Tensor& z, const at::Tensor& codebook, const c10::optional<at::Tensor>& sqnorm) {
  const char* op = "vq_quantize";
  check_codebook(codebook, op);
  TORCH_CHECK_VALUE(z.dim() == 2, op, ": z must be (N, D), got shape ", z.sizes());
  TORCH_CHECK_VALUE(z.size(1) == codebook.size(1), op, ": z's last dim must equal the codebook's D = ",
                    codebook.size(1), ", got z of shape ", z.sizes());
  to_dtype(z, op, "z");
  check_same_dtype_device(z, "z", codebook, "codebook", op);
  if (sqnorm.has_value()) {
    TORCH_CHECK_VALUE(sqnorm->dim() == 1 && sqnorm->size(0) == codebook.size(0), op, ": codebook_sqnorm must be (",
                      codebook.size(0), ",), got ", sqnorm->sizes());
    const auto acc = accumulation_type(codebook.scalar_type());
    TORCH_CHECK_TYPE(sqnorm->scalar_type() == acc, op, ": codebook_sqnorm must be ", dtype_name(acc), " for ",
                     dtype_name(codebook.scalar_type()), " codebooks, got ", dtype_name(sqnorm->scalar_type()));
    TORCH_CHECK_TYPE(sqnorm->device() == codebook.device(), op, ": all inputs must have the same device, got codebook: ",
                     codebook.device(), ", codebook_sqnorm: ", sqnorm->device());
  }
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> vq_quantize(const at::Tensor& z_in, const at::Tensor& codebook_in,
                                               const c10::optional<at::Tensor>& sqnorm_in) {
  check_quantize(z_in, codebook_in, sqnorm_in);
  const c10::DeviceGuard guard(z_in.device());
  const at::Tensor z = (z_in.size(1) == 1 || z_in.stride(1) == 1) ? z_in : z_in.contiguous();
  const at::Tensor codebook = codebook_in.contiguous();
  at::Tensor sqnorm;
  if (sqnorm_in.has_value()) sqnorm = sqnorm_in->contiguous();
  const auto acc = accumulation_type(z.scalar_type());
  at::Tensor indices = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  at::Tensor distance = at::empty({z.size(0)}, z.options().dtype(acc));
  VQParams p;
  p.rows = z.size(0);
  p.codes = codebook.size(0);
  p.dim = codebook.size(1);
  p.dtype = to_dtype(z, "vq_quantize", "z");
  p.z = z.data_ptr();
  p.z_row_stride = z.size(0) > 1 ? z.stride(0) : p.dim;
  p.codebook = codebook.data_ptr();
  p.codebook_sqnorm = sqnorm.defined() ? sqnorm.data_ptr() : nullptr;
  p.indices = indices.data_ptr<int64_t>();
  p.distance = distance.data_ptr();
  if (p.rows == 0) return {distance, indices};
  const size_t bytes = Backend::quantize_workspace_bytes(p);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, z.options().dtype(at::kByte));
  p.workspace = workspace.data_ptr();
  p.workspace_bytes = bytes;
  Backend::quantize(p);
  return {distance, indices};
}

template <class Backend>
at::Tensor vq_dequantize(const at::Tensor& indices_in, const at::Tensor& codebook_in, bool channels_first) {
  const char* op = "vq_dequantize";
  check_codebook(codebook_in, op);
  TORCH_CHECK_TYPE(indices_in.scalar_type() == at::kLong || indices_in.scalar_type() == at::kInt, op,
                   ": indices must be int64 or int32, got ", dtype_name(indices_in.scalar_type()));
  TORCH_CHECK_TYPE(indices_in.device() == codebook_in.device(), op, ": all inputs must have the same device, got indices: ",
                   indices_in.device(), ", codebook: ", codebook_in.device());
  TORCH_CHECK_VALUE(!channels_first || indices_in.dim() == 3, op, ": channels_first needs (B, h, w) indices, got shape ",
                    indices_in.sizes());
  const c10::DeviceGuard guard(indices_in.device());
  const at::Tensor indices = indices_in.contiguous(), codebook = codebook_in.contiguous();
  const int64_t dim = codebook.size(1);
  std::vector<int64_t> shape;
  if (channels_first) {
    shape = {indices.size(0), dim, indices.size(1), indices.size(2)};
  } else {
    shape = indices.sizes().vec();
    shape.push_back(dim);
  }
  at::Tensor out = empty_output(shape, codebook.options());
  VQLookupParams p;
  p.count = indices.numel();
  p.codes = codebook.size(0);
  p.dim = dim;
  p.dtype = to_dtype(codebook, op, "codebook");
  p.indices = indices.data_ptr();
  p.index_bytes = indices.scalar_type() == at::kLong ? 8 : 4;
  p.codebook = codebook.data_ptr();
  p.out = out.data_ptr();
  p.channels_first = channels_first;
  p.plane = channels_first ? indices.size(1) * indices.size(2) : 0;
  if (p.count > 0) Backend::dequantize(p);
  return out;
}

}  // namespace glue
}  // namespace mmfast

// Registers the VQ ops of one backend under a dispatch key.
#define MMFAST_REGISTER_VQ(m, Backend)                                 \
  do {                                                                 \
    m.impl("vq_quantize", &::mmfast::glue::vq_quantize<Backend>);      \
    m.impl("vq_dequantize", &::mmfast::glue::vq_dequantize<Backend>);  \
  } while (0)
