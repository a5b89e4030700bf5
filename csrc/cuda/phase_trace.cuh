// Cycle counts per phase of a kernel's loop, summed over its iterations by one thread: a
// development aid for finding where a tile's time goes. Kernels carry a PhaseTrace<N, false>,
// which compiles to nothing; a trace build (a kernel switch) instantiates PhaseTrace<N, true>.
#pragma once
#include <cstdint>

namespace fastattn::cuda {

template <int kPhases, bool kOn>
struct PhaseTrace {
  __device__ __forceinline__ void start() {}
  __device__ __forceinline__ void mark(int) {}
};

template <int kPhases>
struct PhaseTrace<kPhases, true> {
  unsigned long long sum[kPhases] = {};
  unsigned long long first = 0, last = 0;

  __device__ __forceinline__ void start() { first = last = clock64(); }
  // Closes phase `phase`: the cycles since the previous mark (or start) are added to it.
  __device__ __forceinline__ void mark(int phase) {
    const unsigned long long now = clock64();
    sum[phase] += now - last;
    last = now;
  }
};

}  // namespace fastattn::cuda
