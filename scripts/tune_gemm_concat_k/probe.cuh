// Tuning probe (not part of the package build): one gemm_concat_k configuration per .cu, called from Python.
#pragma once
#include "cuda/sm90/gemm_concat_k_impl.cuh"
using namespace lora_fused::sm90;
using namespace cute;
template <class G>
int run_gemm(const ConcatKProblem& p, void* ws, size_t ws_bytes) {
  typename G::Gemm gemm;
  auto args = G::arguments(p);
  if (G::Gemm::can_implement(args) != cutlass::Status::kSuccess) return -1;
  if (G::Gemm::get_workspace_size(args) > ws_bytes) return -2;
  if (gemm.initialize(args, ws) != cutlass::Status::kSuccess) return -3;
  return gemm.run() == cutlass::Status::kSuccess ? 0 : -4;
}
#define PROBE_VARIANT(NAME, ...) \
  extern "C" int NAME(const ConcatKProblem* p, void* ws, size_t n) { return run_gemm<GemmConcatK<__VA_ARGS__>>(*p, ws, n); }
