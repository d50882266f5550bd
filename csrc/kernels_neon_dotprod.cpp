// NEON + dotprod kernels (Armv8.2 SDOT). Compiled with -march=armv8.2-a+dotprod (this file
// only) and selected at import only when the kernel reports HWCAP_ASIMDDP, so no SDOT ever
// reaches a CPU without it. Only the dot products (and gemm, which calls them) differ from the
// plain NEON table; everything else is inherited from it.
#include <arm_neon.h>

#include <cmath>
#include <cstring>

#include "kernels.h"

namespace alpaca::neon_dotprod {

// acc + the 16 products x[i] * y[i]: SDOT adds each group of 4 products into one int32 lane.
static inline int32x4_t dot16(int32x4_t acc, int8x16_t x, int8x16_t y) {
  return vdotq_s32(acc, x, y);
}

#include "kernels_neon_common.inc"
#include "kernels_generic.inc"

static KernelTable make_table() {
  KernelTable t = *neon_kernels();  // quantizers, fp16 rows, axpy: the plain NEON ones
  t.name = "neon_dotprod";
  set_portable_kernels(t);  // the SDOT dot products, gemm_rows over them, elementwise kernels
  set_dot<block_q2_K, block_q8_K, dot_q2_K_q8_K_neon>(t, GgmlType::Q2_K);
  set_dot<block_q3_K, block_q8_K, dot_q3_K_q8_K_neon>(t, GgmlType::Q3_K);
  set_dot<block_q4_K, block_q8_K, dot_q4_K_q8_K_neon>(t, GgmlType::Q4_K);
  set_dot<block_q5_K, block_q8_K, dot_q5_K_q8_K_neon>(t, GgmlType::Q5_K);
  set_dot<block_q6_K, block_q8_K, dot_q6_K_q8_K_neon>(t, GgmlType::Q6_K);
  return t;
}

}  // namespace alpaca::neon_dotprod

namespace alpaca {
const KernelTable* neon_dotprod_kernels() {
  static const KernelTable table = neon_dotprod::make_table();
  return &table;
}
}  // namespace alpaca
