// Compiled only when SPARSESYNC_CUDA is on (see CMakeLists.txt); the CPU sources provide the fallback returning 0.
#include "sparsesync.h"

extern "C" __attribute__((visibility("default"))) int ss_cuda_compiled(void) { return 1; }
