// GGML tensor types and quantization block layouts, bit-exact with ggml-common.h.
// numpy twin: alpaca_cpu/quants.py (tested against gguf.quants).
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

namespace alpaca {

// The helpers below with loops are `static inline`: every file, each ISA's kernels included,
// gets its own copy compiled with its own flags. (Plain `inline` would let the linker keep one
// copy for all, possibly the one auto-vectorised with AVX2 in kernels_avx2.cpp.)

// Values of enum ggml_type that this engine supports. Everything else the code needs to know
// about a type is in its row of the traits table (type_traits, below).
enum class GgmlType : int32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, IQ4_NL = 20
};

// Tables indexed by type id (TypeTraits here, TypeKernels per ISA in kernels.h) have this many
// slots: every ggml_type id up to the K-quants and IQ types fits.
constexpr int kGgmlTypeSlots = 40;

constexpr int QK = 32;     // weights per block of the 32-element types (Q4_0 ... IQ4_NL)
constexpr int QK_K = 256;  // weights per super-block of the K-quants and Q8_K

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


struct block_q8_1 {          // activations for Q4_1 weights: x = d * q; s = d * sum(q)
  fp16_t d;
  fp16_t s;
  int8_t qs[QK];
};
static_assert(sizeof(block_q8_1) == 36, "block_q8_1 must match GGML");

// What panel kernels read of an activation block besides its ints, made once per matmul (see
// GemmFn) so that the inner loops convert no fp16 scale and add no offset per block and token:
// d as float; for a Q8_0 block sum8 = -8 * sum(q), which turns Q4_0's
// d_w * d_a * sum((q_w - 8) * q_a) into d_w * d_a * (sum(q_w * q_a) + sum8), exact in integers;
// for a Q8_1 block its s (d * sum(q)) as float.
struct ActBlockInfo {
  float d;
  union {
    int32_t sum8;
    float s;
  };
};
static_assert(sizeof(ActBlockInfo) == 8, "two 4-byte fields");

void act_block_info(GgmlType type, const void* blocks, int64_t nb, ActBlockInfo* info);

struct block_q5_0 {          // 32 weights: x = d * (q - 16), q in [0, 31]
  fp16_t d;
  uint8_t qh[4];             // bit j: the fifth bit of weight j (little-endian uint32)
  uint8_t qs[QK / 2];        // low 4 bits, packed like block_q4_0
};
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 must match GGML");

struct block_q5_1 {          // 32 weights: x = d * q + m, q in [0, 31]
  fp16_t d;
  fp16_t m;
  uint8_t qh[4];
  uint8_t qs[QK / 2];
};
static_assert(sizeof(block_q5_1) == 24, "block_q5_1 must match GGML");

// IQ4_NL: 32 weights x = d * kIq4nlValues[q], q in [0, 15] packed like block_q4_0.
struct block_iq4_nl {
  fp16_t d;
  uint8_t qs[QK / 2];
};
static_assert(sizeof(block_iq4_nl) == 18, "block_iq4_nl must match GGML");
// The 16 non-linear levels of IQ4_NL (ggml-common.h kvalues_iq4nl).
inline constexpr int8_t kIq4nlValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                            1,    13,   25,  38,  53,  69,  89,  113};

// --- K-quants: super-blocks of QK_K = 256 weights with packed sub-block scales ---

// Q2_K: 16 sub-blocks of 16; x = d * sc * q - dmin * m, q in [0, 3]; scales[j] = sc | m << 4.
// qs: byte 32*h + l holds weights 128*h + l + 32*s in bits 2s..2s+1 (s = 0..3).
struct block_q2_K {
  uint8_t scales[QK_K / 16];
  uint8_t qs[QK_K / 4];
  fp16_t d;
  fp16_t dmin;
};
static_assert(sizeof(block_q2_K) == 84, "block_q2_K must match GGML");

// Q3_K: 16 sub-blocks of 16; x = d * (sc - 32) * (q - 4), q in [0, 7]: low 2 bits in qs (as
// Q2_K), bit 2 in hmask (bit s of hmask[l] for weight 32*s + l). The 16 six-bit scales: low
// nibbles in scales[0..7] (sub-blocks 0..7 low, 8..15 high nibble), top 2 bits in scales[8..11].
struct block_q3_K {
  uint8_t hmask[QK_K / 8];
  uint8_t qs[QK_K / 4];
  uint8_t scales[12];
  fp16_t d;
};
static_assert(sizeof(block_q3_K) == 110, "block_q3_K must match GGML");

// Q4_K: 8 sub-blocks of 32; x = d * sc * q - dmin * m, q in [0, 15]; 6-bit sc and m packed in
// 12 bytes (k4_scale_min). qs: byte 32*h + l holds weight 64*h + l (low) and 64*h + 32 + l (high).
struct block_q4_K {
  fp16_t d;
  fp16_t dmin;
  uint8_t scales[12];
  uint8_t qs[QK_K / 2];
};
static_assert(sizeof(block_q4_K) == 144, "block_q4_K must match GGML");

// Q5_K: Q4_K plus a fifth bit: bit 2h (low nibble) / 2h+1 (high) of qh[l] for pair h of qs.
struct block_q5_K {
  fp16_t d;
  fp16_t dmin;
  uint8_t scales[12];
  uint8_t qh[QK_K / 8];
  uint8_t qs[QK_K / 2];
};
static_assert(sizeof(block_q5_K) == 176, "block_q5_K must match GGML");

// Q6_K: 16 sub-blocks of 16; x = d * scales[j] * (q - 32), q in [0, 63]. Per half h of 128:
// ql[64h + l] = weight l (low) | l + 64 (high nibble), ql[64h + 32 + l] = l + 32 | l + 96;
// qh[32h + l] holds the top 2 bits of weights l, l + 32, l + 64, l + 96 (bits 0-1, ..., 6-7).
struct block_q6_K {
  uint8_t ql[QK_K / 2];
  uint8_t qh[QK_K / 4];
  int8_t scales[QK_K / 16];
  fp16_t d;
};
static_assert(sizeof(block_q6_K) == 210, "block_q6_K must match GGML");

// Q8_K: activations for the K-quants: x = d * q (float d), bsums[j] = sum of qs[16j .. 16j+15].
struct block_q8_K {
  float d;
  int8_t qs[QK_K];
  int16_t bsums[QK_K / 16];
};
static_assert(sizeof(block_q8_K) == 292, "block_q8_K must match GGML");

// Scale and min of sub-block j (0..7) of a Q4_K/Q5_K block: 6 bits each, packed in 12 bytes.
static inline void k4_scale_min(int j, const uint8_t* q, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = uint8_t((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
    m = uint8_t((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// The 16 signed scales (sc - 32) of a Q3_K block.
static inline void q3_k_scales(const uint8_t* s, int* out) {
  for (int j = 0; j < 16; j++) {
    const int low = j < 8 ? s[j] & 0x0f : s[j - 8] >> 4;
    const int high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    out[j] = (low | (high << 4)) - 32;
  }
}

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
  size_t scale_bytes;        // fp16 scale fields (d, then m) of each block (weight_layout.h)
  size_t scale_offset;       // where they start in the block: 0, or after the quants (Q2_K, Q3_K, Q6_K)
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
static inline float fp16_to_fp32(fp16_t h) {
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

static inline fp16_t fp32_to_fp16(float f) {
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
