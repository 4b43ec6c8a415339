// Compiled only when SPARSESYNC_CUDA is on (see CMakeLists.txt); the CPU sources provide the fallback returning 0.
#include "sparsesync.h"

extern "C" __attribute__((visibility("default"))) int ss_cuda_compiled(void) { return 1; }

// The GPU architectures this library was compiled for (nvcc's __CUDA_ARCH_LIST__, e.g. 900 for sm_90): writes up to
// `cap` of them to `out` and returns how many there are.
extern "C" __attribute__((visibility("default"))) int ss_cuda_archs(int* out, int cap) {
#ifdef __CUDA_ARCH_LIST__
  const int archs[] = {__CUDA_ARCH_LIST__};
  const int n = (int)(sizeof(archs) / sizeof(archs[0]));
  for (int i = 0; i < n && i < cap && out; ++i) out[i] = archs[i];
  return n;
#else
  (void)out;
  (void)cap;
  return -1;  // this nvcc does not say
#endif
}
