// Runtime ISA selection: the best kernel table this CPU supports, or a lower one by name.
#include "dispatch.h"

#include <stdexcept>
#include <string>

namespace alpaca {

#if defined(ALPACA_HAVE_X86)
static bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#endif

std::vector<std::string> available_isas() {
  std::vector<std::string> out{"scalar"};
#if defined(ALPACA_HAVE_X86)
  if (cpu_has_avx2()) out.push_back("avx2");
#endif
#if defined(ALPACA_HAVE_NEON)
  out.push_back("neon");
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
#endif
#if defined(ALPACA_HAVE_NEON)
  if (name == "neon") return neon_kernels();
#endif
  throw std::invalid_argument("ISA '" + name + "' has no kernel table");
}

static const KernelTable* g_active = nullptr;

const KernelTable* active_kernels() {
  if (!g_active) g_active = kernels_for(available_isas().back());
  return g_active;
}

void set_active_isa(const std::string& name) { g_active = kernels_for(name); }

}  // namespace alpaca
