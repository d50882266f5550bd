// How a kernel table stores weight matrices in memory. Matrices are repacked once at load
// (Model::load_matrix) into the layout of the table that runs them; every table also turns a
// packed row back into a GGML row (the token embedding lookup, tests).
//
// Two layouts:
// - GGML: the file's rows as they are (scalar and NEON tables; F32/F16 on every table).
// - Panel8 (x86 SIMD tables, Q4_0/Q4_1/Q8_0): rows in panels of 8. For each block column b a
//   panel holds the 8 rows' scales (fp16 d[8], then fp16 m[8] for Q4_1), then their quants
//   interleaved 4 bytes at a time: byte 32*j + 4*r + e is byte 4*j + e of row r's block qs.
//   One 32-byte load then feeds 8 rows x 4 (Q8_0) or 8 rows x 4+4 (Q4 nibbles) weights to an
//   integer dot product whose 8 lanes are the 8 rows, so no horizontal sums per block and one
//   F16C conversion gives 8 rows' scales. Same bytes per row as GGML; the rows of the last
//   panel beyond the matrix are zero.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "ggml_types.h"

namespace alpaca {

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

// --- Panel8 layout ---
inline bool panel8_applies(GgmlType t) { return type_traits(t).panel8; }

// Bytes of a block's scales and of its quants in GGML's block struct.
struct BlockParts {
  size_t scales;  // fp16 d (and m) at the start of the GGML block
  size_t quants;  // the qs bytes that follow
};
inline BlockParts block_parts(GgmlType t) {
  const TypeTraits& tt = type_traits(t);
  return {tt.scale_bytes, tt.type_size - tt.scale_bytes};
}

inline size_t panel8_packed_bytes(GgmlType t, int64_t rows, int64_t cols) {
  if (!panel8_applies(t)) return ggml_packed_bytes(t, rows, cols);
  const int64_t panels = (rows + kPanelRows - 1) / kPanelRows;
  return size_t(panels) * kPanelRows * row_bytes(t, cols);
}

// Panel p starts at p * 8 * row_bytes (so a row range starting at a multiple of 8 is found
// as with GGML rows); inside it, block column b starts at b * 8 * block bytes.
inline void panel8_pack(GgmlType t, const void* src, int64_t rows, int64_t cols, void* dst) {
  if (!panel8_applies(t)) return ggml_pack(t, src, rows, cols, dst);
  const BlockParts bp = block_parts(t);
  const size_t bb = bp.scales + bp.quants, rb = row_bytes(t, cols), pb = kPanelRows * bb;
  const int64_t nb = cols / type_traits(t).block_size, panels = (rows + kPanelRows - 1) / kPanelRows;
  const auto* s = static_cast<const uint8_t*>(src);
  auto* d = static_cast<uint8_t*>(dst);
  std::memset(d, 0, panel8_packed_bytes(t, rows, cols));
  for (int64_t p = 0; p < panels; p++) {
    for (int64_t r = 0; r < kPanelRows && p * kPanelRows + r < rows; r++) {
      const uint8_t* srow = s + size_t(p * kPanelRows + r) * rb;
      for (int64_t b = 0; b < nb; b++) {
        const uint8_t* sb = srow + size_t(b) * bb;
        uint8_t* pd = d + size_t(p) * kPanelRows * rb + size_t(b) * pb;
        // scales: field f (d, then m) of the 8 rows together
        for (size_t f = 0; f < bp.scales / 2; f++) std::memcpy(pd + f * 16 + 2 * r, sb + 2 * f, 2);
        for (size_t j = 0; j < bp.quants / 4; j++)
          std::memcpy(pd + bp.scales * kPanelRows + 32 * j + 4 * r, sb + bp.scales + 4 * j, 4);
      }
    }
  }
}

inline void panel8_unpack_row(GgmlType t, const void* packed, int64_t cols, int64_t row, void* dst) {
  if (!panel8_applies(t)) return ggml_unpack_row(t, packed, cols, row, dst);
  const BlockParts bp = block_parts(t);
  const size_t bb = bp.scales + bp.quants, rb = row_bytes(t, cols), pb = kPanelRows * bb;
  const int64_t nb = cols / type_traits(t).block_size, p = row / kPanelRows, r = row % kPanelRows;
  const uint8_t* ps = static_cast<const uint8_t*>(packed) + size_t(p) * kPanelRows * rb;
  auto* d = static_cast<uint8_t*>(dst);
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* pd = ps + size_t(b) * pb;
    uint8_t* db = d + size_t(b) * bb;
    for (size_t f = 0; f < bp.scales / 2; f++) std::memcpy(db + 2 * f, pd + f * 16 + 2 * r, 2);
    for (size_t j = 0; j < bp.quants / 4; j++)
      std::memcpy(db + bp.scales + 4 * j, pd + bp.scales * kPanelRows + 32 * j + 4 * r, 4);
  }
}

}  // namespace alpaca
