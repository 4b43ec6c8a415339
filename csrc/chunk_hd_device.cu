// Device glue for the per-chunk coders of ss_hd.h (compiled only when SPARSESYNC_CUDA is on): one thread per chunk
// (per leaf for tree64), the very functions the CPU entry points of csrc/chunk_hd.cpp run and the tests check against
// csrc/format2.cpp. Every launch wrapper takes DEVICE pointers (the tables and cums inside EncParams / DecParams too,
// and the piece arrays of a Pieces) and a cudaStream_t (as void*, NULL = the legacy default stream); it only enqueues
// the kernel and returns the cudaError_t of the launch (0 = launched). Kernels write their per-chunk status codes
// (SS_OK / SS_E*) to errs[]; nothing is synchronised here.
//
// Encode of one segment on the device (chunk j covers [start + j C, min(start + (j+1) C, end))):
//   pos (changed space indices, ascending) and pos_off (nch + 1 prefix offsets: chunk j's run is
//   pos[pos_off[j] .. pos_off[j+1])), e.g. from a CUB compaction and a lower_bound per chunk;
//   1. ss2_hd_cuda_prepare   -> recs (one sshd::Rec per change, at the change's index), first (nch x K), masks, errs
//   2. ss2_hd_cuda_gap_stats -> bits (K x 64) and ngaps (K) (zeroed by the caller); present = OR of masks; the host
//      (or one thread) picks ks with sshd::choose_k
//   3. ss2_hd_cuda_write with data_off NULL -> rl, bl per chunk; prefix sums (CUB) give data_off and the table
//      entries; ss2_hd_cuda_write with data_off -> the streams.
// Decode: ss2_hd_cuda_parse_table (one thread: the chunk table is serial), then ss2_hd_cuda_decode.
#include <cuda_runtime.h>

#include "ss_hd.h"

#define SS_CUDA_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr int kThreads = 128;

struct KParams {
  int k[sshd::kMaxClasses];
};

__device__ __forceinline__ int64_t gtid() { return (int64_t)blockIdx.x * blockDim.x + threadIdx.x; }

__global__ void k_prepare(sshd::EncParams P, sshd::Pieces old, sshd::Pieces neu, int64_t start, int64_t end,
                          int log2c, const int64_t* pos, const int64_t* pos_off, int64_t nch, sshd::Rec* recs,
                          uint32_t* first, uint32_t* masks, int* errs) {
  const int64_t j = gtid();
  if (j >= nch) return;
  const int64_t C = (int64_t)1 << log2c;
  const int64_t cs = start + j * C;
  const int64_t clen = end - cs < C ? end - cs : C;
  const int64_t p0 = pos_off[j], n = pos_off[j + 1] - p0;
  masks[j] = 0;
  if (n <= 0) {
    errs[j] = n < 0 ? SS_EARG : SS_OK;
    return;
  }
  errs[j] = sshd::encode_prepare(P, old, neu, cs, clen, pos + p0, n, recs + p0, first + j * P.cl.K, masks + j);
}

__device__ __forceinline__ void stats_add(unsigned long long* bits, unsigned long long* ngaps, uint64_t g) {
  atomicAdd(ngaps, 1ull);
  for (int b = 0; g; ++b, g >>= 1)
    if (g & 1) atomicAdd(bits + b, 1ull);
}

__global__ void k_gap_stats(int K, const sshd::Rec* recs, const int64_t* pos_off, const uint32_t* first, int64_t nch,
                            unsigned long long* bits, unsigned long long* ngaps) {
  const int64_t j = gtid();
  if (j >= nch) return;
  const int64_t p0 = pos_off[j], n = pos_off[j + 1] - p0;
  if (n <= 0) return;
  for (int c = 0; c < K; ++c) stats_add(bits + 64 * c, ngaps + c, first[j * K + c]);
  for (int64_t i = 0; i < n; ++i) {
    const sshd::Rec& r = recs[p0 + i];
    stats_add(bits + 64 * r.cls, ngaps + r.cls, r.after);
  }
}

__global__ void k_write(sshd::EncParams P, const sshd::Rec* recs, const int64_t* pos_off, const uint32_t* first,
                        uint32_t present, KParams ks, int64_t nch, uint8_t* data, const uint64_t* data_off,
                        uint64_t* rl, uint64_t* bl, int* errs) {
  const int64_t j = gtid();
  if (j >= nch) return;
  const int64_t p0 = pos_off[j], n = pos_off[j + 1] - p0;
  if (n <= 0) {
    if (!data_off) rl[j] = bl[j] = 0;
    errs[j] = SS_OK;
    return;
  }
  if (!data_off) {
    errs[j] = sshd::encode_write(P, recs + p0, n, first + j * P.cl.K, present, ks.k, nullptr, 0, rl + j, bl + j);
    return;
  }
  uint64_t r, b;
  errs[j] = sshd::encode_write(P, recs + p0, n, first + j * P.cl.K, present, ks.k, data + data_off[j], rl[j] + bl[j],
                               &r, &b);
  if (!errs[j] && (r != rl[j] || b != bl[j])) errs[j] = SS_ECOUNT;
}

__global__ void k_parse_table(const uint8_t* seg, uint64_t seg_len, uint64_t table_len, int64_t start, int64_t end,
                              int log2c, int64_t nchanged, sshd::ChunkEntry* out, int64_t* nout, int* rc) {
  if (gtid() != 0) return;
  *rc = sshd::parse_table(seg, seg_len, table_len, start, end, log2c, nchanged, out, nout);
}

__global__ void k_decode(sshd::DecParams P, sshd::Pieces old, int64_t start, int64_t end, const uint8_t* seg,
                         const sshd::ChunkEntry* chunks, int64_t nnz, int64_t* idx_out, uint8_t* val_out, int* errs) {
  const int64_t t = gtid();
  if (t >= nnz) return;
  const sshd::ChunkEntry e = chunks[t];
  const int64_t C = (int64_t)1 << P.log2c;
  const int64_t cs = start + e.j * C;
  const int64_t clen = end - cs < C ? end - cs : C;
  errs[t] = sshd::decode_chunk(P, old, cs, clen, e.n, seg + e.data_off, e.rl, seg + e.data_off + e.rl, e.bl,
                               idx_out + e.out_off, val_out + (uint64_t)e.out_off * (uint64_t)P.w);
}

__global__ void k_tree64_leaves(const uint8_t* data, uint64_t len, uint64_t nleaves, uint64_t* out) {
  const int64_t i = gtid();
  if ((uint64_t)i >= nleaves) return;
  out[i] = sshd::tree64_leaf(data, len, (uint64_t)i);
}

inline unsigned blocks_for(int64_t n) { return (unsigned)((n + kThreads - 1) / kThreads); }

}  // namespace

SS_CUDA_EXPORT int ss2_hd_cuda_compiled(void) { return 1; }

SS_CUDA_EXPORT int ss2_hd_cuda_prepare(const sshd::EncParams* P, const uint64_t* old_ptrs, const uint64_t* new_ptrs,
                                       const int64_t* offs, int64_t npieces, int64_t start, int64_t end, int log2c,
                                       const int64_t* pos, const int64_t* pos_off, int64_t nch, sshd::Rec* recs,
                                       uint32_t* first, uint32_t* masks, int* errs, void* stream) {
  if (!P || nch <= 0) return nch < 0 ? (int)cudaErrorInvalidValue : 0;
  sshd::Pieces o, n;
  o.init(old_ptrs, offs, npieces, P->w);
  n.init(new_ptrs, offs, npieces, P->w);
  k_prepare<<<blocks_for(nch), kThreads, 0, (cudaStream_t)stream>>>(*P, o, n, start, end, log2c, pos, pos_off, nch,
                                                                   recs, first, masks, errs);
  return (int)cudaGetLastError();
}

SS_CUDA_EXPORT int ss2_hd_cuda_gap_stats(int K, const sshd::Rec* recs, const int64_t* pos_off, const uint32_t* first,
                                         int64_t nch, uint64_t* bits, uint64_t* ngaps, void* stream) {
  if (nch <= 0) return nch < 0 ? (int)cudaErrorInvalidValue : 0;
  k_gap_stats<<<blocks_for(nch), kThreads, 0, (cudaStream_t)stream>>>(
      K, recs, pos_off, first, nch, (unsigned long long*)bits, (unsigned long long*)ngaps);
  return (int)cudaGetLastError();
}

SS_CUDA_EXPORT int ss2_hd_cuda_write(const sshd::EncParams* P, const sshd::Rec* recs, const int64_t* pos_off,
                                     const uint32_t* first, uint32_t present, const int32_t* ks_host, int64_t nch,
                                     uint8_t* data, const uint64_t* data_off, uint64_t* rl, uint64_t* bl, int* errs,
                                     void* stream) {
  if (!P || !ks_host || nch <= 0) return nch < 0 || !P || !ks_host ? (int)cudaErrorInvalidValue : 0;
  KParams ks;
  for (int c = 0; c < (int)sshd::kMaxClasses; ++c) ks.k[c] = c < P->cl.K ? ks_host[c] : -1;
  k_write<<<blocks_for(nch), kThreads, 0, (cudaStream_t)stream>>>(*P, recs, pos_off, first, present, ks, nch, data,
                                                                 data_off, rl, bl, errs);
  return (int)cudaGetLastError();
}

SS_CUDA_EXPORT int ss2_hd_cuda_parse_table(const uint8_t* seg, uint64_t seg_len, uint64_t table_len, int64_t start,
                                           int64_t end, int log2c, int64_t nchanged, sshd::ChunkEntry* out,
                                           int64_t* nout, int* rc, void* stream) {
  k_parse_table<<<1, 1, 0, (cudaStream_t)stream>>>(seg, seg_len, table_len, start, end, log2c, nchanged, out, nout,
                                                   rc);
  return (int)cudaGetLastError();
}

SS_CUDA_EXPORT int ss2_hd_cuda_decode(const sshd::DecParams* P, const uint64_t* old_ptrs, const int64_t* offs,
                                      int64_t npieces, int64_t start, int64_t end, const uint8_t* seg,
                                      const sshd::ChunkEntry* chunks, int64_t nnz, int64_t* idx_out,
                                      uint8_t* val_out, int* errs, void* stream) {
  if (!P || nnz <= 0) return nnz < 0 || !P ? (int)cudaErrorInvalidValue : 0;
  sshd::Pieces o;
  o.init(old_ptrs, offs, npieces, P->w);
  k_decode<<<blocks_for(nnz), kThreads, 0, (cudaStream_t)stream>>>(*P, o, start, end, seg, chunks, nnz, idx_out,
                                                                  val_out, errs);
  return (int)cudaGetLastError();
}

SS_CUDA_EXPORT int ss2_hd_cuda_tree64_leaves(const uint8_t* data, uint64_t len, uint64_t* out, void* stream) {
  const uint64_t nl = sshd::tree64_nleaves(len);
  k_tree64_leaves<<<blocks_for((int64_t)nl), kThreads, 0, (cudaStream_t)stream>>>(data, len, nl, out);
  return (int)cudaGetLastError();
}
