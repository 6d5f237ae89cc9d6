// DeepSeek-V3's noaux_tc router on the CPU, a token per iteration: the same fp32 operations in the same order as
// dsv3.reference.moe.grouped_topk (sigmoid from dsv3/moe_routing.h; the build disables FMA contraction elsewhere), so
// experts and weights match it bit for bit.

#include <cstdint>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/fp8_rows.h"
#include "dsv3/moe_routing.h"

namespace dsv3::cpu {
namespace {

// Fewer logits than this (256 tokens of 256 experts) run on the calling thread: waking the OpenMP team can cost
// more than it saves.
constexpr int64_t kParallelLogits = 65536;

// Sum of the two largest values of a group (at least 2 values); equal values count twice, as a sort would keep them.
float top2_sum(const float* values, int64_t n) {
  float first = values[0] > values[1] ? values[0] : values[1];
  float second = values[0] > values[1] ? values[1] : values[0];
  for (int64_t i = 2; i < n; ++i) {
    const float v = values[i];
    if (v > first) {
      second = first;
      first = v;
    } else if (v > second) {
      second = v;
    }
  }
  return first + second;
}

template <DType kType>
void route_tokens(const GroupedTopkParams& p) {
  using Storage = typename Element<kType>::Storage;
  const auto* logits = static_cast<const Storage*>(p.logits);
  const int64_t experts = p.num_experts, group_size = p.num_experts / p.num_groups, topk = p.topk;
#pragma omp parallel if (p.tokens * experts >= kParallelLogits)
  {
    std::vector<float> scores(experts), biased(experts), group_scores(p.num_groups), top_values(topk);
    std::vector<char> kept(p.num_groups);
    std::vector<int32_t> top_experts(topk);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) {
      const Storage* row = logits + t * experts;
      for (int64_t e = 0; e < experts; ++e) {
        scores[e] = router_sigmoid(Element<kType>::load(row[e]));
        biased[e] = scores[e] + p.bias[e];
      }
      for (int64_t g = 0; g < p.num_groups; ++g) {
        group_scores[g] = top2_sum(biased.data() + g * group_size, group_size);
        kept[g] = 0;
      }
      // Keep the topk_group best groups. Each search starts from the first unkept group (one is left while
      // round < topk_group <= num_groups), so a NaN score cannot leave it without a pick.
      for (int64_t round = 0; round < p.topk_group; ++round) {
        int64_t best = 0;
        while (kept[best]) ++best;
        for (int64_t g = best + 1; g < p.num_groups; ++g) {
          if (!kept[g] && ranks_before(group_scores[g], g, group_scores[best], best)) best = g;
        }
        kept[best] = 1;
      }
      // Insertion into a list sorted by ranks_before; experts arrive in ascending index order, so a value equal to
      // one already listed goes after it. The kept groups hold at least topk experts, so the list fills up.
      int64_t count = 0;
      for (int64_t g = 0; g < p.num_groups; ++g) {
        if (!kept[g]) continue;
        for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) {
          const float v = biased[e];
          if (count == topk && !(v > top_values[topk - 1])) continue;
          int64_t position = count < topk ? count : topk - 1;
          for (; position > 0 && v > top_values[position - 1]; --position) {
            top_values[position] = top_values[position - 1];
            top_experts[position] = top_experts[position - 1];
          }
          top_values[position] = v;
          top_experts[position] = static_cast<int32_t>(e);
          count += count < topk ? 1 : 0;
        }
      }
      float* weights = p.weights + t * topk;
      int32_t* indices = p.indices + t * topk;
      float total = scores[top_experts[0]];
      for (int64_t k = 1; k < topk; ++k) total = total + scores[top_experts[k]];
      for (int64_t k = 0; k < topk; ++k) {
        const float w = scores[top_experts[k]];
        weights[k] = (p.renormalize ? w / total : w) * p.routed_scaling_factor;
        indices[k] = top_experts[k];
      }
    }
  }
}

}  // namespace

void grouped_topk(const GroupedTopkParams& params) {
  validate(params);
  dispatch_float_type(params.logits_dtype, [&](auto type) { route_tokens<decltype(type)::value>(params); });
}

}  // namespace dsv3::cpu
