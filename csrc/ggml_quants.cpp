// Reference conversions of Q5_0, Q5_1, IQ4_NL, Q2_K ... Q6_K and Q8_K (see ggml_quants.h).
//
// The quantizers search for scales the way GGML's reference ones do, and must produce the same
// bytes: every float expression below keeps GGML's operand order (a * b * c is (a * b) * c,
// ints convert to float where GGML's do), and CMakeLists.txt compiles this file with
// -ffp-contract=off so that no a * b + c is fused into an FMA (GCC's default for GNU C++ is to
// fuse wherever the target has FMA: every aarch64 CPU). GGML's own reference, in ggml-base,
// is built without FMA on x86-64; on aarch64 a compiler that fuses would make a few blocks of
// its output differ from ours.
//
// Where GGML leaves bytes undefined we write zeros: Q8_K bsums of an all-zero block. It does
// not change a value.
#include "ggml_quants.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

namespace alpaca {
namespace {

constexpr float kGroupMaxEps = 1e-15f;  // below this a group's largest magnitude counts as zero

// Round to nearest, ties to even, by adding 1.5 * 2^23 and reading the low mantissa bits (valid
// for |v| < 2^22; GGML's nearest_int; NaN and larger values give some int, callers clamp).
inline int round_int(float v) {
  const float t = v + 12582912.0f;
  int32_t i;
  std::memcpy(&i, &t, 4);
  return (i & 0x007fffff) - 0x00400000;
}

// --- scale searches (the K-quants' sub-block fits) ---

// Asymmetric fit x ~ scale * L - min_out, L in [0, nmax], weighted: start from the min/max
// scale, then try nstep + 1 scales (rmin + rdelta * is + nmax) / (max - min) and keep the one
// with the smallest weighted error (squared, or absolute when use_mad), refitting scale and min
// by least squares for each. Returns the scale; *min_out >= 0 is subtracted.
float fit_scale_min(int n, int nmax, const float* x, const float* weights, uint8_t* L,
                    float* min_out, uint8_t* Laux, float rmin, float rdelta, int nstep,
                    bool use_mad) {
  float min = x[0], max = x[0];
  float sum_w = weights[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    const float w = weights[i];
    sum_w += w;
    sum_x += w * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *min_out = -min;
    return 0.0f;
  }
  float iscale = nmax / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    const int l = round_int(iscale * (x[i] - min));
    L[i] = uint8_t(std::max(0, std::min(nmax, l)));
    float diff = scale * L[i] + min - x[i];
    diff = use_mad ? std::fabs(diff) : diff * diff;
    best_error += weights[i] * diff;
  }
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::max(0, std::min(nmax, round_int(iscale * (x[i] - min))));
      Laux[i] = uint8_t(l);
      const float w = weights[i];
      sum_l += w * l;
      sum_l2 += w * l * l;
      sum_xl += w * l * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float cur_error = 0;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * Laux[i] + this_min - x[i];
        diff = use_mad ? std::fabs(diff) : diff * diff;
        cur_error += weights[i] * diff;
      }
      if (cur_error < best_error) {
        std::memcpy(L, Laux, size_t(n));
        best_error = cur_error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *min_out = -min;
  return scale;
}

// The signed value of largest magnitude in x (the first one on a tie); false when that
// magnitude is below kGroupMaxEps (an all-zero group).
bool largest_signed(int n, const float* x, float& max) {
  float amax = 0;
  max = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) { amax = ax; max = x[i]; }
  }
  return !(amax < kGroupMaxEps);
}

// The fitting weight of x[i] in the symmetric fits: x^2 (GGML's), times importance[i] when
// an importance row is given (the error-minimising search's candidates).
inline float sym_weight(const float* x, const float* importance, int i) {
  return importance ? importance[i] * (x[i] * x[i]) : x[i] * x[i];
}

// Levels L = clamp(round(iscale * x), -nmax, nmax - 1) and their weighted sums
// sumlx = sum w x L and suml2 = sum w L^2, in element order.
void sym_levels(int n, int nmax, const float* x, const float* imp, float iscale, int8_t* L,
                float& sumlx, float& suml2) {
  sumlx = suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = std::max(-nmax, std::min(nmax - 1, round_int(iscale * x[i])));
    L[i] = int8_t(l);
    const float w = sym_weight(x, imp, i);
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
}

// The start of both symmetric fits: levels for the scale -nmax / max and their sums; false
// (levels 0) for an all-zero group.
bool start_sym_fit(int n, int nmax, const float* x, const float* imp, int8_t* L, float& max,
                   float& sumlx, float& suml2) {
  if (!largest_signed(n, x, max)) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return false;
  }
  sym_levels(n, nmax, x, imp, -nmax / max, L, sumlx, suml2);
  return true;
}

// Symmetric fit x ~ scale * (L - nmax), L in [0, 2 nmax), weights x^2: the scale -nmax / max
// and 18 neighbours -(nmax + 0.1 is) / max, keeping the best least-squares one (Q6_K).
float fit_scale_sym(int n, int nmax, const float* x, const float* imp, int8_t* L) {
  float max, sumlx, suml2;
  if (!start_sym_fit(n, nmax, x, imp, L, max, sumlx, suml2)) return 0.0f;
  for (int i = 0; i < n; ++i) L[i] = int8_t(L[i] + nmax);
  float scale = suml2 ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  int8_t Laux[32];
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    sym_levels(n, nmax, x, imp, -(nmax + 0.1f * is) / max, Laux, sumlx, suml2);
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) L[i] = int8_t(Laux[i] + nmax);
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// Symmetric fit for Q3_K: levels from -nmax / max, then up to 5 passes that move single
// levels while the weighted (x^2) least-squares fit improves. L in [0, 2 nmax) on return.
float fit_scale_q3(int n, int nmax, const float* x, const float* imp, int8_t* L) {
  float max, sumlx, suml2;
  if (!start_sym_fit(n, nmax, x, imp, L, max, sumlx, suml2)) return 0.0f;
  for (int pass = 0; pass < 5; ++pass) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = sym_weight(x, imp, i);
      float slx = sumlx - w * x[i] * L[i];
      if (slx > 0) {
        float sl2 = suml2 - w * L[i] * L[i];
        int new_l = round_int(x[i] * sl2 / slx);
        new_l = std::max(-nmax, std::min(nmax - 1, new_l));
        if (new_l != L[i]) {
          slx += w * x[i] * new_l;
          sl2 += w * new_l * new_l;
          if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = int8_t(new_l);
            sumlx = slx;
            suml2 = sl2;
            ++changed;
          }
        }
      }
    }
    if (!changed) break;
  }
  for (int i = 0; i < n; ++i) L[i] = int8_t(L[i] + nmax);
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// Fits each of the 16 sub-blocks of 16 of a super-block (Q3_K, Q6_K) and returns the signed
// scale of largest magnitude (the first on a tie); amax: that magnitude.
template <float (*Fit)(int, int, const float*, const float*, int8_t*)>
float fit_subblocks(const float* x, const float* imp, int nmax, int8_t* L, float* scales,
                    float& amax) {
  float max_scale = 0;
  amax = 0;
  for (int j = 0; j < 16; ++j) {
    scales[j] = Fit(16, nmax, x + 16 * j, imp ? imp + 16 * j : nullptr, L + 16 * j);
    const float a = std::fabs(scales[j]);
    if (a > amax) { amax = a; max_scale = scales[j]; }
  }
  return max_scale;
}

// Index of the IQ4_NL level nearest to v (the lower one on a tie).
int nearest_iq4nl(float v) {
  if (v <= kIq4nlValues[0]) return 0;
  if (v >= kIq4nlValues[15]) return 15;
  // GGML's binary search ends at lo = the number of levels 1..14 that v is not below; counted
  // here without branches (a search mispredicts on every step: IQ4_NL quantizes 16 candidate
  // scales per block, so this lookup was most of convert-weights --outtype iq4_nl's time).
  int lo = 0;
  for (int i = 1; i < 15; ++i) lo += !(v < kIq4nlValues[i]);
  const int hi = lo + 1;
  return v - kIq4nlValues[lo] < kIq4nlValues[hi] - v ? lo : hi;
}

// Pack 32 5-bit levels as Q5_0/Q5_1: low 4 bits like Q4_0 (weight j low nibble of qs[j % 16],
// j >= 16 high), bit 4 of weight j as bit j of the little-endian uint32 qh.
void pack_5bit(const uint8_t* q, uint8_t* qs, uint8_t* qh) {
  uint32_t h = 0;
  for (int j = 0; j < QK / 2; ++j) qs[j] = uint8_t((q[j] & 0x0F) | ((q[j + QK / 2] & 0x0F) << 4));
  for (int j = 0; j < QK; ++j) h |= uint32_t((q[j] >> 4) & 1) << j;
  std::memcpy(qh, &h, 4);
}

// Pack 256 2-bit levels as Q2_K/Q3_K qs: byte 32h + l holds levels 128h + 32s + l at bits 2s.
void pack_2bit(const uint8_t* L, uint8_t* qs) {
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < 32; ++l) {
      const uint8_t* Lh = L + 128 * h + l;
      qs[32 * h + l] = uint8_t(Lh[0] | (Lh[32] << 2) | (Lh[64] << 4) | (Lh[96] << 6));
    }
}

// The 8 sub-block scales and mins of a Q4_K/Q5_K block, each to 6 bits against the largest
// (d = max_scale / 63, dmin = max_min / 63), packed as k4_scale_min reads them.
template <typename Block>
void pack_k4_scales(const float* scales, const float* mins, float max_scale, float max_min,
                    Block& y) {
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  for (int j = 0; j < 8; ++j) {
    const uint8_t ls = std::min<uint8_t>(63, uint8_t(round_int(inv_scale * scales[j])));
    const uint8_t lm = std::min<uint8_t>(63, uint8_t(round_int(inv_min * mins[j])));
    if (j < 4) {
      y.scales[j] = ls;
      y.scales[j + 4] = lm;
    } else {
      y.scales[j + 4] = uint8_t((ls & 0xF) | ((lm & 0xF) << 4));
      y.scales[j - 4] |= uint8_t((ls >> 4) << 6);
      y.scales[j] |= uint8_t((lm >> 4) << 6);
    }
  }
  y.d = fp32_to_fp16(max_scale / 63.f);
  y.dmin = fp32_to_fp16(max_min / 63.f);
}

// Q4_K and Q5_K levels (nmax 15 or 31) of one super-block: fit each sub-block of 32, quantize
// its scale and min, then requantize the weights against the stored ones.
template <typename Block>
void quantize_k4_levels(const float* x, const float* imp, Block& y, uint8_t* L, int nmax,
                        float rmin, int nstep) {
  float scales[8], mins[8], weights[32];
  uint8_t Laux[32];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    const float* xj = x + 32 * j;
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += xj[l] * xj[l];
    const float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xj[l]);
    if (imp)
      for (int l = 0; l < 32; ++l) weights[l] *= imp[32 * j + l];
    scales[j] = fit_scale_min(32, nmax, xj, weights, L + 32 * j, &mins[j], Laux, rmin, 0.1f,
                              nstep, false);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  pack_k4_scales(scales, mins, max_scale, max_min, y);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    k4_scale_min(j, y.scales, sc, m);
    const float d = fp16_to_fp32(y.d) * sc;
    if (!d) continue;
    const float dm = fp16_to_fp32(y.dmin) * m;
    for (int i = 0; i < 32; ++i) {
      const int l = round_int((x[32 * j + i] + dm) / d);
      L[32 * j + i] = uint8_t(std::max(0, std::min(nmax, l)));
    }
  }
}

}  // namespace

// ---------------------------------------------------------------- quantizers

void quantize_row_q5_0(const float* x, block_q5_0* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++, x += QK) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK; j++) {
      if (amax < std::fabs(x[j])) { amax = std::fabs(x[j]); max = x[j]; }
    }
    const float d = max / -16;
    const float id = d ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    uint8_t q[QK];
    for (int j = 0; j < QK; ++j) q[j] = uint8_t(std::min(31, int(int8_t(x[j] * id + 16.5f))));
    pack_5bit(q, y[b].qs, y[b].qh);
  }
}

void quantize_row_q5_1(const float* x, block_q5_1* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++, x += QK) {
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < QK; j++) {
      if (x[j] < min) min = x[j];
      if (x[j] > max) max = x[j];
    }
    const float d = (max - min) / 31;
    const float id = d ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    y[b].m = fp32_to_fp16(min);
    uint8_t q[QK];
    for (int j = 0; j < QK; ++j) q[j] = uint8_t((x[j] - min) * id + 0.5f);
    pack_5bit(q, y[b].qs, y[b].qh);
  }
}

// Sums of w * q * x and w * q * q (w = x^2) over a block of 32 for the IQ4_NL levels nearest
// to id * x, in GGML's element order.
static void iq4nl_sums(const float* x, float id, float& sumqx, float& sumq2) {
  sumqx = sumq2 = 0;
  for (int j = 0; j < QK; ++j) {
    const float q = kIq4nlValues[nearest_iq4nl(id * x[j])];
    const float w = x[j] * x[j];
    sumqx += w * q * x[j];
    sumq2 += w * q * q;
  }
}

// IQ4_NL as llama-quantize writes it without an importance matrix (GGML's quantize_iq4_nl,
// the block search with ntry 7; weights x^2): the least-squares scale for the levels nearest
// to x * 127 / max, then for each of the 15 scales max / (itry - 127), itry = -7 .. 7, the
// least-squares scale for its levels, keeping whichever has the largest sumqx^2 / sumq2
// (the first on a tie); the levels are then redone for the kept scale. GGML's
// quantize_row_iq4_nl_ref (ntry -1) tries only max / -127 and keeps its levels.
void quantize_row_iq4_nl(const float* x, block_iq4_nl* y, int64_t k) {
  constexpr int ntry = 7;
  for (int64_t b = 0; b < k / QK; b++, x += QK) {
    float amax = 0, max = 0;
    for (int j = 0; j < QK; ++j) {
      const float ax = std::fabs(x[j]);
      if (ax > amax) { amax = ax; max = x[j]; }
    }
    float d = 0;
    if (amax >= kGroupMaxEps) {
      float sumqx, sumq2;
      iq4nl_sums(x, 1 / (-max / kIq4nlValues[0]), sumqx, sumq2);
      d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
      float best = d * sumqx;
      for (int itry = -ntry; itry <= ntry; ++itry) {
        iq4nl_sums(x, float(itry + kIq4nlValues[0]) / max, sumqx, sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
          d = sumqx / sumq2;
          best = d * sumqx;
        }
      }
    }
    y[b].d = fp32_to_fp16(d);
    const float id = d ? 1 / d : 0;
    uint8_t L[QK];
    for (int j = 0; j < QK; ++j) L[j] = uint8_t(nearest_iq4nl(id * x[j]));
    for (int j = 0; j < QK / 2; ++j) y[b].qs[j] = uint8_t(L[j] | (L[j + QK / 2] << 4));
  }
}

void quantize_row_q2_K(const float* x, block_q2_K* y, int64_t k) {
  constexpr float q4scale = 15.f;
  for (int64_t b = 0; b < k / QK_K; b++, x += QK_K) {
    uint8_t L[QK_K], Laux[16];
    float weights[16], mins[16], scales[16];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 16; ++j) {
      for (int l = 0; l < 16; ++l) weights[l] = std::fabs(x[16 * j + l]);
      scales[j] = fit_scale_min(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], Laux, -0.5f,
                                0.1f, 15, true);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    block_q2_K& o = y[b];
    if (max_scale > 0) {
      const float iscale = q4scale / max_scale;
      for (int j = 0; j < 16; ++j) o.scales[j] = uint8_t(round_int(iscale * scales[j]));
      o.d = fp32_to_fp16(max_scale / q4scale);
    } else {
      for (int j = 0; j < 16; ++j) o.scales[j] = 0;
      o.d = fp32_to_fp16(0.f);
    }
    if (max_min > 0) {
      const float iscale = q4scale / max_min;
      for (int j = 0; j < 16; ++j) o.scales[j] |= uint8_t(round_int(iscale * mins[j]) << 4);
      o.dmin = fp32_to_fp16(max_min / q4scale);
    } else {
      o.dmin = fp32_to_fp16(0.f);
    }
    for (int j = 0; j < 16; ++j) {
      const float d = fp16_to_fp32(o.d) * (o.scales[j] & 0xF);
      if (!d) continue;
      const float dm = fp16_to_fp32(o.dmin) * (o.scales[j] >> 4);
      for (int i = 0; i < 16; ++i) {
        const int l = round_int((x[16 * j + i] + dm) / d);
        L[16 * j + i] = uint8_t(std::max(0, std::min(3, l)));
      }
    }
    pack_2bit(L, o.qs);
  }
}

void quantize_row_q3_K_weighted(const float* x, block_q3_K* y, int64_t k, const float* imp) {
  for (int64_t b = 0; b < k / QK_K; b++, x += QK_K, imp = imp ? imp + QK_K : nullptr) {
    int8_t L[QK_K];
    float scales[16], amax;
    const float max_scale = fit_subblocks<fit_scale_q3>(x, imp, 4, L, scales, amax);
    block_q3_K& o = y[b];
    std::memset(o.scales, 0, 12);
    if (max_scale) {
      const float iscale = -32.f / max_scale;
      for (int j = 0; j < 16; ++j) {
        int8_t l = int8_t(round_int(iscale * scales[j]));
        l = int8_t(std::max<int>(-32, std::min<int>(31, l)) + 32);
        if (j < 8) o.scales[j] = uint8_t(l & 0xF);
        else o.scales[j - 8] |= uint8_t((l & 0xF) << 4);
        l = int8_t(l >> 4);
        o.scales[j % 4 + 8] |= uint8_t(l << (2 * (j / 4)));
      }
      o.d = fp32_to_fp16(1 / iscale);
    } else {
      o.d = fp32_to_fp16(0.f);
    }
    int sc[16];
    q3_k_scales(o.scales, sc);
    for (int j = 0; j < 16; ++j) {
      const float d = fp16_to_fp32(o.d) * sc[j];
      if (!d) continue;
      for (int i = 0; i < 16; ++i) {
        const int l = round_int(x[16 * j + i] / d);
        L[16 * j + i] = int8_t(std::max(-4, std::min(3, l)) + 4);
      }
    }
    // bit 2 of level j goes to bit (j / 32) of hmask[j % 32]; qs keep the low 2 bits
    std::memset(o.hmask, 0, QK_K / 8);
    uint8_t low[QK_K];
    for (int j = 0; j < QK_K; ++j) {
      if (L[j] > 3) o.hmask[j % 32] |= uint8_t(1 << (j / 32));
      low[j] = uint8_t(L[j] > 3 ? L[j] - 4 : L[j]);
    }
    pack_2bit(low, o.qs);
  }
}

void quantize_row_q4_K_weighted(const float* x, block_q4_K* y, int64_t k, const float* imp) {
  for (int64_t b = 0; b < k / QK_K; b++, x += QK_K, imp = imp ? imp + QK_K : nullptr) {
    uint8_t L[QK_K];
    quantize_k4_levels(x, imp, y[b], L, 15, -1.f, 20);
    for (int h = 0; h < 4; ++h)
      for (int l = 0; l < 32; ++l)
        y[b].qs[32 * h + l] = uint8_t(L[64 * h + l] | (L[64 * h + 32 + l] << 4));
  }
}

void quantize_row_q5_K_weighted(const float* x, block_q5_K* y, int64_t k, const float* imp) {
  for (int64_t b = 0; b < k / QK_K; b++, x += QK_K, imp = imp ? imp + QK_K : nullptr) {
    uint8_t L[QK_K];
    quantize_k4_levels(x, imp, y[b], L, 31, -0.5f, 15);
    std::memset(y[b].qh, 0, QK_K / 8);
    for (int h = 0; h < 4; ++h)
      for (int l = 0; l < 32; ++l) {
        const int l1 = L[64 * h + l], l2 = L[64 * h + 32 + l];
        y[b].qh[l] |= uint8_t(((l1 >> 4) << (2 * h)) | ((l2 >> 4) << (2 * h + 1)));
        y[b].qs[32 * h + l] = uint8_t((l1 & 0xF) | ((l2 & 0xF) << 4));
      }
  }
}

void quantize_row_q6_K_weighted(const float* x, block_q6_K* y, int64_t k, const float* imp) {
  for (int64_t b = 0; b < k / QK_K; b++, x += QK_K, imp = imp ? imp + QK_K : nullptr) {
    int8_t L[QK_K];
    float scales[16], max_abs_scale;
    const float max_scale = fit_subblocks<fit_scale_sym>(x, imp, 32, L, scales, max_abs_scale);
    block_q6_K& o = y[b];
    if (max_abs_scale < kGroupMaxEps) {
      std::memset(&o, 0, sizeof(o));
      continue;
    }
    const float iscale = -128.f / max_scale;
    o.d = fp32_to_fp16(1 / iscale);
    for (int j = 0; j < 16; ++j) o.scales[j] = int8_t(std::min(127, round_int(iscale * scales[j])));
    for (int j = 0; j < 16; ++j) {
      const float d = fp16_to_fp32(o.d) * o.scales[j];
      if (!d) continue;
      for (int i = 0; i < 16; ++i) {
        const int l = round_int(x[16 * j + i] / d);
        L[16 * j + i] = int8_t(std::max(-32, std::min(31, l)) + 32);
      }
    }
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 32; ++l) {
        const int8_t* Lh = L + 128 * h + l;
        o.ql[64 * h + l] = uint8_t((Lh[0] & 0xF) | ((Lh[64] & 0xF) << 4));
        o.ql[64 * h + 32 + l] = uint8_t((Lh[32] & 0xF) | ((Lh[96] & 0xF) << 4));
        o.qh[32 * h + l] = uint8_t((Lh[0] >> 4) | ((Lh[32] >> 4) << 2) | ((Lh[64] >> 4) << 4) |
                                   ((Lh[96] >> 4) << 6));
      }
  }
}

void quantize_row_q3_K(const float* x, block_q3_K* y, int64_t k) {
  quantize_row_q3_K_weighted(x, y, k, nullptr);
}
void quantize_row_q4_K(const float* x, block_q4_K* y, int64_t k) {
  quantize_row_q4_K_weighted(x, y, k, nullptr);
}
void quantize_row_q5_K(const float* x, block_q5_K* y, int64_t k) {
  quantize_row_q5_K_weighted(x, y, k, nullptr);
}
void quantize_row_q6_K(const float* x, block_q6_K* y, int64_t k) {
  quantize_row_q6_K_weighted(x, y, k, nullptr);
}

void quantize_row_q8_K(const float* x, block_q8_K* y, int64_t k) {
  for (int64_t b = 0; b < k / QK_K; b++, x += QK_K) {
    float max = 0, amax = 0;
    for (int j = 0; j < QK_K; ++j) {
      const float ax = std::fabs(x[j]);
      if (ax > amax) { amax = ax; max = x[j]; }
    }
    if (!amax) {
      std::memset(&y[b], 0, sizeof(block_q8_K));
      continue;
    }
    const float iscale = -127.f / max;
    for (int j = 0; j < QK_K; ++j) y[b].qs[j] = int8_t(std::min(127, round_int(iscale * x[j])));
    for (int j = 0; j < QK_K / 16; ++j) {
      int sum = 0;
      for (int i = 0; i < 16; ++i) sum += y[b].qs[16 * j + i];
      y[b].bsums[j] = int16_t(sum);
    }
    y[b].d = 1 / iscale;
  }
}

// ---------------------------------------------------------------- dequantizers

void dequantize_row_q5_0(const block_q5_0* x, float* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++, y += QK) {
    const float d = fp16_to_fp32(x[b].d);
    uint32_t qh;
    std::memcpy(&qh, x[b].qh, 4);
    for (int j = 0; j < QK / 2; ++j) {
      const int q0 = ((x[b].qs[j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16;
      const int q1 = ((x[b].qs[j] >> 4) | (((qh >> (j + QK / 2)) & 1) << 4)) - 16;
      y[j] = float(q0) * d;
      y[j + QK / 2] = float(q1) * d;
    }
  }
}

void dequantize_row_q5_1(const block_q5_1* x, float* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++, y += QK) {
    const float d = fp16_to_fp32(x[b].d), m = fp16_to_fp32(x[b].m);
    uint32_t qh;
    std::memcpy(&qh, x[b].qh, 4);
    for (int j = 0; j < QK / 2; ++j) {
      const int q0 = (x[b].qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
      const int q1 = (x[b].qs[j] >> 4) | (((qh >> (j + QK / 2)) & 1) << 4);
      y[j] = float(q0) * d + m;
      y[j + QK / 2] = float(q1) * d + m;
    }
  }
}

void dequantize_row_iq4_nl(const block_iq4_nl* x, float* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++, y += QK) {
    const float d = fp16_to_fp32(x[b].d);
    for (int j = 0; j < QK / 2; ++j) {
      y[j] = d * kIq4nlValues[x[b].qs[j] & 0x0F];
      y[j + QK / 2] = d * kIq4nlValues[x[b].qs[j] >> 4];
    }
  }
}

void dequantize_row_q2_K(const block_q2_K* x, float* y, int64_t k) {
  for (int64_t b = 0; b < k / QK_K; b++) {
    const float d = fp16_to_fp32(x[b].d), dmin = fp16_to_fp32(x[b].dmin);
    for (int i = 0; i < QK_K; ++i) {  // weight i: sub-block i / 16, qs byte 32h + i % 32
      const int h = i / 128, s = (i % 128) / 32, l = i % 32;
      const uint8_t sc = x[b].scales[i / 16];
      const int q = (x[b].qs[32 * h + l] >> (2 * s)) & 3;
      y[i] = d * (sc & 0xF) * q - dmin * (sc >> 4);
    }
    y += QK_K;
  }
}

void dequantize_row_q3_K(const block_q3_K* x, float* y, int64_t k) {
  for (int64_t b = 0; b < k / QK_K; b++) {
    const float d = fp16_to_fp32(x[b].d);
    int sc[16];
    q3_k_scales(x[b].scales, sc);
    for (int i = 0; i < QK_K; ++i) {
      const int h = i / 128, s = (i % 128) / 32, l = i % 32;
      const int low = (x[b].qs[32 * h + l] >> (2 * s)) & 3;
      const int high = (x[b].hmask[l] >> (i / 32)) & 1;
      y[i] = d * sc[i / 16] * (low - (high ? 0 : 4));
    }
    y += QK_K;
  }
}

void dequantize_row_q4_K(const block_q4_K* x, float* y, int64_t k) {
  for (int64_t b = 0; b < k / QK_K; b++) {
    const float d = fp16_to_fp32(x[b].d), dmin = fp16_to_fp32(x[b].dmin);
    for (int j = 0; j < 8; ++j) {  // sub-block j: nibble j % 2 of qs[32 * (j / 2) ...]
      uint8_t sc, m;
      k4_scale_min(j, x[b].scales, sc, m);
      const float dl = d * sc, ml = dmin * m;
      const uint8_t* q = x[b].qs + 32 * (j / 2);
      for (int l = 0; l < 32; ++l) y[32 * j + l] = dl * ((q[l] >> (4 * (j % 2))) & 0xF) - ml;
    }
    y += QK_K;
  }
}

void dequantize_row_q5_K(const block_q5_K* x, float* y, int64_t k) {
  for (int64_t b = 0; b < k / QK_K; b++) {
    const float d = fp16_to_fp32(x[b].d), dmin = fp16_to_fp32(x[b].dmin);
    for (int j = 0; j < 8; ++j) {
      uint8_t sc, m;
      k4_scale_min(j, x[b].scales, sc, m);
      const float dl = d * sc, ml = dmin * m;
      const uint8_t* q = x[b].qs + 32 * (j / 2);
      for (int l = 0; l < 32; ++l) {
        const int v = ((q[l] >> (4 * (j % 2))) & 0xF) | (((x[b].qh[l] >> j) & 1) << 4);
        y[32 * j + l] = dl * v - ml;
      }
    }
    y += QK_K;
  }
}

void dequantize_row_q6_K(const block_q6_K* x, float* y, int64_t k) {
  for (int64_t b = 0; b < k / QK_K; b++) {
    const float d = fp16_to_fp32(x[b].d);
    for (int i = 0; i < QK_K; ++i) {  // weight i = 128h + 32s + l
      const int h = i / 128, s = (i % 128) / 32, l = i % 32;
      const int low = (x[b].ql[64 * h + 32 * (s % 2) + l] >> (4 * (s / 2))) & 0xF;
      const int high = (x[b].qh[32 * h + l] >> (2 * s)) & 3;
      y[i] = d * x[b].scales[i / 16] * ((low | (high << 4)) - 32);
    }
    y += QK_K;
  }
}

void dequantize_row_q8_K(const block_q8_K* x, float* y, int64_t k) {
  for (int64_t b = 0; b < k / QK_K; b++, y += QK_K)
    for (int j = 0; j < QK_K; ++j) y[j] = x[b].d * x[b].qs[j];
}

}  // namespace alpaca
