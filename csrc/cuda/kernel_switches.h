// Environment switches that take an older kernel where a newer one is the default (for
// comparison and as a fallback): FASTATTN_DISABLE_WGMMA, FASTATTN_DISABLE_WS,
// FASTATTN_DISABLE_WS_BWD, FASTATTN_WS_FWD_EXACT (the Hopper forward's exact softmax), and the
// Hopper backward's schedules (FASTATTN_WS_BWD_*, see launch_bwd_ws); and one that takes a
// newer variant not yet measured faster: FASTATTN_WS_FWD_Q_WARP (the Hopper forward's Q loaded
// by a producer warp of its own; measured no faster), FASTATTN_WS_FWD_CHAINS (its softmax's row
// max and sum in 4 partial chains); and FASTATTN_WS_FWD_TRACE, a development aid (the Hopper
// forward's cycles per phase printed, tools/fwd_trace.py); FASTATTN_DISABLE_DECODE sends decode
// calls (Lq != Lk, few queries) to the general forward instead of the decode kernel, and
// FASTATTN_DISABLE_WS_SEQ the general forward's calls (KV cache, packed sequences, softcap) to
// the mma.sync kernel instead of the Hopper one.
// Read at each launch, so a CUDA graph records what was set at capture.
#pragma once
#include <cstdlib>

namespace fastattn::cuda {

// True when the variable is set to anything but "" or "0".
inline bool switch_set(const char* variable) {
  const char* value = std::getenv(variable);
  return value != nullptr && value[0] != '\0' && value[0] != '0';
}

}  // namespace fastattn::cuda
