// Native kernel test: every kernel table this CPU and build offer, compared with the scalar
// table. No Python, so the same driver runs natively (x86-64: scalar vs avx2) and
// cross-compiled under qemu-user (aarch64: scalar vs neon and neon_dotprod; see
// run_neon_qemu.sh). tests/test_native_kernels.py builds and runs both.
//
//   test_kernels_native [--expect-isas scalar,neon,neon_dotprod]
//
// --expect-isas also checks runtime detection: available_isas() must be exactly that list.
// Prints one line per failing check and a closing "N passed, M failed"; exits 1 on failure.
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "kernels.h"

using namespace alpaca;

namespace {

// Dot products and gemm: per-block integer sums are exact on every ISA; what may differ is the
// float32 rounding of the per-block scale products and the order of accumulation (SIMD lanes,
// unrolling, FMA). Both errors scale with sum_i |w_i * a_i| (not with the result, which can
// cancel to ~0), and a rounding random walk stays near 1e-7 of that sum. 1e-5 leaves 100x
// headroom, while one wrong element out of K = 11008 (~1/K = 9e-5 of the sum) still fails;
// the exact-integer checks below catch any wrong element outright.
constexpr double kDotRelTol = 1e-5;
// Elementwise kernels (rmsnorm, swiglu, axpy_f16): a few float32 roundings per element (FMA or
// not, a different summation order for rmsnorm's sum of squares). Values are O(1); the
// absolute floor covers results that land near zero.
constexpr double kElemRelTol = 1e-5;
constexpr double kElemAbsTol = 1e-6;

int g_passed = 0, g_failed = 0;

std::string fmt(const char* f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

// One check: `err` is empty when it passed, else what went wrong.
void record(const std::string& what, const std::string& err) {
  if (err.empty()) {
    g_passed++;
  } else {
    g_failed++;
    std::printf("FAIL %s: %s\n", what.c_str(), err.c_str());
  }
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

bool half_is_nan(fp16_t h) { return (h & 0x7fff) > 0x7c00; }

// fp16 conversions must be bit-exact, except that a NaN only has to stay a NaN of the same
// sign: hardware converters (F16C, FCVT) quiet signalling NaNs and keep payload bits, the
// portable twin does not, and no kernel gives NaN payloads a meaning.
bool same_float_or_nan(float a, float b) {
  return bits(a) == bits(b) ||
         (std::isnan(a) && std::isnan(b) && std::signbit(a) == std::signbit(b));
}

bool same_half_or_nan(fp16_t a, fp16_t b) {
  return a == b || (half_is_nan(a) && half_is_nan(b) && (a & 0x8000) == (b & 0x8000));
}

std::vector<float> normal(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

const char* type_name(GgmlType t) { return type_traits(t).name; }

// The activation format each weight type is paired with (see GemmFn).
GgmlType act_type(GgmlType w) { return type_traits(w).vec_dot_type; }

int64_t block_of(GgmlType t) { return type_traits(t).block_size; }

// Byte offsets of a block's fp16 fields (scales, mins, Q8_1's s), from ggml_types.h.
std::vector<size_t> fp16_fields(GgmlType t) {
  switch (t) {
    case GgmlType::Q4_0: case GgmlType::Q8_0: case GgmlType::Q5_0: case GgmlType::IQ4_NL:
      return {0};
    case GgmlType::Q4_1: case GgmlType::Q8_1: case GgmlType::Q5_1: case GgmlType::Q4_K:
    case GgmlType::Q5_K:
      return {0, 2};
    case GgmlType::Q2_K: return {80, 82};
    case GgmlType::Q3_K: return {108};
    case GgmlType::Q6_K: return {208};
    default: return {};  // F32, F16 (no blocks); Q8_K (float d)
  }
}

// Row lengths to test a type at: whole blocks, including one block and K = 11008.
std::vector<int64_t> block_sizes_for(GgmlType t) {
  if (block_of(t) == QK_K) return {256, 2816, 11008, 14336};
  return {32, 96, 11008};
}

// ---------------------------------------------------------------------------------------------
// Operands: `rows` rows of `n` elements in a storage type, stored `stride` bytes apart, plus
// their exact values as doubles (dequantized with the portable scalar code).

struct Rows {
  GgmlType type;
  int64_t rows, n;
  size_t stride;
  std::vector<uint8_t> bytes;  // (rows, stride)
  std::vector<double> values;  // (rows, n)
  const uint8_t* row(int64_t r) const { return bytes.data() + size_t(r) * stride; }
};

// gemm's act_info for activation rows a (what Model::matmuls makes next to Q8_0 and Q8_1
// activations; the kernels that do not read it get it all the same).
std::vector<ActBlockInfo> info_of(const Rows& a) {
  std::vector<ActBlockInfo> info;
  if (a.type != GgmlType::Q8_0 && a.type != GgmlType::Q8_1) return info;
  const int64_t nb = a.n / QK;
  info.resize(size_t(a.rows * nb));
  for (int64_t r = 0; r < a.rows; r++) act_block_info(a.type, a.row(r), nb, info.data() + r * nb);
  return info;
}

// w's rows in table t's weight layout, as the model packs them at load (gemm reads these,
// with the GGML row size as stride). Rows' own padding between rows is dropped first.
std::vector<uint8_t> packed_for(const KernelTable& t, const Rows& w) {
  const size_t rb = row_bytes(w.type, w.n);
  std::vector<uint8_t> ggml(size_t(w.rows) * rb);
  for (int64_t r = 0; r < w.rows; r++) std::memcpy(ggml.data() + size_t(r) * rb, w.row(r), rb);
  std::vector<uint8_t> p(t.packed_bytes(w.type, w.rows, w.n));
  t.pack(w.type, ggml.data(), w.rows, w.n, p.data());
  return p;
}

// Decode one stored row to doubles, from the layout alone (independent of any kernel table).
void decode_row(GgmlType t, const uint8_t* src, int64_t n, double* out) {
  for (int64_t b = 0; b < (is_block_type(t) ? n / QK : 0); b++) {
    double* o = out + b * QK;
    if (t == GgmlType::Q4_0) {
      const auto& blk = reinterpret_cast<const block_q4_0*>(src)[b];
      const double d = fp16_to_fp32(blk.d);
      for (int j = 0; j < QK / 2; j++) {
        o[j] = d * ((blk.qs[j] & 0x0f) - 8);
        o[j + QK / 2] = d * ((blk.qs[j] >> 4) - 8);
      }
    } else if (t == GgmlType::Q4_1) {
      const auto& blk = reinterpret_cast<const block_q4_1*>(src)[b];
      const double d = fp16_to_fp32(blk.d), m = fp16_to_fp32(blk.m);
      for (int j = 0; j < QK / 2; j++) {
        o[j] = d * (blk.qs[j] & 0x0f) + m;
        o[j + QK / 2] = d * (blk.qs[j] >> 4) + m;
      }
    } else if (t == GgmlType::Q8_0) {
      const auto& blk = reinterpret_cast<const block_q8_0*>(src)[b];
      for (int j = 0; j < QK; j++) o[j] = double(fp16_to_fp32(blk.d)) * blk.qs[j];
    } else if (t == GgmlType::Q8_1) {
      const auto& blk = reinterpret_cast<const block_q8_1*>(src)[b];
      for (int j = 0; j < QK; j++) o[j] = double(fp16_to_fp32(blk.d)) * blk.qs[j];
    }
  }
  if (t != GgmlType::F16 && t != GgmlType::F32 && t != GgmlType::Q4_0 && t != GgmlType::Q4_1 &&
      t != GgmlType::Q8_0 && t != GgmlType::Q8_1) {
    // Q5_0 ... Q8_K: the type table's reference dequantizer (equal to gguf.quants bit for bit,
    // tests/test_quants.py), which no kernel table replaces.
    std::vector<float> f(static_cast<size_t>(n));
    type_traits(t).to_float(src, f.data(), n);
    for (int64_t i = 0; i < n; i++) out[i] = f[size_t(i)];
  } else if (t == GgmlType::F16) {
    for (int64_t i = 0; i < n; i++) out[i] = fp16_to_fp32(reinterpret_cast<const fp16_t*>(src)[i]);
  } else if (t == GgmlType::F32) {
    for (int64_t i = 0; i < n; i++) out[i] = reinterpret_cast<const float*>(src)[i];
  }
}

// Rows of normal random floats stored as `t` by the scalar table's quantizers. Strides get
// 16 bytes of padding so a kernel that ignores the stride reads the wrong data.
Rows random_rows(GgmlType t, int64_t rows, int64_t n, uint32_t seed) {
  Rows r{t, rows, n, row_bytes(t, n) + 16, {}, {}};
  r.bytes.assign(size_t(rows) * r.stride, 0xA5);
  r.values.resize(size_t(rows * n));
  const KernelTable& s = *scalar_kernels();
  for (int64_t i = 0; i < rows; i++) {
    const std::vector<float> x = normal(size_t(n), seed + uint32_t(i));
    uint8_t* dst = r.bytes.data() + size_t(i) * r.stride;
    s.of(t, Need::FromFloat).from_float(x.data(), dst, n);
    decode_row(t, dst, n, r.values.data() + i * n);
  }
  return r;
}

// Rows whose values are small integers and whose scales are 1.0, so every product, block sum
// and partial sum is an integer below 2^24: any correct kernel returns the exact result.
// `amp` bounds |q| of int8 types.
Rows integer_rows(GgmlType t, int64_t rows, int64_t n, uint32_t seed, int amp) {
  Rows r{t, rows, n, row_bytes(t, n) + 16, {}, {}};
  r.bytes.assign(size_t(rows) * r.stride, 0x5A);
  r.values.resize(size_t(rows * n));
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> nib(0, 255), q(-amp, amp), small(-8, 8);
  const fp16_t one = 0x3c00;
  for (int64_t i = 0; i < rows; i++) {
    uint8_t* dst = r.bytes.data() + size_t(i) * r.stride;
    for (int64_t b = 0; b < (is_block_type(t) ? n / QK : 0); b++) {
      if (t == GgmlType::Q4_0) {
        auto& blk = reinterpret_cast<block_q4_0*>(dst)[b];
        blk.d = one;
        for (auto& v : blk.qs) v = uint8_t(nib(rng));
      } else if (t == GgmlType::Q4_1) {
        auto& blk = reinterpret_cast<block_q4_1*>(dst)[b];
        blk.d = one;
        blk.m = one;
        for (auto& v : blk.qs) v = uint8_t(nib(rng));
      } else if (t == GgmlType::Q8_0) {
        auto& blk = reinterpret_cast<block_q8_0*>(dst)[b];
        blk.d = one;
        for (auto& v : blk.qs) v = int8_t(q(rng));
      } else if (t == GgmlType::Q8_1) {
        auto& blk = reinterpret_cast<block_q8_1*>(dst)[b];
        blk.d = one;
        int sum = 0;
        for (auto& v : blk.qs) sum += v = int8_t(q(rng));
        blk.s = fp32_to_fp16(float(sum));  // |sum| <= 32 * amp < 2048: exact in fp16
      }
    }
    const bool other = is_block_type(t) && t != GgmlType::Q4_0 && t != GgmlType::Q4_1 &&
                       t != GgmlType::Q8_0 && t != GgmlType::Q8_1;
    if (other && t == GgmlType::Q8_K) {  // d = 1, small quants, their sums
      for (int64_t b = 0; b < n / QK_K; b++) {
        auto& blk = reinterpret_cast<block_q8_K*>(dst)[b];
        blk.d = 1.0f;
        for (auto& v : blk.qs) v = int8_t(q(rng));
        for (int j = 0; j < QK_K / 16; j++) {
          int sum = 0;
          for (int i = 0; i < 16; i++) sum += blk.qs[16 * j + i];
          blk.bsums[j] = int16_t(sum);
        }
      }
    } else if (other) {  // random quants and sub-block scales, every fp16 field 1.0
      const size_t bb = type_traits(t).type_size;
      for (size_t i = 0; i < row_bytes(t, n); i++) dst[i] = uint8_t(nib(rng));
      for (int64_t b = 0; b < n / block_of(t); b++)
        for (size_t at : fp16_fields(t)) std::memcpy(dst + size_t(b) * bb + at, &one, 2);
    }
    for (int64_t j = 0; j < n; j++) {
      if (t == GgmlType::F16) reinterpret_cast<fp16_t*>(dst)[j] = fp32_to_fp16(float(small(rng)));
      if (t == GgmlType::F32) reinterpret_cast<float*>(dst)[j] = float(small(rng));
    }
    decode_row(t, dst, n, r.values.data() + i * n);
  }
  return r;
}

float table_dot(const KernelTable& k, GgmlType wt, int64_t n, const uint8_t* w, const uint8_t* a) {
  return k.of(wt, Need::Dot).dot(n, w, a);
}

// sum_i |w_i * a_i| of weight row r and activation row t: the scale of rounding errors.
double magnitude(const Rows& w, int64_t r, const Rows& a, int64_t t) {
  double m = 0.0;
  for (int64_t i = 0; i < w.n; i++) m += std::fabs(w.values[r * w.n + i] * a.values[t * a.n + i]);
  return m;
}

double exact_dot(const Rows& w, int64_t r, const Rows& a, int64_t t) {
  double s = 0.0;  // integer operands: every partial sum is exact in double
  for (int64_t i = 0; i < w.n; i++) s += w.values[r * w.n + i] * a.values[t * a.n + i];
  return s;
}

// Every weight type of the traits table.
std::vector<GgmlType> weight_types() {
  std::vector<GgmlType> out;
  for (const TypeTraits* tt : all_type_traits())
    if (tt->is_weight) out.push_back(tt->type);
  return out;
}
const std::vector<GgmlType> kWeightTypes = weight_types();

// ---------------------------------------------------------------------------------------------
// Quantizers and dequantizers: bit-exact with the scalar twin.

// Blocks chosen to hit every rounding corner, 32 floats each.
std::vector<float> quantizer_inputs() {
  std::vector<float> x;
  auto block = [&](auto f) { for (int j = 0; j < QK; j++) x.push_back(f(j)); };
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> k(-127, 126);
  // amax = 127 makes d = 1 and id = 1 exactly, so x.5 values are exact ties: roundf sends
  // them away from zero, round-to-even hardware modes would not.
  block([&](int j) { return j == 0 ? 127.0f : float(k(rng)) + 0.5f; });
  block([&](int j) { return j == 5 ? -127.0f : float(k(rng)) + 0.5f; });
  block([&](int j) { return j % 2 ? 0.5f : -2.5f; });
  block([](int) { return 0.0f; });                                   // d = 0, id = 0
  block([](int j) { return j == 3 ? -0.0f : 0.0f; });
  block([](int j) { return j == 17 ? 1e-3f : 0.0f; });                // one nonzero
  block([](int j) { return j == 9 ? -7.0f : 0.25f * float(j % 5); }); // negative largest
  block([](int j) { return float(j - 16); });                         // ramp
  block([](int j) { return std::ldexp(float(j % 7) - 3.0f, -121); }); // d subnormal, id finite
  // (A block with amax below ~3.7e-37 makes id = 1/d overflow to inf; the scalar twin then
  // converts +-inf to int8, which is undefined behaviour, so no kernel is held to it.)
  // Normal data at scales from 1e-30 to 1e30, one scale per block.
  for (int b = 0; b < 64; b++) {
    const std::vector<float> v = normal(QK, 100 + b, std::pow(10.0f, float(b - 32) * 30.0f / 32.0f));
    x.insert(x.end(), v.begin(), v.end());
  }
  return x;
}

// Type t's from_float on tables s and t, byte for byte.
std::string compare_quantizer(GgmlType type, const KernelTable& s, const KernelTable& t,
                              const std::vector<float>& x) {
  const int64_t k = int64_t(x.size());
  const size_t bb = type_traits(type).type_size, rb = row_bytes(type, k);
  std::vector<uint8_t> ys(rb, 0), yt(rb, 0xff);  // padding bytes must not matter
  s.of(type, Need::FromFloat).from_float(x.data(), ys.data(), k);
  t.of(type, Need::FromFloat).from_float(x.data(), yt.data(), k);
  for (size_t i = 0; i < rb; i++) {
    if (ys[i] != yt[i]) {
      return fmt("block %zu of %zu differs at byte %zu: scalar 0x%02x, got 0x%02x", i / bb,
                 rb / bb, i % bb, ys[i], yt[i]);
    }
  }
  return "";
}

// Type t's to_float on tables s and t, bit for bit.
std::string compare_dequantizer(GgmlType type, const KernelTable& s, const KernelTable& t,
                                uint32_t seed) {
  // Random bytes with random finite fp16 scales (d, and m or s): every bit pattern of qs.
  const TypeTraits& tt = type_traits(type);
  const int64_t nb = 97;
  std::vector<uint8_t> blocks(size_t(nb) * tt.type_size);
  std::mt19937 rng(seed);
  for (auto& b : blocks) b = uint8_t(rng());
  for (int64_t b = 0; b < nb; b++) {
    for (size_t at : fp16_fields(type)) {
      uint8_t* h = blocks.data() + size_t(b) * tt.type_size + at;
      if ((h[1] & 0x7c) == 0x7c) h[1] &= 0xbf;  // inf/NaN exponent -> finite
    }
    if (type == GgmlType::Q8_K) {  // float d: finite
      const float d = float(int(rng() % 2001) - 1000) / 256.0f;
      std::memcpy(blocks.data() + size_t(b) * tt.type_size, &d, 4);
    }
  }
  const int64_t k = nb * tt.block_size;
  std::vector<float> ys(static_cast<size_t>(k)), yt(static_cast<size_t>(k));
  s.of(type, Need::ToFloat).to_float(blocks.data(), ys.data(), k);
  t.of(type, Need::ToFloat).to_float(blocks.data(), yt.data(), k);
  for (size_t i = 0; i < ys.size(); i++) {
    if (bits(ys[i]) != bits(yt[i])) {
      return fmt("element %zu: scalar %.9g, got %.9g", i, ys[i], yt[i]);
    }
  }
  return "";
}

void test_quantizers(const KernelTable& s, const KernelTable& t) {
  const std::string isa = t.name;
  std::vector<std::pair<std::string, std::vector<float>>> inputs = {
      {"corners", quantizer_inputs()},
      {"k=32", normal(32, 1)},
      {"k=96", normal(96, 2, 3.0f)},
      {"k=11008", normal(11008, 3, 0.05f)},
  };
  // Every block type of the traits table (F16 and F32 rows: test_fp16).
  for (const TypeTraits* tt : all_type_traits()) {
    if (!tt->is_block) continue;
    for (const auto& [label, x] : inputs) {
      if (int64_t(x.size()) < tt->block_size) continue;  // k=32, k=96: no super-block
      // whole blocks of the type (the corners' 73 blocks of 32: 9 super-blocks)
      const std::vector<float> xb(x.begin(), x.begin() + int64_t(x.size()) / tt->block_size * tt->block_size);
      record(isa + " from_float " + tt->name + " " + label, compare_quantizer(tt->type, s, t, xb));
    }
    record(isa + " to_float " + tt->name,
           compare_dequantizer(tt->type, s, t, 20 + uint32_t(tt->type)));
  }
}

// ---------------------------------------------------------------------------------------------
// fp16 <-> fp32 rows: bit-exact (NaNs: see same_float_or_nan).

void test_fp16(const KernelTable& s, const KernelTable& t) {
  const std::string isa = t.name;
  // Every half, as one row; then short misaligned slices so the tail loops run too.
  std::vector<fp16_t> halves(65536);
  for (size_t i = 0; i < halves.size(); i++) halves[i] = fp16_t(i);
  std::vector<float> fs(halves.size()), ft(halves.size());
  std::string err;
  const ToFloatFn s_to = s.of(GgmlType::F16, Need::ToFloat).to_float;
  const ToFloatFn t_to = t.of(GgmlType::F16, Need::ToFloat).to_float;
  const FromFloatFn s_from = s.of(GgmlType::F16, Need::FromFloat).from_float;
  const FromFloatFn t_from = t.of(GgmlType::F16, Need::FromFloat).from_float;
  s_to(halves.data(), fs.data(), int64_t(halves.size()));
  t_to(halves.data(), ft.data(), int64_t(halves.size()));
  for (size_t i = 0; i < halves.size() && err.empty(); i++) {
    if (!same_float_or_nan(fs[i], ft[i])) {
      err = fmt("half 0x%04zx: scalar 0x%08x, got 0x%08x", i, bits(fs[i]), bits(ft[i]));
    }
  }
  record(isa + " fp16_to_fp32_row all 65536 halves", err);
  err.clear();
  for (int64_t len : {1, 3, 7, 9, 15, 17, 29}) {
    std::vector<float> a(size_t(len), -1.0f), b(size_t(len), -2.0f);
    s_to(halves.data() + 0x3c01, a.data(), len);
    t_to(halves.data() + 0x3c01, b.data(), len);
    for (int64_t i = 0; i < len && err.empty(); i++) {
      if (bits(a[size_t(i)]) != bits(b[size_t(i)])) err = fmt("k=%lld element %lld", (long long)len, (long long)i);
    }
  }
  record(isa + " fp16_to_fp32_row short rows", err);

  // fp32 -> fp16: every half's value, every midpoint between neighbouring halves (ties to
  // even) and one float ulp either side of it, the overflow edge, and random float bits.
  std::vector<float> x;
  for (uint32_t h = 0; h < 65536; h++) {
    const float v = fp16_to_fp32(fp16_t(h));
    if (!std::isfinite(v)) continue;
    x.push_back(v);
    if ((h & 0x7fff) == 0x7bff) continue;  // 65504: its "midpoint" is the overflow edge below
    const float mid = 0.5f * (v + fp16_to_fp32(fp16_t(h + 1)));  // exact: halves have 11 bits
    x.push_back(mid);
    x.push_back(std::nextafter(mid, 0.0f));
    x.push_back(std::nextafter(mid, 2.0f * mid));
  }
  for (float v : {65504.0f, 65519.996f, 65520.0f, 65536.0f, 1e10f, 2.9802322e-8f, 2.9802326e-8f,
                  1e-45f, 0.0f, INFINITY}) {
    x.push_back(v);
    x.push_back(-v);
  }
  x.push_back(NAN);
  x.push_back(from_bits(0x7f800001u));  // signalling NaN
  x.push_back(from_bits(0xffc12345u));
  std::mt19937 rng(31);
  for (int i = 0; i < 65536; i++) x.push_back(from_bits(rng()));
  while (x.size() % 8 != 5) x.push_back(1.0f);  // a row length that leaves a tail
  std::vector<fp16_t> hs(x.size()), ht(x.size());
  s_from(x.data(), hs.data(), int64_t(x.size()));
  t_from(x.data(), ht.data(), int64_t(x.size()));
  err.clear();
  for (size_t i = 0; i < x.size() && err.empty(); i++) {
    if (!same_half_or_nan(hs[i], ht[i])) {
      err = fmt("float %.9g (0x%08x): scalar 0x%04x, got 0x%04x", x[i], bits(x[i]), hs[i], ht[i]);
    }
  }
  record(isa + fmt(" fp32_to_fp16_row %zu floats", x.size()), err);
  // Short slices from the midpoint and random-bits regions, so the tail loop meets ties too.
  err.clear();
  for (size_t start : {size_t(40001), size_t(x.size() - 40003)}) {
    for (int64_t len : {1, 3, 7, 9, 15, 17, 29}) {
      std::vector<fp16_t> a(static_cast<size_t>(len)), b(static_cast<size_t>(len));
      s_from(x.data() + start, a.data(), len);
      t_from(x.data() + start, b.data(), len);
      for (int64_t i = 0; i < len && err.empty(); i++) {
        if (!same_half_or_nan(a[size_t(i)], b[size_t(i)])) {
          err = fmt("k=%lld element %lld: scalar 0x%04x, got 0x%04x", (long long)len, (long long)i,
                    a[size_t(i)], b[size_t(i)]);
        }
      }
    }
  }
  record(isa + " fp32_to_fp16_row short rows", err);
}

// ---------------------------------------------------------------------------------------------
// Dot products and gemm.

void test_dots(const KernelTable& s, const KernelTable& t) {
  const std::string isa = t.name;
  for (GgmlType wt : kWeightTypes) {
    std::vector<int64_t> sizes = block_sizes_for(wt);
    if (!is_block_type(wt)) sizes.insert(sizes.end(), {1, 7, 15, 33, 11007});
    for (int64_t n : sizes) {
      const Rows w = random_rows(wt, 1, n, uint32_t(n) * 7 + 1);
      const Rows a = random_rows(act_type(wt), 1, n, uint32_t(n) * 7 + 2);
      const double ref = table_dot(s, wt, n, w.row(0), a.row(0));
      const double got = table_dot(t, wt, n, w.row(0), a.row(0));
      const double tol = kDotRelTol * magnitude(w, 0, a, 0);
      record(isa + fmt(" dot %s K=%lld", type_name(wt), (long long)n),
             std::fabs(got - ref) <= tol
                 ? ""
                 : fmt("scalar %.9g, got %.9g, |diff| %.3g > tol %.3g", ref, got, std::fabs(got - ref), tol));
    }
  }
}

// A bound on |sc * q| + |m| of a K-quant weight with unit d and dmin and any sub-block scale
// and quant bits (integer_rows): Q2_K 15 * 3 + 15, Q3_K 32 * 4, Q4_K 63 * 15 + 63, Q5_K
// 63 * 31 + 63, Q6_K 128 * 32.
int64_t k_weight_bound(GgmlType t) {
  switch (t) {
    case GgmlType::Q2_K: return 60;
    case GgmlType::Q3_K: return 128;
    case GgmlType::Q4_K: return 1008;
    case GgmlType::Q5_K: return 2016;
    default: return 4096;  // Q6_K
  }
}

// Integer operands with unit scales: the exact result, on every table including scalar.
void test_exact(const KernelTable& t) {
  const std::string isa = t.name;
  for (GgmlType wt : kWeightTypes) {
    // Amplitudes keep sum |w * a| (and every partial sum) below 2^24 at K = 11008 (see
    // integer_rows). K-quant weights with random sub-block scales reach |w| ~ 4096 (Q6_K), so
    // they run at K = 256 with activations up to 8 and at K = 2816 (11 super-blocks of random
    // scale and quant bits per row) with the largest amplitude <= 8 that keeps that bound.
    const bool kq = block_of(wt) == QK_K;
    const std::vector<int64_t> lengths = kq ? std::vector<int64_t>{256, 2816} : std::vector<int64_t>{32, 96, 11008};
    for (int64_t n : lengths) {
      const int amp_w = 30;
      const int amp_a = wt == GgmlType::Q4_0 ? 127 : wt == GgmlType::Q4_1 ? 60 : wt == GgmlType::IQ4_NL ? 4
                        : kq ? int(std::min<int64_t>(8, ((int64_t(1) << 24) - 1) / (n * k_weight_bound(wt))))
                             : 30;
      const Rows w = integer_rows(wt, 5, n, uint32_t(n) + 3, amp_w);
      const Rows a = integer_rows(act_type(wt), 3, n, uint32_t(n) + 4, amp_a);
      std::string err;
      const double want = exact_dot(w, 0, a, 0);
      const float got = table_dot(t, wt, n, w.row(0), a.row(0));
      if (double(got) != want) err = fmt("dot: want %.1f, got %.9g", want, got);
      std::vector<float> out(3 * 5);
      t.of(wt, Need::Gemm).gemm(n, packed_for(t, w).data(), row_bytes(wt, n), 5, a.bytes.data(), a.stride,
             info_of(a).data(), 3, out.data(), 5);
      for (int64_t tok = 0; tok < 3 && err.empty(); tok++) {
        for (int64_t r = 0; r < 5 && err.empty(); r++) {
          const double e = exact_dot(w, r, a, tok);
          if (double(out[size_t(tok * 5 + r)]) != e) {
            err = fmt("gemm row %lld token %lld: want %.1f, got %.9g", (long long)r, (long long)tok, e,
                      out[size_t(tok * 5 + r)]);
          }
        }
      }
      record(isa + fmt(" exact integer dot+gemm %s K=%lld", type_name(wt), (long long)n), err);
    }
  }
}

void test_gemm(const KernelTable& s, const KernelTable& t) {
  const std::string isa = t.name;
  struct Shape { int64_t rows, n_tok, n; };
  // One row, rows not a multiple of 8, K = 32, 96 and 11008.
  const std::vector<Shape> shapes = {{1, 1, 32}, {7, 3, 32}, {13, 5, 96}, {9, 2, 11008}, {24, 17, 576}};
  // Super-block types: one super-block, K = 2816, 11008, 14336; token counts that leave a
  // partial AVX2 tile (4 per pass in panels, 8 in the Q2_K/Q3_K/Q5_K row kernels).
  const std::vector<Shape> shapes_k = {{1, 1, 256}, {7, 3, 256}, {5, 3, 2816}, {3, 2, 11008}, {2, 1, 14336},
                                       {4, 11, 2816}, {9, 9, 512}};
  for (GgmlType wt : kWeightTypes) {
    for (const Shape& sh : block_of(wt) == QK_K ? shapes_k : shapes) {
      const Rows w = random_rows(wt, sh.rows, sh.n, uint32_t(sh.rows * 1000 + sh.n));
      const Rows a = random_rows(act_type(wt), sh.n_tok, sh.n, uint32_t(sh.rows * 1000 + sh.n + 1));
      const int64_t out_stride = sh.rows + 3;  // padding columns must stay untouched
      const float sentinel = from_bits(0x7fc0dead);
      std::vector<float> os(size_t(sh.n_tok * out_stride), sentinel), ot = os;
      const size_t rb = row_bytes(wt, sh.n);
      const std::vector<ActBlockInfo> info = info_of(a);
      s.of(wt, Need::Gemm).gemm(sh.n, packed_for(s, w).data(), rb, sh.rows, a.bytes.data(), a.stride, info.data(), sh.n_tok,
             os.data(), out_stride);
      t.of(wt, Need::Gemm).gemm(sh.n, packed_for(t, w).data(), rb, sh.rows, a.bytes.data(), a.stride, info.data(), sh.n_tok,
             ot.data(), out_stride);
      std::string err;
      for (int64_t tok = 0; tok < sh.n_tok && err.empty(); tok++) {
        for (int64_t r = 0; r < out_stride && err.empty(); r++) {
          const float ref = os[size_t(tok * out_stride + r)], got = ot[size_t(tok * out_stride + r)];
          if (r >= sh.rows) {
            if (bits(got) != bits(sentinel)) err = fmt("wrote padding column %lld", (long long)r);
            continue;
          }
          const double tol = kDotRelTol * magnitude(w, r, a, tok);
          if (!(std::fabs(double(got) - double(ref)) <= tol)) {
            err = fmt("row %lld token %lld: scalar %.9g, got %.9g, tol %.3g", (long long)r,
                      (long long)tok, ref, got, tol);
          }
        }
      }
      record(isa + fmt(" gemm %s rows=%lld tok=%lld K=%lld", type_name(wt), (long long)sh.rows,
                       (long long)sh.n_tok, (long long)sh.n),
             err);
    }
  }
}

// A token's gemm result does not depend on how many tokens share the call (prefill gives what
// token-by-token decode gives, a server's sequences do not change each other's output): every
// weight type on every table, bit for bit. 11 tokens: two full passes of 4 (AVX2 and AVX-512
// K-quant panels), one of 8 (AVX-512 block-32 panels) and partial ones; 19 rows: a partial
// panel of 8 and of 16.
void test_gemm_alone_equals_batched(const KernelTable& t) {
  const std::string isa = t.name;
  for (GgmlType wt : kWeightTypes) {
    const int64_t rows = 19, n_tok = 11, n = block_of(wt) == QK_K ? 2816 : 96;
    const Rows w = random_rows(wt, rows, n, 77);
    const Rows a = random_rows(act_type(wt), n_tok, n, 78);
    const std::vector<uint8_t> packed = packed_for(t, w);
    const std::vector<ActBlockInfo> info = info_of(a);
    const size_t nb = info.size() / size_t(n_tok);
    const GemmFn gemm = t.of(wt, Need::Gemm).gemm;
    std::vector<float> out(size_t(n_tok * rows)), one(static_cast<size_t>(rows));
    gemm(n, packed.data(), row_bytes(wt, n), rows, a.bytes.data(), a.stride, info.data(), n_tok, out.data(), rows);
    std::string err;
    for (int64_t tok = 0; tok < n_tok && err.empty(); tok++) {
      gemm(n, packed.data(), row_bytes(wt, n), rows, a.row(tok), a.stride, info.empty() ? nullptr : info.data() + size_t(tok) * nb,
           1, one.data(), rows);
      for (int64_t r = 0; r < rows && err.empty(); r++) {
        const float b = out[size_t(tok * rows + r)], o = one[size_t(r)];
        if (bits(b) != bits(o)) err = fmt("row %lld token %lld: alone %.9g, with others %.9g", (long long)r, (long long)tok, o, b);
      }
    }
    record(isa + fmt(" gemm alone == batched bits %s K=%lld tok=%lld", type_name(wt), (long long)n, (long long)n_tok), err);
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise kernels.

std::string compare_elementwise(const std::vector<float>& ref, const std::vector<float>& got) {
  for (size_t i = 0; i < ref.size(); i++) {
    const double d = std::fabs(double(got[i]) - double(ref[i]));
    if (!(d <= kElemRelTol * std::fabs(double(ref[i])) + kElemAbsTol)) {
      return fmt("element %zu: scalar %.9g, got %.9g", i, ref[i], got[i]);
    }
  }
  return "";
}

void test_elementwise(const KernelTable& s, const KernelTable& t) {
  const std::string isa = t.name;
  for (int64_t n : {1, 7, 64, 576, 4099}) {
    const std::vector<float> x = normal(size_t(n), 41), w = normal(size_t(n), 42);
    std::vector<float> ys(static_cast<size_t>(n)), yt(static_cast<size_t>(n));
    s.rmsnorm(x.data(), w.data(), ys.data(), n, 1e-5f);
    t.rmsnorm(x.data(), w.data(), yt.data(), n, 1e-5f);
    record(isa + fmt(" rmsnorm n=%lld", (long long)n), compare_elementwise(ys, yt));
  }
  for (int64_t n : {1, 9, 1536, 11008}) {
    const std::vector<float> g = normal(size_t(n), 43, 4.0f), u = normal(size_t(n), 44);
    std::vector<float> ys(static_cast<size_t>(n)), yt(static_cast<size_t>(n));
    s.swiglu(g.data(), u.data(), ys.data(), n);
    t.swiglu(g.data(), u.data(), yt.data(), n);
    record(isa + fmt(" swiglu n=%lld", (long long)n), compare_elementwise(ys, yt));
  }
  for (int64_t n : {1, 7, 8, 70, 2049}) {
    std::vector<float> ys = normal(size_t(n), 49, 30.0f), yt = ys;  // raw attention scores
    const float lse_s = s.softmax(ys.data(), n, 0.125f);
    const float lse_t = t.softmax(yt.data(), n, 0.125f);
    ys.push_back(lse_s);  // the returned log of the normalizer is compared like a value
    yt.push_back(lse_t);
    record(isa + fmt(" softmax n=%lld", (long long)n), compare_elementwise(ys, yt));
  }
  for (int64_t n : {1, 7, 8, 33, 4099}) {
    const std::vector<float> xf = normal(size_t(n), 45);
    std::vector<fp16_t> x(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; i++) x[size_t(i)] = fp32_to_fp16(xf[size_t(i)]);
    std::vector<float> ys = normal(size_t(n), 46), yt = ys;
    s.axpy_f16(n, 0.37f, x.data(), ys.data());
    t.axpy_f16(n, 0.37f, x.data(), yt.data());
    record(isa + fmt(" axpy_f16 n=%lld", (long long)n), compare_elementwise(ys, yt));
  }
  // mix_rows: rows of F16 and F32 values weighted by softmax-like (positive, summing to 1)
  // weights, so results stay O(1) like the elementwise kernels.
  for (int64_t n : {8, 13, 64, 80}) {
    for (int64_t n_q : {1, 3, 4, 7}) {
      const int64_t n_pos = 37;
      std::vector<float> w = normal(size_t(n_q * n_pos), 47);
      for (int64_t q = 0; q < n_q; q++) {
        float sum = 0.0f;
        for (int64_t p = 0; p < n_pos; p++) sum += (w[size_t(q * n_pos + p)] = std::fabs(w[size_t(q * n_pos + p)]));
        for (int64_t p = 0; p < n_pos; p++) w[size_t(q * n_pos + p)] /= sum;
      }
      const std::vector<float> vf = normal(size_t(n_pos * n), 48);
      std::vector<fp16_t> vh(vf.size());
      for (size_t i = 0; i < vf.size(); i++) vh[i] = fp32_to_fp16(vf[i]);
      for (GgmlType vt : {GgmlType::F16, GgmlType::F32}) {
        const void* v = vt == GgmlType::F16 ? static_cast<const void*>(vh.data()) : vf.data();
        const size_t vs = size_t(n) * (vt == GgmlType::F16 ? 2 : 4);
        std::vector<float> os(size_t(n_q * n)), ot(os.size());
        s.mix_rows(vt, n, v, vs, n_pos, w.data(), n_pos, n_q, os.data(), n);
        t.mix_rows(vt, n, v, vs, n_pos, w.data(), n_pos, n_q, ot.data(), n);
        record(isa + fmt(" mix_rows %s n=%lld n_q=%lld", type_name(vt), (long long)n, (long long)n_q),
               compare_elementwise(os, ot));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ",") + x;
  return s;
}

void test_dispatch(const std::vector<std::string>& isas, const std::string& expected) {
  if (!expected.empty()) {
    record("available_isas() == " + expected,
           join(isas) == expected ? "" : "runtime detection gave " + join(isas));
  }
  // Every ISA this build might know: present ones give their table, absent ones refuse.
  for (const char* name : {"scalar", "avx2", "avx512", "neon", "neon_dotprod"}) {
    bool listed = false;
    for (const auto& i : isas) listed = listed || i == name;
    std::string err;
    try {
      const KernelTable* k = kernels_for(name);
      if (!listed) err = "not listed, yet kernels_for gave a table";
      else if (std::string(k->name) != name) err = fmt("table is named '%s'", k->name);
    } catch (const std::invalid_argument&) {
      if (listed) err = "listed, yet kernels_for refused it";
    }
    record(std::string("kernels_for(\"") + name + "\")", err);
  }
}

// The table has every kernel a weight type needs (conversions, dot, gemm, and a quantizer for
// its activation format), and refuses type ids the traits table does not know.
void test_type_kernels(const KernelTable& t) {
  const std::string isa = t.name;
  for (GgmlType wt : kWeightTypes) {
    std::string err;
    try {
      t.of(wt, Need::ToFloat);
      t.of(wt, Need::FromFloat);
      t.of(wt, Need::Dot);
      t.of(wt, Need::Gemm);
      if (act_type(wt) != GgmlType::F32) t.of(act_type(wt), Need::FromFloat);
    } catch (const std::invalid_argument& e) {
      err = e.what();
    }
    record(isa + fmt(" kernels of %s", type_name(wt)), err);
  }
  for (int id = -1; id < kGgmlTypeSlots + 2; id++) {
    bool known = false;
    for (const TypeTraits* tt : all_type_traits()) known = known || int(tt->type) == id;
    std::string err;
    try {
      t.of(GgmlType(id), Need::Gemm);
      if (!known) err = "an unknown type id got kernels";
    } catch (const std::invalid_argument& e) {
      const std::string msg = e.what();
      if (known && type_traits(GgmlType(id)).is_weight) err = "refused a weight type: " + msg;
      if (!known && msg.find("type id " + std::to_string(id)) == std::string::npos)
        err = "message does not name the id: " + msg;
    }
    if (!err.empty() || !known) record(isa + fmt(" of(type id %d)", id), err);
  }
}

// Packing is lossless: every row unpacks to its GGML bytes, on every table and type.
void test_layout(const KernelTable& t) {
  const std::string isa = t.name;
  for (GgmlType wt : kWeightTypes) {
    for (int64_t rows : {1, 7, 8, 13, 24}) {
      const Rows w = random_rows(wt, rows, 3 * block_of(wt) * (block_of(wt) == 1 ? 32 : 1), uint32_t(rows) * 31 + 5);
      const std::vector<uint8_t> p = packed_for(t, w);
      const size_t rb = row_bytes(wt, w.n);
      std::vector<uint8_t> back(rb);
      std::string err;
      for (int64_t r = 0; r < rows && err.empty(); r++) {
        t.unpack_row(wt, p.data(), w.n, r, back.data());
        if (std::memcmp(back.data(), w.row(r), rb) != 0) err = fmt("row %lld differs", (long long)r);
      }
      record(isa + fmt(" pack/unpack_row %s rows=%lld", type_name(wt), (long long)rows), err);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string expected;
  for (int i = 1; i < argc; i++) {
    if (std::strcmp(argv[i], "--expect-isas") == 0 && i + 1 < argc) {
      expected = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--expect-isas scalar,neon,...]\n", argv[0]);
      return 2;
    }
  }
  const std::vector<std::string> isas = available_isas();
  std::printf("available ISAs: %s\n", join(isas).c_str());
  test_dispatch(isas, expected);

  const KernelTable& s = *scalar_kernels();
  for (const auto& name : isas) {
    const KernelTable& t = *kernels_for(name);
    const int before = g_passed + g_failed;
    test_type_kernels(t);
    test_exact(t);  // scalar included: exact results need no twin
    test_gemm_alone_equals_batched(t);
    test_layout(t);
    if (name != "scalar") {
      test_quantizers(s, t);
      test_fp16(s, t);
      test_dots(s, t);
      test_gemm(s, t);
      test_elementwise(s, t);
    }
    std::printf("%s: %d checks\n", name.c_str(), g_passed + g_failed - before);
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
