// NEON kernels for every aarch64 CPU: plain Armv8-A Advanced SIMD, no extension, compiled with
// the target's baseline flags (no -march). Int8 dot products widen with SMULL and add pairs
// into int32 with SADALP; kernels_neon_dotprod.cpp replaces just that step with SDOT.
// Quantizers round exactly like the scalar twin, so the integer parts are bit-identical on
// every ISA.
#include <arm_neon.h>

#include <cmath>
#include <cstring>

#include "kernels.h"

namespace alpaca::neon {

// acc + the 16 products x[i] * y[i]. |x*y| <= 128*128 fits int16, so SMULL cannot overflow
// and SADALP widens each pair of products into an int32 lane.
static inline int32x4_t dot16(int32x4_t acc, int8x16_t x, int8x16_t y) {
  acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(x), vget_low_s8(y)));
  return vpadalq_s16(acc, vmull_high_s8(x, y));
}

#include "kernels_neon_common.inc"

// Quantize 32 floats to int8 exactly as the scalar twin: d = amax / 127, id = 1 / d,
// q = roundf(x * id). Returns d; writes qs; the sum of q in *sum if asked.
static inline float quantize_block_q8(const float* x, int8_t* qs, int32_t* sum) {
  float32x4_t v[8];
  float32x4_t amax = vdupq_n_f32(0.0f);
  for (int i = 0; i < 8; i++) {
    v[i] = vld1q_f32(x + 4 * i);
    amax = vmaxnmq_f32(amax, vabsq_f32(v[i]));  // maxnm skips NaN, like std::max(amax, nan)
  }
  const float d = vmaxnmvq_f32(amax) / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  int32x4_t qsum = vdupq_n_s32(0);
  for (int i = 0; i < 8; i += 2) {
    // FCVTAS rounds to nearest with ties away from zero: exactly roundf. (FCVTNS, ties to
    // even, would differ from the scalar twin on every exact .5.)
    const int32x4_t q0 = vcvtaq_s32_f32(vmulq_n_f32(v[i], id));
    const int32x4_t q1 = vcvtaq_s32_f32(vmulq_n_f32(v[i + 1], id));
    qsum = vaddq_s32(qsum, vaddq_s32(q0, q1));
    // |q| <= 127 by construction, so plain narrowing is exact.
    const int16x8_t q16 = vcombine_s16(vmovn_s32(q0), vmovn_s32(q1));
    vst1_s8(qs + 4 * i, vmovn_s16(q16));
  }
  if (sum) *sum = vaddvq_s32(qsum);
  return d;
}

static void quantize_row_q8_0(const float* x, block_q8_0* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++) {
    y[b].d = float_to_half(quantize_block_q8(x + b * QK, y[b].qs, nullptr));
  }
}

static void quantize_row_q8_1(const float* x, block_q8_1* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++) {
    int32_t sum = 0;
    const float d = quantize_block_q8(x + b * QK, y[b].qs, &sum);
    y[b].d = float_to_half(d);
    y[b].s = float_to_half(float(sum) * d);
  }
}

static void fp16_to_fp32_row(const fp16_t* x, float* y, int64_t k) {
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    vst1q_f32(y + i, load_half_lo(x + i));
    vst1q_f32(y + i + 4, load_half_hi(x + i));
  }
  for (; i < k; i++) y[i] = half_to_float(x[i]);
}

static void fp32_to_fp16_row(const float* x, fp16_t* y, int64_t k) {
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const float16x4_t lo = vcvt_f16_f32(vld1q_f32(x + i));
    const float16x4_t hi = vcvt_f16_f32(vld1q_f32(x + i + 4));
    vst1q_u16(y + i, vreinterpretq_u16_f16(vcombine_f16(lo, hi)));
  }
  for (; i < k; i++) y[i] = float_to_half(x[i]);
}

#include "kernels_generic.inc"

static KernelTable make_table() {
  KernelTable t = *scalar_kernels();  // weight quantizers and dequantizers: scalar twin
  t.name = "neon";
  auto& types = t.types;
  types[int(GgmlType::Q8_0)].from_float = erased_from_float<block_q8_0, quantize_row_q8_0>;
  types[int(GgmlType::Q8_1)].from_float = erased_from_float<block_q8_1, quantize_row_q8_1>;
  types[int(GgmlType::F16)].to_float = erased_to_float<fp16_t, fp16_to_fp32_row>;
  types[int(GgmlType::F16)].from_float = erased_from_float<fp16_t, fp32_to_fp16_row>;
  set_portable_kernels(t);  // dot products, gemm_rows over them, elementwise kernels
  set_dot<block_q2_K, block_q8_K, dot_q2_K_q8_K_neon>(t, GgmlType::Q2_K);
  set_dot<block_q3_K, block_q8_K, dot_q3_K_q8_K_neon>(t, GgmlType::Q3_K);
  set_dot<block_q4_K, block_q8_K, dot_q4_K_q8_K_neon>(t, GgmlType::Q4_K);
  set_dot<block_q5_K, block_q8_K, dot_q5_K_q8_K_neon>(t, GgmlType::Q5_K);
  set_dot<block_q6_K, block_q8_K, dot_q6_K_q8_K_neon>(t, GgmlType::Q6_K);
  return t;
}

}  // namespace alpaca::neon

namespace alpaca {
const KernelTable* neon_kernels() {
  static const KernelTable table = neon::make_table();
  return &table;
}
}  // namespace alpaca
