// The type traits table (ggml_types.h) and the reference row conversions it points to: the
// portable quantizers and dequantizers, bit-exact with GGML's reference ones (ggml-quants.c
// *_ref). They are the scalar kernel table's conversions and the twin the SIMD ones are tested
// against. numpy twin of the table: alpaca_cpu/ggml_types.py.
#include "ggml_types.h"

#include "ggml_quants.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace alpaca {
namespace {

void quantize_row_q4_0(const float* x, block_q4_0* y, int64_t k) {
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

void quantize_row_q4_1(const float* x, block_q4_1* y, int64_t k) {
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

// Q8_0 and Q8_1: q = roundf(x / d) with d = amax / 127; Q8_1 also keeps s = d * sum(q).
template <typename Block>
void quantize_row_q8(const float* x, Block* y, int64_t k) {
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
    if constexpr (std::is_same_v<Block, block_q8_1>) y[b].s = fp32_to_fp16(float(sum) * d);
  }
}

void dequantize_row_q4_0(const block_q4_0* x, float* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++, y += QK) {
    const float d = fp16_to_fp32(x[b].d);
    for (int j = 0; j < QK / 2; j++) {
      y[j] = float((x[b].qs[j] & 0x0f) - 8) * d;
      y[j + QK / 2] = float((x[b].qs[j] >> 4) - 8) * d;
    }
  }
}

void dequantize_row_q4_1(const block_q4_1* x, float* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++, y += QK) {
    const float d = fp16_to_fp32(x[b].d), m = fp16_to_fp32(x[b].m);
    for (int j = 0; j < QK / 2; j++) {
      y[j] = float(x[b].qs[j] & 0x0f) * d + m;
      y[j + QK / 2] = float(x[b].qs[j] >> 4) * d + m;
    }
  }
}

// Q8_0 and Q8_1 alike: x = d * q (Q8_1's s is a by-product for the dot products).
template <typename Block>
void dequantize_row_q8(const Block* x, float* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++, y += QK) {
    const float d = fp16_to_fp32(x[b].d);
    for (int j = 0; j < QK; j++) y[j] = float(x[b].qs[j]) * d;
  }
}

void fp16_to_fp32_row(const fp16_t* x, float* y, int64_t k) {
  for (int64_t i = 0; i < k; i++) y[i] = fp16_to_fp32(x[i]);
}

void fp32_to_fp16_row(const float* x, fp16_t* y, int64_t k) {
  for (int64_t i = 0; i < k; i++) y[i] = fp32_to_fp16(x[i]);
}

void copy_f32_row(const float* x, float* y, int64_t k) { std::copy(x, x + k, y); }

// The typed conversions above as the table's type-erased signatures.
template <typename Src, void (*F)(const Src*, float*, int64_t)>
void to_float(const void* x, float* y, int64_t k) { F(static_cast<const Src*>(x), y, k); }
template <typename Dst, void (*F)(const float*, Dst*, int64_t)>
void from_float(const float* x, void* y, int64_t k) { F(x, static_cast<Dst*>(y), k); }

// One row per type: id, name, block size, bytes per block, block type?, weight type?,
// activation format, scale bytes and offset, to float, from float. The conversions of Q5_0 ...
// Q8_K are in ggml_quants.cpp. Scale bytes (the fp16 fields a block starts with) only matter
// for the types a table keeps in panels (weight_layout.h).
const TypeTraits kTraits[] = {
    {GgmlType::F32, "F32", 1, 4, false, true, GgmlType::F32, 0, 0,
     to_float<float, copy_f32_row>, from_float<float, copy_f32_row>},
    {GgmlType::F16, "F16", 1, 2, false, true, GgmlType::F32, 0, 0,
     to_float<fp16_t, fp16_to_fp32_row>, from_float<fp16_t, fp32_to_fp16_row>},
    {GgmlType::Q4_0, "Q4_0", QK, sizeof(block_q4_0), true, true, GgmlType::Q8_0, 2, 0,
     to_float<block_q4_0, dequantize_row_q4_0>, from_float<block_q4_0, quantize_row_q4_0>},
    {GgmlType::Q4_1, "Q4_1", QK, sizeof(block_q4_1), true, true, GgmlType::Q8_1, 4, 0,
     to_float<block_q4_1, dequantize_row_q4_1>, from_float<block_q4_1, quantize_row_q4_1>},
    {GgmlType::Q5_0, "Q5_0", QK, sizeof(block_q5_0), true, true, GgmlType::Q8_0, 2, 0,
     to_float<block_q5_0, dequantize_row_q5_0>, from_float<block_q5_0, quantize_row_q5_0>},
    {GgmlType::Q5_1, "Q5_1", QK, sizeof(block_q5_1), true, true, GgmlType::Q8_1, 4, 0,
     to_float<block_q5_1, dequantize_row_q5_1>, from_float<block_q5_1, quantize_row_q5_1>},
    {GgmlType::Q8_0, "Q8_0", QK, sizeof(block_q8_0), true, true, GgmlType::Q8_0, 2, 0,
     to_float<block_q8_0, dequantize_row_q8<block_q8_0>>, from_float<block_q8_0, quantize_row_q8<block_q8_0>>},
    {GgmlType::Q8_1, "Q8_1", QK, sizeof(block_q8_1), true, false, GgmlType::Q8_1, 4, 0,
     to_float<block_q8_1, dequantize_row_q8<block_q8_1>>, from_float<block_q8_1, quantize_row_q8<block_q8_1>>},
    {GgmlType::Q2_K, "Q2_K", QK_K, sizeof(block_q2_K), true, true, GgmlType::Q8_K, 4, offsetof(block_q2_K, d),
     to_float<block_q2_K, dequantize_row_q2_K>, from_float<block_q2_K, quantize_row_q2_K>},
    {GgmlType::Q3_K, "Q3_K", QK_K, sizeof(block_q3_K), true, true, GgmlType::Q8_K, 2, offsetof(block_q3_K, d),
     to_float<block_q3_K, dequantize_row_q3_K>, from_float<block_q3_K, quantize_row_q3_K>},
    {GgmlType::Q4_K, "Q4_K", QK_K, sizeof(block_q4_K), true, true, GgmlType::Q8_K, 4, 0,
     to_float<block_q4_K, dequantize_row_q4_K>, from_float<block_q4_K, quantize_row_q4_K>},
    {GgmlType::Q5_K, "Q5_K", QK_K, sizeof(block_q5_K), true, true, GgmlType::Q8_K, 4, 0,
     to_float<block_q5_K, dequantize_row_q5_K>, from_float<block_q5_K, quantize_row_q5_K>},
    {GgmlType::Q6_K, "Q6_K", QK_K, sizeof(block_q6_K), true, true, GgmlType::Q8_K, 2, offsetof(block_q6_K, d),
     to_float<block_q6_K, dequantize_row_q6_K>, from_float<block_q6_K, quantize_row_q6_K>},
    {GgmlType::Q8_K, "Q8_K", QK_K, sizeof(block_q8_K), true, false, GgmlType::Q8_K, 0, 0,
     to_float<block_q8_K, dequantize_row_q8_K>, from_float<block_q8_K, quantize_row_q8_K>},
    {GgmlType::IQ4_NL, "IQ4_NL", QK, sizeof(block_iq4_nl), true, true, GgmlType::Q8_0, 2, 0,
     to_float<block_iq4_nl, dequantize_row_iq4_nl>, from_float<block_iq4_nl, quantize_row_iq4_nl>},
};

// kTraits indexed by type id (null where the id is unknown). Built on first use, so that
// other files' static initialisers may call type_traits too.
const std::array<const TypeTraits*, kGgmlTypeSlots>& index_by_id() {
  static const std::array<const TypeTraits*, kGgmlTypeSlots> index = [] {
    std::array<const TypeTraits*, kGgmlTypeSlots> ix{};
    for (const TypeTraits& t : kTraits) ix[size_t(t.type)] = &t;
    return ix;
  }();
  return index;
}

std::string known_names() {
  std::string s;
  for (const TypeTraits& t : kTraits) s += (s.empty() ? "" : ", ") + std::string(t.name);
  return s;
}

}  // namespace

GgmlType checked_type(int32_t id) {
  if (id < 0 || id >= kGgmlTypeSlots || !index_by_id()[size_t(id)])
    throw std::invalid_argument("unsupported GGML type id " + std::to_string(id) +
                                " (supported: " + known_names() + ")");
  return GgmlType(id);
}

const TypeTraits& type_traits(GgmlType t) { return *index_by_id()[size_t(checked_type(int32_t(t)))]; }

std::vector<const TypeTraits*> all_type_traits() {
  std::vector<const TypeTraits*> out;
  for (const TypeTraits& t : kTraits) out.push_back(&t);
  return out;
}

void act_block_info(GgmlType type, const void* blocks, int64_t nb, ActBlockInfo* info) {
  if (type == GgmlType::Q8_0) {
    const auto* x = static_cast<const block_q8_0*>(blocks);
    for (int64_t b = 0; b < nb; b++) {
      int32_t sum = 0;
      for (int i = 0; i < QK; i++) sum += x[b].qs[i];
      info[b].d = fp16_to_fp32(x[b].d);
      info[b].sum8 = -8 * sum;
    }
  } else if (type == GgmlType::Q8_1) {
    const auto* x = static_cast<const block_q8_1*>(blocks);
    for (int64_t b = 0; b < nb; b++) {
      info[b].d = fp16_to_fp32(x[b].d);
      info[b].s = fp16_to_fp32(x[b].s);
    }
  } else {
    throw std::invalid_argument(std::string("act_block_info: no block info for ") +
                                type_traits(type).name);
  }
}

}  // namespace alpaca
