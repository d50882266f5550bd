// Error-minimising quantizers, the same block layouts as the reference quantizers
// (ggml_types.cpp, ggml_quants.cpp) with lower weighted squared error of the dequantized
// weights, sum_i w_i (x_i - deq_i)^2:
// - Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: each block's scale (and min) is searched;
// - Q3_K, Q4_K, Q5_K, Q6_K: GGML's sub-block fits weighted by the importance give a second
//   candidate super-block (without importance: the reference bytes).
// The reference block is always one of the candidates and wins ties, so the search never does
// worse than the reference by that measure. numpy twin of the error it minimises:
// alpaca_cpu/quant_search.py.
#pragma once
#include <cstdint>

#include "ggml_types.h"

namespace alpaca {

// True for the types quantize_row_search handles.
bool has_search_quantizer(GgmlType t);

// One row of k floats (whole blocks) -> blocks of type t. `importance`: k per-column weights
// w_i >= 0 (an importance matrix row), or nullptr for w_i = 1. Deterministic: the same inputs
// give the same bytes on every thread count. std::invalid_argument for a type without one.
void quantize_row_search(GgmlType t, const float* x, void* y, int64_t k, const float* importance);

}  // namespace alpaca
