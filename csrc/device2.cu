// CUDA versions of the format-2 kernel calls (csrc/format2.cpp: ss2_scan, ss2_encode, ss2_decode, ss2_gather,
// ss2_put, ss2_scatter, ss2_add_scatter, ss2_take, ss2_tree64_many), compiled only when SPARSESYNC_CUDA is on. Their
// results are those of the CPU calls for the same inputs (the Python wrappers in sparsesync/kernels_cuda.py return
// them in the same form as sparsesync._native), so the encoder's buckets are the CPU encoder's bytes.
//
// Conventions of every ss2_cuda_* entry point:
//   - tensor data and the space tables (ptrs: uint64 addresses, offs: npieces + 1 int64 prefix sums) are DEVICE
//     pointers; n = offs[npieces] is passed by the host (which has the same table). Arguments documented "(host)"
//     are host memory (chunk tables, cuts, symbol tables, ks, the encoded segment bytes: all small or on the host
//     anyway).
//   - stream: a cudaStream_t as void* (NULL = the legacy default stream). Calls that must return a host result (the
//     encode's segment, error codes found by a kernel) synchronise that stream; the others only enqueue work.
//   - scratch memory comes from the caller (PyTorch's caching allocator): calls taking (scratch, scratch_bytes) with
//     scratch NULL only check their arguments and store the bytes they need in *scratch_bytes.
//   - return SS_OK (0), an SS_E* code of csrc/sparsesync.h (the same code the CPU call returns), or for a CUDA
//     runtime failure ss2_cuda_rc(err) = -1000 - err (ss2_cuda_error_string names it). Nothing aborts.
//   - 64-bit element indices throughout. Decode writes only the given outputs (bounds checks of ss_hd.h); indexed
//     writes check every index before any write.
//
// The coding and hashing are the shared host/device functions of ss_hd.h (through the ss2_hd_cuda_* launchers of
// csrc/chunk_hd_device.cu where they exist); scan and compaction use CUB.
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include <cub/cub.cuh>
#include <new>
#include <thrust/iterator/counting_iterator.h>
#include <vector>

#include "ss_hd.h"

#define SS_CUDA_EXPORT extern "C" __attribute__((visibility("default")))

// the launchers of csrc/chunk_hd_device.cu (same library)
extern "C" {
int ss2_hd_cuda_prepare(const sshd::EncParams* P, const uint64_t* old_ptrs, const uint64_t* new_ptrs,
                        const int64_t* offs, int64_t npieces, int64_t start, int64_t end, int log2c, const int64_t* pos,
                        const int64_t* pos_off, int64_t nch, sshd::Rec* recs, uint32_t* first, uint32_t* masks,
                        int* errs, void* stream);
int ss2_hd_cuda_write(const sshd::EncParams* P, const sshd::Rec* recs, const int64_t* pos_off, const uint32_t* first,
                      uint32_t present, const int32_t* ks_host, int64_t nch, uint8_t* data, const uint64_t* data_off,
                      uint64_t* rl, uint64_t* bl, int* errs, void* stream);
int ss2_hd_cuda_decode(const sshd::DecParams* P, const uint64_t* old_ptrs, const int64_t* offs, int64_t npieces,
                       int64_t start, int64_t end, const uint8_t* seg, const sshd::ChunkEntry* chunks, int64_t nnz,
                       int64_t* idx_out, uint8_t* val_out, int* errs, void* stream);
}

namespace {

constexpr int kThreads = 256;
constexpr int64_t kTile = 4096;  // elements per block step; = the scan's fine block (FORMAT.md 6: counts per 4096)
constexpr int64_t kMaxGrid = 1 << 20;

inline int cuda_rc(cudaError_t e) { return e == cudaSuccess ? SS_OK : -1000 - (int)e; }
#define SS_CU(x)                                \
  do {                                          \
    const cudaError_t _e = (x);                 \
    if (_e != cudaSuccess) return cuda_rc(_e);  \
  } while (0)
#define SS_RC(x)                 \
  do {                           \
    const int _r = (x);          \
    if (_r) return _r < 0 ? _r : -1000 - _r; \
  } while (0)

inline bool width_ok(int w) { return w == 1 || w == 2 || w == 4 || w == 8; }

inline unsigned grid_for(int64_t items, int64_t per_block) {
  int64_t g = (items + per_block - 1) / per_block;
  if (g < 1) g = 1;
  if (g > kMaxGrid) g = kMaxGrid;
  return (unsigned)g;
}

int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 132;
  return n > 0 ? n : 132;
}

__device__ __forceinline__ int64_t gtid() { return (int64_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t gstride() { return (int64_t)gridDim.x * blockDim.x; }

// The piece holding element i (sshd::locate_piece, shared with the CPU kernels).
__device__ __forceinline__ int64_t locate(const int64_t* offs, int64_t lo, int64_t hi, int64_t i) {
  return sshd::locate_piece(offs, lo, hi, i);
}

template <int W>
struct UT;
template <>
struct UT<1> { typedef uint8_t T; };
template <>
struct UT<2> { typedef uint16_t T; };
template <>
struct UT<4> { typedef uint32_t T; };
template <>
struct UT<8> { typedef unsigned long long T; };

// Element i of piece t (the tensors' addresses are multiples of W: checked by the Python wrapper).
template <int W>
__device__ __forceinline__ typename UT<W>::T* elem(const uint64_t* ptrs, const int64_t* offs, int64_t t, int64_t i) {
  return (typename UT<W>::T*)(uintptr_t)ptrs[t] + (i - offs[t]);
}

// A block's tile [s, e): its first and last pieces (thread 0 searches, all read after the barrier).
struct TilePieces {
  int64_t t0, t1;
};
__device__ __forceinline__ void tile_pieces(TilePieces* sh, const int64_t* offs, int64_t np, int64_t s, int64_t e) {
  if (threadIdx.x == 0) {
    const int64_t a = locate(offs, 0, np, s);
    sh->t0 = a;
    sh->t1 = locate(offs, a, np, e - 1);
  }
  __syncthreads();
}
__device__ __forceinline__ int64_t piece_in(const int64_t* offs, int64_t t0, int64_t t1, int64_t i) {
  return t0 == t1 ? t0 : locate(offs, t0, t1 + 1, i);
}

// ---------------------------------------------------------------- scan
// Grid-stride over the fine blocks of 4096 elements. Per element: bitwise compare; a changed element adds to its
// block's count, its piece's count (one atomic per run of lanes in the same piece) and hist[key(old)][symbol]; in the
// fine blocks b % 16 == 0 every element adds to keys[key(old)]. The histogram and the key counts are kept in shared
// memory (when nkeys x nsym counters fit) and added to the global ones once per block at the end.
template <int W, int MODE>
__global__ void __launch_bounds__(kThreads) k_scan(const uint64_t* optrs, const uint64_t* nptrs, const int64_t* offs,
                                                   int64_t np, int64_t n, int kb, int shift, int nsym, int shist,
                                                   uint32_t* counts, unsigned long long* hist,
                                                   unsigned long long* keys, unsigned long long* pieces,
                                                   unsigned long long* total) {
  typedef typename UT<W>::T T;
  extern __shared__ uint32_t sm[];
  __shared__ TilePieces tp;
  __shared__ uint32_t wsum[kThreads / 32];
  const int nkeys = kb ? 1 << kb : 1;
  uint32_t* skeys = sm;
  uint32_t* shh = sm + nkeys;
  const int nsh = nkeys + (shist ? nkeys * nsym : 0);
  for (int i = threadIdx.x; i < nsh; i += blockDim.x) sm[i] = 0;
  __syncthreads();
  const uint64_t km = sshd::low_mask(kb);
  const int64_t nblocks = (n + kTile - 1) / kTile;
  const int lane = threadIdx.x & 31;
  unsigned long long mytotal = 0;
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const int64_t s = b * kTile, e = s + kTile < n ? s + kTile : n;
    tile_pieces(&tp, offs, np, s, e);
    const int64_t t0 = tp.t0, t1 = tp.t1;
    const bool sample = (b & 15) == 0;
    uint32_t c = 0;
    for (int64_t base = s; base < e; base += blockDim.x) {  // uniform trip count: whole warps take part below
      const int64_t i = base + threadIdx.x;
      const bool valid = i < e;
      int64_t t = 0;
      bool changed = false;
      T ov = 0, nv = 0;
      if (valid) {
        t = piece_in(offs, t0, t1, i);
        ov = *elem<W>(optrs, offs, t, i);
        nv = *elem<W>(nptrs, offs, t, i);
        changed = ov != nv;
        const uint32_t key = kb ? (uint32_t)(((uint64_t)ov >> shift) & km) : 0u;
        if (sample) atomicAdd(&skeys[key], 1u);
        if (changed) {
          ++c;
          int sym;
          if (MODE == 0) {
            uint64_t extra;
            int ne;
            sym = sshd::value_symbol(W, 0, (uint64_t)ov, (uint64_t)nv, &extra, &ne);
          } else {
            sym = (int)((uint64_t)nv >> (8 * W - 8));
          }
          if (shist)
            atomicAdd(&shh[key * (uint32_t)nsym + (uint32_t)sym], 1u);
          else
            atomicAdd(&hist[(uint64_t)key * 256 + (uint64_t)sym], 1ull);
        }
      }
      const unsigned act = __ballot_sync(0xffffffffu, changed);
      if (changed) {
        const unsigned peers = __match_any_sync(act, (unsigned long long)t);
        if (lane == __ffs((int)peers) - 1) atomicAdd(&pieces[t], (unsigned long long)__popc(peers));
      }
    }
    // the block's count
    for (int o = 16; o > 0; o >>= 1) c += __shfl_down_sync(0xffffffffu, c, o);
    if (lane == 0) wsum[threadIdx.x >> 5] = c;
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t sum = 0;
      for (int q = 0; q < (int)(blockDim.x >> 5); ++q) sum += wsum[q];
      counts[b] = sum;
      mytotal += sum;
    }
    __syncthreads();  // tp and wsum are rewritten by the next step
  }
  if (threadIdx.x == 0 && mytotal) atomicAdd(total, mytotal);
  for (int i = threadIdx.x; i < nkeys; i += blockDim.x)
    if (skeys[i]) atomicAdd(&keys[i], (unsigned long long)skeys[i]);
  if (shist)
    for (int i = threadIdx.x; i < nkeys * nsym; i += blockDim.x)
      if (shh[i]) atomicAdd(&hist[(uint64_t)(i / nsym) * 256 + (uint64_t)(i % nsym)], (unsigned long long)shh[i]);
}

// Changed elements of [start, end) (added to *count).
template <int W>
__global__ void __launch_bounds__(kThreads) k_count(const uint64_t* optrs, const uint64_t* nptrs, const int64_t* offs,
                                                    int64_t np, int64_t start, int64_t end,
                                                    unsigned long long* count) {
  __shared__ TilePieces tp;
  __shared__ uint32_t wsum[kThreads / 32];
  const int64_t ntiles = (end - start + kTile - 1) / kTile;
  unsigned long long mine = 0;
  for (int64_t b = blockIdx.x; b < ntiles; b += gridDim.x) {
    const int64_t s = start + b * kTile, e = s + kTile < end ? s + kTile : end;
    tile_pieces(&tp, offs, np, s, e);
    uint32_t c = 0;
    for (int64_t i = s + threadIdx.x; i < e; i += blockDim.x) {
      const int64_t t = piece_in(offs, tp.t0, tp.t1, i);
      c += *elem<W>(optrs, offs, t, i) != *elem<W>(nptrs, offs, t, i);
    }
    for (int o = 16; o > 0; o >>= 1) c += __shfl_down_sync(0xffffffffu, c, o);
    if ((threadIdx.x & 31) == 0) wsum[threadIdx.x >> 5] = c;
    __syncthreads();
    if (threadIdx.x == 0)
      for (int q = 0; q < (int)(blockDim.x >> 5); ++q) mine += wsum[q];
    __syncthreads();
  }
  if (threadIdx.x == 0 && mine) atomicAdd(count, mine);
}

// The selection predicate of the compaction: element i changed (one instantiation: the width is a run-time value).
struct ChangedPred {
  const uint64_t* optrs;
  const uint64_t* nptrs;
  const int64_t* offs;
  int64_t np;
  int w;
  __device__ __forceinline__ bool operator()(int64_t i) const {
    const int64_t t = locate(offs, 0, np, i);
    const uint64_t d = (uint64_t)(i - offs[t]) * (uint64_t)w;
    const uint8_t* a = (const uint8_t*)(uintptr_t)optrs[t] + d;
    const uint8_t* b = (const uint8_t*)(uintptr_t)nptrs[t] + d;
    switch (w) {
      case 1: return *a != *b;
      case 2: return *(const uint16_t*)a != *(const uint16_t*)b;
      case 4: return *(const uint32_t*)a != *(const uint32_t*)b;
      default: return *(const unsigned long long*)a != *(const unsigned long long*)b;
    }
  }
};

// ---------------------------------------------------------------- tree64
// Leaf i of a buffer: sshd::tree64_leaf, or for a full leaf at an 8-byte aligned address the same hash over its 512
// little-endian words (sshd::h64_words: equal to h64 of the 4096 bytes, without byte loads).
__device__ __forceinline__ uint64_t leaf_hash(const uint8_t* data, uint64_t len, uint64_t i) {
  const uint64_t off = i * sshd::kLeafBytes;
  if (off < len && len - off >= sshd::kLeafBytes && (((uintptr_t)(data + off)) & 7) == 0)
    return sshd::h64_words((const uint64_t*)(data + off), sshd::kLeafBytes / 8, i);
  return sshd::tree64_leaf(data, len, i);
}

__global__ void k_leaves_one(const uint8_t* data, uint64_t len, uint64_t nleaves, uint64_t* out) {
  for (int64_t i = gtid(); (uint64_t)i < nleaves; i += gstride()) out[i] = leaf_hash(data, len, (uint64_t)i);
}

__global__ void k_top_one(const uint64_t* leaves, uint64_t nleaves, uint64_t len, uint64_t* out) {
  if (gtid() == 0) *out = sshd::tree64_top(leaves, nleaves, len);
}

// Leaf L of all buffers (base: count + 1 prefix sums of the buffers' leaf counts).
__global__ void k_leaves_many(const uint64_t* ptrs, const uint64_t* lens, const uint64_t* base, int64_t count,
                              uint64_t nleaves, uint64_t* leaves) {
  for (int64_t L = gtid(); (uint64_t)L < nleaves; L += gstride()) {
    int64_t lo = 0, hi = count;  // base[lo] <= L < base[hi]
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (base[mid] <= (uint64_t)L)
        lo = mid;
      else
        hi = mid;
    }
    leaves[L] = leaf_hash((const uint8_t*)(uintptr_t)ptrs[lo], lens[lo], (uint64_t)L - base[lo]);
  }
}

__global__ void k_tops_many(const uint64_t* lens, const uint64_t* base, int64_t count, const uint64_t* leaves,
                            uint64_t* out) {
  for (int64_t i = gtid(); i < count; i += gstride())
    out[i] = sshd::tree64_top(leaves + base[i], base[i + 1] - base[i], lens[i]);
}

// ---------------------------------------------------------------- encode helpers
// pos_off[j] = the first position >= start + j C (j = 1 .. nch-1); pos_off[0] = 0, pos_off[nch] = npos.
__global__ void k_chunk_bounds(const int64_t* pos, int64_t npos, int64_t start, int log2c, int64_t nch,
                               int64_t* pos_off) {
  for (int64_t j = gtid(); j <= nch; j += gstride()) {
    if (j == 0) {
      pos_off[0] = 0;
    } else if (j == nch) {
      pos_off[nch] = npos;
    } else {
      // the search of csrc/format2.cpp (same result for any input, sorted or not)
      const int64_t x = start + (j << log2c);
      if (npos <= 0) {
        pos_off[j] = 0;
        continue;
      }
      int64_t base = 0, len = npos;
      while (len > 1) {
        const int64_t half = len / 2;
        base = pos[base + half] < x ? base + half : base;
        len -= half;
      }
      pos_off[j] = base + (pos[base] < x ? 1 : 0);
    }
  }
}

// Status of a set of per-item codes: misc[0] = 1 if some run bound decreases (chunk runs out of order), misc[1] =
// the smallest item index with a nonzero code (INT64_MAX when none).
__global__ void k_bounds_check(const int64_t* pos_off, int64_t nch, unsigned long long* bad) {
  for (int64_t j = gtid(); j < nch; j += gstride())
    if (pos_off[j + 1] < pos_off[j]) atomicOr(bad, 1ull);
}
__global__ void k_first_err(const int* errs, int64_t m, unsigned long long* first) {
  for (int64_t j = gtid(); j < m; j += gstride())
    if (errs[j]) atomicMin(first, (unsigned long long)j);
}
__global__ void k_or_masks(const uint32_t* masks, int64_t m, unsigned int* present) {
  unsigned int v = 0;
  for (int64_t j = gtid(); j < m; j += gstride()) v |= masks[j];
  for (int o = 16; o > 0; o >>= 1) v |= __shfl_down_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0 && v) atomicOr(present, v);
}

// Per chunk: its data size (rl + bl) and its chunk table entry's size.
__global__ void k_sizes(const int64_t* pos_off, int64_t nch, const uint64_t* rl, const uint64_t* bl, uint64_t* dsz,
                        uint64_t* tsz) {
  for (int64_t j = gtid(); j < nch; j += gstride()) {
    const uint64_t n = (uint64_t)(pos_off[j + 1] - pos_off[j]);
    dsz[j] = n ? rl[j] + bl[j] : 0;
    tsz[j] = sshd::table_entry_size(n, n ? rl[j] : 0, n ? bl[j] : 0);
  }
}
// totals[0] = table bytes, totals[1] = data bytes (from the exclusive sums and the last sizes)
__global__ void k_totals(const uint64_t* doff, const uint64_t* dsz, const uint64_t* toff, const uint64_t* tsz,
                         int64_t nch, uint64_t* totals) {
  if (gtid() != 0) return;
  totals[0] = toff[nch - 1] + tsz[nch - 1];
  totals[1] = doff[nch - 1] + dsz[nch - 1];
}
__global__ void k_table(const int64_t* pos_off, int64_t nch, const uint64_t* rl, const uint64_t* bl,
                        const uint64_t* toff, uint8_t* table, uint64_t cap, unsigned long long* bad) {
  for (int64_t j = gtid(); j < nch; j += gstride()) {
    const uint64_t n = (uint64_t)(pos_off[j + 1] - pos_off[j]);
    uint64_t p = toff[j];
    if (!sshd::table_entry_put(table, cap, &p, n, n ? rl[j] : 0, n ? bl[j] : 0)) atomicOr(bad, 1ull);
  }
}

// Step 2's gap statistics (the sums of sshd::gap_stats_add): every chunk with changes adds its K first gaps, every
// change the gap after it. One thread per change / chunk, counters in shared memory (K x 64 + K), added to the global
// ones (zeroed by the caller) once per block.
__device__ __forceinline__ void gap_add(unsigned long long* sg, int K, int c, uint64_t g) {
  atomicAdd(&sg[K * 64 + c], 1ull);
  for (int b = 0; g; ++b, g >>= 1)
    if (g & 1) atomicAdd(&sg[c * 64 + b], 1ull);
}
__global__ void k_gap_stats(int K, const sshd::Rec* recs, int64_t npos, const int64_t* pos_off, const uint32_t* first,
                            int64_t nch, unsigned long long* bits, unsigned long long* ngaps) {
  extern __shared__ unsigned long long sg[];
  const int m = K * 65;
  for (int i = threadIdx.x; i < m; i += blockDim.x) sg[i] = 0;
  __syncthreads();
  for (int64_t i = gtid(); i < npos; i += gstride()) gap_add(sg, K, recs[i].cls, recs[i].after);
  for (int64_t j = gtid(); j < nch; j += gstride())
    if (pos_off[j + 1] > pos_off[j])
      for (int c = 0; c < K; ++c) gap_add(sg, K, c, first[j * K + c]);
  __syncthreads();
  for (int i = threadIdx.x; i < m; i += blockDim.x)
    if (sg[i]) atomicAdd(i < K * 64 ? &bits[i] : &ngaps[i - K * 64], sg[i]);
}
// vals[i] = new element at pos[i] (w bytes, little-endian); with update, old[pos[i]] = new[pos[i]] instead.
template <int W, bool UPDATE>
__global__ void k_at_positions(const uint64_t* optrs, const uint64_t* nptrs, const int64_t* offs, int64_t np,
                               const int64_t* pos, int64_t npos, uint8_t* vals) {
  for (int64_t i = gtid(); i < npos; i += gstride()) {
    const int64_t v = pos[i];
    const int64_t t = locate(offs, 0, np, v);
    const typename UT<W>::T x = *elem<W>(nptrs, offs, t, v);
    if (UPDATE)
      *elem<W>(optrs, offs, t, v) = x;
    else
      *((typename UT<W>::T*)vals + i) = x;
  }
}

// ---------------------------------------------------------------- ranges and indices
template <int W, bool PUT>
__global__ void __launch_bounds__(kThreads) k_range(const uint64_t* ptrs, const int64_t* offs, int64_t np,
                                                    int64_t start, int64_t end, uint8_t* buf) {
  typedef typename UT<W>::T T;
  __shared__ TilePieces tp;
  const int64_t ntiles = (end - start + kTile - 1) / kTile;
  for (int64_t b = blockIdx.x; b < ntiles; b += gridDim.x) {
    const int64_t s = start + b * kTile, e = s + kTile < end ? s + kTile : end;
    tile_pieces(&tp, offs, np, s, e);
    for (int64_t i = s + threadIdx.x; i < e; i += blockDim.x) {
      const int64_t t = piece_in(offs, tp.t0, tp.t1, i);
      T* p = elem<W>(ptrs, offs, t, i);
      T* q = (T*)buf + (i - start);
      if (PUT)
        *p = *q;
      else
        *q = *p;
    }
    __syncthreads();
  }
}

__global__ void k_check_idx(const int64_t* idx, int64_t count, int64_t n, int* bad) {
  for (int64_t i = gtid(); i < count; i += gstride())
    if (idx[i] < 0 || idx[i] >= n) *bad = 1;
}

// op 0: dst = in; 1: dst += in; 2: dst -= in; 3: out = src. out (ops 1, 2, optional) gets the new values.
template <int W, int OP>
__global__ void k_indexed(const uint64_t* ptrs, const int64_t* offs, int64_t np, const int64_t* idx, const uint8_t* in,
                          uint8_t* out, int64_t count, uint8_t* touched, const int* bad) {
  typedef typename UT<W>::T T;
  if (*bad) return;
  for (int64_t i = gtid(); i < count; i += gstride()) {
    const int64_t v = idx[i];
    const int64_t t = locate(offs, 0, np, v);
    T* p = elem<W>(ptrs, offs, t, v);
    if (OP == 3) {
      ((T*)out)[i] = *p;
      continue;
    }
    if (touched) touched[t] = 1;
    if (OP == 0) {
      *p = ((const T*)in)[i];
    } else {
      const T d = ((const T*)in)[i];
      const T nv = OP == 2 ? (T)(*p - d) : (T)(*p + d);
      *p = nv;
      if (out) ((T*)out)[i] = nv;
    }
  }
}

// ---------------------------------------------------------------- scratch layout
struct Layout {
  uint64_t size = 0;
  uint64_t take(uint64_t bytes) {
    const uint64_t off = size;
    size += (bytes + 255) & ~(uint64_t)255;
    return off;
  }
};

// tree64 of len bytes at data (device) into *out (device), leaves in leaves (tree64_nleaves(len) words).
int hash_device(const uint8_t* data, uint64_t len, uint64_t* leaves, uint64_t* out, cudaStream_t st) {
  const uint64_t nl = sshd::tree64_nleaves(len);
  k_leaves_one<<<grid_for((int64_t)nl, 128), 128, 0, st>>>(data, len, nl, leaves);
  k_top_one<<<1, 32, 0, st>>>(leaves, nl, len, out);
  return cuda_rc(cudaGetLastError());
}

// ---------------------------------------------------------------- encode
struct EncLayout {
  uint64_t freqs, cums, pos_off, recs, first, masks, errs, bits, ngaps, misc, rl, bl, dsz, tsz, doff, toff, table,
      data, vals, leaves, cub;
  uint64_t cub_bytes, total;
};

int enc_layout(int64_t npos, int64_t nch, int K, int w, uint64_t table_cap, uint64_t data_cap, EncLayout* L) {
  Layout a;
  const uint64_t m = (uint64_t)nch;
  L->freqs = a.take((uint64_t)K * 256 * 4);
  L->cums = a.take((uint64_t)K * 256 * 4);
  L->pos_off = a.take((m + 1) * 8);
  L->recs = a.take((uint64_t)(npos > 0 ? npos : 1) * sizeof(sshd::Rec));
  L->first = a.take(m * (uint64_t)K * 4);
  L->masks = a.take(m * 4);
  L->errs = a.take(m * 4);
  L->bits = a.take((uint64_t)K * 64 * 8);
  L->ngaps = a.take((uint64_t)K * 8);
  L->misc = a.take(8 * 8);
  L->rl = a.take(m * 8);
  L->bl = a.take(m * 8);
  L->dsz = a.take(m * 8);
  L->tsz = a.take(m * 8);
  L->doff = a.take(m * 8);
  L->toff = a.take(m * 8);
  L->table = a.take(table_cap ? table_cap : 1);
  L->data = a.take(data_cap ? data_cap : 1);
  const uint64_t vbytes = (uint64_t)npos * (uint64_t)w;
  L->vals = a.take(vbytes ? vbytes : 8);
  L->leaves = a.take(sshd::tree64_nleaves(vbytes) * 8);
  size_t cb = 0;
  const cudaError_t e = cub::DeviceScan::ExclusiveSum(nullptr, cb, (const uint64_t*)nullptr, (uint64_t*)nullptr,
                                                      (int64_t)(nch > 0 ? nch : 1), (cudaStream_t)0);
  if (e != cudaSuccess) return cuda_rc(e);
  L->cub_bytes = cb;
  L->cub = a.take(cb ? cb : 1);
  L->total = a.size;
  return SS_OK;
}

// The first nonzero code of errs[0..m) in index order (SS_OK when none); synchronises the stream.
int first_error(const int* errs, int64_t m, unsigned long long* slot, cudaStream_t st) {
  if (m <= 0) return SS_OK;
  const unsigned long long none = ~0ull;
  SS_CU(cudaMemcpyAsync(slot, &none, 8, cudaMemcpyHostToDevice, st));
  k_first_err<<<grid_for(m, kThreads), kThreads, 0, st>>>(errs, m, slot);
  SS_CU(cudaGetLastError());
  unsigned long long j = 0;
  SS_CU(cudaMemcpyAsync(&j, slot, 8, cudaMemcpyDeviceToHost, st));
  SS_CU(cudaStreamSynchronize(st));
  if (j == none) return SS_OK;
  int code = 0;
  SS_CU(cudaMemcpy(&code, errs + j, sizeof(int), cudaMemcpyDeviceToHost));
  return code;
}

template <int W>
int launch_at_positions(bool update, const uint64_t* optrs, const uint64_t* nptrs, const int64_t* offs, int64_t np,
                        const int64_t* pos, int64_t npos, uint8_t* vals, cudaStream_t st) {
  if (update)
    k_at_positions<W, true><<<grid_for(npos, kThreads), kThreads, 0, st>>>(optrs, nptrs, offs, np, pos, npos, vals);
  else
    k_at_positions<W, false><<<grid_for(npos, kThreads), kThreads, 0, st>>>(optrs, nptrs, offs, np, pos, npos, vals);
  return cuda_rc(cudaGetLastError());
}
int at_positions(int w, bool update, const uint64_t* optrs, const uint64_t* nptrs, const int64_t* offs, int64_t np,
                 const int64_t* pos, int64_t npos, uint8_t* vals, cudaStream_t st) {
  if (npos <= 0) return SS_OK;
  switch (w) {
    case 1: return launch_at_positions<1>(update, optrs, nptrs, offs, np, pos, npos, vals, st);
    case 2: return launch_at_positions<2>(update, optrs, nptrs, offs, np, pos, npos, vals, st);
    case 4: return launch_at_positions<4>(update, optrs, nptrs, offs, np, pos, npos, vals, st);
    default: return launch_at_positions<8>(update, optrs, nptrs, offs, np, pos, npos, vals, st);
  }
}

int encode_impl(const uint64_t* optrs, const uint64_t* nptrs, const int64_t* offs, int64_t np, int64_t n, int w,
                int kb, int mode, int64_t start, int64_t end, int log2c, const int64_t* cuts, int ncuts,
                const uint32_t* freqs, uint8_t* table_out, int64_t table_cap, int64_t* table_len, uint8_t* data_out,
                int64_t data_cap, int64_t* data_len, int32_t* ks_out, uint64_t* values_hash, int64_t* nchanged,
                int update_old, const int64_t* pos, int64_t npos, uint8_t* scratch, uint64_t* scratch_bytes,
                cudaStream_t st) {
  // ---- arguments (as ss2_encode)
  if (!width_ok(w) || (mode != 0 && mode != 1) || log2c < 12 || log2c > 30) return SS_EARG;
  if (np < 0 || n < 0 || n > INT64_MAX / 16 || (np > 0 && (!optrs || !nptrs || !offs))) return SS_EARG;
  if (start < 0 || start >= end || end > n) return SS_EARG;
  if (!freqs || !table_len || !data_len || !ks_out || !values_hash || !nchanged || table_cap < 0 || data_cap < 0 ||
      !scratch_bytes)
    return SS_EARG;
  if ((table_cap > 0 && !table_out) || (data_cap > 0 && !data_out)) return SS_EARG;
  sshd::EncParams P;
  if (!sshd::classes_init(P.cl, w, kb, cuts, ncuts)) return SS_EARG;
  if (npos < 0 || npos > end - start || (npos > 0 && !pos)) return SS_EARG;
  const int K = P.cl.K;
  const int64_t C = (int64_t)1 << log2c;
  const int64_t nch = (end - start + C - 1) / C;
  EncLayout L;
  SS_RC(enc_layout(npos, nch, K, w, (uint64_t)table_cap, (uint64_t)data_cap, &L));
  if (!scratch) {
    *scratch_bytes = L.total;
    return SS_OK;
  }
  if (*scratch_bytes < L.total) return SS_EARG;
  uint8_t* S = scratch;
  uint32_t* d_freqs = (uint32_t*)(S + L.freqs);
  uint32_t* d_cums = (uint32_t*)(S + L.cums);
  int64_t* pos_off = (int64_t*)(S + L.pos_off);
  sshd::Rec* recs = (sshd::Rec*)(S + L.recs);
  uint32_t* first = (uint32_t*)(S + L.first);
  uint32_t* masks = (uint32_t*)(S + L.masks);
  int* errs = (int*)(S + L.errs);
  uint64_t* bits = (uint64_t*)(S + L.bits);
  uint64_t* ngaps = (uint64_t*)(S + L.ngaps);
  unsigned long long* misc = (unsigned long long*)(S + L.misc);  // [0] bad bounds [1] first err [2] present
  uint64_t* rl = (uint64_t*)(S + L.rl);
  uint64_t* bl = (uint64_t*)(S + L.bl);
  uint64_t* dsz = (uint64_t*)(S + L.dsz);
  uint64_t* tsz = (uint64_t*)(S + L.tsz);
  uint64_t* doff = (uint64_t*)(S + L.doff);
  uint64_t* toff = (uint64_t*)(S + L.toff);
  uint8_t* d_table = S + L.table;
  uint8_t* d_data = S + L.data;
  uint8_t* d_vals = S + L.vals;
  uint64_t* d_leaves = (uint64_t*)(S + L.leaves);
  // ---- symbol tables
  std::vector<uint32_t> cums((size_t)K * 256);
  for (int c = 0; c < K; ++c) sshd::build_cum(freqs + (size_t)c * 256, &cums[(size_t)c * 256]);
  SS_CU(cudaMemcpyAsync(d_freqs, freqs, (size_t)K * 256 * 4, cudaMemcpyHostToDevice, st));
  SS_CU(cudaMemcpyAsync(d_cums, cums.data(), (size_t)K * 256 * 4, cudaMemcpyHostToDevice, st));
  P.w = w;
  P.mode = mode;
  P.freqs = d_freqs;
  P.cums = d_cums;
  SS_CU(cudaMemsetAsync(misc, 0, 8 * 8, st));
  // ---- each chunk's run of positions; runs out of order: SS_EARG (before any chunk's own check, as ss2_encode)
  k_chunk_bounds<<<grid_for(nch + 1, kThreads), kThreads, 0, st>>>(pos, npos, start, log2c, nch, pos_off);
  k_bounds_check<<<grid_for(nch, kThreads), kThreads, 0, st>>>(pos_off, nch, misc + 0);
  SS_CU(cudaGetLastError());
  // ---- step 1: records per chunk
  SS_CU(cudaMemsetAsync(first, 0, (size_t)nch * K * 4, st));
  SS_RC(ss2_hd_cuda_prepare(&P, optrs, nptrs, offs, np, start, end, log2c, pos, pos_off, nch, recs, first, masks,
                            errs, st));
  {
    unsigned long long bad = 0;
    SS_CU(cudaMemcpyAsync(&bad, misc + 0, 8, cudaMemcpyDeviceToHost, st));
    SS_CU(cudaStreamSynchronize(st));
    if (bad) return SS_EARG;
  }
  SS_RC(first_error(errs, nch, misc + 1, st));
  // ---- step 2: present classes, gap statistics, Rice parameters (on the host: K x 64 counters)
  SS_CU(cudaMemsetAsync(bits, 0, (size_t)K * 64 * 8, st));
  SS_CU(cudaMemsetAsync(ngaps, 0, (size_t)K * 8, st));
  k_or_masks<<<grid_for(nch, kThreads * 16), kThreads, 0, st>>>(masks, nch, (unsigned int*)(misc + 2));
  SS_CU(cudaGetLastError());
  {
    int64_t g = (int64_t)sm_count() * 4, need = ((npos > nch ? npos : nch) + kThreads - 1) / kThreads;
    if (g > need) g = need;
    if (g < 1) g = 1;
    k_gap_stats<<<(unsigned)g, kThreads, (size_t)K * 65 * 8, st>>>(K, recs, npos, pos_off, first, nch,
                                                                   (unsigned long long*)bits,
                                                                   (unsigned long long*)ngaps);
    SS_CU(cudaGetLastError());
  }
  std::vector<uint64_t> hbits((size_t)K * 64), hngaps((size_t)K);
  unsigned long long present64 = 0;
  SS_CU(cudaMemcpyAsync(hbits.data(), bits, (size_t)K * 64 * 8, cudaMemcpyDeviceToHost, st));
  SS_CU(cudaMemcpyAsync(hngaps.data(), ngaps, (size_t)K * 8, cudaMemcpyDeviceToHost, st));
  SS_CU(cudaMemcpyAsync(&present64, misc + 2, 8, cudaMemcpyDeviceToHost, st));
  SS_CU(cudaStreamSynchronize(st));
  const uint32_t present = (uint32_t)present64;
  int32_t ks[sshd::kMaxClasses];
  for (int c = 0; c < K; ++c) {
    ks[c] = -1;
    if (!(present >> c & 1)) continue;
    if (!sshd::freq_ok(freqs + (size_t)c * 256, 255)) return SS_ERANS;
    ks[c] = sshd::choose_k(&hbits[(size_t)c * 64], hngaps[(size_t)c], log2c);
  }
  for (int c = 0; c < K; ++c) ks_out[c] = ks[c];
  // ---- step 3a: sizes, offsets (exclusive sums), totals
  SS_RC(ss2_hd_cuda_write(&P, recs, pos_off, first, present, ks, nch, nullptr, nullptr, rl, bl, errs, st));
  k_sizes<<<grid_for(nch, kThreads), kThreads, 0, st>>>(pos_off, nch, rl, bl, dsz, tsz);
  SS_CU(cudaGetLastError());
  size_t cb = L.cub_bytes;
  SS_CU(cub::DeviceScan::ExclusiveSum(S + L.cub, cb, dsz, doff, (int64_t)nch, st));
  SS_CU(cub::DeviceScan::ExclusiveSum(S + L.cub, cb, tsz, toff, (int64_t)nch, st));
  k_totals<<<1, 32, 0, st>>>(doff, dsz, toff, tsz, nch, (uint64_t*)(misc + 4));
  SS_CU(cudaGetLastError());
  uint64_t tot[2] = {0, 0};
  SS_CU(cudaMemcpyAsync(tot, misc + 4, 16, cudaMemcpyDeviceToHost, st));
  SS_CU(cudaStreamSynchronize(st));
  *table_len = (int64_t)tot[0];
  *data_len = (int64_t)tot[1];
  *nchanged = npos;
  if (tot[0] > (uint64_t)table_cap || tot[1] > (uint64_t)data_cap) return SS_ECOUNT;
  // ---- step 3b: table and streams, values hash
  if (tot[0]) {
    k_table<<<grid_for(nch, kThreads), kThreads, 0, st>>>(pos_off, nch, rl, bl, toff, d_table, tot[0], misc + 3);
    SS_CU(cudaGetLastError());
  }
  SS_RC(ss2_hd_cuda_write(&P, recs, pos_off, first, present, ks, nch, d_data, doff, rl, bl, errs, st));
  SS_RC(at_positions(w, false, optrs, nptrs, offs, np, pos, npos, d_vals, st));
  SS_RC(hash_device(d_vals, (uint64_t)npos * (uint64_t)w, d_leaves, (uint64_t*)(misc + 6), st));
  if (tot[0]) SS_CU(cudaMemcpyAsync(table_out, d_table, tot[0], cudaMemcpyDeviceToHost, st));
  if (tot[1]) SS_CU(cudaMemcpyAsync(data_out, d_data, tot[1], cudaMemcpyDeviceToHost, st));
  SS_CU(cudaMemcpyAsync(values_hash, misc + 6, 8, cudaMemcpyDeviceToHost, st));
  SS_RC(first_error(errs, nch, misc + 1, st));  // synchronises
  {
    unsigned long long tbad = 0;
    SS_CU(cudaMemcpy(&tbad, misc + 3, 8, cudaMemcpyDeviceToHost));
    if (tbad) return SS_ECOUNT;
  }
  // ---- the snapshot update (only on success; stream ordered, not waited for)
  if (update_old) SS_RC(at_positions(w, true, optrs, nptrs, offs, np, pos, npos, nullptr, st));
  return SS_OK;
}

// ---------------------------------------------------------------- decode
int decode_impl(const uint8_t* seg, int64_t seg_len, int64_t table_len, const uint64_t* optrs, const int64_t* offs,
                int64_t np, int64_t n, int w, int kb, int mode, int64_t start, int64_t end, int log2c,
                const int64_t* cuts, int ncuts, const int32_t* ks, const uint32_t* freqs, int64_t nchanged,
                uint64_t expected_hash, int64_t* idx_out, uint8_t* val_out, uint8_t* scratch,
                uint64_t* scratch_bytes, cudaStream_t st) {
  if (!width_ok(w) || mode < 0 || mode > 2 || log2c < 12 || log2c > 30) return SS_EARG;
  if (np < 0 || n < 0 || n > INT64_MAX / 16 || (np > 0 && (!optrs || !offs))) return SS_EARG;
  if (start < 0 || start >= end || end > n) return SS_EARG;
  if (seg_len < 0 || seg_len > (INT64_MAX >> 4) || (seg_len > 0 && !seg) || !freqs || !ks || !scratch_bytes)
    return SS_EARG;
  sshd::DecParams P;
  if (!sshd::classes_init(P.cl, w, kb, cuts, ncuts)) return SS_EARG;
  const int K = P.cl.K;
  P.w = w;
  P.mode = mode;
  P.log2c = log2c;
  for (int c = 0; c < K; ++c) P.ks[c] = ks[c] < 0 ? -1 : ks[c];
  for (int c = K; c < (int)sshd::kMaxClasses; ++c) P.ks[c] = -1;
  P.freqs = freqs;  // host tables for the checks
  int rc = sshd::check_classes(P);
  if (rc) return rc;
  if (table_len < 0 || table_len > seg_len) return SS_ETABLE;
  const int64_t C = (int64_t)1 << log2c;
  const int64_t nch = (end - start + C - 1) / C;
  std::vector<sshd::ChunkEntry> chunks((size_t)nch);
  int64_t nnz = 0;
  rc = sshd::parse_table(seg, (uint64_t)seg_len, (uint64_t)table_len, start, end, log2c, nchanged, chunks.data(), &nnz);
  if (rc) return rc;
  // nchanged >= 1 here (parse_table), nnz >= 1
  Layout a;
  const uint64_t o_seg = a.take((uint64_t)seg_len);
  const uint64_t o_freqs = a.take((uint64_t)K * 256 * 4);
  const uint64_t o_cums = a.take((uint64_t)K * 256 * 4);
  const uint64_t o_chunks = a.take((uint64_t)nnz * sizeof(sshd::ChunkEntry));
  const uint64_t o_errs = a.take((uint64_t)nnz * 4);
  const uint64_t o_misc = a.take(64);
  const uint64_t vbytes = (uint64_t)nchanged * (uint64_t)w;
  const uint64_t o_leaves = a.take(sshd::tree64_nleaves(vbytes) * 8);
  if (!scratch) {
    *scratch_bytes = a.size;
    return SS_OK;
  }
  if (!idx_out || !val_out) return SS_EARG;
  if (*scratch_bytes < a.size) return SS_EARG;
  uint8_t* S = scratch;
  std::vector<uint32_t> cums((size_t)K * 256);
  for (int c = 0; c < K; ++c) sshd::build_cum(freqs + (size_t)c * 256, &cums[(size_t)c * 256]);
  SS_CU(cudaMemcpyAsync(S + o_seg, seg, (size_t)seg_len, cudaMemcpyHostToDevice, st));
  SS_CU(cudaMemcpyAsync(S + o_freqs, freqs, (size_t)K * 256 * 4, cudaMemcpyHostToDevice, st));
  SS_CU(cudaMemcpyAsync(S + o_cums, cums.data(), (size_t)K * 256 * 4, cudaMemcpyHostToDevice, st));
  SS_CU(cudaMemcpyAsync(S + o_chunks, chunks.data(), (size_t)nnz * sizeof(sshd::ChunkEntry), cudaMemcpyHostToDevice,
                        st));
  P.freqs = (const uint32_t*)(S + o_freqs);
  P.cums = (const uint32_t*)(S + o_cums);
  int* errs = (int*)(S + o_errs);
  unsigned long long* misc = (unsigned long long*)(S + o_misc);
  SS_RC(ss2_hd_cuda_decode(&P, optrs, offs, np, start, end, S + o_seg, (const sshd::ChunkEntry*)(S + o_chunks), nnz,
                           idx_out, val_out, errs, st));
  if (mode != 2) SS_RC(hash_device(val_out, vbytes, (uint64_t*)(S + o_leaves), (uint64_t*)(misc + 2), st));
  rc = first_error(errs, nnz, misc + 1, st);  // synchronises
  if (rc) return rc;
  if (mode == 2) return SS_OK;
  uint64_t h = 0;
  SS_CU(cudaMemcpy(&h, misc + 2, 8, cudaMemcpyDeviceToHost));
  return h == expected_hash ? SS_OK : SS_EHASH;
}

template <int W>
int launch_scan(int mode, const uint64_t* optrs, const uint64_t* nptrs, const int64_t* offs, int64_t np, int64_t n,
                int kb, int shift, int nsym, int shist, size_t smem, unsigned grid, uint32_t* counts,
                unsigned long long* hist, unsigned long long* keys, unsigned long long* pieces,
                unsigned long long* total, cudaStream_t st) {
  if (mode == 0)
    k_scan<W, 0><<<grid, kThreads, smem, st>>>(optrs, nptrs, offs, np, n, kb, shift, nsym, shist, counts, hist, keys,
                                               pieces, total);
  else
    k_scan<W, 1><<<grid, kThreads, smem, st>>>(optrs, nptrs, offs, np, n, kb, shift, nsym, shist, counts, hist, keys,
                                               pieces, total);
  return cuda_rc(cudaGetLastError());
}

template <int W, bool PUT>
int launch_range(const uint64_t* ptrs, const int64_t* offs, int64_t np, int64_t start, int64_t end, uint8_t* buf,
                 cudaStream_t st) {
  const unsigned g = grid_for(end - start, kTile);
  k_range<W, PUT><<<g, kThreads, 0, st>>>(ptrs, offs, np, start, end, buf);
  return cuda_rc(cudaGetLastError());
}

int range_copy(const uint64_t* ptrs, const int64_t* offs, int64_t np, int64_t n, int w, int64_t start, int64_t end,
               uint8_t* buf, bool put, cudaStream_t st) {
  if (!width_ok(w) || np < 0 || n < 0 || (np > 0 && (!ptrs || !offs))) return SS_EARG;
  if (start < 0 || end < start || end > n) return SS_EARG;
  if (end == start) return SS_OK;
  if (!buf) return SS_EARG;
  switch (w) {
    case 1: return put ? launch_range<1, true>(ptrs, offs, np, start, end, buf, st)
                       : launch_range<1, false>(ptrs, offs, np, start, end, buf, st);
    case 2: return put ? launch_range<2, true>(ptrs, offs, np, start, end, buf, st)
                       : launch_range<2, false>(ptrs, offs, np, start, end, buf, st);
    case 4: return put ? launch_range<4, true>(ptrs, offs, np, start, end, buf, st)
                       : launch_range<4, false>(ptrs, offs, np, start, end, buf, st);
    default: return put ? launch_range<8, true>(ptrs, offs, np, start, end, buf, st)
                        : launch_range<8, false>(ptrs, offs, np, start, end, buf, st);
  }
}

template <int W, int OP>
int launch_indexed(const uint64_t* ptrs, const int64_t* offs, int64_t np, const int64_t* idx, const uint8_t* in,
                   uint8_t* out, int64_t count, uint8_t* touched, const int* bad, cudaStream_t st) {
  k_indexed<W, OP><<<grid_for(count, kThreads), kThreads, 0, st>>>(ptrs, offs, np, idx, in, out, count, touched, bad);
  return cuda_rc(cudaGetLastError());
}

template <int OP>
int indexed(const uint64_t* ptrs, const int64_t* offs, int64_t np, int64_t n, int w, const int64_t* idx,
            const uint8_t* in, uint8_t* out, int64_t count, uint8_t* touched, int* status, cudaStream_t st) {
  if (!width_ok(w) || count < 0 || np < 0 || n < 0 || (np > 0 && (!ptrs || !offs)) || !status) return SS_EARG;
  if (count > 0 && (!idx || (OP != 3 && !in) || (OP == 3 && !out))) return SS_EARG;
  if (count == 0) return SS_OK;
  SS_CU(cudaMemsetAsync(status, 0, sizeof(int), st));
  k_check_idx<<<grid_for(count, kThreads), kThreads, 0, st>>>(idx, count, n, status);
  SS_CU(cudaGetLastError());
  int rc;
  switch (w) {
    case 1: rc = launch_indexed<1, OP>(ptrs, offs, np, idx, in, out, count, touched, status, st); break;
    case 2: rc = launch_indexed<2, OP>(ptrs, offs, np, idx, in, out, count, touched, status, st); break;
    case 4: rc = launch_indexed<4, OP>(ptrs, offs, np, idx, in, out, count, touched, status, st); break;
    default: rc = launch_indexed<8, OP>(ptrs, offs, np, idx, in, out, count, touched, status, st); break;
  }
  if (rc) return rc;
  int bad = 0;
  SS_CU(cudaMemcpyAsync(&bad, status, sizeof(int), cudaMemcpyDeviceToHost, st));
  SS_CU(cudaStreamSynchronize(st));
  return bad ? SS_EPOS : SS_OK;
}

}  // namespace

// ====================================================================================================================
// exported C ABI

// 1: this library has the ss2_cuda_* calls. Also the version of their ABI.
SS_CUDA_EXPORT int ss2_cuda_abi(void) { return 1; }

// Number of CUDA devices the runtime sees (0 when none or no driver), for diagnostics.
SS_CUDA_EXPORT int ss2_cuda_device_count(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

// Text of a code returned by an ss2_cuda_* call (CUDA runtime errors: -1000 - cudaError_t).
SS_CUDA_EXPORT const char* ss2_cuda_error_string(int code) {
  if (code <= -1000) return cudaGetErrorString((cudaError_t)(-1000 - code));
  return "not a CUDA runtime error";
}

// ss2_scan over a whole space, outputs in device memory: counts (ceil(n/4096) u32), hist (nkeys x 256 u64), keys
// (nkeys u64), pieces (npieces i64), *total (u64). hist, keys, pieces and total are zeroed here. Enqueues only.
SS_CUDA_EXPORT int ss2_cuda_scan(const uint64_t* old_ptrs, const uint64_t* new_ptrs, const int64_t* offs,
                                 int64_t npieces, int64_t n, int w, int kb, int mode, uint32_t* counts, uint64_t* hist,
                                 uint64_t* keys, int64_t* pieces, uint64_t* total, void* stream) {
  if (!width_ok(w) || mode < 0 || mode > 2 || !hist || !keys || !total) return SS_EARG;
  if (npieces < 0 || n < 0 || n > INT64_MAX / 16 || (npieces > 0 && (!old_ptrs || !new_ptrs || !offs))) return SS_EARG;
  if (kb < 0 || kb > 8 || kb > 8 * w - 1) return SS_EARG;
  if (n > 0 && (!counts || !pieces)) return SS_EARG;
  if (mode == 2) mode = 0;
  cudaStream_t st = (cudaStream_t)stream;
  const int nkeys = kb ? 1 << kb : 1;
  SS_CU(cudaMemsetAsync(hist, 0, (size_t)nkeys * 256 * 8, st));
  SS_CU(cudaMemsetAsync(keys, 0, (size_t)nkeys * 8, st));
  SS_CU(cudaMemsetAsync(total, 0, 8, st));
  if (npieces > 0) SS_CU(cudaMemsetAsync(pieces, 0, (size_t)npieces * 8, st));
  if (n == 0) return SS_OK;
  const int nsym = mode == 1 ? 256 : sshd::max_symbol(w, 0) + 1;
  const size_t hbytes = (size_t)nkeys * (size_t)nsym * 4;
  const int shist = (size_t)nkeys * 4 + hbytes <= 48 * 1024 ? 1 : 0;
  const size_t smem = (size_t)nkeys * 4 + (shist ? hbytes : 0);
  const int shift = kb ? 8 * w - 1 - kb : 0;
  const int64_t nblocks = (n + kTile - 1) / kTile;
  int64_t g = (int64_t)sm_count() * 8;
  if (g > nblocks) g = nblocks;
  const unsigned grid = (unsigned)g;
  unsigned long long* h = (unsigned long long*)hist;
  unsigned long long* k = (unsigned long long*)keys;
  unsigned long long* p = (unsigned long long*)pieces;
  unsigned long long* t = (unsigned long long*)total;
  switch (w) {
    case 1: return launch_scan<1>(mode, old_ptrs, new_ptrs, offs, npieces, n, kb, shift, nsym, shist, smem, grid,
                                  counts, h, k, p, t, st);
    case 2: return launch_scan<2>(mode, old_ptrs, new_ptrs, offs, npieces, n, kb, shift, nsym, shist, smem, grid,
                                  counts, h, k, p, t, st);
    case 4: return launch_scan<4>(mode, old_ptrs, new_ptrs, offs, npieces, n, kb, shift, nsym, shist, smem, grid,
                                  counts, h, k, p, t, st);
    default: return launch_scan<8>(mode, old_ptrs, new_ptrs, offs, npieces, n, kb, shift, nsym, shist, smem, grid,
                                   counts, h, k, p, t, st);
  }
}

// *count (device u64) = the changed elements of [start, end) (zeroed here). Enqueues only.
SS_CUDA_EXPORT int ss2_cuda_count(const uint64_t* old_ptrs, const uint64_t* new_ptrs, const int64_t* offs,
                                  int64_t npieces, int64_t n, int w, int64_t start, int64_t end, uint64_t* count,
                                  void* stream) {
  if (!width_ok(w) || !count || npieces < 0 || n < 0 || (npieces > 0 && (!old_ptrs || !new_ptrs || !offs)))
    return SS_EARG;
  if (start < 0 || end < start || end > n) return SS_EARG;
  cudaStream_t st = (cudaStream_t)stream;
  SS_CU(cudaMemsetAsync(count, 0, 8, st));
  if (end == start) return SS_OK;
  int64_t g = (int64_t)sm_count() * 8, nt = (end - start + kTile - 1) / kTile;
  const unsigned grid = (unsigned)(g < nt ? g : nt);
  unsigned long long* c = (unsigned long long*)count;
  switch (w) {
    case 1: k_count<1><<<grid, kThreads, 0, st>>>(old_ptrs, new_ptrs, offs, npieces, start, end, c); break;
    case 2: k_count<2><<<grid, kThreads, 0, st>>>(old_ptrs, new_ptrs, offs, npieces, start, end, c); break;
    case 4: k_count<4><<<grid, kThreads, 0, st>>>(old_ptrs, new_ptrs, offs, npieces, start, end, c); break;
    default: k_count<8><<<grid, kThreads, 0, st>>>(old_ptrs, new_ptrs, offs, npieces, start, end, c); break;
  }
  return cuda_rc(cudaGetLastError());
}

// The changed elements of [start, end), ascending, into pos_out (device; room for all of them: count them first) and
// their number into *nsel (device int64), by cub::DeviceSelect::If. temp NULL: *temp_bytes = the CUB scratch needed.
// Enqueues only.
SS_CUDA_EXPORT int ss2_cuda_positions(const uint64_t* old_ptrs, const uint64_t* new_ptrs, const int64_t* offs,
                                      int64_t npieces, int64_t n, int w, int64_t start, int64_t end, int64_t* pos_out,
                                      int64_t* nsel, void* temp, uint64_t* temp_bytes, void* stream) {
  if (!width_ok(w) || !temp_bytes || npieces < 0 || n < 0 || (npieces > 0 && (!old_ptrs || !new_ptrs || !offs)))
    return SS_EARG;
  if (start < 0 || end < start || end > n) return SS_EARG;
#if defined(CUB_VERSION) && CUB_VERSION < 200600
  // older CCCL (CUDA 12.x before 12.6): DeviceSelect counts items in 32 bits
  if (end - start > (int64_t)INT32_MAX) return SS_EARG;
#endif
  ChangedPred pred{old_ptrs, new_ptrs, offs, npieces, w};
  thrust::counting_iterator<int64_t> first(start);
  size_t tb = temp ? (size_t)*temp_bytes : 0;
  const cudaError_t e = cub::DeviceSelect::If(temp, tb, first, pos_out, nsel, (int64_t)(end - start), pred,
                                              (cudaStream_t)stream);
  if (!temp) *temp_bytes = (uint64_t)tb;
  return cuda_rc(e);
}

// ss2_encode of one sparse segment with the changed positions given (device, npositions of them, strictly
// increasing, exactly the changed elements of [start, end)). cuts, freqs, table_out, data_out, ks_out and the other
// outputs are host memory, as ss2_encode's. The device holds table_cap + data_cap bytes of the segment in scratch.
// Synchronises the stream (the segment is copied to the host); the snapshot update (update_old) is enqueued last.
SS_CUDA_EXPORT int ss2_cuda_encode(const uint64_t* old_ptrs, const uint64_t* new_ptrs, const int64_t* offs,
                                   int64_t npieces, int64_t n, int w, int kb, int mode, int64_t start, int64_t end,
                                   int log2c, const int64_t* cuts, int ncuts, const uint32_t* freqs,
                                   uint8_t* table_out, int64_t table_cap, int64_t* table_len, uint8_t* data_out,
                                   int64_t data_cap, int64_t* data_len, int32_t* ks_out, uint64_t* values_hash,
                                   int64_t* nchanged, int update_old, const int64_t* positions, int64_t npositions,
                                   void* scratch, uint64_t* scratch_bytes, void* stream) {
  try {
    return encode_impl(old_ptrs, new_ptrs, offs, npieces, n, w, kb, mode, start, end, log2c, cuts, ncuts, freqs,
                       table_out, table_cap, table_len, data_out, data_cap, data_len, ks_out, values_hash, nchanged,
                       update_old, positions, npositions, (uint8_t*)scratch, scratch_bytes, (cudaStream_t)stream);
  } catch (...) {
    return SS_ENOMEM;
  }
}

// ss2_decode of one sparse segment (seg, cuts, ks, freqs: host) into device staging idx_out / val_out (nchanged
// entries each). Synchronises the stream. Writes nothing outside idx_out, val_out and scratch.
SS_CUDA_EXPORT int ss2_cuda_decode(const uint8_t* seg, int64_t seg_len, int64_t table_len, const uint64_t* old_ptrs,
                                   const int64_t* offs, int64_t npieces, int64_t n, int w, int kb, int mode,
                                   int64_t start, int64_t end, int log2c, const int64_t* cuts, int ncuts,
                                   const int32_t* ks, const uint32_t* freqs, int64_t nchanged, uint64_t expected_hash,
                                   int64_t* idx_out, uint8_t* val_out, void* scratch, uint64_t* scratch_bytes,
                                   void* stream) {
  try {
    return decode_impl(seg, seg_len, table_len, old_ptrs, offs, npieces, n, w, kb, mode, start, end, log2c, cuts,
                       ncuts, ks, freqs, nchanged, expected_hash, idx_out, val_out, (uint8_t*)scratch, scratch_bytes,
                       (cudaStream_t)stream);
  } catch (...) {
    return SS_ENOMEM;
  }
}

// out (device) = the bytes of space elements [start, end). Enqueues only.
SS_CUDA_EXPORT int ss2_cuda_gather(const uint64_t* ptrs, const int64_t* offs, int64_t npieces, int64_t n, int w,
                                   int64_t start, int64_t end, uint8_t* out, void* stream) {
  return range_copy(ptrs, offs, npieces, n, w, start, end, out, false, (cudaStream_t)stream);
}

// Space elements [start, end) = data (device). Enqueues only.
SS_CUDA_EXPORT int ss2_cuda_put(const uint64_t* ptrs, const int64_t* offs, int64_t npieces, int64_t n, int w,
                                int64_t start, int64_t end, const uint8_t* data, void* stream) {
  return range_copy(ptrs, offs, npieces, n, w, start, end, (uint8_t*)data, true, (cudaStream_t)stream);
}

// dst[idx[i]] = vals[i] (device; indices distinct). touched (device, npieces bytes, optional): 1 for every piece
// written. status: one device int of scratch. Every index is checked before any write (SS_EPOS, nothing written).
// Synchronises the stream.
SS_CUDA_EXPORT int ss2_cuda_scatter(const uint64_t* ptrs, const int64_t* offs, int64_t npieces, int64_t n, int w,
                                    const int64_t* idx, const uint8_t* vals, int64_t count, uint8_t* touched,
                                    int* status, void* stream) {
  return indexed<0>(ptrs, offs, npieces, n, w, idx, vals, nullptr, count, touched, status, (cudaStream_t)stream);
}

// dst[idx[i]] += d[i] (-= with negate) modulo 2^(8w); new_out (device, optional) gets the results. As ss2_cuda_scatter.
SS_CUDA_EXPORT int ss2_cuda_add_scatter(const uint64_t* ptrs, const int64_t* offs, int64_t npieces, int64_t n, int w,
                                        const int64_t* idx, const uint8_t* d, uint8_t* new_out, int64_t count,
                                        int negate, uint8_t* touched, int* status, void* stream) {
  cudaStream_t st = (cudaStream_t)stream;
  return negate ? indexed<2>(ptrs, offs, npieces, n, w, idx, d, new_out, count, touched, status, st)
                : indexed<1>(ptrs, offs, npieces, n, w, idx, d, new_out, count, touched, status, st);
}

// out[i] = src[idx[i]] (device). Indices checked first (SS_EPOS, nothing written). Synchronises the stream.
SS_CUDA_EXPORT int ss2_cuda_take(const uint64_t* ptrs, const int64_t* offs, int64_t npieces, int64_t n, int w,
                                 const int64_t* idx, uint8_t* out, int64_t count, int* status, void* stream) {
  return indexed<3>(ptrs, offs, npieces, n, w, idx, nullptr, out, count, nullptr, status, (cudaStream_t)stream);
}

// out[i] (device u64) = tree64 of the lens[i] bytes at ptrs[i] for count buffers (ptrs, lens, base: device;
// base = count + 1 prefix sums of tree64_nleaves(lens[i]), nleaves = base[count]; leaves: nleaves device words of
// scratch). Enqueues only.
SS_CUDA_EXPORT int ss2_cuda_tree64_many(const uint64_t* ptrs, const uint64_t* lens, const uint64_t* base, int64_t count,
                                        uint64_t nleaves, uint64_t* leaves, uint64_t* out, void* stream) {
  if (count < 0 || (count > 0 && (!ptrs || !lens || !base || !leaves || !out))) return SS_EARG;
  if (count == 0) return SS_OK;
  cudaStream_t st = (cudaStream_t)stream;
  k_leaves_many<<<grid_for((int64_t)nleaves, 128), 128, 0, st>>>(ptrs, lens, base, count, nleaves, leaves);
  k_tops_many<<<grid_for(count, 64), 64, 0, st>>>(lens, base, count, leaves, out);
  return cuda_rc(cudaGetLastError());
}

// tree64 of len device bytes at data into *out (device); leaves: tree64_nleaves(len) device words. Enqueues only.
SS_CUDA_EXPORT int ss2_cuda_tree64(const uint8_t* data, uint64_t len, uint64_t* leaves, uint64_t* out, void* stream) {
  if ((!data && len) || !leaves || !out) return SS_EARG;
  return hash_device(data, len, leaves, out, (cudaStream_t)stream);
}
