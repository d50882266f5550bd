#pragma once
#include <string>
#include <vector>

#include "kernels.h"

namespace alpaca {

// ISAs this build can run on this CPU, lowest first ("scalar", then e.g. "avx2", or "neon"
// then "neon_dotprod" on aarch64).
std::vector<std::string> available_isas();
// The kernel table of a named ISA; std::invalid_argument if the CPU or build lacks it.
const KernelTable* kernels_for(const std::string& name);
// The table new models use: the best available unless set_active_isa chose a lower one.
const KernelTable* active_kernels();
void set_active_isa(const std::string& name);

}  // namespace alpaca
