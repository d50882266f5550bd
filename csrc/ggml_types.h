// GGML tensor types and quantization block layouts, bit-exact with ggml-common.h.
// numpy twin: alpaca_cpu/quants.py (tested against gguf.quants).
#pragma once
#include <cstdint>
#include <cstring>

namespace alpaca {

// Values of enum ggml_type that this engine supports.
enum class GgmlType : int32_t { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q8_1 = 9 };

constexpr int QK = 32;  // weights per block for every block type here

using fp16_t = uint16_t;  // IEEE half, stored as bits

struct block_q4_0 {          // 32 weights: x = d * (q - 8), q in [0, 15]
  fp16_t d;                  // scale
  uint8_t qs[QK / 2];        // low nibbles: weights 0..15, high nibbles: 16..31
};
static_assert(sizeof(block_q4_0) == 18, "block_q4_0 must match GGML");

struct block_q4_1 {          // 32 weights: x = d * q + m, q in [0, 15]
  fp16_t d;                  // scale
  fp16_t m;                  // min
  uint8_t qs[QK / 2];
};
static_assert(sizeof(block_q4_1) == 20, "block_q4_1 must match GGML");

struct block_q8_0 {          // 32 weights: x = d * q, q in [-127, 127]
  fp16_t d;
  int8_t qs[QK];
};
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must match GGML");

// The sum of each block's 32 ints for nb Q8_0 blocks: with it, a Q4_0 dot product
// d_w * d_a * sum((q - 8) * a) becomes d_w * d_a * (sum(q * a) - 8 * sum(a)) (see gemm).
inline void q8_0_block_sums(const block_q8_0* blocks, int64_t nb, int32_t* sums) {
  for (int64_t b = 0; b < nb; b++) {
    int32_t s = 0;
    for (int i = 0; i < QK; i++) s += blocks[b].qs[i];
    sums[b] = s;
  }
}

struct block_q8_1 {          // activations for Q4_1 weights: x = d * q; s = d * sum(q)
  fp16_t d;
  fp16_t s;
  int8_t qs[QK];
};
static_assert(sizeof(block_q8_1) == 36, "block_q8_1 must match GGML");

// Bytes of one row of `n` elements (n must be a multiple of QK for block types).
inline size_t row_bytes(GgmlType t, int64_t n) {
  switch (t) {
    case GgmlType::F32: return size_t(n) * 4;
    case GgmlType::F16: return size_t(n) * 2;
    case GgmlType::Q4_0: return size_t(n / QK) * sizeof(block_q4_0);
    case GgmlType::Q4_1: return size_t(n / QK) * sizeof(block_q4_1);
    case GgmlType::Q8_0: return size_t(n / QK) * sizeof(block_q8_0);
    case GgmlType::Q8_1: return size_t(n / QK) * sizeof(block_q8_1);
  }
  return 0;
}

inline bool is_block_type(GgmlType t) { return t != GgmlType::F32 && t != GgmlType::F16; }

// Portable IEEE half <-> float conversions (round to nearest even), used by the scalar path.
inline float fp16_to_fp32(fp16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) { mant <<= 1; exp--; }
      mant &= 0x3ff;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline fp16_t fp32_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) {  // inf or nan
    return fp16_t(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
  }
  if (absx >= 0x477ff000u) return fp16_t(sign | 0x7c00);  // overflow -> inf
  if (absx < 0x38800000u) {                                // result is subnormal or zero
    if (absx < 0x33000000u) return fp16_t(sign);
    const uint32_t e = absx >> 23;
    const uint32_t m = (absx & 0x7fffff) | 0x800000;
    const int shift = 126 - int(e);  // 14 - (e - 127) + 13 - 1 ... bits to drop
    const uint32_t half_m = m >> (shift);
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    uint32_t r = half_m;
    if (rem > halfway || (rem == halfway && (half_m & 1))) r++;
    return fp16_t(sign | r);
  }
  uint32_t r = absx - ((127 - 15) << 23);  // rebias exponent
  const uint32_t rem = r & 0x1fff;
  r >>= 13;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++;
  return fp16_t(sign | r);
}

}  // namespace alpaca
