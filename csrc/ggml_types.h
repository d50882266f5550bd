// GGML tensor types and quantization block layouts, bit-exact with ggml-common.h.
// numpy twin: alpaca_cpu/quants.py (tested against gguf.quants).
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

namespace alpaca {

// Values of enum ggml_type that this engine supports. Everything else the code needs to know
// about a type is in its row of the traits table (type_traits, below).
enum class GgmlType : int32_t { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q8_1 = 9 };

// Tables indexed by type id (TypeTraits here, TypeKernels per ISA in kernels.h) have this many
// slots: every ggml_type id up to the K-quants and IQ types fits.
constexpr int kGgmlTypeSlots = 40;

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

// One row of a row-conversion kernel, type-erased so that every type fits one table:
// `k` elements (a multiple of the type's block size) from/to float.
using ToFloatFn = void (*)(const void* x, float* y, int64_t k);
using FromFloatFn = void (*)(const float* x, void* y, int64_t k);

// Everything the engine knows about one GGML type (ggml calls this `type_traits`).
struct TypeTraits {
  GgmlType type;
  const char* name;          // GGML's name: "Q4_0", "F16", ...
  int64_t block_size;        // elements per block (1 for F32/F16)
  size_t type_size;          // bytes per block
  bool is_block;             // quantized in blocks: rows must be whole blocks
  bool is_weight;            // may be a weight matrix (Q8_1 is an activation format only)
  GgmlType vec_dot_type;     // the activation format a weight row of this type multiplies with
  size_t scale_bytes;        // fp16 scale fields (d, then m) leading each block (weight_layout.h)
  bool panel8;               // the x86 Panel8 layout (weight_layout.h) is defined for it
  ToFloatFn to_float;        // reference (portable, bit-exact) row conversions: the scalar table's
  FromFloatFn from_float;
};

// The traits of t; std::invalid_argument naming the type id if the engine does not know it.
const TypeTraits& type_traits(GgmlType t);
// The type with this id (from Python or a file), checked the same way.
GgmlType checked_type(int32_t id);
// Every known type, in id order.
std::vector<const TypeTraits*> all_type_traits();

// Bytes of one row of `n` elements (n a multiple of the type's block size).
inline size_t row_bytes(GgmlType t, int64_t n) {
  const TypeTraits& tt = type_traits(t);
  return size_t(n / tt.block_size) * tt.type_size;
}

inline bool is_block_type(GgmlType t) { return type_traits(t).is_block; }

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
