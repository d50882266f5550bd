// Reference row conversions of Q5_0, Q5_1, IQ4_NL, the K-quants (Q2_K ... Q6_K) and Q8_K:
// the type table's to_float / from_float for them (ggml_types.cpp), shared by every kernel
// table. Bit-exact with GGML: dequantizers equal ggml's dequantize_row_*, quantizers equal its
// quantize_row_*_ref, except IQ4_NL's, which equals quantize_iq4_nl without an importance
// matrix, as llama-quantize calls it (the same float operations in the same order;
// ggml_quants.cpp is compiled with -ffp-contract=off so that no a*b+c becomes an FMA). numpy
// twins: alpaca_cpu/quants.py (32-element types, Q8_K) and alpaca_cpu/kquants.py (K-quants).
#pragma once
#include <cstdint>

#include "ggml_types.h"

namespace alpaca {

void quantize_row_q5_0(const float* x, block_q5_0* y, int64_t k);
void quantize_row_q5_1(const float* x, block_q5_1* y, int64_t k);
void quantize_row_iq4_nl(const float* x, block_iq4_nl* y, int64_t k);
void quantize_row_q2_K(const float* x, block_q2_K* y, int64_t k);
void quantize_row_q3_K(const float* x, block_q3_K* y, int64_t k);
void quantize_row_q4_K(const float* x, block_q4_K* y, int64_t k);
void quantize_row_q5_K(const float* x, block_q5_K* y, int64_t k);
void quantize_row_q6_K(const float* x, block_q6_K* y, int64_t k);
void quantize_row_q8_K(const float* x, block_q8_K* y, int64_t k);

// The same K-quant fits with each weight's fitting weight multiplied by importance[i] (k
// values, >= 0): the error-minimising search's candidates for these types (quant_search.cpp).
// nullptr gives the reference bytes.
void quantize_row_q3_K_weighted(const float* x, block_q3_K* y, int64_t k, const float* importance);
void quantize_row_q4_K_weighted(const float* x, block_q4_K* y, int64_t k, const float* importance);
void quantize_row_q5_K_weighted(const float* x, block_q5_K* y, int64_t k, const float* importance);
void quantize_row_q6_K_weighted(const float* x, block_q6_K* y, int64_t k, const float* importance);

void dequantize_row_q5_0(const block_q5_0* x, float* y, int64_t k);
void dequantize_row_q5_1(const block_q5_1* x, float* y, int64_t k);
void dequantize_row_iq4_nl(const block_iq4_nl* x, float* y, int64_t k);
void dequantize_row_q2_K(const block_q2_K* x, float* y, int64_t k);
void dequantize_row_q3_K(const block_q3_K* x, float* y, int64_t k);
void dequantize_row_q4_K(const block_q4_K* x, float* y, int64_t k);
void dequantize_row_q5_K(const block_q5_K* x, float* y, int64_t k);
void dequantize_row_q6_K(const block_q6_K* x, float* y, int64_t k);
void dequantize_row_q8_K(const block_q8_K* x, float* y, int64_t k);

}  // namespace alpaca
