// Runtime ISA selection: the best kernel table this CPU supports, or a lower one by name.
#include "dispatch.h"

#include <atomic>
#if defined(ALPACA_HAVE_X86)
#include <cpuid.h>
#endif
#include <stdexcept>
#include <string>

#if defined(ALPACA_HAVE_NEON) && defined(__linux__)
#include <sys/auxv.h>  // getauxval(AT_HWCAP): the kernel's list of CPU features
#elif defined(ALPACA_HAVE_NEON) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace alpaca {

#if defined(ALPACA_HAVE_X86)
static bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

// The OS saves and restores the AVX-512 registers (opmask, upper halves of zmm0-15, zmm16-31)
// on context switches: XCR0 bits 1, 2, 5, 6 and 7, readable once CPUID says OSXSAVE.
static bool os_saves_zmm() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE)) return false;
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xe6) == 0xe6;
}

static bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         os_saves_zmm();
}
static bool cpu_has_avx512_vnni() {
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
}
#endif

#if defined(ALPACA_HAVE_NEON)
#if defined(__linux__)
#ifndef HWCAP_ASIMDDP  // older libc headers
#define HWCAP_ASIMDDP (1 << 20)
#endif
static bool cpu_has_neon() { return getauxval(AT_HWCAP) & HWCAP_ASIMD; }
static bool cpu_has_dotprod() { return getauxval(AT_HWCAP) & HWCAP_ASIMDDP; }
#elif defined(__APPLE__)
static bool cpu_has_neon() { return true; }  // every Apple arm64 CPU
static bool cpu_has_dotprod() {
  int v = 0;
  size_t len = sizeof(v);
  return sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &len, nullptr, 0) == 0 && v != 0;
}
#else
static bool cpu_has_neon() { return true; }  // Advanced SIMD is in every AArch64 ABI we build for
static bool cpu_has_dotprod() { return false; }  // no portable way to ask: stay on plain NEON
#endif
#endif

std::vector<std::string> available_isas() {
  std::vector<std::string> out{"scalar"};
#if defined(ALPACA_HAVE_X86)
  if (cpu_has_avx2()) out.push_back("avx2");
  if (cpu_has_avx512()) out.push_back("avx512");
  if (cpu_has_avx512_vnni()) out.push_back("avx512_vnni");
#endif
#if defined(ALPACA_HAVE_NEON)
  if (cpu_has_neon()) out.push_back("neon");
  if (cpu_has_neon() && cpu_has_dotprod()) out.push_back("neon_dotprod");
#endif
  return out;
}

const KernelTable* kernels_for(const std::string& name) {
  bool ok = false;
  for (const auto& isa : available_isas()) ok = ok || isa == name;
  if (!ok) {
    std::string have;
    for (const auto& isa : available_isas()) have += (have.empty() ? "" : ", ") + isa;
    throw std::invalid_argument("ISA '" + name + "' is not available on this CPU/build (available: " +
                                have + ")");
  }
  if (name == "scalar") return scalar_kernels();
#if defined(ALPACA_HAVE_X86)
  if (name == "avx2") return avx2_kernels();
  if (name == "avx512") return avx512_kernels();
  if (name == "avx512_vnni") return avx512_vnni_kernels();
#endif
#if defined(ALPACA_HAVE_NEON)
  if (name == "neon") return neon_kernels();
  if (name == "neon_dotprod") return neon_dotprod_kernels();
#endif
  throw std::invalid_argument("ISA '" + name + "' has no kernel table");
}

const TypeKernels& KernelTable::of(GgmlType t, Need need) const {
  const TypeTraits& tt = type_traits(t);  // refuses unknown ids
  const TypeKernels& k = types[int(t)];
  const char* what = nullptr;
  switch (need) {  // a closed enum of this file's own: every value handled, no default
    case Need::ToFloat: what = k.to_float ? nullptr : "conversion to float"; break;
    case Need::FromFloat: what = k.from_float ? nullptr : "conversion from float"; break;
    case Need::Dot: what = k.dot ? nullptr : "dot product"; break;
    case Need::Gemm: what = k.gemm ? nullptr : "matrix product"; break;
  }
  if (what)
    throw std::invalid_argument(std::string("GGML type ") + tt.name + " (id " +
                                std::to_string(int(t)) + ") has no " + what + " in the " + name +
                                " kernels" + (tt.is_weight ? "" : " (it is an activation format)"));
  return k;
}

// Atomic: models may be built from several threads while another one picks an ISA.
static std::atomic<const KernelTable*> g_active{nullptr};

const KernelTable* active_kernels() {
  const KernelTable* k = g_active.load();
  if (!k) {
    k = kernels_for(available_isas().back());
    const KernelTable* expected = nullptr;
    if (!g_active.compare_exchange_strong(expected, k)) k = expected;
  }
  return k;
}

void set_active_isa(const std::string& name) { g_active.store(kernels_for(name)); }

}  // namespace alpaca
