// How a kernel table stores weight matrices in memory. Matrices are repacked once at load
// (Model::load_matrix) into the layout of the table that runs them; every table also turns a
// packed row back into a GGML row (the token embedding lookup, tests).
//
// Two layouts:
// - GGML: the file's rows as they are (scalar and NEON tables; other types on every table).
// - Panel<R> (x86 SIMD tables, Q4_0/Q4_1/Q8_0, the K-quants and more: each table's list; R = 8
//   for AVX2, 16 for AVX-512): rows in panels of R. For each block column b a panel holds the R
//   rows' scales (fp16 d[R], then fp16 m[R] for Q4_1), then their quants interleaved 4 bytes at
//   a time: byte 4R*j + 4*r + e is byte 4*j + e of row r's block qs. One 4R-byte load (a 256-bit
//   register for R = 8, 512-bit for 16) then feeds R rows x 4 (Q8_0) or R rows x 4+4 (Q4
//   nibbles) weights to an integer dot product whose lanes are the R rows, so no horizontal sums
//   per block and one F16C conversion gives R rows' scales. Same bytes per row as GGML; the rows
//   of the last panel beyond the matrix are zero.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "ggml_types.h"

namespace alpaca {

// The AVX2 table's panel height; the model splits matrices between threads in multiples of 16
// rows (Model::matmuls), so any panel height that divides 16 keeps whole panels per thread.
constexpr int kPanelRows = 8;

// --- GGML layout: a copy ---
inline size_t ggml_packed_bytes(GgmlType t, int64_t rows, int64_t cols) {
  return size_t(rows) * row_bytes(t, cols);
}
inline void ggml_pack(GgmlType t, const void* src, int64_t rows, int64_t cols, void* dst) {
  std::memcpy(dst, src, ggml_packed_bytes(t, rows, cols));
}
inline void ggml_unpack_row(GgmlType t, const void* packed, int64_t cols, int64_t row, void* dst) {
  const size_t rb = row_bytes(t, cols);
  std::memcpy(dst, static_cast<const uint8_t*>(packed) + size_t(row) * rb, rb);
}

// --- Panel<R> layout: for block types made of fp16 scale fields and quants in 4-byte groups
// (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, IQ4_NL; the K-quants Q2_K ... Q6_K, whose 4-, 6- or 8-bit
// sub-block scales count as quants). Each table says which types it panels (its pack wrappers);
// the rest keep the GGML layout. ---

// Where a GGML block keeps its fp16 scale fields and its quants: the scales either lead the
// block or end it (Q2_K's d and dmin, Q3_K's and Q6_K's d); the quants are the other bytes, in
// order.
struct BlockParts {
  size_t scales;        // bytes of fp16 d (and m)
  size_t scale_offset;  // where they start
  size_t quants;        // bytes of the rest
  size_t quant_offset;  // where the rest starts
};
inline BlockParts block_parts(GgmlType t) {
  const TypeTraits& tt = type_traits(t);
  const size_t q = tt.type_size - tt.scale_bytes;
  return {tt.scale_bytes, tt.scale_offset, q, tt.scale_offset == 0 ? tt.scale_bytes : 0};
}

template <int R>
inline size_t panel_packed_bytes(GgmlType t, int64_t rows, int64_t cols) {
  const int64_t panels = (rows + R - 1) / R;
  return size_t(panels) * R * row_bytes(t, cols);
}

// Panel p starts at p * R * row_bytes (so a row range starting at a multiple of R is found
// as with GGML rows); inside it, block column b starts at b * R * block bytes.
template <int R>
inline void panel_pack(GgmlType t, const void* src, int64_t rows, int64_t cols, void* dst) {
  const BlockParts bp = block_parts(t);
  const size_t bb = bp.scales + bp.quants, rb = row_bytes(t, cols), pb = R * bb;
  const int64_t nb = cols / type_traits(t).block_size, panels = (rows + R - 1) / R;
  const auto* s = static_cast<const uint8_t*>(src);
  auto* d = static_cast<uint8_t*>(dst);
  std::memset(d, 0, panel_packed_bytes<R>(t, rows, cols));
  for (int64_t p = 0; p < panels; p++) {
    for (int64_t r = 0; r < R && p * R + r < rows; r++) {
      const uint8_t* srow = s + size_t(p * R + r) * rb;
      for (int64_t b = 0; b < nb; b++) {
        const uint8_t* sb = srow + size_t(b) * bb;
        uint8_t* pd = d + size_t(p) * R * rb + size_t(b) * pb;
        // scales: field f (d, then m) of the R rows together
        for (size_t f = 0; f < bp.scales / 2; f++)
          std::memcpy(pd + f * 2 * R + 2 * r, sb + bp.scale_offset + 2 * f, 2);
        for (size_t j = 0; j < bp.quants / 4; j++)
          std::memcpy(pd + bp.scales * R + 4 * R * j + 4 * r, sb + bp.quant_offset + 4 * j, 4);
      }
    }
  }
}

template <int R>
inline void panel_unpack_row(GgmlType t, const void* packed, int64_t cols, int64_t row, void* dst) {
  const BlockParts bp = block_parts(t);
  const size_t bb = bp.scales + bp.quants, rb = row_bytes(t, cols), pb = R * bb;
  const int64_t nb = cols / type_traits(t).block_size, p = row / R, r = row % R;
  const uint8_t* ps = static_cast<const uint8_t*>(packed) + size_t(p) * R * rb;
  auto* d = static_cast<uint8_t*>(dst);
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* pd = ps + size_t(b) * pb;
    uint8_t* db = d + size_t(b) * bb;
    for (size_t f = 0; f < bp.scales / 2; f++)
      std::memcpy(db + bp.scale_offset + 2 * f, pd + f * 2 * R + 2 * r, 2);
    for (size_t j = 0; j < bp.quants / 4; j++)
      std::memcpy(db + bp.quant_offset + 4 * j, pd + bp.scales * R + 4 * R * j + 4 * r, 4);
  }
}

// A table's layout functions (KernelTable entries): Panel<R> for the types Applies(t) names,
// GGML for the others.
template <int R, bool (*Applies)(GgmlType)>
inline size_t panels_packed_bytes(GgmlType t, int64_t rows, int64_t cols) {
  return Applies(t) ? panel_packed_bytes<R>(t, rows, cols) : ggml_packed_bytes(t, rows, cols);
}
template <int R, bool (*Applies)(GgmlType)>
inline void panels_pack(GgmlType t, const void* src, int64_t rows, int64_t cols, void* dst) {
  Applies(t) ? panel_pack<R>(t, src, rows, cols, dst) : ggml_pack(t, src, rows, cols, dst);
}
template <int R, bool (*Applies)(GgmlType)>
inline void panels_unpack_row(GgmlType t, const void* packed, int64_t cols, int64_t row, void* dst) {
  Applies(t) ? panel_unpack_row<R>(t, packed, cols, row, dst)
             : ggml_unpack_row(t, packed, cols, row, dst);
}


}  // namespace alpaca
