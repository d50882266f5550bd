// Error-minimising quantizers (see quant_search.h).
//
// A block of 32 weights x with per-weight importances w is stored as levels L and an fp16
// scale d (and, for the affine types, an fp16 offset m): x ~ d * L (+ m). For a fixed (d, m)
// the best level of each weight is its own rounding, clamped to the type's range; for fixed
// levels the best (d, m) is a weighted least-squares fit. The search alternates the two from
// a grid of starting scales around the reference one, measures every candidate with d and m
// already rounded to fp16 (the error of the bytes actually written), and keeps the best; the
// reference quantizer's own block is a candidate too and wins ties.
#include "quant_search.h"

#include "ggml_quants.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace alpaca {
namespace {

// The starting scales: the largest magnitude (symmetric types) or the range (affine types)
// maps to a level between kTopLevel * top and top + 0.5, in kSteps + 1 steps.
constexpr int kSteps = 12;
constexpr float kTopLevel = 0.7f;
// Least-squares refits (levels -> scale -> levels ...) from each starting scale.
constexpr int kRefits = 2;

// How a type stores a block's levels.
struct Format {
  int lo, hi;   // level range: x = d * L, L in [lo, hi]; affine: x = d * L + m, L in [0, hi]
  bool affine;
};

Format format_of(GgmlType t) {
  switch (t) {
    case GgmlType::Q4_0: return {-8, 7, false};
    case GgmlType::Q5_0: return {-16, 15, false};
    case GgmlType::Q8_0: return {-127, 127, false};
    case GgmlType::Q4_1: return {0, 15, true};
    case GgmlType::Q5_1: return {0, 31, true};
    default:
      throw std::invalid_argument(std::string("no error-minimising quantizer for type ") +
                                  type_traits(t).name);
  }
}

inline float round_fp16(float v) { return fp16_to_fp32(fp32_to_fp16(v)); }

// Nearest integer (ties to even) of v clamped to [lo, hi], without a libm call: the baseline
// x86-64 has no rounding instruction. Adding 1.5 * 2^23 leaves the integer in the low mantissa
// bits; v is clamped first so that it stays in range (NaN ends up as lo).
inline int round_clamp(float v, int lo, int hi) {
  v = std::max(v, float(lo));
  v = std::min(v, float(hi));
  const float t = v + 12582912.0f;
  int32_t i;
  std::memcpy(&i, &t, 4);
  return (i & 0x007fffff) - 0x00400000;
}

// One candidate: levels for every weight, the scale and offset as stored, and its error.
struct Candidate {
  int L[QK];
  float d = 0, m = 0;
  double err = INFINITY;
};

// Best levels for (d, m) (both already fp16-rounded) and the weighted error they give, summed
// in float so that the loop vectorises (the final choice against the reference block is made
// in double, in quantize_block).
void assign(const Format& f, const float* x, const float* w, Candidate& c) {
  float err = 0;
  const float id = c.d != 0.0f ? 1.0f / c.d : 0.0f;
  for (int i = 0; i < QK; i++) {
    const int l = round_clamp((x[i] - c.m) * id, f.lo, f.hi);
    c.L[i] = l;
    const float diff = x[i] - (float(l) * c.d + c.m);
    err += w[i] * diff * diff;
  }
  c.err = err;
}

// Weighted least-squares (d, m) for the levels in c (m stays 0 for symmetric types); false
// when the levels do not determine them (all equal, or all weights zero).
bool refit(const Format& f, const float* x, const float* w, const Candidate& c, float& d,
           float& m) {
  double sw = 0, sl = 0, sll = 0, sx = 0, sxl = 0;
  for (int i = 0; i < QK; i++) {
    const double wi = w[i], l = c.L[i];
    sw += wi;
    sl += wi * l;
    sll += wi * l * l;
    sx += wi * x[i];
    sxl += wi * x[i] * l;
  }
  if (!f.affine) {
    if (!(sll > 0)) return false;
    d = float(sxl / sll);
    m = 0;
    return true;
  }
  const double det = sw * sll - sl * sl;
  if (!(det > 0)) return false;
  d = float((sw * sxl - sx * sl) / det);
  m = float((sll * sx - sl * sxl) / det);
  return true;
}

// Start from (d0, m0), alternate refits and level assignments, keep the best seen in best.
void search_from(const Format& f, const float* x, const float* w, float d0, float m0,
                 Candidate& cur, Candidate& best) {
  cur.d = round_fp16(d0);
  cur.m = round_fp16(m0);
  assign(f, x, w, cur);
  if (cur.err < best.err) best = cur;
  for (int r = 0; r < kRefits; r++) {
    float d, m;
    if (!refit(f, x, w, cur, d, m)) return;
    cur.d = round_fp16(d);
    cur.m = round_fp16(m);
    if (!std::isfinite(cur.d) || !std::isfinite(cur.m)) return;
    assign(f, x, w, cur);
    if (cur.err < best.err) best = cur;
  }
}

// Levels, scale and offset -> the type's block bytes.
void pack(GgmlType t, const Candidate& c, void* out) {
  uint8_t q[QK];
  const int bias = t == GgmlType::Q4_0 ? 8 : t == GgmlType::Q5_0 ? 16 : 0;
  for (int i = 0; i < QK; i++) q[i] = uint8_t(c.L[i] + bias);
  auto nibbles = [&](uint8_t* qs) {
    for (int j = 0; j < QK / 2; j++) qs[j] = uint8_t((q[j] & 0x0F) | ((q[j + QK / 2] & 0x0F) << 4));
  };
  auto high_bits = [&](uint8_t* qh) {
    uint32_t h = 0;
    for (int i = 0; i < QK; i++) h |= uint32_t((q[i] >> 4) & 1) << i;
    std::memcpy(qh, &h, 4);
  };
  switch (t) {
    case GgmlType::Q4_0: {
      auto* b = static_cast<block_q4_0*>(out);
      b->d = fp32_to_fp16(c.d);
      nibbles(b->qs);
      break;
    }
    case GgmlType::Q4_1: {
      auto* b = static_cast<block_q4_1*>(out);
      b->d = fp32_to_fp16(c.d);
      b->m = fp32_to_fp16(c.m);
      nibbles(b->qs);
      break;
    }
    case GgmlType::Q5_0: {
      auto* b = static_cast<block_q5_0*>(out);
      b->d = fp32_to_fp16(c.d);
      nibbles(b->qs);
      high_bits(b->qh);
      break;
    }
    case GgmlType::Q5_1: {
      auto* b = static_cast<block_q5_1*>(out);
      b->d = fp32_to_fp16(c.d);
      b->m = fp32_to_fp16(c.m);
      nibbles(b->qs);
      high_bits(b->qh);
      break;
    }
    case GgmlType::Q8_0: {
      auto* b = static_cast<block_q8_0*>(out);
      b->d = fp32_to_fp16(c.d);
      for (int i = 0; i < QK; i++) b->qs[i] = int8_t(c.L[i]);
      break;
    }
    default:
      throw std::invalid_argument("pack: unexpected type");
  }
}

// The weighted error of an already-written block of n weights (the reference quantizer's).
double block_error(const TypeTraits& tt, const void* block, const float* x, const float* w,
                   int n = QK) {
  float y[QK_K];
  tt.to_float(block, y, n);
  double err = 0;
  for (int i = 0; i < n; i++) {
    const double diff = double(x[i]) - double(y[i]);
    err += double(w[i]) * diff * diff;
  }
  return err;
}

void quantize_block(GgmlType t, const TypeTraits& tt, const Format& f, const float* x,
                    const float* w, uint8_t* out) {
  tt.from_float(x, out, QK);  // the reference block: the candidate to beat
  const double ref_err = block_error(tt, out, x, w);
  float min = x[0], max = x[0], amax = 0, signed_max = 0;
  for (int i = 0; i < QK; i++) {
    min = std::min(min, x[i]);
    max = std::max(max, x[i]);
    if (std::fabs(x[i]) > amax) { amax = std::fabs(x[i]); signed_max = x[i]; }
  }
  if (ref_err == 0 || amax == 0) return;
  Candidate best, cur;
  for (int s = 0; s <= kSteps; s++) {
    const float frac = kTopLevel + (1.0f - kTopLevel) * float(s) / kSteps;
    if (f.affine) {
      if (max > min) {
        const float top = (f.hi + 0.5f) * frac;
        search_from(f, x, w, (max - min) / top, min, cur, best);
      }
    } else {
      // The largest magnitude on the negative side (level lo, as the reference puts it) or
      // on the positive side (level hi).
      search_from(f, x, w, signed_max / ((f.lo - 0.5f) * frac), 0, cur, best);
      search_from(f, x, w, signed_max / ((f.hi + 0.5f) * frac), 0, cur, best);
    }
  }
  if (!std::isfinite(best.err)) return;
  uint8_t candidate[sizeof(block_q8_0)];  // the largest of the five block types
  static_assert(sizeof(block_q8_0) >= sizeof(block_q5_1), "candidate buffer too small");
  pack(t, best, candidate);
  if (block_error(tt, candidate, x, w) < ref_err) std::memcpy(out, candidate, tt.type_size);
}

// The K-quants: GGML's own sub-block fits, with each weight's fitting weight multiplied by
// its importance, give the candidate; the reference super-block is the other one, and the
// smaller weighted error wins (ties: the reference). Without importance: the reference.
using WeightedK = void (*)(const float*, void*, int64_t, const float*);

template <typename Block, void (*Fn)(const float*, Block*, int64_t, const float*)>
void weighted_k(const float* x, void* y, int64_t k, const float* importance) {
  Fn(x, static_cast<Block*>(y), k, importance);
}

WeightedK weighted_k_of(GgmlType t) {
  switch (t) {
    case GgmlType::Q3_K: return weighted_k<block_q3_K, quantize_row_q3_K_weighted>;
    case GgmlType::Q4_K: return weighted_k<block_q4_K, quantize_row_q4_K_weighted>;
    case GgmlType::Q5_K: return weighted_k<block_q5_K, quantize_row_q5_K_weighted>;
    case GgmlType::Q6_K: return weighted_k<block_q6_K, quantize_row_q6_K_weighted>;
    default: return nullptr;
  }
}

void quantize_superblocks(const TypeTraits& tt, WeightedK fit, const float* x, uint8_t* out,
                          int64_t k, const float* importance) {
  tt.from_float(x, out, k);
  if (!importance) return;
  uint8_t candidate[sizeof(block_q6_K)];  // the largest of the four block types
  static_assert(sizeof(block_q6_K) >= sizeof(block_q5_K), "candidate buffer too small");
  for (int64_t b = 0; b < k / QK_K; b++) {
    const float* xb = x + b * QK_K;
    const float* wb = importance + b * QK_K;
    uint8_t* ob = out + b * tt.type_size;
    fit(xb, candidate, QK_K, wb);
    if (block_error(tt, candidate, xb, wb, QK_K) < block_error(tt, ob, xb, wb, QK_K))
      std::memcpy(ob, candidate, tt.type_size);
  }
}

}  // namespace

bool has_search_quantizer(GgmlType t) {
  switch (t) {
    case GgmlType::Q4_0: case GgmlType::Q4_1: case GgmlType::Q5_0: case GgmlType::Q5_1:
    case GgmlType::Q8_0:
      return true;
    default:
      return weighted_k_of(t) != nullptr;
  }
}

void quantize_row_search(GgmlType t, const float* x, void* y, int64_t k,
                         const float* importance) {
  const TypeTraits& tt = type_traits(t);
  if (const WeightedK fit = weighted_k_of(t)) {
    quantize_superblocks(tt, fit, x, static_cast<uint8_t*>(y), k, importance);
    return;
  }
  const Format f = format_of(t);
  float ones[QK];
  std::fill(ones, ones + QK, 1.0f);
  uint8_t* out = static_cast<uint8_t*>(y);
  for (int64_t b = 0; b < k / QK; b++) {
    const float* w = importance ? importance + b * QK : ones;
    quantize_block(t, tt, f, x + b * QK, w, out + b * tt.type_size);
  }
}

}  // namespace alpaca
