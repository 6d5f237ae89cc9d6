// The only pybind11 file: exposes the CPU kernels as dsv3._C.cpu, the CUDA kernels (when built) as dsv3._C.cuda,
// and what was compiled as dsv3._C.build_info(). Tensors cross as raw addresses (int), shapes as ints and streams as
// cudaStream_t integers; dsv3.ops does all tensor checking and allocation.

#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/cpu_ops.h"
#include "dsv3/gemm_schedule.h"
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
  m.def(
      "fp8_gemm_schedule",
      [](int64_t m, int64_t n, int64_t k, int num_sms) {
        const dsv3::Fp8GemmSchedule schedule = dsv3::choose_fp8_gemm_schedule(m, n, k, num_sms);
        static const char* variants[] = {"tile128x128", "swapab128x64"};
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
  cuda.def("fp8_gemm_workspace_bytes", &dsv3::cuda::fp8_gemm_workspace_bytes, py::arg("m"), py::arg("n"), py::arg("k"),
           py::arg("num_sms"));
  cuda.def(
      "fp8_gemm_nt",
      [](std::uintptr_t a, std::uintptr_t a_scales, std::uintptr_t b, std::uintptr_t b_scales, std::uintptr_t out,
         int64_t m, int64_t n, int64_t k, std::uintptr_t workspace, int num_sms, std::uintptr_t stream) {
        dsv3::cuda::fp8_gemm_nt(fp8_gemm_params(a, a_scales, b, b_scales, out, m, n, k), workspace, num_sms, stream);
      },
      py::arg("a"), py::arg("a_scales"), py::arg("b"), py::arg("b_scales"), py::arg("out"), py::arg("m"), py::arg("n"),
      py::arg("k"), py::arg("workspace"), py::arg("num_sms"), py::arg("stream"));
#endif
}
