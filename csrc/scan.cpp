// ss_scan: pass 1 of encoding (changed-element counts per fine block + value-symbol histogram).
#include "ss_diff.h"

namespace ss {
namespace {

constexpr int64_t kBlocksPerTask = 64;  // 64 fine blocks = 256K elements per task

template <int W, int MODE>
int64_t scan_impl(const uint8_t* old_bits, const uint8_t* new_bits, int64_t n, uint32_t* counts, uint64_t* hist,
                  int nthreads) {
  typedef typename UInt<W>::T T;
  const int64_t nblocks = (n + kFineBlock - 1) / kFineBlock;
  const int64_t ntasks = (nblocks + kBlocksPerTask - 1) / kBlocksPerTask;
  int nt = plan_threads(nthreads, ntasks, n * W, 4 << 20);
  std::vector<uint64_t> local((size_t)nt * 256, 0);
  parallel_for(ntasks, nt, [&](int64_t t, int wid) {
    uint64_t* h = &local[(size_t)wid * 256];
    int64_t b0 = t * kBlocksPerTask, b1 = std::min(nblocks, b0 + kBlocksPerTask);
    for (int64_t blk = b0; blk < b1; ++blk) {
      int64_t s = blk * kFineBlock, e = std::min(n, s + kFineBlock);
      uint32_t c = 0;
      for_each_diff<W>(old_bits, new_bits, s, e, [&](int64_t i) {
        ++c;
        T nv = load_elem<W>(new_bits + i * W);
        int sym;
        if (MODE == 0) {
          sym = delta_symbol_only<W>(load_elem<W>(old_bits + i * W), nv);
        } else {
          sym = (int)((uint64_t)nv >> (8 * W - 8));
        }
        ++h[sym];
      });
      counts[blk] = c;
    }
  });
  for (int s = 0; s < 256; ++s) hist[s] = 0;
  int64_t total = 0;
  for (int w = 0; w < nt; ++w)
    for (int s = 0; s < 256; ++s) {
      hist[s] += local[(size_t)w * 256 + s];
      total += (int64_t)local[(size_t)w * 256 + s];
    }
  return total;
}

template <int MODE>
int64_t scan_w(const uint8_t* o, const uint8_t* nw, int64_t n, int w, uint32_t* counts, uint64_t* hist, int nt) {
  switch (w) {
    case 1: return scan_impl<1, MODE>(o, nw, n, counts, hist, nt);
    case 2: return scan_impl<2, MODE>(o, nw, n, counts, hist, nt);
    case 4: return scan_impl<4, MODE>(o, nw, n, counts, hist, nt);
    case 8: return scan_impl<8, MODE>(o, nw, n, counts, hist, nt);
  }
  return SS_EARG;
}

}  // namespace
}  // namespace ss

SS_EXPORT int64_t ss_scan(const uint8_t* old_bits, const uint8_t* new_bits, int64_t n, int w, int mode,
                          uint32_t* counts, uint64_t* hist, int nthreads) {
  if (n < 0 || (w != 1 && w != 2 && w != 4 && w != 8) || (mode != 0 && mode != 1) || !hist) return SS_EARG;
  if (n > INT64_MAX / 8) return SS_EARG;
  if (n > 0 && (!old_bits || !new_bits || !counts)) return SS_EARG;
  try {
    return mode == 0 ? ss::scan_w<0>(old_bits, new_bits, n, w, counts, hist, nthreads)
                     : ss::scan_w<1>(old_bits, new_bits, n, w, counts, hist, nthreads);
  } catch (const std::bad_alloc&) {
    return SS_ENOMEM;
  } catch (...) {
    return SS_ENOMEM;
  }
}
