// Portable reference kernels: the scalar twin of every SIMD kernel. Bit-exact layouts and
// rounding of GGML's reference quantizers (ggml-quants.c *_ref).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace alpaca::scalar {

static void quantize_row_q4_0(const float* x, block_q4_0* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++, x += QK) {
    float amax = 0.0f, max = 0.0f;  // max keeps the sign of the largest magnitude
    for (int j = 0; j < QK; j++) {
      if (std::fabs(x[j]) > amax) { amax = std::fabs(x[j]); max = x[j]; }
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    for (int j = 0; j < QK / 2; j++) {
      const int q0 = std::min(15, int(int8_t(x[j] * id + 8.5f)));
      const int q1 = std::min(15, int(int8_t(x[j + QK / 2] * id + 8.5f)));
      y[b].qs[j] = uint8_t(q0 | (q1 << 4));
    }
  }
}

static void quantize_row_q4_1(const float* x, block_q4_1* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++, x += QK) {
    float min = x[0], max = x[0];
    for (int j = 1; j < QK; j++) { min = std::min(min, x[j]); max = std::max(max, x[j]); }
    const float d = (max - min) / 15.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    y[b].m = fp32_to_fp16(min);
    for (int j = 0; j < QK / 2; j++) {
      const int q0 = std::min(15, int(int8_t((x[j] - min) * id + 0.5f)));
      const int q1 = std::min(15, int(int8_t((x[j + QK / 2] - min) * id + 0.5f)));
      y[b].qs[j] = uint8_t(q0 | (q1 << 4));
    }
  }
}

static void quantize_row_q8_0(const float* x, block_q8_0* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++, x += QK) {
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    for (int j = 0; j < QK; j++) y[b].qs[j] = int8_t(std::roundf(x[j] * id));
  }
}

static void quantize_row_q8_1(const float* x, block_q8_1* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++, x += QK) {
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int j = 0; j < QK; j++) {
      y[b].qs[j] = int8_t(std::roundf(x[j] * id));
      sum += y[b].qs[j];
    }
    y[b].d = fp32_to_fp16(d);
    y[b].s = fp32_to_fp16(float(sum) * d);
  }
}

static void dequantize_row_q4_0(const block_q4_0* x, float* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++, y += QK) {
    const float d = fp16_to_fp32(x[b].d);
    for (int j = 0; j < QK / 2; j++) {
      y[j] = float((x[b].qs[j] & 0x0f) - 8) * d;
      y[j + QK / 2] = float((x[b].qs[j] >> 4) - 8) * d;
    }
  }
}

static void dequantize_row_q4_1(const block_q4_1* x, float* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++, y += QK) {
    const float d = fp16_to_fp32(x[b].d), m = fp16_to_fp32(x[b].m);
    for (int j = 0; j < QK / 2; j++) {
      y[j] = float(x[b].qs[j] & 0x0f) * d + m;
      y[j + QK / 2] = float(x[b].qs[j] >> 4) * d + m;
    }
  }
}

static void dequantize_row_q8_0(const block_q8_0* x, float* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++, y += QK) {
    const float d = fp16_to_fp32(x[b].d);
    for (int j = 0; j < QK; j++) y[j] = float(x[b].qs[j]) * d;
  }
}

static void fp16_to_fp32_row(const fp16_t* x, float* y, int64_t k) {
  for (int64_t i = 0; i < k; i++) y[i] = fp16_to_fp32(x[i]);
}

static void fp32_to_fp16_row(const float* x, fp16_t* y, int64_t k) {
  for (int64_t i = 0; i < k; i++) y[i] = fp32_to_fp16(x[i]);
}

static float dot_q4_0_q8_0(int64_t n, const block_q4_0* w, const block_q8_0* a) {
  float sum = 0.0f;
  for (int64_t b = 0; b < n / QK; b++) {
    int sumi = 0;
    for (int j = 0; j < QK / 2; j++) {
      sumi += ((w[b].qs[j] & 0x0f) - 8) * a[b].qs[j];
      sumi += ((w[b].qs[j] >> 4) - 8) * a[b].qs[j + QK / 2];
    }
    sum += float(sumi) * fp16_to_fp32(w[b].d) * fp16_to_fp32(a[b].d);
  }
  return sum;
}

static float dot_q4_1_q8_1(int64_t n, const block_q4_1* w, const block_q8_1* a) {
  float sum = 0.0f;
  for (int64_t b = 0; b < n / QK; b++) {
    int sumi = 0;
    for (int j = 0; j < QK / 2; j++) {
      sumi += (w[b].qs[j] & 0x0f) * a[b].qs[j];
      sumi += (w[b].qs[j] >> 4) * a[b].qs[j + QK / 2];
    }
    sum += float(sumi) * fp16_to_fp32(w[b].d) * fp16_to_fp32(a[b].d) +
           fp16_to_fp32(w[b].m) * fp16_to_fp32(a[b].s);
  }
  return sum;
}

static float dot_q8_0_q8_0(int64_t n, const block_q8_0* w, const block_q8_0* a) {
  float sum = 0.0f;
  for (int64_t b = 0; b < n / QK; b++) {
    int sumi = 0;
    for (int j = 0; j < QK; j++) sumi += w[b].qs[j] * a[b].qs[j];
    sum += float(sumi) * fp16_to_fp32(w[b].d) * fp16_to_fp32(a[b].d);
  }
  return sum;
}

static float dot_f16_f32(int64_t n, const fp16_t* w, const float* a) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; i++) sum += fp16_to_fp32(w[i]) * a[i];
  return sum;
}

static float dot_f32_f32(int64_t n, const float* w, const float* a) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; i++) sum += w[i] * a[i];
  return sum;
}

static void axpy_f16(int64_t n, float a, const fp16_t* x, float* y) {
  for (int64_t i = 0; i < n; i++) y[i] += a * fp16_to_fp32(x[i]);
}

#include "kernels_generic.inc"

static const KernelTable table = {
    "scalar",
    quantize_row_q4_0, quantize_row_q4_1, quantize_row_q8_0, quantize_row_q8_1,
    dequantize_row_q4_0, dequantize_row_q4_1, dequantize_row_q8_0,
    fp16_to_fp32_row, fp32_to_fp16_row,
    dot_q4_0_q8_0, dot_q4_1_q8_1, dot_q8_0_q8_0, dot_f16_f32, dot_f32_f32,
    ggml_packed_bytes, ggml_pack, ggml_unpack_row,
    gemm, mix_rows, rmsnorm, softmax, swiglu, axpy_f16, read_bytes,
};

}  // namespace alpaca::scalar

namespace alpaca {
const KernelTable* scalar_kernels() { return &scalar::table; }
}  // namespace alpaca
