// The only pybind11 file: exposes the CPU kernels as dsv3._C.cpu, the CUDA kernels (when built) as dsv3._C.cuda,
// and what was compiled as dsv3._C.build_info(). Tensors cross as raw addresses (int), shapes as ints and streams as
// cudaStream_t integers; dsv3.ops does all tensor checking and allocation.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "cpu/cpu_ops.h"
#include "dsv3/ep_params.h"
#include "dsv3/gemm_schedule.h"
#include "dsv3/moe_params.h"
#include "dsv3/quant_params.h"
#if defined(DSV3_WITH_CUDA)
#include "cuda/cuda_ops.h"
#endif

namespace py = pybind11;
using dsv3::DType;

namespace {

template <typename T>
T* pointer(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

dsv3::TokenGroupQuantParams token_group_quant_params(std::uintptr_t x, int32_t x_dtype, std::uintptr_t q,
                                                     std::uintptr_t scales, int64_t rows, int64_t k, int64_t group_size,
                                                     bool ue8m0) {
  return {pointer<const void>(x),
          static_cast<DType>(x_dtype),
          pointer<uint8_t>(q),
          pointer<float>(scales),
          rows,
          k,
          group_size,
          ue8m0};
}

dsv3::BlockQuantParams block_quant_params(std::uintptr_t w, int32_t w_dtype, std::uintptr_t q, std::uintptr_t scale_inv,
                                          int64_t n, int64_t k, int64_t block) {
  return {
      pointer<const void>(w), static_cast<DType>(w_dtype), pointer<uint8_t>(q), pointer<float>(scale_inv), n, k, block};
}

dsv3::BlockDequantParams block_dequant_params(std::uintptr_t q, std::uintptr_t scale_inv, std::uintptr_t out,
                                              int32_t out_dtype, int64_t n, int64_t k, int64_t block) {
  return {pointer<const uint8_t>(q),
          pointer<const float>(scale_inv),
          pointer<void>(out),
          static_cast<DType>(out_dtype),
          n,
          k,
          block};
}

dsv3::MlaDecodeParams mla_decode_params(std::uintptr_t q, std::uintptr_t kv_cache, bool fp8_cache,
                                        std::uintptr_t block_table, std::uintptr_t cache_seqlens,
                                        std::uintptr_t metadata, std::uintptr_t split_offsets, std::uintptr_t out,
                                        std::uintptr_t lse, std::uintptr_t partial_out, std::uintptr_t partial_lse,
                                        int64_t batch, int64_t s_q, int64_t heads, int64_t num_blocks,
                                        int64_t max_blocks, int64_t num_parts, int64_t head_dim_v, float softmax_scale,
                                        bool causal) {
  return {pointer<const uint16_t>(q),
          pointer<const uint8_t>(kv_cache),
          fp8_cache,
          pointer<const int32_t>(block_table),
          pointer<const int32_t>(cache_seqlens),
          pointer<const int32_t>(metadata),
          pointer<const int32_t>(split_offsets),
          pointer<uint16_t>(out),
          pointer<float>(lse),
          pointer<float>(partial_out),
          pointer<float>(partial_lse),
          batch,
          s_q,
          heads,
          num_blocks,
          max_blocks,
          num_parts,
          head_dim_v,
          softmax_scale,
          causal};
}

dsv3::MlaAppendParams mla_append_params(std::uintptr_t kv_cache, bool fp8_cache, std::uintptr_t slot_mapping,
                                        std::uintptr_t latent, std::uintptr_t rope, int32_t input_dtype, int64_t tokens,
                                        int64_t num_blocks, bool ue8m0) {
  return {pointer<uint8_t>(kv_cache),
          fp8_cache,
          pointer<const int64_t>(slot_mapping),
          pointer<const void>(latent),
          pointer<const void>(rope),
          static_cast<DType>(input_dtype),
          tokens,
          num_blocks,
          ue8m0};
}

dsv3::Fp8GemmParams fp8_gemm_params(std::uintptr_t a, std::uintptr_t a_scales, std::uintptr_t b,
                                    std::uintptr_t b_scales, std::uintptr_t out, int64_t m, int64_t n, int64_t k) {
  return {pointer<const uint8_t>(a),
          pointer<const float>(a_scales),
          pointer<const uint8_t>(b),
          pointer<const float>(b_scales),
          pointer<uint16_t>(out),
          m,
          n,
          k};
}

#if defined(DSV3_WITH_CUDA)
std::optional<dsv3::Fp8GemmSchedule> fp8_gemm_forced_schedule(const std::optional<std::tuple<int, int, int>>& codes) {
  if (!codes) return std::nullopt;
  const auto [variant, decomposition, splits] = *codes;
  return dsv3::Fp8GemmSchedule{static_cast<dsv3::Fp8GemmVariant>(variant),
                               static_cast<dsv3::Fp8GemmDecomposition>(decomposition), splits, 0};
}
#endif

dsv3::Fp8LinearParams fp8_linear_params(std::uintptr_t x, int32_t x_dtype, std::uintptr_t b, std::uintptr_t b_scales,
                                        std::uintptr_t out, int64_t m, int64_t n, int64_t k) {
  return {pointer<const void>(x),
          static_cast<DType>(x_dtype),
          pointer<const uint8_t>(b),
          pointer<const float>(b_scales),
          pointer<uint16_t>(out),
          m,
          n,
          k};
}

dsv3::RmsNormParams rms_norm_params(std::uintptr_t x, std::uintptr_t residual, std::uintptr_t residual_out,
                                    std::uintptr_t weight, std::uintptr_t out, int32_t dtype, int64_t rows,
                                    int64_t hidden, float eps) {
  return {pointer<const void>(x),
          pointer<const void>(residual),
          pointer<void>(residual_out),
          pointer<const void>(weight),
          pointer<void>(out),
          static_cast<DType>(dtype),
          rows,
          hidden,
          eps};
}

dsv3::RopeParams rope_params(std::uintptr_t x, std::uintptr_t out, int32_t dtype, std::uintptr_t positions,
                             std::uintptr_t cos_sin, int64_t tokens, int64_t heads, int64_t dim, int64_t token_stride,
                             int64_t head_stride, int64_t max_positions) {
  return {pointer<const void>(x),
          pointer<void>(out),
          static_cast<DType>(dtype),
          pointer<const int64_t>(positions),
          pointer<const float>(cos_sin),
          tokens,
          heads,
          dim,
          token_stride,
          head_stride,
          max_positions};
}

dsv3::GroupedFp8GemmParams grouped_gemm_params(int32_t layout, std::uintptr_t a, std::uintptr_t a_scales,
                                               std::uintptr_t b, std::uintptr_t b_scales, std::uintptr_t out,
                                               std::uintptr_t group_rows, int64_t groups, int64_t m, int64_t n,
                                               int64_t k) {
  const auto kind = static_cast<dsv3::GroupedLayout>(layout);
  const bool contiguous = kind == dsv3::GroupedLayout::kContiguous;
  return {kind,
          pointer<const uint8_t>(a),
          pointer<const float>(a_scales),
          pointer<const uint8_t>(b),
          pointer<const float>(b_scales),
          pointer<uint16_t>(out),
          contiguous ? pointer<const int32_t>(group_rows) : nullptr,
          contiguous ? nullptr : pointer<const int32_t>(group_rows),
          groups,
          m,
          n,
          k};
}

dsv3::GroupedTopkParams grouped_topk_params(std::uintptr_t logits, int32_t logits_dtype, std::uintptr_t bias,
                                            std::uintptr_t weights, std::uintptr_t indices, int64_t tokens,
                                            int64_t num_experts, int64_t num_groups, int64_t topk_group, int64_t topk,
                                            float routed_scaling_factor, bool renormalize) {
  return {pointer<const void>(logits),
          static_cast<DType>(logits_dtype),
          pointer<const float>(bias),
          pointer<float>(weights),
          pointer<int32_t>(indices),
          tokens,
          num_experts,
          num_groups,
          topk_group,
          topk,
          routed_scaling_factor,
          renormalize};
}

// Arguments of moe_layout_count / moe_layout_scatter, in the order of MoeLayoutParams.
struct MoeLayoutArgs {
  std::uintptr_t topk_idx;
  bool idx_int64;
  int64_t tokens, topk, num_experts;
  bool masked;
  int64_t alignment, max_m, rows;
  std::uintptr_t tokens_per_expert, expert_offsets, masked_m, workspace, errors, m_indices, src_token, src_slot, row_of;

  dsv3::MoeLayoutParams params() const {
    return {pointer<const void>(topk_idx),
            idx_int64,
            tokens,
            topk,
            num_experts,
            masked,
            alignment,
            max_m,
            rows,
            pointer<int32_t>(tokens_per_expert),
            pointer<int64_t>(expert_offsets),
            pointer<int32_t>(masked_m),
            pointer<int32_t>(workspace),
            pointer<int32_t>(errors),
            pointer<int32_t>(m_indices),
            pointer<int64_t>(src_token),
            pointer<int64_t>(src_slot),
            pointer<int64_t>(row_of)};
  }
};

// Binds one step of the MoE token layout (count or scatter): the fields of MoeLayoutParams in order, then the
// `Extra` trailing arguments (the CUDA stream), all handed to `run`.
template <typename... Extra, typename Run, typename... ExtraArgs>
void def_moe_layout_step(py::module_& module, const char* name, Run run, ExtraArgs... extra_args) {
  module.def(
      name,
      [run](std::uintptr_t topk_idx, bool idx_int64, int64_t tokens, int64_t topk, int64_t num_experts, bool masked,
            int64_t alignment, int64_t max_m, int64_t rows, std::uintptr_t tokens_per_expert,
            std::uintptr_t expert_offsets, std::uintptr_t masked_m, std::uintptr_t workspace, std::uintptr_t errors,
            std::uintptr_t m_indices, std::uintptr_t src_token, std::uintptr_t src_slot, std::uintptr_t row_of,
            Extra... extra) {
        const MoeLayoutArgs args{topk_idx,       idx_int64, tokens,    topk,   num_experts,
                                 masked,         alignment, max_m,     rows,   tokens_per_expert,
                                 expert_offsets, masked_m,  workspace, errors, m_indices,
                                 src_token,      src_slot,  row_of};
        run(args.params(), extra...);
      },
      py::arg("topk_idx"), py::arg("idx_int64"), py::arg("tokens"), py::arg("topk"), py::arg("num_experts"),
      py::arg("masked"), py::arg("alignment"), py::arg("max_m"), py::arg("rows"), py::arg("tokens_per_expert"),
      py::arg("expert_offsets"), py::arg("masked_m"), py::arg("workspace"), py::arg("errors"), py::arg("m_indices"),
      py::arg("src_token"), py::arg("src_slot"), py::arg("row_of"), extra_args...);
}

dsv3::MoePermuteParams moe_permute_params(std::uintptr_t x, int32_t x_dtype, std::uintptr_t src_token,
                                          std::uintptr_t out, std::uintptr_t q, std::uintptr_t scales, int64_t tokens,
                                          int64_t hidden, int64_t rows, bool quantize, bool ue8m0) {
  return {pointer<const void>(x),
          static_cast<DType>(x_dtype),
          pointer<const int64_t>(src_token),
          pointer<void>(out),
          pointer<uint8_t>(q),
          pointer<float>(scales),
          tokens,
          hidden,
          rows,
          quantize,
          ue8m0};
}

dsv3::MoeUnpermuteParams moe_unpermute_params(std::uintptr_t y, int32_t dtype, std::uintptr_t row_of,
                                              std::uintptr_t weights, std::uintptr_t out, int64_t tokens, int64_t topk,
                                              int64_t rows, int64_t hidden) {
  return {pointer<const void>(y),
          static_cast<DType>(dtype),
          pointer<const int64_t>(row_of),
          pointer<const float>(weights),
          pointer<void>(out),
          tokens,
          topk,
          rows,
          hidden};
}

// Binds the expert-parallel packing kernels on `module`; `Extra` is the trailing stream argument of the CUDA ones.
template <typename... Extra, typename Copy, typename Combine, typename... ExtraArgs>
void def_ep_ops(py::module_& module, Copy copy, Combine combine, ExtraArgs... extra_args) {
  module.def(
      "ep_copy_rows",
      [copy](std::uintptr_t src, std::uintptr_t dst, std::uintptr_t src_index, std::uintptr_t dst_index, int64_t rows,
             int64_t src_rows, int64_t dst_rows, int64_t src_stride, int64_t dst_stride, int64_t src_offset,
             int64_t dst_offset, int64_t row_bytes, Extra... extra) {
        const dsv3::EpCopyRowsParams params{pointer<const uint8_t>(src),
                                            pointer<uint8_t>(dst),
                                            pointer<const int64_t>(src_index),
                                            pointer<const int64_t>(dst_index),
                                            rows,
                                            src_rows,
                                            dst_rows,
                                            src_stride,
                                            dst_stride,
                                            src_offset,
                                            dst_offset,
                                            row_bytes};
        py::gil_scoped_release release;
        copy(params, extra...);
      },
      py::arg("src"), py::arg("dst"), py::arg("src_index"), py::arg("dst_index"), py::arg("rows"), py::arg("src_rows"),
      py::arg("dst_rows"), py::arg("src_stride"), py::arg("dst_stride"), py::arg("src_offset"), py::arg("dst_offset"),
      py::arg("row_bytes"), extra_args...);
  module.def(
      "ep_combine_reduce",
      [combine](std::uintptr_t src, int32_t src_dtype, std::uintptr_t token, std::uintptr_t rank_offsets,
                std::uintptr_t out, int64_t rows, int64_t tokens, int64_t cols, int64_t num_ranks, int64_t src_stride,
                int64_t src_offset, Extra... extra) {
        const dsv3::EpCombineParams params{pointer<const uint8_t>(src),
                                           static_cast<DType>(src_dtype),
                                           pointer<const int64_t>(token),
                                           pointer<const int64_t>(rank_offsets),
                                           pointer<float>(out),
                                           rows,
                                           tokens,
                                           cols,
                                           num_ranks,
                                           src_stride,
                                           src_offset};
        py::gil_scoped_release release;
        combine(params, extra...);
      },
      py::arg("src"), py::arg("src_dtype"), py::arg("token"), py::arg("rank_offsets"), py::arg("out"), py::arg("rows"),
      py::arg("tokens"), py::arg("cols"), py::arg("num_ranks"), py::arg("src_stride"), py::arg("src_offset"),
      extra_args...);
}

py::dict build_info() {
  py::dict info;
  py::list backends;
  backends.append("cpu");
#if defined(DSV3_WITH_CUDA)
  backends.append("cuda");
  info["cuda_runtime_version"] = dsv3::cuda::runtime_version();
  info["cutlass_version"] = DSV3_CUTLASS_VERSION;
#else
  info["cuda_runtime_version"] = py::none();
  info["cutlass_version"] = py::none();
#endif
  info["backends"] = backends;
  py::list archs;
  const std::string arch_list = DSV3_CUDA_ARCH_LIST;
  for (size_t start = 0; start < arch_list.size();) {
    const size_t end = std::min(arch_list.find(',', start), arch_list.size());
    archs.append(arch_list.substr(start, end - start));
    start = end + 1;
  }
  info["cuda_archs"] = archs;
#if defined(DSV3_WITH_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["version"] = DSV3_VERSION;
  info["compiler"] = __VERSION__;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dsv3 kernels (raw-pointer interface; use dsv3.ops)";
  m.def("build_info", &build_info, "What this extension was compiled with");
  m.attr("moe_layout_chunk") = dsv3::kMoeLayoutChunk;  // entries per chunk of the GPU layout workspace
  m.def(
      "fp8_gemm_schedule",
      [](int64_t m, int64_t n, int64_t k, int num_sms) {
        const dsv3::Fp8GemmSchedule schedule = dsv3::choose_fp8_gemm_schedule(m, n, k, num_sms);
        static const char* variants[] = {"tile128x128",         "swapab128x64",
                                         "pingpong64x128",      "tile128x128_cluster1x2",
                                         "tile128x128_overlap", "tile128x128_overlap_cluster1x2",
                                         "decode128x64"};
        static const char* decompositions[] = {"data_parallel", "split_k", "stream_k"};
        py::dict out;
        out["variant"] = variants[static_cast<int>(schedule.variant)];
        out["decomposition"] = decompositions[static_cast<int>(schedule.decomposition)];
        out["splits"] = schedule.splits;
        out["tiles"] = schedule.tiles;
        return out;
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("num_sms"),
      "How the CUDA FP8 GEMM would run an (m, n, k) problem on a GPU with num_sms SMs");
  m.def("fp8_gemm_decode_splits", &dsv3::decode_splits, py::arg("tiles"), py::arg("k"), py::arg("num_sms"),
        "The K splits (cluster size) of the CUDA decode GEMM kernel for `tiles` tiles of 128 weight rows x 64 tokens");

  py::module_ cpu = m.def_submodule("cpu", "C++ CPU kernels");
  cpu.def(
      "per_token_group_quant_fp8",
      [](std::uintptr_t x, int32_t x_dtype, std::uintptr_t q, std::uintptr_t scales, int64_t rows, int64_t k,
         int64_t group_size, bool ue8m0) {
        const auto params = token_group_quant_params(x, x_dtype, q, scales, rows, k, group_size, ue8m0);
        py::gil_scoped_release release;
        dsv3::cpu::per_token_group_quant_fp8(params);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("q"), py::arg("scales"), py::arg("rows"), py::arg("k"),
      py::arg("group_size"), py::arg("ue8m0"));
  cpu.def(
      "silu_and_mul_quant_fp8",
      [](std::uintptr_t h, std::uintptr_t q, std::uintptr_t scales, int64_t rows, int64_t inter) {
        const dsv3::SiluMulQuantParams params{pointer<const uint16_t>(h), pointer<uint8_t>(q), pointer<float>(scales),
                                              rows, inter};
        py::gil_scoped_release release;
        dsv3::cpu::silu_and_mul_quant_fp8(params);
      },
      py::arg("h"), py::arg("q"), py::arg("scales"), py::arg("rows"), py::arg("inter"));
  cpu.def(
      "per_block_quant_fp8",
      [](std::uintptr_t w, int32_t w_dtype, std::uintptr_t q, std::uintptr_t scale_inv, int64_t n, int64_t k,
         int64_t block) {
        const auto params = block_quant_params(w, w_dtype, q, scale_inv, n, k, block);
        py::gil_scoped_release release;
        dsv3::cpu::per_block_quant_fp8(params);
      },
      py::arg("w"), py::arg("w_dtype"), py::arg("q"), py::arg("scale_inv"), py::arg("n"), py::arg("k"),
      py::arg("block"));
  cpu.def(
      "dequant_fp8_block",
      [](std::uintptr_t q, std::uintptr_t scale_inv, std::uintptr_t out, int32_t out_dtype, int64_t n, int64_t k,
         int64_t block) {
        const auto params = block_dequant_params(q, scale_inv, out, out_dtype, n, k, block);
        py::gil_scoped_release release;
        dsv3::cpu::dequant_fp8_block(params);
      },
      py::arg("q"), py::arg("scale_inv"), py::arg("out"), py::arg("out_dtype"), py::arg("n"), py::arg("k"),
      py::arg("block"));

  cpu.def(
      "fp8_gemm_nt",
      [](std::uintptr_t a, std::uintptr_t a_scales, std::uintptr_t b, std::uintptr_t b_scales, std::uintptr_t out,
         int64_t m, int64_t n, int64_t k) {
        const auto params = fp8_gemm_params(a, a_scales, b, b_scales, out, m, n, k);
        py::gil_scoped_release release;
        dsv3::cpu::fp8_gemm_nt(params);
      },
      py::arg("a"), py::arg("a_scales"), py::arg("b"), py::arg("b_scales"), py::arg("out"), py::arg("m"), py::arg("n"),
      py::arg("k"));
  cpu.def(
      "fp8_linear",
      [](std::uintptr_t x, int32_t x_dtype, std::uintptr_t b, std::uintptr_t b_scales, std::uintptr_t out, int64_t m,
         int64_t n, int64_t k) {
        const auto params = fp8_linear_params(x, x_dtype, b, b_scales, out, m, n, k);
        py::gil_scoped_release release;
        dsv3::cpu::fp8_linear(params);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("b"), py::arg("b_scales"), py::arg("out"), py::arg("m"), py::arg("n"),
      py::arg("k"));

  cpu.def(
      "grouped_fp8_gemm",
      [](int32_t layout, std::uintptr_t a, std::uintptr_t a_scales, std::uintptr_t b, std::uintptr_t b_scales,
         std::uintptr_t out, std::uintptr_t group_rows, int64_t groups, int64_t m, int64_t n, int64_t k) {
        const auto params = grouped_gemm_params(layout, a, a_scales, b, b_scales, out, group_rows, groups, m, n, k);
        py::gil_scoped_release release;
        dsv3::cpu::grouped_fp8_gemm(params);
      },
      py::arg("layout"), py::arg("a"), py::arg("a_scales"), py::arg("b"), py::arg("b_scales"), py::arg("out"),
      py::arg("group_rows"), py::arg("groups"), py::arg("m"), py::arg("n"), py::arg("k"));
  cpu.def(
      "rms_norm",
      [](std::uintptr_t x, std::uintptr_t residual, std::uintptr_t residual_out, std::uintptr_t weight,
         std::uintptr_t out, int32_t dtype, int64_t rows, int64_t hidden, float eps) {
        const auto params = rms_norm_params(x, residual, residual_out, weight, out, dtype, rows, hidden, eps);
        py::gil_scoped_release release;
        dsv3::cpu::rms_norm(params);
      },
      py::arg("x"), py::arg("residual"), py::arg("residual_out"), py::arg("weight"), py::arg("out"), py::arg("dtype"),
      py::arg("rows"), py::arg("hidden"), py::arg("eps"));
  cpu.def(
      "apply_rope",
      [](std::uintptr_t x, std::uintptr_t out, int32_t dtype, std::uintptr_t positions, std::uintptr_t cos_sin,
         int64_t tokens, int64_t heads, int64_t dim, int64_t token_stride, int64_t head_stride, int64_t max_positions) {
        const auto params = rope_params(x, out, dtype, positions, cos_sin, tokens, heads, dim, token_stride,
                                        head_stride, max_positions);
        py::gil_scoped_release release;
        dsv3::cpu::apply_rope(params);
      },
      py::arg("x"), py::arg("out"), py::arg("dtype"), py::arg("positions"), py::arg("cos_sin"), py::arg("tokens"),
      py::arg("heads"), py::arg("dim"), py::arg("token_stride"), py::arg("head_stride"), py::arg("max_positions"));
  cpu.def(
      "fused_moe",
      [](std::uintptr_t x, std::uintptr_t x_codes, std::uintptr_t x_scales, std::uintptr_t topk_weights,
         std::uintptr_t topk_idx, std::uintptr_t w13, std::uintptr_t w13_scales, std::uintptr_t w2,
         std::uintptr_t w2_scales, std::uintptr_t shared_w13, std::uintptr_t shared_w13_scales,
         std::uintptr_t shared_w2, std::uintptr_t shared_w2_scales, std::uintptr_t out, int64_t tokens, int64_t topk,
         int64_t experts, int64_t hidden, int64_t inter, int64_t shared_inter) {
        const dsv3::FusedMoeParams params{pointer<const uint16_t>(x),
                                          pointer<const uint8_t>(x_codes),
                                          pointer<const float>(x_scales),
                                          pointer<const float>(topk_weights),
                                          pointer<const int32_t>(topk_idx),
                                          pointer<const uint8_t>(w13),
                                          pointer<const float>(w13_scales),
                                          pointer<const uint8_t>(w2),
                                          pointer<const float>(w2_scales),
                                          pointer<const uint8_t>(shared_w13),
                                          pointer<const float>(shared_w13_scales),
                                          pointer<const uint8_t>(shared_w2),
                                          pointer<const float>(shared_w2_scales),
                                          pointer<uint16_t>(out),
                                          tokens,
                                          topk,
                                          experts,
                                          hidden,
                                          inter,
                                          shared_inter};
        py::gil_scoped_release release;
        dsv3::cpu::fused_moe(params);
      },
      py::arg("x"), py::arg("x_codes"), py::arg("x_scales"), py::arg("topk_weights"), py::arg("topk_idx"),
      py::arg("w13"), py::arg("w13_scales"), py::arg("w2"), py::arg("w2_scales"), py::arg("shared_w13"),
      py::arg("shared_w13_scales"), py::arg("shared_w2"), py::arg("shared_w2_scales"), py::arg("out"),
      py::arg("tokens"), py::arg("topk"), py::arg("experts"), py::arg("hidden"), py::arg("inter"),
      py::arg("shared_inter"));
  cpu.def(
      "mla_schedule",
      [](std::uintptr_t cache_seqlens, std::uintptr_t metadata, std::uintptr_t split_offsets, int64_t batch,
         int64_t num_parts) {
        dsv3::cpu::mla_schedule({pointer<const int32_t>(cache_seqlens), pointer<int32_t>(metadata),
                                 pointer<int32_t>(split_offsets), batch, num_parts});
      },
      py::arg("cache_seqlens"), py::arg("metadata"), py::arg("split_offsets"), py::arg("batch"), py::arg("num_parts"));
  cpu.def(
      "mla_decode",
      [](std::uintptr_t q, std::uintptr_t kv_cache, bool fp8_cache, std::uintptr_t block_table,
         std::uintptr_t cache_seqlens, std::uintptr_t metadata, std::uintptr_t split_offsets, std::uintptr_t out,
         std::uintptr_t lse, std::uintptr_t partial_out, std::uintptr_t partial_lse, int64_t batch, int64_t s_q,
         int64_t heads, int64_t num_blocks, int64_t max_blocks, int64_t num_parts, int64_t head_dim_v,
         float softmax_scale, bool causal) {
        const auto params = mla_decode_params(q, kv_cache, fp8_cache, block_table, cache_seqlens, metadata,
                                              split_offsets, out, lse, partial_out, partial_lse, batch, s_q, heads,
                                              num_blocks, max_blocks, num_parts, head_dim_v, softmax_scale, causal);
        py::gil_scoped_release release;
        dsv3::cpu::mla_decode(params);
      },
      py::arg("q"), py::arg("kv_cache"), py::arg("fp8_cache"), py::arg("block_table"), py::arg("cache_seqlens"),
      py::arg("metadata"), py::arg("split_offsets"), py::arg("out"), py::arg("lse"), py::arg("partial_out"),
      py::arg("partial_lse"), py::arg("batch"), py::arg("s_q"), py::arg("heads"), py::arg("num_blocks"),
      py::arg("max_blocks"), py::arg("num_parts"), py::arg("head_dim_v"), py::arg("softmax_scale"), py::arg("causal"));
  cpu.def(
      "mla_append_kv",
      [](std::uintptr_t kv_cache, bool fp8_cache, std::uintptr_t slot_mapping, std::uintptr_t latent,
         std::uintptr_t rope, int32_t input_dtype, int64_t tokens, int64_t num_blocks, bool ue8m0) {
        const auto params =
            mla_append_params(kv_cache, fp8_cache, slot_mapping, latent, rope, input_dtype, tokens, num_blocks, ue8m0);
        py::gil_scoped_release release;
        dsv3::cpu::mla_append_kv(params);
      },
      py::arg("kv_cache"), py::arg("fp8_cache"), py::arg("slot_mapping"), py::arg("latent"), py::arg("rope"),
      py::arg("input_dtype"), py::arg("tokens"), py::arg("num_blocks"), py::arg("ue8m0"));

  cpu.def(
      "grouped_topk",
      [](std::uintptr_t logits, int32_t logits_dtype, std::uintptr_t bias, std::uintptr_t weights,
         std::uintptr_t indices, int64_t tokens, int64_t num_experts, int64_t num_groups, int64_t topk_group,
         int64_t topk, float routed_scaling_factor, bool renormalize) {
        const auto params = grouped_topk_params(logits, logits_dtype, bias, weights, indices, tokens, num_experts,
                                                num_groups, topk_group, topk, routed_scaling_factor, renormalize);
        py::gil_scoped_release release;
        dsv3::cpu::grouped_topk(params);
      },
      py::arg("logits"), py::arg("logits_dtype"), py::arg("bias"), py::arg("weights"), py::arg("indices"),
      py::arg("tokens"), py::arg("num_experts"), py::arg("num_groups"), py::arg("topk_group"), py::arg("topk"),
      py::arg("routed_scaling_factor"), py::arg("renormalize"));
  def_moe_layout_step(cpu, "moe_layout_count", [](const dsv3::MoeLayoutParams& params) {
    py::gil_scoped_release release;
    dsv3::cpu::moe_layout_count(params);
  });
  def_moe_layout_step(cpu, "moe_layout_scatter", [](const dsv3::MoeLayoutParams& params) {
    py::gil_scoped_release release;
    dsv3::cpu::moe_layout_scatter(params);
  });
  cpu.def(
      "moe_permute",
      [](std::uintptr_t x, int32_t x_dtype, std::uintptr_t src_token, std::uintptr_t out, std::uintptr_t q,
         std::uintptr_t scales, int64_t tokens, int64_t hidden, int64_t rows, bool quantize, bool ue8m0) {
        const auto params =
            moe_permute_params(x, x_dtype, src_token, out, q, scales, tokens, hidden, rows, quantize, ue8m0);
        py::gil_scoped_release release;
        dsv3::cpu::moe_permute(params);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("src_token"), py::arg("out"), py::arg("q"), py::arg("scales"),
      py::arg("tokens"), py::arg("hidden"), py::arg("rows"), py::arg("quantize"), py::arg("ue8m0"));
  cpu.def(
      "moe_unpermute",
      [](std::uintptr_t y, int32_t dtype, std::uintptr_t row_of, std::uintptr_t weights, std::uintptr_t out,
         int64_t tokens, int64_t topk, int64_t rows, int64_t hidden) {
        const auto params = moe_unpermute_params(y, dtype, row_of, weights, out, tokens, topk, rows, hidden);
        py::gil_scoped_release release;
        dsv3::cpu::moe_unpermute(params);
      },
      py::arg("y"), py::arg("dtype"), py::arg("row_of"), py::arg("weights"), py::arg("out"), py::arg("tokens"),
      py::arg("topk"), py::arg("rows"), py::arg("hidden"));
  def_ep_ops(
      cpu, [](const dsv3::EpCopyRowsParams& params) { dsv3::cpu::ep_copy_rows(params); },
      [](const dsv3::EpCombineParams& params) { dsv3::cpu::ep_combine_reduce(params); });

#if defined(DSV3_WITH_CUDA)
  py::module_ cuda = m.def_submodule("cuda", "CUDA kernels (sm_90a)");
  cuda.def("device_count", &dsv3::cuda::device_count);
  cuda.def("set_device", &dsv3::cuda::set_device, py::arg("index"));
  cuda.def(
      "per_token_group_quant_fp8",
      [](std::uintptr_t x, int32_t x_dtype, std::uintptr_t q, std::uintptr_t scales, int64_t rows, int64_t k,
         int64_t group_size, bool ue8m0, std::uintptr_t stream) {
        dsv3::cuda::per_token_group_quant_fp8(
            token_group_quant_params(x, x_dtype, q, scales, rows, k, group_size, ue8m0), stream);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("q"), py::arg("scales"), py::arg("rows"), py::arg("k"),
      py::arg("group_size"), py::arg("ue8m0"), py::arg("stream"));
  cuda.def(
      "silu_and_mul_quant_fp8",
      [](std::uintptr_t h, std::uintptr_t q, std::uintptr_t scales, int64_t rows, int64_t inter,
         std::uintptr_t stream) {
        dsv3::cuda::silu_and_mul_quant_fp8(
            {pointer<const uint16_t>(h), pointer<uint8_t>(q), pointer<float>(scales), rows, inter}, stream);
      },
      py::arg("h"), py::arg("q"), py::arg("scales"), py::arg("rows"), py::arg("inter"), py::arg("stream"));
  cuda.def(
      "per_block_quant_fp8",
      [](std::uintptr_t w, int32_t w_dtype, std::uintptr_t q, std::uintptr_t scale_inv, int64_t n, int64_t k,
         int64_t block, std::uintptr_t stream) {
        dsv3::cuda::per_block_quant_fp8(block_quant_params(w, w_dtype, q, scale_inv, n, k, block), stream);
      },
      py::arg("w"), py::arg("w_dtype"), py::arg("q"), py::arg("scale_inv"), py::arg("n"), py::arg("k"),
      py::arg("block"), py::arg("stream"));
  cuda.def(
      "dequant_fp8_block",
      [](std::uintptr_t q, std::uintptr_t scale_inv, std::uintptr_t out, int32_t out_dtype, int64_t n, int64_t k,
         int64_t block, std::uintptr_t stream) {
        dsv3::cuda::dequant_fp8_block(block_dequant_params(q, scale_inv, out, out_dtype, n, k, block), stream);
      },
      py::arg("q"), py::arg("scale_inv"), py::arg("out"), py::arg("out_dtype"), py::arg("n"), py::arg("k"),
      py::arg("block"), py::arg("stream"));
  // forced_schedule: (variant, decomposition, splits) codes of dsv3/gemm_schedule.h to run instead of the heuristic's.
  cuda.def(
      "fp8_gemm_workspace_bytes",
      [](int64_t m, int64_t n, int64_t k, int num_sms, const std::optional<std::tuple<int, int, int>>& forced) {
        return dsv3::cuda::fp8_gemm_workspace_bytes(m, n, k, num_sms, fp8_gemm_forced_schedule(forced));
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("num_sms"), py::arg("forced_schedule") = py::none());
  cuda.def(
      "fp8_gemm_nt",
      [](std::uintptr_t a, std::uintptr_t a_scales, std::uintptr_t b, std::uintptr_t b_scales, std::uintptr_t out,
         int64_t m, int64_t n, int64_t k, std::uintptr_t workspace, int num_sms, std::uintptr_t stream,
         const std::optional<std::tuple<int, int, int>>& forced) {
        dsv3::cuda::fp8_gemm_nt(fp8_gemm_params(a, a_scales, b, b_scales, out, m, n, k), workspace, num_sms, stream,
                                fp8_gemm_forced_schedule(forced));
      },
      py::arg("a"), py::arg("a_scales"), py::arg("b"), py::arg("b_scales"), py::arg("out"), py::arg("m"), py::arg("n"),
      py::arg("k"), py::arg("workspace"), py::arg("num_sms"), py::arg("stream"),
      py::arg("forced_schedule") = py::none());
  cuda.def("fp8_linear_workspace_bytes", &dsv3::cuda::fp8_linear_workspace_bytes, py::arg("m"), py::arg("n"),
           py::arg("k"), py::arg("num_sms"));
  cuda.def(
      "fp8_linear",
      [](std::uintptr_t x, int32_t x_dtype, std::uintptr_t b, std::uintptr_t b_scales, std::uintptr_t out, int64_t m,
         int64_t n, int64_t k, std::uintptr_t workspace, int num_sms, std::uintptr_t stream) {
        dsv3::cuda::fp8_linear(fp8_linear_params(x, x_dtype, b, b_scales, out, m, n, k), workspace, num_sms, stream);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("b"), py::arg("b_scales"), py::arg("out"), py::arg("m"), py::arg("n"),
      py::arg("k"), py::arg("workspace"), py::arg("num_sms"), py::arg("stream"));
  cuda.def(
      "rms_norm",
      [](std::uintptr_t x, std::uintptr_t residual, std::uintptr_t residual_out, std::uintptr_t weight,
         std::uintptr_t out, int32_t dtype, int64_t rows, int64_t hidden, float eps, std::uintptr_t stream) {
        dsv3::cuda::rms_norm(rms_norm_params(x, residual, residual_out, weight, out, dtype, rows, hidden, eps), stream);
      },
      py::arg("x"), py::arg("residual"), py::arg("residual_out"), py::arg("weight"), py::arg("out"), py::arg("dtype"),
      py::arg("rows"), py::arg("hidden"), py::arg("eps"), py::arg("stream"));
  cuda.def(
      "apply_rope",
      [](std::uintptr_t x, std::uintptr_t out, int32_t dtype, std::uintptr_t positions, std::uintptr_t cos_sin,
         int64_t tokens, int64_t heads, int64_t dim, int64_t token_stride, int64_t head_stride, int64_t max_positions,
         std::uintptr_t stream) {
        dsv3::cuda::apply_rope(rope_params(x, out, dtype, positions, cos_sin, tokens, heads, dim, token_stride,
                                           head_stride, max_positions),
                               stream);
      },
      py::arg("x"), py::arg("out"), py::arg("dtype"), py::arg("positions"), py::arg("cos_sin"), py::arg("tokens"),
      py::arg("heads"), py::arg("dim"), py::arg("token_stride"), py::arg("head_stride"), py::arg("max_positions"),
      py::arg("stream"));
  cuda.def("grouped_fp8_gemm_workspace_bytes", &dsv3::cuda::grouped_fp8_gemm_workspace_bytes, py::arg("groups"),
           py::arg("num_sms"));
  cuda.def(
      "grouped_fp8_gemm",
      [](int32_t layout, std::uintptr_t a, std::uintptr_t a_scales, std::uintptr_t b, std::uintptr_t b_scales,
         std::uintptr_t out, std::uintptr_t group_rows, int64_t groups, int64_t m, int64_t n, int64_t k,
         int64_t expected_m, std::uintptr_t workspace, int num_sms, std::uintptr_t stream) {
        dsv3::GroupedFp8GemmParams params =
            grouped_gemm_params(layout, a, a_scales, b, b_scales, out, group_rows, groups, m, n, k);
        params.expected_m = expected_m;
        dsv3::cuda::grouped_fp8_gemm(params, workspace, num_sms, stream);
      },
      py::arg("layout"), py::arg("a"), py::arg("a_scales"), py::arg("b"), py::arg("b_scales"), py::arg("out"),
      py::arg("group_rows"), py::arg("groups"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("expected_m"),
      py::arg("workspace"), py::arg("num_sms"), py::arg("stream"));
  cuda.def(
      "grouped_topk",
      [](std::uintptr_t logits, int32_t logits_dtype, std::uintptr_t bias, std::uintptr_t weights,
         std::uintptr_t indices, int64_t tokens, int64_t num_experts, int64_t num_groups, int64_t topk_group,
         int64_t topk, float routed_scaling_factor, bool renormalize, std::uintptr_t stream) {
        dsv3::cuda::grouped_topk(grouped_topk_params(logits, logits_dtype, bias, weights, indices, tokens, num_experts,
                                                     num_groups, topk_group, topk, routed_scaling_factor, renormalize),
                                 stream);
      },
      py::arg("logits"), py::arg("logits_dtype"), py::arg("bias"), py::arg("weights"), py::arg("indices"),
      py::arg("tokens"), py::arg("num_experts"), py::arg("num_groups"), py::arg("topk_group"), py::arg("topk"),
      py::arg("routed_scaling_factor"), py::arg("renormalize"), py::arg("stream"));
  def_moe_layout_step<std::uintptr_t>(
      cuda, "moe_layout_count",
      [](const dsv3::MoeLayoutParams& params, std::uintptr_t stream) { dsv3::cuda::moe_layout_count(params, stream); },
      py::arg("stream"));
  def_moe_layout_step<std::uintptr_t>(
      cuda, "moe_layout_scatter",
      [](const dsv3::MoeLayoutParams& params, std::uintptr_t stream) {
        dsv3::cuda::moe_layout_scatter(params, stream);
      },
      py::arg("stream"));
  cuda.def(
      "moe_permute",
      [](std::uintptr_t x, int32_t x_dtype, std::uintptr_t src_token, std::uintptr_t out, std::uintptr_t q,
         std::uintptr_t scales, int64_t tokens, int64_t hidden, int64_t rows, bool quantize, bool ue8m0,
         std::uintptr_t stream) {
        dsv3::cuda::moe_permute(
            moe_permute_params(x, x_dtype, src_token, out, q, scales, tokens, hidden, rows, quantize, ue8m0), stream);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("src_token"), py::arg("out"), py::arg("q"), py::arg("scales"),
      py::arg("tokens"), py::arg("hidden"), py::arg("rows"), py::arg("quantize"), py::arg("ue8m0"), py::arg("stream"));
  cuda.def(
      "mla_schedule",
      [](std::uintptr_t cache_seqlens, std::uintptr_t metadata, std::uintptr_t split_offsets, int64_t batch,
         int64_t num_parts, std::uintptr_t stream) {
        dsv3::cuda::mla_schedule({pointer<const int32_t>(cache_seqlens), pointer<int32_t>(metadata),
                                  pointer<int32_t>(split_offsets), batch, num_parts},
                                 stream);
      },
      py::arg("cache_seqlens"), py::arg("metadata"), py::arg("split_offsets"), py::arg("batch"), py::arg("num_parts"),
      py::arg("stream"));
  cuda.def(
      "mla_decode",
      [](std::uintptr_t q, std::uintptr_t kv_cache, bool fp8_cache, std::uintptr_t block_table,
         std::uintptr_t cache_seqlens, std::uintptr_t metadata, std::uintptr_t split_offsets, std::uintptr_t out,
         std::uintptr_t lse, std::uintptr_t partial_out, std::uintptr_t partial_lse, int64_t batch, int64_t s_q,
         int64_t heads, int64_t num_blocks, int64_t max_blocks, int64_t num_parts, int64_t head_dim_v,
         float softmax_scale, bool causal, std::uintptr_t stream) {
        dsv3::cuda::mla_decode(mla_decode_params(q, kv_cache, fp8_cache, block_table, cache_seqlens, metadata,
                                                 split_offsets, out, lse, partial_out, partial_lse, batch, s_q, heads,
                                                 num_blocks, max_blocks, num_parts, head_dim_v, softmax_scale, causal),
                               stream);
      },
      py::arg("q"), py::arg("kv_cache"), py::arg("fp8_cache"), py::arg("block_table"), py::arg("cache_seqlens"),
      py::arg("metadata"), py::arg("split_offsets"), py::arg("out"), py::arg("lse"), py::arg("partial_out"),
      py::arg("partial_lse"), py::arg("batch"), py::arg("s_q"), py::arg("heads"), py::arg("num_blocks"),
      py::arg("max_blocks"), py::arg("num_parts"), py::arg("head_dim_v"), py::arg("softmax_scale"), py::arg("causal"),
      py::arg("stream"));
  cuda.def(
      "mla_append_kv",
      [](std::uintptr_t kv_cache, bool fp8_cache, std::uintptr_t slot_mapping, std::uintptr_t latent,
         std::uintptr_t rope, int32_t input_dtype, int64_t tokens, int64_t num_blocks, bool ue8m0,
         std::uintptr_t stream) {
        dsv3::cuda::mla_append_kv(
            mla_append_params(kv_cache, fp8_cache, slot_mapping, latent, rope, input_dtype, tokens, num_blocks, ue8m0),
            stream);
      },
      py::arg("kv_cache"), py::arg("fp8_cache"), py::arg("slot_mapping"), py::arg("latent"), py::arg("rope"),
      py::arg("input_dtype"), py::arg("tokens"), py::arg("num_blocks"), py::arg("ue8m0"), py::arg("stream"));
  cuda.def(
      "moe_unpermute",
      [](std::uintptr_t y, int32_t dtype, std::uintptr_t row_of, std::uintptr_t weights, std::uintptr_t out,
         int64_t tokens, int64_t topk, int64_t rows, int64_t hidden, std::uintptr_t stream) {
        dsv3::cuda::moe_unpermute(moe_unpermute_params(y, dtype, row_of, weights, out, tokens, topk, rows, hidden),
                                  stream);
      },
      py::arg("y"), py::arg("dtype"), py::arg("row_of"), py::arg("weights"), py::arg("out"), py::arg("tokens"),
      py::arg("topk"), py::arg("rows"), py::arg("hidden"), py::arg("stream"));
  def_ep_ops<std::uintptr_t>(
      cuda,
      [](const dsv3::EpCopyRowsParams& params, std::uintptr_t stream) { dsv3::cuda::ep_copy_rows(params, stream); },
      [](const dsv3::EpCombineParams& params, std::uintptr_t stream) { dsv3::cuda::ep_combine_reduce(params, stream); },
      py::arg("stream"));
#endif
}
