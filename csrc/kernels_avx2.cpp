// AVX2 + FMA + F16C kernels. Compiled with -mavx2 -mfma -mf16c (this file only); selected at
// import only when the CPU has all three. Quantizers round exactly like the scalar twin, so
// the integer parts are bit-identical on every ISA.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace alpaca::avx2 {

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

static inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_hadd_epi32(s, s);
  s = _mm_hadd_epi32(s, s);
  return _mm_cvtsi128_si32(s);
}

// Pins v's running value at this point of the program: GCC otherwise re-associates chains of
// integer adds into trees whose partial sums outnumber the 16 registers and spill to the stack.
static inline void keep_in_register(__m256i& v) { asm volatile("" : "+x"(v)); }

static inline float fp16_scalar(fp16_t h) { return _cvtsh_ss(h); }

// Round half away from zero, like roundf (the GGML reference), not the FPU's half-to-even.
static inline __m256 round_half_away(__m256 v) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_andnot_ps(sign_mask, v);
  __m256 r = _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 tie = _mm256_cmp_ps(_mm256_sub_ps(a, r), _mm256_set1_ps(0.5f), _CMP_EQ_OQ);
  r = _mm256_add_ps(r, _mm256_and_ps(tie, _mm256_set1_ps(1.0f)));
  return _mm256_or_ps(r, _mm256_and_ps(sign_mask, v));
}

// Quantize 32 floats to int8 with scale 1/d; returns d and writes qs; sum of q in *sum.
static inline float quantize_block_q8(const float* x, int8_t* qs, int* sum) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; i++) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[i]));
  }
  const float d = hmax(amax) / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const __m256 vid = _mm256_set1_ps(id);
  __m256i q[4];
  for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(round_half_away(_mm256_mul_ps(v[i], vid)));
  if (sum) *sum = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
  // int32 -> int16 -> int8; packs work within 128-bit lanes, so fix the order with a permute.
  __m256i p01 = _mm256_packs_epi32(q[0], q[1]);
  __m256i p23 = _mm256_packs_epi32(q[2], q[3]);
  __m256i p = _mm256_packs_epi16(p01, p23);
  p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs), p);
  return d;
}

static void quantize_row_q8_0(const float* x, block_q8_0* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++) {
    const float d = quantize_block_q8(x + b * QK, y[b].qs, nullptr);
    y[b].d = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
  }
}

static void quantize_row_q8_1(const float* x, block_q8_1* y, int64_t k) {
  for (int64_t b = 0; b < k / QK; b++) {
    int sum = 0;
    const float d = quantize_block_q8(x + b * QK, y[b].qs, &sum);
    y[b].d = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
    y[b].s = _cvtss_sh(float(sum) * d, _MM_FROUND_TO_NEAREST_INT);
  }
}

static void fp16_to_fp32_row(const fp16_t* x, float* y, int64_t k) {
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  }
  for (; i < k; i++) y[i] = fp16_scalar(x[i]);
}

static void fp32_to_fp16_row(const float* x, fp16_t* y, int64_t k) {
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < k; i++) y[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}

// 32 nibbles of a Q4 block as 32 bytes in [0, 15]: low nibbles first, then high nibbles.
static inline __m256i unpack_nibbles(const uint8_t* qs) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

// Sum of products of 32 unsigned bytes (u) and 32 signed bytes (s), as 8 int32 lanes.
static inline __m256i dot_u8_i8(__m256i u, __m256i s) {
  const __m256i p16 = _mm256_maddubs_epi16(u, s);
  return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

// Sum of products of 32 signed bytes with 32 signed bytes.
static inline __m256i dot_i8_i8(__m256i x, __m256i y) {
  return dot_u8_i8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
}

static float dot_q4_0_q8_0(int64_t n, const block_q4_0* w, const block_q8_0* a) {
  __m256 acc = _mm256_setzero_ps();
  const __m256i eight = _mm256_set1_epi8(8);
  for (int64_t b = 0; b < n / QK; b++) {
    const __m256i qw = _mm256_sub_epi8(unpack_nibbles(w[b].qs), eight);
    const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[b].qs));
    const __m256 s = _mm256_cvtepi32_ps(dot_i8_i8(qw, qa));
    const __m256 d = _mm256_set1_ps(fp16_scalar(w[b].d) * fp16_scalar(a[b].d));
    acc = _mm256_fmadd_ps(d, s, acc);
  }
  return hsum(acc);
}

static float dot_q4_1_q8_1(int64_t n, const block_q4_1* w, const block_q8_1* a) {
  __m256 acc = _mm256_setzero_ps();
  float acc_m = 0.0f;
  for (int64_t b = 0; b < n / QK; b++) {
    const __m256i qw = unpack_nibbles(w[b].qs);
    const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[b].qs));
    const __m256 s = _mm256_cvtepi32_ps(dot_u8_i8(qw, qa));
    const __m256 d = _mm256_set1_ps(fp16_scalar(w[b].d) * fp16_scalar(a[b].d));
    acc = _mm256_fmadd_ps(d, s, acc);
    acc_m += fp16_scalar(w[b].m) * fp16_scalar(a[b].s);
  }
  return hsum(acc) + acc_m;
}

static float dot_q8_0_q8_0(int64_t n, const block_q8_0* w, const block_q8_0* a) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / QK; b++) {
    const __m256i qw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qs));
    const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[b].qs));
    const __m256 s = _mm256_cvtepi32_ps(dot_i8_i8(qw, qa));
    const __m256 d = _mm256_set1_ps(fp16_scalar(w[b].d) * fp16_scalar(a[b].d));
    acc = _mm256_fmadd_ps(d, s, acc);
  }
  return hsum(acc);
}

static float dot_f16_f32(int64_t n, const fp16_t* w, const float* a) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
    const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i + 8)));
    acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(a + i), acc0);
    acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(a + i + 8), acc1);
  }
  float sum = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; i++) sum += fp16_scalar(w[i]) * a[i];
  return sum;
}

static float dot_f32_f32(int64_t n, const float* w, const float* a) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(a + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(a + i + 8), acc1);
  }
  float sum = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; i++) sum += w[i] * a[i];
  return sum;
}

static void axpy_f16(int64_t n, float a, const fp16_t* x, float* y) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, xv, _mm256_loadu_ps(y + i)));
  }
  for (; i < n; i++) y[i] += a * fp16_scalar(x[i]);
}

// e^x for 8 floats: x = n*ln2 + r with |r| <= ln2/2, e^r by its Taylor series to r^6 (error
// below 2e-7 relative), times 2^n built in the exponent bits. Inputs are clamped to [-87, 88]
// so 2^n stays a normal float (e^-87 ~ 1.6e-38 stands in for anything smaller).
static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static float softmax_simd(float* x, int64_t n, float scale) {
  const __m256 vs = _mm256_set1_ps(scale);
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_mul_ps(_mm256_loadu_ps(x + i), vs));
  float mx = hmax(vmax);
  for (int64_t j = i; j < n; j++) mx = std::max(mx, x[j] * scale);
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(x + i), vs, vm));
    _mm256_storeu_ps(x + i, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (int64_t j = i; j < n; j++) {
    x[j] = std::exp(x[j] * scale - mx);
    sum += x[j];
  }
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
  for (int64_t j = i; j < n; j++) x[j] *= 1.0f / sum;
  return mx + std::log(sum);
}

#include "kernels_generic.inc"

static void swiglu_simd(const float* gate, const float* up, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp8(_mm256_xor_ps(g, sign));  // e^-g
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
  }
  swiglu(gate + i, up + i, out + i, n - i);  // the last n % 8
}

// ---- GEMM on Panel8 weights (weight_layout.h): 8 rows x C tokens per pass ----------------
// Each 32-byte load of a panel holds 4 consecutive weights of each of the 8 rows; multiplied
// by the same 4 activations broadcast to every lane, the integer dot product's 8 lanes are the
// 8 rows. A block's products stay in int16 lanes (no overflow: see each kernel) and are widened
// once per block, so per block and token the float work is one conversion and one FMA for 8
// rows, with the 8 row scales converted by one F16C instruction.

static inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Every cache line of the block that comes kPrefetchBytes later: a panel is one sequential
// stream, and requesting it that far ahead keeps enough lines in flight to cover DRAM latency.
// (One line per block instead of all of them: 1-thread decode 20-25 % slower; 1 KiB to 4 KiB
// ahead measured alike, within this machine's noise.)
template <size_t kBlock>
static inline void prefetch_ahead(const uint8_t* pb) {
  constexpr size_t kPrefetchBytes = 1024;
  for (size_t off = 0; off < kBlock; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(pb + kPrefetchBytes + off), _MM_HINT_T0);
}

// Every cache line of the super-block column about to be read, requested at once. Q6_K's
// panel reads its last 40 % (qh, scales) from the start of each column, lines that the fixed
// prefetch distance requests only then: one-token decode from memory ran at 10 GB/s (Zen 4,
// 1 thread; Q4_K 19), 19 GB/s with this. The other K-quants measured no gain here.
template <size_t kBlock>
static inline void request_block(const uint8_t* pb) {
  for (size_t off = 0; off < kBlock; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(pb + off), _MM_HINT_T0);
}

// The C x 8 results to out (rows beyond nr belong to the panel's zero padding).
template <int C>
static inline void store_panel(const __m256* acc, float* out, int64_t out_stride, int nr) {
  for (int c = 0; c < C; c++) {
    if (nr == kPanelRows) {
      _mm256_storeu_ps(out + c * out_stride, acc[c]);
    } else {
      alignas(32) float tmp[kPanelRows];
      _mm256_store_ps(tmp, acc[c]);
      std::memcpy(out + c * out_stride, tmp, size_t(nr) * sizeof(float));
    }
  }
}

// Q8_0 weights with Q8_0 activations. maddubs multiplies unsigned by signed bytes, so |w|
// meets a with w's sign moved onto it; products (up to 127*128) are widened every pair.
template <int C>
static void panel_q8_0(int64_t nb, const uint8_t* w, const uint8_t* act, size_t act_stride,
                       const ActBlockInfo* info, float* out, int64_t out_stride, int nr) {
  constexpr size_t kBlock = kPanelRows * sizeof(block_q8_0);
  __m256 acc[C];
  for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* pb = w + size_t(b) * kBlock;
    prefetch_ahead<kBlock>(pb);
    const block_q8_0* ab[C];
    __m256i isum[C];
    for (int c = 0; c < C; c++) {
      ab[c] = reinterpret_cast<const block_q8_0*>(act + c * act_stride) + b;
      isum[c] = _mm256_setzero_si256();
    }
    for (int j = 0; j < 8; j++) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + 2 * kPanelRows + 32 * j));
      for (int c = 0; c < C; c++) {
        isum[c] = _mm256_add_epi32(isum[c], dot_i8_i8(v, bcast4(ab[c]->qs + 4 * j)));
        keep_in_register(isum[c]);
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pb)));
    for (int c = 0; c < C; c++) {
      acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(info[c * nb + b].d)),
                               _mm256_cvtepi32_ps(isum[c]), acc[c]);
    }
  }
  store_panel<C>(acc, out, out_stride, nr);
}

using PanelFn = void (*)(int64_t, const uint8_t*, const uint8_t*, size_t, const ActBlockInfo*, float*,
                         int64_t, int);

// Panels outer (a panel's weights stay in cache), tokens inner in groups of max_tok (each
// unpacked weight vector serves them all), then the rest; fns[c - 1] runs c tokens. info:
// (n_tok, nb) or null.
static void gemm_panels(const PanelFn* fns, int max_tok, int64_t nb, const uint8_t* w,
                        size_t w_stride, int64_t n_rows, const uint8_t* act, size_t act_stride,
                        const ActBlockInfo* info, int64_t n_tok, float* out, int64_t out_stride) {
  for (int64_t r = 0; r < n_rows; r += kPanelRows) {
    const int nr = int(std::min<int64_t>(kPanelRows, n_rows - r));
    const uint8_t* wp = w + size_t(r) * w_stride;
    for (int64_t t = 0; t < n_tok; t += max_tok) {
      const int nt = int(std::min<int64_t>(max_tok, n_tok - t));
      fns[nt - 1](nb, wp, act + t * act_stride, act_stride, info ? info + t * nb : nullptr,
                  out + t * out_stride + r, out_stride, nr);
    }
  }
}

// The Panel8 gemm of a type with kWeights weights per block from its panel kernels for 1, 2,
// ..., sizeof...(Fns) tokens per pass (see gemm_panels); kernels that do not read act_info
// ignore it.
template <int64_t kWeights, PanelFn... Fns>
static void gemm_panel8(int64_t n, const void* w, size_t w_stride, int64_t n_rows, const void* act,
                        size_t act_stride, const ActBlockInfo* act_info, int64_t n_tok, float* out,
                        int64_t out_stride) {
  static const PanelFn fns[] = {Fns...};
  gemm_panels(fns, int(sizeof...(Fns)), n / kWeights, static_cast<const uint8_t*>(w), w_stride,
              n_rows, static_cast<const uint8_t*>(act), act_stride, act_info, n_tok, out, out_stride);
}

// ---- F16 / F32 weights with float activations (F16/F32 models, attention scores) ----------
// R rows x C tokens per pass: each converted weight vector serves C tokens and each activation
// vector R rows, with R*C independent FMA chains.
template <int R, int C, bool kF16>
static void tile_float(int64_t n, const uint8_t* w, size_t w_stride, const uint8_t* act,
                       size_t act_stride, float* out, int64_t out_stride) {
  auto wrow = [&](int r) { return w + size_t(r) * w_stride; };
  auto arow = [&](int c) { return reinterpret_cast<const float*>(act + size_t(c) * act_stride); };
  __m256 acc[R][C];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 a[C];
    for (int c = 0; c < C; c++) a[c] = _mm256_loadu_ps(arow(c) + i);
    for (int r = 0; r < R; r++) {
      const __m256 wv =
          kF16 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
                     reinterpret_cast<const fp16_t*>(wrow(r)) + i)))
               : _mm256_loadu_ps(reinterpret_cast<const float*>(wrow(r)) + i);
      for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(wv, a[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; r++) {
    for (int c = 0; c < C; c++) {
      float v = hsum(acc[r][c]);
      for (int64_t j = i; j < n; j++) {
        const float wj = kF16 ? fp16_scalar(reinterpret_cast<const fp16_t*>(wrow(r))[j])
                              : reinterpret_cast<const float*>(wrow(r))[j];
        v += wj * arow(c)[j];
      }
      out[c * out_stride + r] = v;
    }
  }
}

using FloatTileFn = void (*)(int64_t, const uint8_t*, size_t, const uint8_t*, size_t, float*, int64_t);

template <bool kF16>
static void gemm_float(int64_t n, const void* wv, size_t w_stride, int64_t n_rows,
                       const void* actv, size_t act_stride, const ActBlockInfo*, int64_t n_tok,
                       float* out, int64_t out_stride) {
  const auto* w = static_cast<const uint8_t*>(wv);
  const auto* act = static_cast<const uint8_t*>(actv);
  constexpr int RM = 4, CN = 3;
  static const FloatTileFn fns[RM][CN] = {
      {tile_float<1, 1, kF16>, tile_float<1, 2, kF16>, tile_float<1, 3, kF16>},
      {tile_float<2, 1, kF16>, tile_float<2, 2, kF16>, tile_float<2, 3, kF16>},
      {tile_float<3, 1, kF16>, tile_float<3, 2, kF16>, tile_float<3, 3, kF16>},
      {tile_float<4, 1, kF16>, tile_float<4, 2, kF16>, tile_float<4, 3, kF16>}};
  for (int64_t r = 0; r < n_rows; r += RM) {
    const int nr = int(std::min<int64_t>(RM, n_rows - r));
    for (int64_t t = 0; t < n_tok; t += CN) {
      const int nt = int(std::min<int64_t>(CN, n_tok - t));
      fns[nr - 1][nt - 1](n, w + size_t(r) * w_stride, w_stride, act + size_t(t) * act_stride,
                          act_stride, out + t * out_stride + r, out_stride);
    }
  }
}

// mix_rows for F16 or F32 rows: K vectors (8K columns) x C queries of accumulators; each
// row vector (converted once when F16) serves the C queries.
template <int K, int C, bool kF16>
static void mix_tile(int64_t n_pos, const uint8_t* v, size_t v_stride, const float* w,
                     int64_t w_stride, float* out, int64_t out_stride) {
  __m256 acc[C][K];
  for (int c = 0; c < C; c++)
    for (int k = 0; k < K; k++) acc[c][k] = _mm256_setzero_ps();
  for (int64_t p = 0; p < n_pos; p++) {
    const uint8_t* row = v + size_t(p) * v_stride;
    __m256 vv[K];
    for (int k = 0; k < K; k++)
      vv[k] = kF16 ? _mm256_cvtph_ps(_mm_loadu_si128(
                         reinterpret_cast<const __m128i*>(reinterpret_cast<const fp16_t*>(row) + 8 * k)))
                   : _mm256_loadu_ps(reinterpret_cast<const float*>(row) + 8 * k);
    for (int c = 0; c < C; c++) {
      const __m256 a = _mm256_broadcast_ss(w + c * w_stride + p);
      for (int k = 0; k < K; k++) acc[c][k] = _mm256_fmadd_ps(a, vv[k], acc[c][k]);
    }
  }
  for (int c = 0; c < C; c++)
    for (int k = 0; k < K; k++) _mm256_storeu_ps(out + c * out_stride + 8 * k, acc[c][k]);
}

template <bool kF16>
static void mix_rows_typed(int64_t n, const uint8_t* v, size_t v_stride, int64_t n_pos,
                           const float* w, int64_t w_stride, int64_t n_q, float* out,
                           int64_t out_stride) {
  using MixFn = void (*)(int64_t, const uint8_t*, size_t, const float*, int64_t, float*, int64_t);
  static const MixFn wide[3] = {mix_tile<4, 1, kF16>, mix_tile<4, 2, kF16>, mix_tile<4, 3, kF16>};
  static const MixFn narrow[3] = {mix_tile<1, 1, kF16>, mix_tile<1, 2, kF16>, mix_tile<1, 3, kF16>};
  constexpr size_t eb = kF16 ? 2 : 4;
  for (int64_t q = 0; q < n_q; q += 3) {
    const int nq = int(std::min<int64_t>(3, n_q - q));
    const float* wq = w + q * w_stride;
    float* oq = out + q * out_stride;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) wide[nq - 1](n_pos, v + eb * i, v_stride, wq, w_stride, oq + i, out_stride);
    for (; i + 8 <= n; i += 8) narrow[nq - 1](n_pos, v + eb * i, v_stride, wq, w_stride, oq + i, out_stride);
    if (i < n)  // columns left over (head sizes not a multiple of 8): the generic kernel
      mix_rows(kF16 ? GgmlType::F16 : GgmlType::F32, n - i, v + eb * i, v_stride, n_pos, wq,
               w_stride, nq, oq + i, out_stride);
  }
}

static void mix_rows_simd(GgmlType vtype, int64_t n, const void* v, size_t v_stride, int64_t n_pos,
                          const float* w, int64_t w_stride, int64_t n_q, float* out,
                          int64_t out_stride) {
  const auto* vb = static_cast<const uint8_t*>(v);
  if (vtype == GgmlType::F16) return mix_rows_typed<true>(n, vb, v_stride, n_pos, w, w_stride, n_q, out, out_stride);
  return mix_rows_typed<false>(n, vb, v_stride, n_pos, w, w_stride, n_q, out, out_stride);
}

// ---- Q4_K and Q6_K in panels of 8 rows, with Q8_K activations ----
// The same panel layouts and integer sums as the AVX-512 tables' (kernels_avx512_common.inc,
// weight_layout.h) with 8 rows per panel: a super-block column holds the 8 rows' fp16 d (and
// Q4_K's dmin), then the rest of their blocks in 32-byte columns of 4 bytes per row. With 16
// registers, each token keeps one sub-block sum, its super-block sum and one float accumulator
// (the mins are subtracted in the same accumulator), so 4 tokens share each unpacked column.
// Q4_K runs up to 8: its sub-block sums then live partly on the stack, and still the 1.1B
// shape's Q4_K_M prefill was 4-5 % faster than with 4 (1 thread, builds alternated).

// Q4_K: the 8 scales and mins of 8 rows from the 3 scale columns (k4_scale_min, 8 rows at once):
// sc_lo / m_lo hold sub-blocks 0..3 in the 4 bytes of each row's lane, sc_hi / m_hi 4..7.
struct K4Scales {
  __m256i sc_lo, sc_hi, m_lo, m_hi;
};
static inline K4Scales k4_scales(const uint8_t* p) {
  const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
  const __m256i c2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64));
  const __m256i m6 = _mm256_set1_epi8(0x3f), m4 = _mm256_set1_epi8(0x0f), top2 = _mm256_set1_epi8(0x30);
  K4Scales s;
  s.sc_lo = _mm256_and_si256(c0, m6);
  s.m_lo = _mm256_and_si256(c1, m6);
  s.sc_hi = _mm256_or_si256(_mm256_and_si256(c2, m4), _mm256_and_si256(_mm256_srli_epi32(c0, 2), top2));
  s.m_hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(c2, 4), m4),
                           _mm256_and_si256(_mm256_srli_epi32(c1, 2), top2));
  return s;
}

// Byte b of every 32-bit lane, in both int16 halves of the lane (for madd).
static inline __m256i lane_byte_pairs(__m256i v, int b) {
  const __m256i x = _mm256_and_si256(_mm256_srli_epi32(v, 8 * b), _mm256_set1_epi32(0xff));
  return _mm256_or_si256(x, _mm256_slli_epi32(x, 16));
}

// sum_k (w_k (bsum_2k) + w'_k (bsum_2k+1)) for one token, with a row's weights as madd's
// int16 pairs: the two bsums of each pair are contiguous int16 in the Q8_K block, so each is
// one broadcast from memory and one madd, with no scalar work per token. The weight pairs
// depend on the panel only and are made once per super-block (k4_min_pairs, sc_pairs).
// |bsum| <= 16 * 128 and |w| <= 128: every madd pair fits int32.
struct BsumPairs {
  __m256i w[8];
};
static inline __m256i bsum_dot(const BsumPairs& p, const block_q8_K& a) {
  __m256i r = _mm256_setzero_si256();
  for (int k = 0; k < 8; k++)
    r = _mm256_add_epi32(r, _mm256_madd_epi16(p.w[k], bcast4(reinterpret_cast<const int8_t*>(a.bsums + 2 * k))));
  return r;
}

// Q4_K/Q5_K: sum_j m_j (bsum_2j + bsum_2j+1): m_j in both halves of pair j.
static inline BsumPairs k4_min_pairs(const K4Scales& s) {
  BsumPairs p;
  for (int j = 0; j < 8; j++) p.w[j] = lane_byte_pairs(j < 4 ? s.m_lo : s.m_hi, j % 4);
  return p;
}

// 16 signed byte scales per row (4 columns of 4 per lane, sub-block 4 col + b in byte b) as
// pairs (sc_2k, sc_2k+1) sign-extended to int16, for bsum_dot: sum_s sc_s bsum_s.
static inline BsumPairs sc_pairs(const __m256i sc[4]) {
  BsumPairs p;
  for (int col = 0; col < 4; col++) {
    const __m256i even = _mm256_srai_epi16(_mm256_slli_epi16(sc[col], 8), 8);  // (b0, b2)
    const __m256i odd = _mm256_srai_epi16(sc[col], 8);                         // (b1, b3)
    p.w[2 * col] = _mm256_blend_epi16(even, _mm256_slli_epi32(odd, 16), 0xaa);      // (b0, b1)
    p.w[2 * col + 1] = _mm256_blend_epi16(_mm256_srli_epi32(even, 16), odd, 0xaa);  // (b2, b3)
  }
  return p;
}

// A super-block's float step for C tokens of a type with mins (the Q4_K, Q5_K, Q2_K panels):
// acc += d_w d_a isum - dmin_w d_a mins, d_w the panel block's first 8 halves, dmin_w the next 8.
template <int C>
static inline void add_block_with_mins(const uint8_t* pb, const block_q8_K* const* ab,
                                       const __m256i* isum, const __m256i* mins, __m256* acc) {
  const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pb)));
  const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pb + 2 * kPanelRows)));
  for (int c = 0; c < C; c++) {
    const __m256 da = _mm256_set1_ps(ab[c]->d);
    acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(dw, da), _mm256_cvtepi32_ps(isum[c]), acc[c]);
    acc[c] = _mm256_fnmadd_ps(_mm256_mul_ps(mw, da), _mm256_cvtepi32_ps(mins[c]), acc[c]);
  }
}

// Per super-block: d_w d_a sum_j sc_j sum(q a) - dmin_w d_a sum_j m_j bs_j. A sub-block's 8
// maddubs steps add 16 products of q <= 15, |a| <= 128 per int16 lane (<= 30720); the scale
// (< 64) multiplies them in the madd that widens them.
template <int C>
static void panel_q4_K(int64_t nb, const uint8_t* w, const uint8_t* act, size_t act_stride,
                       const ActBlockInfo*, float* out, int64_t out_stride, int nr) {
  constexpr size_t kBlock = kPanelRows * sizeof(block_q4_K);
  constexpr size_t kQs = 4 * kPanelRows + 3 * 32;
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  __m256 acc[C];
  for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* pb = w + size_t(b) * kBlock;
    prefetch_ahead<kBlock>(pb);
    const block_q8_K* ab[C];
    __m256i isum[C];
    for (int c = 0; c < C; c++) {
      ab[c] = reinterpret_cast<const block_q8_K*>(act + c * act_stride) + b;
      isum[c] = _mm256_setzero_si256();
    }
    const K4Scales s = k4_scales(pb + 4 * kPanelRows);
    for (int j = 0; j < 8; j++) {  // sub-block j: chunk j / 2, low nibbles for even j
      const uint8_t* pq = pb + kQs + 256 * (j / 2);
      __m256i sub[C];
      for (int c = 0; c < C; c++) sub[c] = _mm256_setzero_si256();
      for (int i = 0; i < 8; i++) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pq + 32 * i));
        const __m256i q = j % 2 ? _mm256_and_si256(_mm256_srli_epi16(v, 4), low4) : _mm256_and_si256(v, low4);
        for (int c = 0; c < C; c++)
          sub[c] = _mm256_add_epi16(sub[c], _mm256_maddubs_epi16(q, bcast4(ab[c]->qs + 32 * j + 4 * i)));
      }
      const __m256i sc = lane_byte_pairs(j < 4 ? s.sc_lo : s.sc_hi, j % 4);
      for (int c = 0; c < C; c++) {
        isum[c] = _mm256_add_epi32(isum[c], _mm256_madd_epi16(sub[c], sc));
        keep_in_register(isum[c]);
      }
    }
    __m256i mins[C];
    const BsumPairs mp = k4_min_pairs(s);
    for (int c = 0; c < C; c++) mins[c] = bsum_dot(mp, *ab[c]);
    add_block_with_mins<C>(pb, ab, isum, mins, acc);
  }
  store_panel<C>(acc, out, out_stride, nr);
}

// Q6_K: per super-block d_w d_a (sum_s sc_s sum(q a) - 32 sum_s sc_s bsum_s) (see the AVX-512
// panel_q6_K for where each weight's bits are). q <= 63 and |a| <= 128: two columns' maddubs
// (4 products per int16 lane, |sum| <= 32256) fit int16, and the madd that widens them
// multiplies by the sub-block's signed scale (no 32-bit multiply).
template <int C>
static void panel_q6_K(int64_t nb, const uint8_t* w, const uint8_t* act, size_t act_stride,
                       const ActBlockInfo*, float* out, int64_t out_stride, int nr) {
  constexpr size_t kBlock = kPanelRows * sizeof(block_q6_K);
  constexpr size_t kQl = 2 * kPanelRows, kQh = kQl + 32 * 32, kSc = kQh + 16 * 32;
  const __m256i low4 = _mm256_set1_epi8(0x0f), top2 = _mm256_set1_epi8(0x30);
  __m256 acc[C];
  for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* pb = w + size_t(b) * kBlock;
    request_block<kBlock>(pb);
    prefetch_ahead<kBlock>(pb);
    const block_q8_K* ab[C];
    __m256i isum[C];
    for (int c = 0; c < C; c++) {
      ab[c] = reinterpret_cast<const block_q8_K*>(act + c * act_stride) + b;
      isum[c] = _mm256_setzero_si256();
    }
    __m256i sc[4];
    for (int col = 0; col < 4; col++)
      sc[col] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + kSc + 32 * col));
#pragma GCC unroll 16
    for (int s = 0; s < 16; s++) {  // sub-block s = 8h + 2g + half: columns 4 half .. 4 half + 3
      const int h = s / 8, g = (s % 8) / 2, half = s % 2;
      // the sub-block's signed scale as int16 in both halves of every row's lane
      const __m256i sc32 = _mm256_srai_epi32(_mm256_slli_epi32(sc[s / 4], 24 - 8 * (s % 4)), 24);
      const __m256i sc16 = _mm256_blend_epi16(sc32, _mm256_slli_epi32(sc32, 16), 0xaa);
      __m256i pair[C];  // int16 sums of two columns' products
#pragma GCC unroll 4
      for (int i = 4 * half; i < 4 * half + 4; i++) {
        const __m256i ql = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(pb + kQl + 32 * (16 * h + 8 * (g & 1) + i)));
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + kQh + 32 * (8 * h + i)));
        const __m256i lo = g < 2 ? _mm256_and_si256(ql, low4) : _mm256_and_si256(_mm256_srli_epi16(ql, 4), low4);
        const __m256i hb = g == 0   ? _mm256_slli_epi16(qh, 4)
                           : g == 1 ? _mm256_slli_epi16(qh, 2)
                           : g == 2 ? qh
                                    : _mm256_srli_epi16(qh, 2);
        const __m256i q = _mm256_or_si256(lo, _mm256_and_si256(hb, top2));
        for (int c = 0; c < C; c++) {
          const __m256i p = _mm256_maddubs_epi16(q, bcast4(ab[c]->qs + 128 * h + 32 * g + 4 * i));
          if (i % 2 == 0) {
            pair[c] = p;
          } else {  // two columns: |sum| <= 4 * 63 * 127 = 32004 fits int16; the scale widens it
            isum[c] = _mm256_add_epi32(isum[c], _mm256_madd_epi16(_mm256_add_epi16(pair[c], p), sc16));
            keep_in_register(isum[c]);
          }
        }
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pb)));
    const BsumPairs sp = sc_pairs(sc);
    for (int c = 0; c < C; c++) {
      const __m256i offset = _mm256_slli_epi32(bsum_dot(sp, *ab[c]), 5);  // 32 sum sc bsum
      acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(ab[c]->d)),
                               _mm256_cvtepi32_ps(_mm256_sub_epi32(isum[c], offset)), acc[c]);
    }
  }
  store_panel<C>(acc, out, out_stride, nr);
}

// ---- Q5_K, Q3_K and Q2_K in panels of 8 rows, with Q8_K activations ----
// The same panel layout (weight_layout.h: a super-block column holds the 8 rows' fp16 fields,
// then the rest of their blocks in 32-byte columns of 4 bytes per row) and the same per-token
// work as Q4_K/Q6_K above: exact int32 sums per row lane, the float work once per super-block
// and token for 8 rows, the same operations in the same order for any number of tokens. The
// loops over sub-blocks and columns are unrolled (#pragma GCC unroll) so that every shift count
// and shuffle control is a constant: GCC left them as loops with the controls built at run
// time, 1.3-1.5x slower (Q3_K, Q2_K; one thread, 8-row x 2048 gemm, 1 and 64 tokens).

// Byte b of every 32-bit lane as a signed int16 in both halves of the lane (for madd): one
// in-lane byte shuffle puts it in the high byte of each half, an arithmetic shift brings it down.
static inline __m256i lane_sbyte_pairs(__m256i v, int b) {
  const int8_t z = -128;  // 0x80: a zero byte
  const __m256i idx = _mm256_setr_epi8(z, b, z, b, z, 4 + b, z, 4 + b, z, 8 + b, z, 8 + b, z, 12 + b, z, 12 + b,
                                       z, b, z, b, z, 4 + b, z, 4 + b, z, 8 + b, z, 8 + b, z, 12 + b, z, 12 + b);
  return _mm256_srai_epi16(_mm256_shuffle_epi8(v, idx), 8);
}

// Bit `from` of every byte moved to bit `to` (16-bit shifts by |to - from| <= 7: bit `to` of
// each byte then comes from the same byte), every other bit cleared.
static inline __m256i move_bit(__m256i v, int from, int to) {
  const __m256i x = from <= to ? _mm256_slli_epi16(v, to - from) : _mm256_srli_epi16(v, from - to);
  return _mm256_and_si256(x, _mm256_set1_epi8(char(1 << to)));
}

// Q5_K: Q4_K's panel plus the fifth bits. Super-block column: d[8], dmin[8], the 12 scale bytes
// (3 columns, as Q4_K), qh (8 columns: column i holds qh bytes 4i .. 4i + 3 of each row), the
// nibbles (32 columns, as Q4_K: column 8h + i holds qs bytes 32h + 4i ..). Weight 64h + 4i + e
// (low nibble) has its fifth bit at bit 2h of byte e of qh column i, weight 64h + 32 + 4i + e
// (high nibble) at bit 2h + 1. q <= 31 and |a| <= 128: 4 maddubs steps add at most 31744 per
// int16 lane, so a sub-block's sum is widened (times its scale) after each half.
template <int C>
static void panel_q5_K(int64_t nb, const uint8_t* w, const uint8_t* act, size_t act_stride,
                       const ActBlockInfo*, float* out, int64_t out_stride, int nr) {
  constexpr size_t kBlock = kPanelRows * sizeof(block_q5_K);
  constexpr size_t kQh = 4 * kPanelRows + 3 * 32, kQs = kQh + 8 * 32;
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  __m256 acc[C];
  for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* pb = w + size_t(b) * kBlock;
    prefetch_ahead<kBlock>(pb);
    const block_q8_K* ab[C];
    __m256i isum[C];
    for (int c = 0; c < C; c++) {
      ab[c] = reinterpret_cast<const block_q8_K*>(act + c * act_stride) + b;
      isum[c] = _mm256_setzero_si256();
    }
    const K4Scales s = k4_scales(pb + 4 * kPanelRows);
    const auto column = [&](size_t off) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + off)); };
#pragma GCC unroll 8
    for (int h = 0; h < 4; h++) {  // sub-blocks 2h (low nibbles of columns 8h ..) and 2h + 1 (high)
      const __m256i sc_lo = lane_byte_pairs(h < 2 ? s.sc_lo : s.sc_hi, (2 * h) % 4);
      const __m256i sc_hi = lane_byte_pairs(h < 2 ? s.sc_lo : s.sc_hi, (2 * h + 1) % 4);
      __m256i slo[C], shi[C];
      for (int c = 0; c < C; c++) slo[c] = shi[c] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int i = 0; i < 8; i++) {
        const __m256i v = column(kQs + 32 * (8 * h + i)), qh = column(kQh + 32 * i);
        const __m256i lo = _mm256_or_si256(_mm256_and_si256(v, low4), move_bit(qh, 2 * h, 4));
        const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4), move_bit(qh, 2 * h + 1, 4));
        for (int c = 0; c < C; c++) {
          slo[c] = _mm256_add_epi16(slo[c], _mm256_maddubs_epi16(lo, bcast4(ab[c]->qs + 64 * h + 4 * i)));
          shi[c] = _mm256_add_epi16(shi[c], _mm256_maddubs_epi16(hi, bcast4(ab[c]->qs + 64 * h + 32 + 4 * i)));
        }
        if (i % 4 == 3) {  // each half of the sub-blocks: widened and scaled
          for (int c = 0; c < C; c++) {
            isum[c] = _mm256_add_epi32(isum[c], _mm256_madd_epi16(slo[c], sc_lo));
            isum[c] = _mm256_add_epi32(isum[c], _mm256_madd_epi16(shi[c], sc_hi));
            slo[c] = shi[c] = _mm256_setzero_si256();
            keep_in_register(isum[c]);
          }
        }
      }
    }
    __m256i mins[C];
    const BsumPairs mp = k4_min_pairs(s);
    for (int c = 0; c < C; c++) mins[c] = bsum_dot(mp, *ab[c]);
    add_block_with_mins<C>(pb, ab, isum, mins, acc);
  }
  store_panel<C>(acc, out, out_stride, nr);
}

// Q3_K and Q2_K: 16 sub-blocks of 16. Weight 128h + 32s + l (h < 2, s < 4, l = 4i + e < 32) has
// its low 2 bits at bits 2s, 2s + 1 of byte e of qs column 8h + i (qs bytes 32h + 4i ..) and
// belongs to sub-block 8h + 2s + i / 4: 4 columns per sub-block, each read for 4 values of s.
// Per sub-block 4 maddubs steps of q <= 7 and |a| <= 128 (at most 7168 per int16 lane), then
// one madd with the sub-block's scale in both halves of each lane widens and scales the sum.

// Q3_K: x = d (sc - 32)(q - 4). Super-block column: d[8], hmask (8 columns: column i holds
// hmask bytes 4i .. 4i + 3; bit 4h + s of byte e is weight 128h + 32s + 4i + e's third bit,
// set where q - 4 >= 0), qs (16 columns), the 12 scale bytes (3 columns). q + 4 (0..7) meets
// the activations unsigned; sum_j sc_j sum((q - 4) a) = sum_j sc_j sum(q a) - 4 sum_j sc_j bsum_j.
//
// The 16 six-bit scales minus 32 of 8 rows (q3_k_scales for 8 rows at once), as signed bytes:
// sc[g] holds sub-blocks 4g .. 4g + 3 in the 4 bytes of each row's lane. Low nibbles: scale
// bytes 0..7 (sub-blocks 0..7 low, 8..15 high nibble); top 2 bits: bits 2g, 2g + 1 of scale byte
// 8 + j % 4, i.e. of the same byte of column 2 for the 4 sub-blocks of sc[g].
static inline void q3_k_scales8(const uint8_t* p, __m256i sc[4]) {
  const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
  const __m256i c2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64));
  const __m256i m4 = _mm256_set1_epi8(0x0f), top2 = _mm256_set1_epi8(0x30), b32 = _mm256_set1_epi8(32);
  sc[0] = _mm256_or_si256(_mm256_and_si256(c0, m4), _mm256_and_si256(_mm256_slli_epi16(c2, 4), top2));
  sc[1] = _mm256_or_si256(_mm256_and_si256(c1, m4), _mm256_and_si256(_mm256_slli_epi16(c2, 2), top2));
  sc[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c0, 4), m4), _mm256_and_si256(c2, top2));
  sc[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c1, 4), m4),
                          _mm256_and_si256(_mm256_srli_epi16(c2, 2), top2));
  for (int g = 0; g < 4; g++) sc[g] = _mm256_sub_epi8(sc[g], b32);
}

// The 16 sub-block sums of q (unsigned) and the tokens' activations, each times its scale
// (scale(j): int16 pairs, see lane_sbyte_pairs), added to isum; qv(h, s, i) the 32 weights
// of column 8h + i at shift s.
template <int C, typename Q, typename S>
static inline void k16_panel_sums(const Q& qv, const S& scale, const block_q8_K* const* ab, __m256i* isum) {
#pragma GCC unroll 8
  for (int h = 0; h < 2; h++) {
#pragma GCC unroll 8
    for (int s = 0; s < 4; s++) {
#pragma GCC unroll 8
      for (int half = 0; half < 2; half++) {
        __m256i sub[C];
        for (int c = 0; c < C; c++) sub[c] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int i = 4 * half; i < 4 * half + 4; i++) {
          const __m256i q = qv(h, s, i);
          for (int c = 0; c < C; c++)
            sub[c] = _mm256_add_epi16(sub[c], _mm256_maddubs_epi16(q, bcast4(ab[c]->qs + 128 * h + 32 * s + 4 * i)));
        }
        const __m256i sc = scale(8 * h + 2 * s + half);
        for (int c = 0; c < C; c++) {
          isum[c] = _mm256_add_epi32(isum[c], _mm256_madd_epi16(sub[c], sc));
          keep_in_register(isum[c]);
        }
      }
    }
  }
}

template <int C>
static void panel_q3_K(int64_t nb, const uint8_t* w, const uint8_t* act, size_t act_stride,
                       const ActBlockInfo*, float* out, int64_t out_stride, int nr) {
  constexpr size_t kBlock = kPanelRows * sizeof(block_q3_K);
  constexpr size_t kHm = 2 * kPanelRows, kQs = kHm + 8 * 32, kSc = kQs + 16 * 32;
  const __m256i three = _mm256_set1_epi8(3);
  __m256 acc[C];
  for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* pb = w + size_t(b) * kBlock;
    prefetch_ahead<kBlock>(pb);
    const block_q8_K* ab[C];
    __m256i isum[C];
    for (int c = 0; c < C; c++) {
      ab[c] = reinterpret_cast<const block_q8_K*>(act + c * act_stride) + b;
      isum[c] = _mm256_setzero_si256();
    }
    __m256i sc[4];
    q3_k_scales8(pb + kSc, sc);
    const auto qv = [&](int h, int s, int i) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + kQs + 32 * (8 * h + i)));
      const __m256i hm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + kHm + 32 * i));
      return _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 2 * s), three), move_bit(hm, 4 * h + s, 2));
    };
    const auto scale = [&](int j) { return lane_sbyte_pairs(sc[j / 4], j % 4); };
    k16_panel_sums<C>(qv, scale, ab, isum);
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pb)));
    const BsumPairs sp = sc_pairs(sc);
    for (int c = 0; c < C; c++) {
      const __m256i offset = _mm256_slli_epi32(bsum_dot(sp, *ab[c]), 2);  // 4 sum sc bsum
      acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(ab[c]->d)),
                               _mm256_cvtepi32_ps(_mm256_sub_epi32(isum[c], offset)), acc[c]);
    }
  }
  store_panel<C>(acc, out, out_stride, nr);
}

// Q2_K: x = d sc q - dmin m. Super-block column: d[8], dmin[8], the 16 scale bytes (4 columns:
// column g holds sub-blocks 4g .. 4g + 3, sc in the low nibble, m in the high one), qs (16
// columns). Per super-block d_w d_a sum_j sc_j sum(q a) - dmin_w d_a sum_j m_j bsum_j.
template <int C>
static void panel_q2_K(int64_t nb, const uint8_t* w, const uint8_t* act, size_t act_stride,
                       const ActBlockInfo*, float* out, int64_t out_stride, int nr) {
  constexpr size_t kBlock = kPanelRows * sizeof(block_q2_K);
  constexpr size_t kSc = 4 * kPanelRows, kQs = kSc + 4 * 32;
  const __m256i three = _mm256_set1_epi8(3), low4 = _mm256_set1_epi8(0x0f);
  __m256 acc[C];
  for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* pb = w + size_t(b) * kBlock;
    prefetch_ahead<kBlock>(pb);
    const block_q8_K* ab[C];
    __m256i isum[C];
    for (int c = 0; c < C; c++) {
      ab[c] = reinterpret_cast<const block_q8_K*>(act + c * act_stride) + b;
      isum[c] = _mm256_setzero_si256();
    }
    const auto column = [&](size_t off) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + off)); };
    const auto qv = [&](int h, int s, int i) {
      return _mm256_and_si256(_mm256_srli_epi16(column(kQs + 32 * (8 * h + i)), 2 * s), three);
    };
    // sc_j (< 16) in both int16 halves of each lane
    const auto scale = [&](int j) { return lane_sbyte_pairs(_mm256_and_si256(column(kSc + 32 * (j / 4)), low4), j % 4); };
    k16_panel_sums<C>(qv, scale, ab, isum);
    __m256i m[4];  // the mins, sub-blocks 4g .. 4g + 3 per lane (< 16: signed bytes as they are)
    for (int g = 0; g < 4; g++) m[g] = _mm256_and_si256(_mm256_srli_epi16(column(kSc + 32 * g), 4), low4);
    __m256i mins[C];
    const BsumPairs mp = sc_pairs(m);
    for (int c = 0; c < C; c++) mins[c] = bsum_dot(mp, *ab[c]);
    add_block_with_mins<C>(pb, ab, isum, mins, acc);
  }
  store_panel<C>(acc, out, out_stride, nr);
}

// The types this table keeps in panels of 8 rows; the rest keep GGML rows.
static bool panel8_applies(GgmlType t) {
  switch (t) {
    case GgmlType::Q4_0: case GgmlType::Q4_1: case GgmlType::Q8_0:
    case GgmlType::Q5_0: case GgmlType::Q5_1: case GgmlType::IQ4_NL:
    case GgmlType::Q4_K: case GgmlType::Q6_K:
    case GgmlType::Q5_K: case GgmlType::Q3_K: case GgmlType::Q2_K:
      return true;
    default:  // every other type: GGML rows
      return false;
  }
}

// --- K-quants (Q4_K, Q6_K: the Q4_K_M mix) with Q8_K activations ---

// Q8_K activations, byte for byte the reference quantizer (ggml_quants.cpp): the signed value
// of largest magnitude (first one on a tie; NaN never wins), iscale = -127 / max, levels by
// the same add-1.5*2^23 rounding, capped at 127 and wrapped to int8 as the scalar cast does.
static void quantize_row_q8_K(const float* x, block_q8_K* y, int64_t k) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  for (int64_t b = 0; b < k / QK_K; b++, x += QK_K) {
    __m256 vmax = _mm256_setzero_ps();
    for (int j = 0; j < QK_K; j += 8)  // max(|x|, acc): a NaN |x| keeps acc, as x > amax does
      vmax = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + j), abs_mask), vmax);
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    float amax = 0.0f;
    for (float v : lanes) amax = v > amax ? v : amax;
    if (!amax) {
      std::memset(&y[b], 0, sizeof(block_q8_K));
      continue;
    }
    int first = 0;
    while (!(std::fabs(x[first]) == amax)) first++;
    const float iscale = -127.f / x[first];
    const __m256 vs = _mm256_set1_ps(iscale);
    const __m256i mant = _mm256_set1_epi32(0x007fffff), bias = _mm256_set1_epi32(0x00400000);
    const __m256i cap = _mm256_set1_epi32(127), low8 = _mm256_set1_epi32(0xff);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int j = 0; j < QK_K; j += 32) {
      __m256i q[4];
      for (int i = 0; i < 4; i++) {
        __m256 p = _mm256_mul_ps(vs, _mm256_loadu_ps(x + j + 8 * i));
        asm("" : "+x"(p));  // round the product first: no FMA with the add (-mfma contracts)
        const __m256 t = _mm256_add_ps(p, magic);
        __m256i v = _mm256_sub_epi32(_mm256_and_si256(_mm256_castps_si256(t), mant), bias);
        q[i] = _mm256_and_si256(_mm256_min_epi32(v, cap), low8);  // int8 cast = low 8 bits
      }
      // low bytes 0..255 pack without saturation; the packs interleave 128-bit lanes
      const __m256i p = _mm256_packus_epi16(_mm256_packus_epi32(q[0], q[1]),
                                            _mm256_packus_epi32(q[2], q[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[b].qs + j),
                          _mm256_permutevar8x32_epi32(p, order));
    }
    for (int j = 0; j < QK_K / 16; j++) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(y[b].qs + 16 * j));
      const __m256i w = _mm256_madd_epi16(_mm256_cvtepi8_epi16(v), _mm256_set1_epi16(1));
      y[b].bsums[j] = int16_t(hsum_epi32(w));
    }
    y[b].d = 1 / iscale;
  }
}

// Q4_K . Q8_K: per pair of sub-blocks one 32-byte load of nibbles; maddubs (q <= 15, |a| <=
// 127: pairs fit int16) then madd with the sub-block's 6-bit scale. Same integer sums and the
// same float combination as the portable dot_q4_K_q8_K.
static float dot_q4_K_q8_K_avx2(int64_t n, const block_q4_K* w, const block_q8_K* a) {
  const __m256i nib = _mm256_set1_epi8(0x0f);
  float sum = 0.0f;
  for (int64_t b = 0; b < n / QK_K; b++) {
    uint8_t sc[8], m[8];
    for (int j = 0; j < 8; j++) k4_scale_min(j, w[b].scales, sc[j], m[j]);
    int summ = 0;
    for (int j = 0; j < 8; j++) summ += m[j] * (a[b].bsums[2 * j] + a[b].bsums[2 * j + 1]);
    __m256i acc = _mm256_setzero_si256();
    for (int h = 0; h < 4; h++) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qs + 32 * h));
      const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[b].qs + 64 * h));
      const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[b].qs + 64 * h + 32));
      const __m256i p0 = _mm256_maddubs_epi16(_mm256_and_si256(q, nib), a0);
      const __m256i p1 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 4), nib), a1);
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p0, _mm256_set1_epi16(sc[2 * h])));
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p1, _mm256_set1_epi16(sc[2 * h + 1])));
    }
    const int sumi = hsum_epi32(acc);
    sum += a[b].d * (fp16_to_fp32(w[b].d) * float(sumi) - fp16_to_fp32(w[b].dmin) * float(summ));
  }
  return sum;
}

// Q6_K . Q8_K: 32 weights (two sub-blocks of 16) per step, q in [0, 63] unsigned in maddubs
// (pairs <= 2 * 63 * 127, fits int16), scales per 128-bit half; the -32 offset is taken out
// with the activation's bsums: sum (q - 32) a = sum q a - 32 bsum.
static float dot_q6_K_q8_K_avx2(int64_t n, const block_q6_K* w, const block_q8_K* a) {
  const __m256i nib = _mm256_set1_epi8(0x0f), hi2 = _mm256_set1_epi8(0x30);
  float sum = 0.0f;
  for (int64_t b = 0; b < n / QK_K; b++) {
    const int8_t* sc = w[b].scales;
    int offset = 0;
    for (int j = 0; j < 16; j++) offset += sc[j] * a[b].bsums[j];
    __m256i acc = _mm256_setzero_si256();
    for (int h = 0; h < 2; h++) {
      const uint8_t* ql = w[b].ql + 64 * h;
      const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
      const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qh + 32 * h));
      const __m256i q[4] = {  // weights 128h + 32s + l, l = 0..31
          _mm256_or_si256(_mm256_and_si256(l0, nib), _mm256_and_si256(_mm256_slli_epi16(qh, 4), hi2)),
          _mm256_or_si256(_mm256_and_si256(l1, nib), _mm256_and_si256(_mm256_slli_epi16(qh, 2), hi2)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), nib), _mm256_and_si256(qh, hi2)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), nib),
                          _mm256_and_si256(_mm256_srli_epi16(qh, 2), hi2))};
      for (int s = 0; s < 4; s++) {
        const int j = 8 * h + 2 * s;  // sub-blocks j (low 128 bits) and j + 1 (high)
        const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[b].qs + 16 * j));
        const __m256i scales = _mm256_set_m128i(_mm_set1_epi16(sc[j + 1]), _mm_set1_epi16(sc[j]));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(q[s], av), scales));
      }
    }
    const int sumi = hsum_epi32(acc) - 32 * offset;
    sum += a[b].d * fp16_to_fp32(w[b].d) * float(sumi);
  }
  return sum;
}

// --- Q2_K, Q3_K, Q5_K dot products with Q8_K activations, on GGML rows ---
// (Their gemm is the panel kernels above; these row kernels, once also a multi-token gemm, now
// serve the table's dot entry, which the engine does not call.) Each weight super-block is
// decoded once into 8 vectors of 32 weights (vector v: weights 32v .. 32v + 31, which meet
// activations 32v .. 32v + 31 for all three types) as unsigned bytes, plus per-vector int16
// scales (one scale for the whole vector: Q5_K's sub-blocks of 32; the low 128 bits sub-block 2v
// and the high 128 bits 2v + 1: Q2_K/Q3_K's sub-blocks of 16). Per token: sum_v
// madd(maddubs(q_v, a_v), scale_v), exact in int32, minus the part that multiplies Q8_K's per-16
// bsums (mins; Q3_K's -4 offset). The integer sums are the portable dot products'
// (kernels_dots.inc); the float combination is theirs, written the same way.

struct KDecoded {
  __m256i q[8];    // unsigned weights (Q3_K: q + 4), vector v = weights 32v .. 32v + 31
  __m256i sc[8];   // int16 scales for vector v (see above)
  __m256i mins;    // int16 x 16: what multiplies bsums[0..15]
  float d, dmin;   // dmin unused by Q3_K
};

// 16 int8 sub-block scales (j order) as the int16 vector V with sub-blocks 0, 2, .., 14 in the
// low 128 bits and 1, 3, .., 15 in the high: one in-lane byte shuffle per vector v then puts
// sub-block 2v's scale in every low int16 lane and 2v + 1's in every high one.
static inline __m256i k16_scale_pairs(__m128i sc8, bool is_signed) {
  const __m128i even_odd = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m128i eo = _mm_shuffle_epi8(sc8, even_odd);
  return is_signed ? _mm256_cvtepi8_epi16(eo) : _mm256_cvtepu8_epi16(eo);
}
static inline void k16_scales(__m256i v, __m256i* sc) {
  for (int p = 0; p < 8; p++) sc[p] = _mm256_shuffle_epi8(v, _mm256_set1_epi16(int16_t(0x0100 * (2 * p + 1) + 2 * p)));
}

// Q2_K / Q3_K low 2 bits: qs[32h + l] holds weights 128h + 32s + l in bits 2s, 2s + 1.
static inline __m256i k2_low_bits(const uint8_t* qs, int v) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * (v / 4)));
  return _mm256_and_si256(_mm256_srli_epi16(raw, 2 * (v % 4)), _mm256_set1_epi8(3));
}

struct Q2KRow {
  using W = block_q2_K;
  static constexpr bool kMin = true;  // x = d sc q - dmin m: summ from mins . bsums
  static inline void decode(const W& w, KDecoded& k) {
    const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.scales));
    const __m128i low4 = _mm_set1_epi8(0x0f);
    k16_scales(k16_scale_pairs(_mm_and_si128(s, low4), false), k.sc);
    k.mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(s, 4), low4));
    for (int v = 0; v < 8; v++) k.q[v] = k2_low_bits(w.qs, v);
    k.d = fp16_scalar(w.d);
    k.dmin = fp16_scalar(w.dmin);
  }
};

// Q3_K's 16 six-bit scales minus 32, as int8 in sub-block order (q3_k_scales, 16 at once):
// low nibbles from bytes 0..7 (sub-blocks 0..7 low, 8..15 high nibble), the top 2 bits of
// sub-block j in bits 2(j / 4) of byte 8 + j % 4.
static inline __m128i q3_k_scales_simd(const uint8_t* s) {
  uint64_t lo8;
  uint32_t hi4;
  std::memcpy(&lo8, s, 8);
  std::memcpy(&hi4, s + 8, 4);
  const __m128i x = _mm_cvtsi64_si128(int64_t(lo8)), low4 = _mm_set1_epi8(0x0f);
  const __m128i low = _mm_unpacklo_epi64(_mm_and_si128(x, low4), _mm_and_si128(_mm_srli_epi16(x, 4), low4));
  // 32-bit lane k holds bytes 8..11 for sub-blocks 4k .. 4k + 3; their bits sit 2k up
  const __m128i h = _mm_srlv_epi32(_mm_set1_epi32(int32_t(hi4)), _mm_setr_epi32(0, 2, 4, 6));
  const __m128i high = _mm_slli_epi16(_mm_and_si128(h, _mm_set1_epi8(3)), 4);
  return _mm_sub_epi8(_mm_or_si128(low, high), _mm_set1_epi8(32));
}

struct Q3KRow {
  using W = block_q3_K;
  static constexpr bool kMin = false;  // x = d (sc - 32)(q - 4): q + 4 unsigned, -4 sum sc bsum
  static inline void decode(const W& w, KDecoded& k) {
    const __m128i sc8 = q3_k_scales_simd(w.scales);
    k16_scales(k16_scale_pairs(sc8, true), k.sc);
    k.mins = _mm256_slli_epi16(_mm256_cvtepi8_epi16(sc8), 2);  // 4 (sc - 32): |.| <= 128
    const __m256i hm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.hmask));
    const __m256i one = _mm256_set1_epi8(1);
    for (int v = 0; v < 8; v++) {  // bit v of hmask[l]: weight 32v + l has q >= 0, i.e. + 4
      const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(hm, v), one);
      k.q[v] = _mm256_or_si256(k2_low_bits(w.qs, v), _mm256_slli_epi16(hb, 2));
    }
    k.d = fp16_scalar(w.d);
    k.dmin = 0.0f;
  }
};

struct Q5KRow {
  using W = block_q5_K;
  static constexpr bool kMin = true;  // x = d sc q - dmin m: summ from mins . bsums
  static inline void decode(const W& w, KDecoded& k) {
    // k4_scale_min for 8 sub-blocks at once: 12 bytes as 3 words (see block_q4_K)
    uint32_t u[3];
    std::memcpy(u, w.scales, 12);
    const uint32_t sc_lo = u[0] & 0x3f3f3f3f, m_lo = u[1] & 0x3f3f3f3f;
    const uint32_t sc_hi = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
    const uint32_t m_hi = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
    // sub-block j's scale in every int16 lane of vector j: one in-lane shuffle each
    const __m128i sc8 = _mm_cvtsi64_si128(int64_t(uint64_t(sc_lo) | (uint64_t(sc_hi) << 32)));
    const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sc8));
    for (int j = 0; j < 8; j++)
      k.sc[j] = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16(int16_t(0x0100 * (2 * j + 1) + 2 * j)));
    // m_j multiplies bsums 2j and 2j + 1
    const __m128i m8 = _mm_cvtsi64_si128(int64_t(uint64_t(m_lo) | (uint64_t(m_hi) << 32)));
    k.mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.qh));
    const __m256i low4 = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10);
    // bit b of qh[l] moved to bit 4 of its byte (a 16-bit shift by |4 - b| <= 4 leaves bit 4 of
    // each byte coming from the same byte), masked: the fifth bit as 0 or 16
    auto fifth = [&](int b) {
      const __m256i x = b <= 4 ? _mm256_slli_epi16(qh, 4 - b) : _mm256_srli_epi16(qh, b - 4);
      return _mm256_and_si256(x, bit4);
    };
    for (int h = 0; h < 4; h++) {  // bit 2h of qh[l]: weight 64h + l; bit 2h + 1: 64h + 32 + l
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.qs + 32 * h));
      k.q[2 * h] = _mm256_or_si256(_mm256_and_si256(raw, low4), fifth(2 * h));
      k.q[2 * h + 1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low4), fifth(2 * h + 1));
    }
    k.d = fp16_scalar(w.d);
    k.dmin = fp16_scalar(w.dmin);
  }
};

// One decoded super-block against one token's Q8_K block, added to the token's 8 float lanes
// (summed once per row): sum_v madd(maddubs(q_v, a_v), sc_v) times d_w d_a, minus the bsums
// part (Q2_K/Q5_K: mins, times dmin_w d_a; Q3_K: 4 (sc - 32), with d_w d_a). q <= 31 and
// |a| <= 128: maddubs pairs fit int16; madd with the scale (|sc| <= 63) widens to int32;
// bsums (|.| <= 2048) times mins (<= 128) in madd pairs fit int32. Each lane's integer sums are
// exact, as the portable dot's are; only the float additions are grouped differently.
template <typename B>
static inline __m256 k_block_term(const KDecoded& k, const block_q8_K& a, __m256 acc) {
  __m256i isum = _mm256_setzero_si256();
  for (int v = 0; v < 8; v++) {
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qs + 32 * v));
    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(k.q[v], av), k.sc[v]));
  }
  const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.bsums));
  const __m256i mb = _mm256_madd_epi16(k.mins, bs);
  if constexpr (B::kMin) {
    acc = _mm256_fmadd_ps(_mm256_set1_ps(a.d * k.d), _mm256_cvtepi32_ps(isum), acc);
    return _mm256_fnmadd_ps(_mm256_set1_ps(a.d * k.dmin), _mm256_cvtepi32_ps(mb), acc);
  } else {
    return _mm256_fmadd_ps(_mm256_set1_ps(a.d * k.d), _mm256_cvtepi32_ps(_mm256_sub_epi32(isum, mb)), acc);
  }
}

template <typename B>
static float dot_k_row(int64_t n, const typename B::W* w, const block_q8_K* a) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / QK_K; b++) {
    KDecoded k;
    B::decode(w[b], k);
    acc = k_block_term<B>(k, a[b], acc);
  }
  return hsum(acc);
}

template <typename B>
static void set_k_dot(KernelTable& t, GgmlType type) {
  t.types[int(type)].dot = erased_dot<typename B::W, block_q8_K, dot_k_row<B>>;
}

// --- 5-bit and non-linear 4-bit blocks of 32 (Q5_0, Q5_1, IQ4_NL): the Q4_K_M mix's Q5_0 rows ---
// The dot product of one GGML row: each weight block is expanded once to 32 int8 weights in one
// register, in weight order (bytes 0..15: low nibbles, weights 0..15; bytes 16..31: high
// nibbles, weights 16..31). Per block: an exact int32 sum (8 lanes), converted and accumulated
// with d_w * d_a by one FMA. (The GEMM runs on panels: panel_b32 below.)

// How each type's weights come out of a panel's nibble (panel_b32):
enum class Weights {
  U4,   // the nibble itself, q in [0, 15] (Q4_0, Q4_1)
  U5,   // the nibble plus 16 * the fifth bit, q in [0, 31] (Q5_0, Q5_1)
  Lut,  // IQ4_NL's level of the nibble, int8 in [-127, 113]
};

// Q4_0 and Q4_1 run on panels only (their dot products are the portable ones).
struct Q4_0Block {
  using W = block_q4_0;
  using A = block_q8_0;
  static constexpr Weights kWeights = Weights::U4;
  static constexpr int kBias = 8;  // x = d * (q - kBias): - kBias * sum(a), from act_info
  static constexpr bool kMin = false;  // x = d * q + m: + m_w * s_a from the Q8_1 block
};
struct Q4_1Block {
  using W = block_q4_1;
  using A = block_q8_1;
  static constexpr Weights kWeights = Weights::U4;
  static constexpr int kBias = 0;
  static constexpr bool kMin = true;
};

// 0xff in byte j where bit j of the block's 32-bit qh (little-endian) is set, else 0.
static inline __m256i expand_qh(const uint8_t* qh) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  // byte j of the result takes byte j / 8 of bits (shuffle within each 128-bit lane)
  const __m256i idx = _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303);
  const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(int(bits)), idx);
  const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201));  // 1 << (j % 8)
  return _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
}

// Q5_0: q - 16 as int8 in [-16, 15]: the nibble where the fifth bit is set, else nibble - 16
// (= nibble | 0xf0 in two's complement).
struct Q5_0Block {
  using W = block_q5_0;
  using A = block_q8_0;
  static constexpr bool kSigned = true, kMin = false;
  static constexpr Weights kWeights = Weights::U5;
  static constexpr int kBias = 16;  // the panel's q is unsigned
  static inline __m256i expand(const W& b) {
    return _mm256_or_si256(unpack_nibbles(b.qs), _mm256_andnot_si256(expand_qh(b.qh), _mm256_set1_epi8(char(0xf0))));
  }
};

// Q5_1: q unsigned in [0, 31] (x = d*q + m; the m term is m_w * s_a per block).
struct Q5_1Block {
  using W = block_q5_1;
  using A = block_q8_1;
  static constexpr bool kSigned = false, kMin = true;
  static constexpr Weights kWeights = Weights::U5;
  static constexpr int kBias = 0;
  static inline __m256i expand(const W& b) {
    return _mm256_or_si256(unpack_nibbles(b.qs), _mm256_and_si256(expand_qh(b.qh), _mm256_set1_epi8(0x10)));
  }
};

// IQ4_NL: the 16 levels looked up by nibble (one byte shuffle of the table), int8 in [-127, 113].
struct Iq4nlBlock {
  using W = block_iq4_nl;
  using A = block_q8_0;
  static constexpr bool kSigned = true, kMin = false;
  static constexpr Weights kWeights = Weights::Lut;
  static constexpr int kBias = 0;
  static inline __m256i expand(const W& b) {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4nlValues));
    return _mm256_shuffle_epi8(_mm256_set_m128i(t, t), unpack_nibbles(b.qs));
  }
};

// Integer sums per block: maddubs pairs stay within int16 (|w| <= 127 signed or w <= 31
// unsigned, |a| <= 127).
template <typename B>
static float dot_block32(int64_t n, const typename B::W* w, const typename B::A* a) {
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  float accm = 0.0f;
  auto block = [&](int64_t b, int k) {
    const __m256i q = B::expand(w[b]);
    // sign trick: |q| (or q) unsigned, the sign moved onto a
    const __m256i qu = B::kSigned ? _mm256_sign_epi8(q, q) : q;
    __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[b].qs));
    if constexpr (B::kSigned) qa = _mm256_sign_epi8(qa, q);
    const __m256 s = _mm256_cvtepi32_ps(dot_u8_i8(qu, qa));
    acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(fp16_scalar(w[b].d) * fp16_scalar(a[b].d)), s, acc[k]);
    if constexpr (B::kMin) accm += fp16_scalar(w[b].m) * fp16_scalar(a[b].s);
  };
  // even and odd blocks in two accumulators: two FMA chains
  const int64_t nb = n / QK;
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    block(b, 0);
    block(b + 1, 1);
  }
  if (b < nb) block(b, 0);
  return hsum(_mm256_add_ps(acc[0], acc[1])) + accm;
}

// ---- Block types of 32 nibbles (Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL) in panels of 8 rows ----
// A panel block column holds the 8 rows' fp16 d (then m[8] for Q4_1/Q5_1), Q5's fifth bits (32
// bytes: row r's qh in lane r), then 4 nibble columns (column j: weights 4j..4j+3 in the low
// nibbles, 16+4j.. in the high ones), as the AVX-512 tables' panel_b32 with 8 rows. Each
// 32-byte load holds 4+4 weights of each of the 8 rows; multiplied by the same activations
// broadcast to every lane, the integer dot product's 8 lanes are the 8 rows. Per block and
// token: an exact int32 sum per row lane, one conversion and one FMA for 8 rows (the 8 scales
// converted by one F16C instruction); the same operations in the same order for any number of
// tokens, so prefill equals token-by-token decode.

// Q5: 0x10 added to each weight byte whose fifth bit is set. Column j's low weights are bits
// 4j..4j+3 of qh (byte j / 2), the high ones bits 16+4j..; each row's 4-byte lane gathers its
// qh byte (shuffle within 128-bit lanes) and tests one bit per byte.
static inline __m256i add_fifth_bits(__m256i nib, __m256i qh, int qh_byte, int j) {
  const __m256i idx = _mm256_add_epi8(_mm256_setr_epi32(0, 0x04040404, 0x08080808, 0x0c0c0c0c, 0,
                                                        0x04040404, 0x08080808, 0x0c0c0c0c),
                                      _mm256_set1_epi8(char(qh_byte)));
  const __m256i bit = _mm256_set1_epi32(j % 2 ? int(0x80402010) : 0x08040201);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(qh, idx), bit), bit);
  return _mm256_or_si256(nib, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
}

// Integer sums: unsigned weights go straight into maddubs with the activations (|a| <= 127);
// an int16 lane gains at most 2 * 15 * 127 (U4) or 2 * 31 * 127 (U5) per maddubs, so U4 lanes
// (16 products) are widened once per block and U5 lanes every two columns. The offsets:
// - kBias * sum(a) from act_info (sum8 = -8 sum(a)), + m_w * s_a for the types with a min.
// IQ4_NL's signed levels meet a with the level's sign moved onto it, widened every step.
template <int C, typename B>
static void panel_b32(int64_t nb, const uint8_t* w, const uint8_t* act, size_t act_stride,
                      const ActBlockInfo* info, float* out, int64_t out_stride, int nr) {
  using A = typename B::A;
  constexpr Weights kW = B::kWeights;
  static_assert(B::kBias == 0 || B::kBias == 8 || B::kBias == 16, "offsets from sum8 = -8 sum(a)");
  constexpr size_t kBlock = kPanelRows * sizeof(typename B::W);
  constexpr size_t kScales = kPanelRows * (B::kMin ? 4 : 2);
  constexpr size_t kQs = kScales + (kW == Weights::U5 ? 4 * kPanelRows : 0);
  const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  const __m128i lut128 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4nlValues));
  const __m256i lut = _mm256_set_m128i(lut128, lut128);
  __m256 acc[C], accm[C];
  for (int c = 0; c < C; c++) acc[c] = accm[c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* pb = w + size_t(b) * kBlock;
    prefetch_ahead<kBlock>(pb);
    const A* ab[C];
    __m256i isum[C], i16[C];  // int32 lanes; int16 lanes not yet widened (U4, U5)
    for (int c = 0; c < C; c++) {
      ab[c] = reinterpret_cast<const A*>(act + c * act_stride) + b;
      isum[c] = i16[c] = _mm256_setzero_si256();
    }
    __m256i qh = _mm256_setzero_si256();
    if constexpr (kW == Weights::U5) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + kScales));
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + kQs + 32 * j));
      __m256i lo = _mm256_and_si256(v, low4);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      if constexpr (kW == Weights::U5) {
        lo = add_fifth_bits(lo, qh, j / 2, j);
        hi = add_fifth_bits(hi, qh, 2 + j / 2, j);
      } else if constexpr (kW == Weights::Lut) {
        lo = _mm256_shuffle_epi8(lut, lo);
        hi = _mm256_shuffle_epi8(lut, hi);
      }
      for (int c = 0; c < C; c++) {
        const __m256i a_lo = bcast4(ab[c]->qs + 4 * j), a_hi = bcast4(ab[c]->qs + 16 + 4 * j);
        if constexpr (kW == Weights::Lut) {
          isum[c] = _mm256_add_epi32(isum[c], dot_i8_i8(lo, a_lo));
          isum[c] = _mm256_add_epi32(isum[c], dot_i8_i8(hi, a_hi));
          keep_in_register(isum[c]);
        } else {
          i16[c] = _mm256_add_epi16(i16[c], _mm256_maddubs_epi16(lo, a_lo));
          i16[c] = _mm256_add_epi16(i16[c], _mm256_maddubs_epi16(hi, a_hi));
          if (kW == Weights::U5 && j % 2) {
            isum[c] = _mm256_add_epi32(isum[c], _mm256_madd_epi16(i16[c], ones));
            i16[c] = _mm256_setzero_si256();
          }
          keep_in_register(i16[c]);
        }
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pb)));
    for (int c = 0; c < C; c++) {
      const ActBlockInfo& ai = info[c * nb + b];
      __m256i dot = kW == Weights::U4 ? _mm256_madd_epi16(i16[c], ones) : isum[c];
      if constexpr (B::kBias != 0) dot = _mm256_add_epi32(dot, _mm256_set1_epi32(B::kBias / 8 * ai.sum8));
      acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(ai.d)), _mm256_cvtepi32_ps(dot), acc[c]);
    }
    if constexpr (B::kMin) {
      const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pb + 2 * kPanelRows)));
      for (int c = 0; c < C; c++) accm[c] = _mm256_fmadd_ps(mw, _mm256_set1_ps(info[c * nb + b].s), accm[c]);
    }
  }
  if constexpr (B::kMin)
    for (int c = 0; c < C; c++) acc[c] = _mm256_add_ps(acc[c], accm[c]);
  store_panel<C>(acc, out, out_stride, nr);
}

template <typename B>
static void set_panel_b32(KernelTable& t, GgmlType type) {
  TypeKernels& k = t.types[int(type)];
  k.gemm = gemm_panel8<QK, panel_b32<1, B>, panel_b32<2, B>, panel_b32<3, B>, panel_b32<4, B>>;
  k.uses_act_info = true;
}

// dot on GGML rows (dot_block32), gemm on panels.
template <typename B>
static void set_block32(KernelTable& t, GgmlType type) {
  t.types[int(type)].dot = erased_dot<typename B::W, typename B::A, dot_block32<B>>;
  set_panel_b32<B>(t, type);
}

static KernelTable make_table() {
  KernelTable t = *scalar_kernels();  // weight quantizers and dequantizers: scalar twin
  t.name = "avx2";
  auto& types = t.types;
  types[int(GgmlType::Q8_0)].from_float = erased_from_float<block_q8_0, quantize_row_q8_0>;
  types[int(GgmlType::Q8_1)].from_float = erased_from_float<block_q8_1, quantize_row_q8_1>;
  types[int(GgmlType::F16)].to_float = erased_to_float<fp16_t, fp16_to_fp32_row>;
  types[int(GgmlType::F16)].from_float = erased_from_float<fp16_t, fp32_to_fp16_row>;
  types[int(GgmlType::Q8_K)].from_float = erased_from_float<block_q8_K, quantize_row_q8_K>;
  set_portable_kernels(t);  // then the tile kernels replace gemm_rows
  set_dot<block_q4_K, block_q8_K, dot_q4_K_q8_K_avx2>(t, GgmlType::Q4_K);
  set_dot<block_q6_K, block_q8_K, dot_q6_K_q8_K_avx2>(t, GgmlType::Q6_K);
  set_k_dot<Q2KRow>(t, GgmlType::Q2_K);
  set_k_dot<Q3KRow>(t, GgmlType::Q3_K);
  set_k_dot<Q5KRow>(t, GgmlType::Q5_K);
  set_block32<Q5_0Block>(t, GgmlType::Q5_0);
  set_block32<Q5_1Block>(t, GgmlType::Q5_1);
  set_block32<Iq4nlBlock>(t, GgmlType::IQ4_NL);
  set_panel_b32<Q4_0Block>(t, GgmlType::Q4_0);
  set_panel_b32<Q4_1Block>(t, GgmlType::Q4_1);
  types[int(GgmlType::Q8_0)].gemm =
      gemm_panel8<QK, panel_q8_0<1>, panel_q8_0<2>, panel_q8_0<3>, panel_q8_0<4>>;
  types[int(GgmlType::Q8_0)].uses_act_info = true;
  // (The K-quants' panels read no act_info: uses_act_info stays false, as set_dot left it.)
  types[int(GgmlType::Q4_K)].gemm =
      gemm_panel8<QK_K, panel_q4_K<1>, panel_q4_K<2>, panel_q4_K<3>, panel_q4_K<4>, panel_q4_K<5>,
                  panel_q4_K<6>, panel_q4_K<7>, panel_q4_K<8>>;
  types[int(GgmlType::Q6_K)].gemm =
      gemm_panel8<QK_K, panel_q6_K<1>, panel_q6_K<2>, panel_q6_K<3>, panel_q6_K<4>>;
  types[int(GgmlType::Q5_K)].gemm =
      gemm_panel8<QK_K, panel_q5_K<1>, panel_q5_K<2>, panel_q5_K<3>, panel_q5_K<4>>;
  types[int(GgmlType::Q3_K)].gemm =
      gemm_panel8<QK_K, panel_q3_K<1>, panel_q3_K<2>, panel_q3_K<3>, panel_q3_K<4>>;
  types[int(GgmlType::Q2_K)].gemm =
      gemm_panel8<QK_K, panel_q2_K<1>, panel_q2_K<2>, panel_q2_K<3>, panel_q2_K<4>>;
  types[int(GgmlType::F16)].gemm = gemm_float<true>;
  types[int(GgmlType::F32)].gemm = gemm_float<false>;
  t.packed_bytes = panels_packed_bytes<kPanelRows, panel8_applies>;
  t.pack = panels_pack<kPanelRows, panel8_applies>;
  t.unpack_row = panels_unpack_row<kPanelRows, panel8_applies>;
  t.mix_rows = mix_rows_simd;
  t.softmax = softmax_simd;
  t.swiglu = swiglu_simd;
  return t;
}

}  // namespace alpaca::avx2

namespace alpaca {
const KernelTable* avx2_kernels() {
  static const KernelTable table = avx2::make_table();
  return &table;
}
}  // namespace alpaca
