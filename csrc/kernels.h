// The kernel table: one instance per ISA (kernels_<isa>.cpp), chosen once at import
// (dispatch.cpp). Every entry has the same signature and meaning on every ISA; the scalar
// table is the reference that the SIMD tables are tested against (tests/test_kernels.py).
#pragma once
#include <cstddef>
#include <cstdint>

#include "ggml_types.h"
#include "weight_layout.h"

namespace alpaca {

// A row-major block of quantized or float rows: `rows` rows of `cols` elements,
// consecutive rows `stride` bytes apart.
struct RowsView {
  const void* data;
  int64_t rows;
  int64_t cols;
  size_t stride;
  GgmlType type;
};

// A matrix product on a tile: out[t * out_stride + r] = dot(w row r, act row t) for r < n_rows,
// t < n_tok. w is the table's packed matrix (see KernelTable::pack) from a row that is a
// multiple of kPanelRows, w_stride its GGML row bytes; act is already in the weight type's
// vec_dot_type (TypeTraits), rows act_stride bytes apart. act_info: act_block_info of every
// act row (n_tok rows of n / 32 blocks), made once per matmul by the caller when the type's
// kernels say uses_act_info; null otherwise.
using GemmFn = void (*)(int64_t n, const void* w, size_t w_stride, int64_t n_rows, const void* act,
                        size_t act_stride, const ActBlockInfo* act_info, int64_t n_tok, float* out,
                        int64_t out_stride);
// Dot product of one weight row with one activation row (its vec_dot_type) of n elements.
using DotFn = float (*)(int64_t n, const void* w, const void* a);

// One ISA's kernels for one type (ggml calls this `type_traits_cpu`). A null entry: the ISA
// has no such kernel for the type (KernelTable::of refuses to hand it out).
struct TypeKernels {
  ToFloatFn to_float;      // one row of k elements to float
  FromFloatFn from_float;  // float to one row (quantize: the activation formats' hot path)
  DotFn dot;               // weight row . activation row
  GemmFn gemm;             // a tile of weight rows x tokens (see GemmFn)
  bool uses_act_info;      // gemm reads act_info (see GemmFn)
};

// Which of a TypeKernels' entries a caller needs, for KernelTable::of's error message.
enum class Need { ToFloat, FromFloat, Dot, Gemm };

struct KernelTable {
  const char* name;

  // --- per type, indexed by type id: conversions, dot products, gemm ---
  TypeKernels types[kGgmlTypeSlots];

  // This table's kernels for t, with `need` present; std::invalid_argument naming the type if
  // the engine does not know it (type_traits) or this table lacks the kernel.
  const TypeKernels& of(GgmlType t, Need need) const;

  // --- weight layout (weight_layout.h): matrices are repacked once at load for this table ---
  // Bytes of a packed rows x cols matrix; pack GGML rows (src) into it; one packed row back to
  // a GGML row.
  size_t (*packed_bytes)(GgmlType t, int64_t rows, int64_t cols);
  void (*pack)(GgmlType t, const void* src, int64_t rows, int64_t cols, void* dst);
  void (*unpack_row)(GgmlType t, const void* packed, int64_t cols, int64_t row, void* dst);

  // --- attention's second product: out[q * out_stride + i] = sum_p w[q * w_stride + p] * v_p[i]
  //     for q < n_q, i < n, p < n_pos; rows v_p (F16 or F32: vtype) v_stride bytes apart ---
  void (*mix_rows)(GgmlType vtype, int64_t n, const void* v, size_t v_stride, int64_t n_pos,
                   const float* w, int64_t w_stride, int64_t n_q, float* out, int64_t out_stride);

  // --- elementwise ---
  // y = x / sqrt(mean(x^2) + eps) * weight
  void (*rmsnorm)(const float* x, const float* weight, float* y, int64_t n, float eps);
  // x = softmax(scale * x): exp(scale * x - max) / sum, in place over n > 0 values. Returns
  // log(sum(exp(scale * x))) so that softmaxes of parts of a row can be merged (attention
  // split over positions).
  float (*softmax)(float* x, int64_t n, float scale);
  // out = silu(gate) * up
  void (*swiglu)(const float* gate, const float* up, float* out, int64_t n);
  // y += a * x (x in f16): accumulate one value row into an attention output
  void (*axpy_f16)(int64_t n, float a, const fp16_t* x, float* y);

  // Reads n bytes (n % 32 == 0) as fast as the ISA can and folds them into a checksum: the
  // memory read-bandwidth probe (so decode speed can be reported as a fraction of it).
  uint64_t (*read_bytes)(const uint8_t* p, int64_t n);
};

// Tables (defined in kernels_<isa>.cpp). Absent ISAs return nullptr.
const KernelTable* scalar_kernels();
const KernelTable* avx2_kernels();
const KernelTable* avx512_kernels();       // AVX-512 F/BW/VL (AVX2's table + 512-bit panels)
const KernelTable* avx512_vnni_kernels();  // + VNNI (vpdpbusd), where the CPU reports it
const KernelTable* neon_kernels();          // plain Armv8-A Advanced SIMD (every aarch64 CPU)
const KernelTable* neon_dotprod_kernels();  // + SDOT (Armv8.2 dotprod), where the CPU reports it

}  // namespace alpaca
