// AVX-512 F/BW/VL kernels without VNNI (Skylake-SP/X). Compiled with -mavx512f -mavx512bw
// -mavx512vl (+ AVX2's -mavx2 -mfma -mf16c) in this file only; selected at import when the CPU
// has them and the OS saves the 512-bit state (dispatch.cpp). The kernels are shared with the
// VNNI table (kernels_avx512_common.inc); this file gives them their integer dot-product steps.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace alpaca::avx512 {

constexpr const char* kTableName = "avx512";

// u8 x s8 in int16 lanes: maddubs gives pair sums, and a Q4 block's 8 steps add 16 products of
// q <= 15 and |a| <= 128 per lane, at most 30720: no saturation. Widened once per block.
static inline __m512i acc_u8i8(__m512i acc, __m512i u, __m512i s) {
  return _mm512_add_epi16(acc, _mm512_maddubs_epi16(u, s));
}
static inline __m512i finish_u8i8(__m512i acc) {
  return _mm512_madd_epi16(acc, _mm512_set1_epi16(1));
}
constexpr bool kU8i8Int32 = false;  // int16 lanes until finish_u8i8
// u <= 127 into int32 lanes: maddubs pair sums (<= 2 * 127 * 128) fit int16, widened at once.
static inline __m512i acc_u7i8(__m512i acc, __m512i u, __m512i s) {
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
}
// Scaled: madd with the scale in both int16 halves widens and scales at once.
static inline __m512i scale_u8i8(__m512i acc, __m512i sc) {
  return _mm512_madd_epi16(acc, _mm512_or_si512(sc, _mm512_slli_epi32(sc, 16)));
}
// s8 x s8: |w| meets a with w's sign moved onto it (maddubs wants one unsigned operand);
// pair sums up to 2 * 127 * 128 fit int16 and are widened at every step.
static inline __m512i acc_i8i8(__m512i acc, __m512i w, __m512i a) {
  const __m512i sa = _mm512_mask_sub_epi8(a, _mm512_movepi8_mask(w), _mm512_setzero_si512(), a);
  const __m512i pairs = _mm512_maddubs_epi16(_mm512_abs_epi8(w), sa);
  return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
}

#include "kernels_avx512_common.inc"

}  // namespace alpaca::avx512

namespace alpaca {
const KernelTable* avx512_kernels() {
  static const KernelTable table = avx512::make_table();
  return &table;
}
}  // namespace alpaca
