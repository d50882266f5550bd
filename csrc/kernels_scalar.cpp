// Portable reference kernels: the scalar twin of every SIMD kernel. Its row conversions are the
// type traits' reference ones (ggml_types.cpp), bit-exact with GGML's reference quantizers.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace alpaca::scalar {

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

static KernelTable make_table() {
  KernelTable t{};
  t.name = "scalar";
  for (const TypeTraits* tt : all_type_traits()) {
    t.types[int(tt->type)].to_float = tt->to_float;
    t.types[int(tt->type)].from_float = tt->from_float;
  }
  set_portable_kernels(t);
  t.packed_bytes = ggml_packed_bytes;
  t.pack = ggml_pack;
  t.unpack_row = ggml_unpack_row;
  return t;
}

}  // namespace alpaca::scalar

namespace alpaca {
const KernelTable* scalar_kernels() {
  static const KernelTable table = scalar::make_table();
  return &table;
}
}  // namespace alpaca
