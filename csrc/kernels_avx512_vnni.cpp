// AVX-512 F/BW/VL + VNNI kernels (Ice Lake, Zen 4 and later). Compiled with -mavx512vnni besides
// kernels_avx512.cpp's flags, in this file only; selected at import when the CPU reports VNNI
// (dispatch.cpp). The same kernels as the plain AVX-512 table (kernels_avx512_common.inc), with
// vpdpbusd doing a u8 x s8 multiply, the pairwise and the 4-wise sums and the add in one step.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace alpaca::avx512_vnni {

constexpr const char* kTableName = "avx512_vnni";

// int32 lanes throughout (vpdpbusd does not saturate; a block's sums stay far below 2^31).
static inline __m512i acc_u8i8(__m512i acc, __m512i u, __m512i s) {
  return _mm512_dpbusd_epi32(acc, u, s);
}
static inline __m512i finish_u8i8(__m512i acc) { return acc; }
constexpr bool kU8i8Int32 = true;
static inline __m512i acc_u7i8(__m512i acc, __m512i u, __m512i s) {
  return _mm512_dpbusd_epi32(acc, u, s);
}
static inline __m512i scale_u8i8(__m512i acc, __m512i sc) { return _mm512_mullo_epi32(acc, sc); }
// s8 x s8: |w| (unsigned) meets a with w's sign moved onto it.
static inline __m512i acc_i8i8(__m512i acc, __m512i w, __m512i a) {
  const __m512i sa = _mm512_mask_sub_epi8(a, _mm512_movepi8_mask(w), _mm512_setzero_si512(), a);
  return _mm512_dpbusd_epi32(acc, _mm512_abs_epi8(w), sa);
}

#include "kernels_avx512_common.inc"

}  // namespace alpaca::avx512_vnni

namespace alpaca {
const KernelTable* avx512_vnni_kernels() {
  static const KernelTable table = avx512_vnni::make_table();
  return &table;
}
}  // namespace alpaca
