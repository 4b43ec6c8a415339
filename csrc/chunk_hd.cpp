// CPU entry points over the host/device per-chunk coders of ss_hd.h: the same arguments and results as ss2_encode /
// ss2_decode (csrc/sparsesync.h), computed chunk by chunk with the scalar code the CUDA kernels run
// (csrc/chunk_hd_device.cu), so the tests compare the two implementations byte for byte. Plus tree64 / h64 through
// the shared leaf hash. Not a hot path: simple loops, chunks in parallel.
#include <memory>

#include "ss_hd.h"
#include "ss_internal.h"

namespace {

using sshd::ChunkEntry;
using sshd::Rec;

inline bool width_ok(int w) { return w == 1 || w == 2 || w == 4 || w == 8; }

inline bool space_ok(const uint64_t* ptrs, const int64_t* offs, int64_t np) {
  if (np < 0 || !offs || offs[0] != 0) return false;
  if (np > 0 && !ptrs) return false;
  for (int64_t t = 0; t < np; ++t)
    if (offs[t + 1] < offs[t]) return false;
  return offs[np] <= INT64_MAX / 16;
}

// tree64 through sshd::tree64_leaf / tree64_top (leaves in parallel).
uint64_t hd_tree64(const uint8_t* data, uint64_t len, int nthreads) {
  const uint64_t nl = sshd::tree64_nleaves(len);
  std::vector<uint64_t> leaves((size_t)nl);
  const int64_t per_task = 64;
  const int64_t ntasks = (int64_t)((nl + per_task - 1) / per_task);
  ss::parallel_for(ntasks, ss::plan_threads(nthreads, ntasks, (int64_t)len, 1 << 20), [&](int64_t t, int) {
    const uint64_t b = (uint64_t)t * per_task, e = std::min<uint64_t>(nl, b + per_task);
    for (uint64_t i = b; i < e; ++i) leaves[(size_t)i] = sshd::tree64_leaf(data, len, i);
  });
  return sshd::tree64_top(leaves.data(), nl, len);
}

int encode_impl(const uint64_t* old_ptrs, const uint64_t* new_ptrs, const int64_t* offs, int64_t np, int w, int kb,
                int mode, int64_t start, int64_t end, int log2c, const int64_t* cuts, int ncuts,
                const uint32_t* freqs, uint8_t* table_out, int64_t table_cap, int64_t* table_len, uint8_t* data_out,
                int64_t data_cap, int64_t* data_len, int32_t* ks_out, uint64_t* values_hash, int64_t* nchanged,
                int update_old, const int64_t* positions, int64_t npositions, int nthreads) {
  if (!width_ok(w) || (mode != 0 && mode != 1) || log2c < 12 || log2c > 30) return SS_EARG;
  if (!space_ok(old_ptrs, offs, np) || (np > 0 && !new_ptrs)) return SS_EARG;
  const int64_t N = offs[np];
  if (start < 0 || start >= end || end > N) return SS_EARG;
  if (!freqs || !table_len || !data_len || !ks_out || !values_hash || !nchanged || table_cap < 0 || data_cap < 0)
    return SS_EARG;
  if ((table_cap > 0 && !table_out) || (data_cap > 0 && !data_out)) return SS_EARG;
  sshd::EncParams P;
  if (!sshd::classes_init(P.cl, w, kb, cuts, ncuts)) return SS_EARG;
  if (positions) {
    if (npositions < 0 || npositions > end - start) return SS_EARG;
  } else if (npositions != 0) {
    return SS_EARG;
  }
  const int K = P.cl.K;
  std::vector<uint32_t> cums((size_t)K * 256);
  for (int c = 0; c < K; ++c) sshd::build_cum(freqs + (size_t)c * 256, &cums[(size_t)c * 256]);
  P.w = w;
  P.mode = mode;
  P.freqs = freqs;
  P.cums = cums.data();
  sshd::Pieces O, Nw;
  O.init(old_ptrs, offs, np, w);
  Nw.init(new_ptrs, offs, np, w);
  // ---- the changed positions: given, or by diffing the range
  std::vector<int64_t> diffpos;
  const int64_t* pos = positions;
  int64_t npos = npositions;
  if (!positions) {
    for (int64_t i = start; i < end; ++i)
      if (O(i) != Nw(i)) diffpos.push_back(i);
    pos = diffpos.data();
    npos = (int64_t)diffpos.size();
  }
  // ---- each chunk's run of positions (must ascend through [start, end))
  const int64_t C = (int64_t)1 << log2c;
  const int64_t nch = (end - start + C - 1) / C;
  std::vector<int64_t> lb((size_t)nch + 1);
  {
    int64_t q = 0;
    for (int64_t j = 0; j < nch; ++j) {
      lb[(size_t)j] = q;
      const int64_t ce = std::min(end, start + (j + 1) * C);
      while (q < npos && pos[q] < ce) ++q;
    }
    lb[(size_t)nch] = q;
    if (q != npos) return SS_EARG;  // positions at or past end (or not ascending)
  }
  // ---- step 1: records per chunk
  std::unique_ptr<Rec[]> recs(new Rec[(size_t)std::max<int64_t>(1, npos)]);
  std::vector<uint32_t> first((size_t)nch * K);
  std::vector<uint32_t> masks((size_t)nch, 0);
  std::vector<int> errs((size_t)nch, 0);
  const int nt = ss::plan_threads(nthreads, nch, P.cl.K > 1 ? (end - start) : npos * 16, 1 << 18);
  ss::parallel_for(nch, nt, [&](int64_t j, int) {
    sshd::Pieces o = O, nw = Nw;  // own cursors
    const int64_t cs = start + j * C, clen = std::min(C, end - cs);
    const int64_t p0 = lb[(size_t)j], n = lb[(size_t)j + 1] - p0;
    if (n == 0) return;
    errs[(size_t)j] = sshd::encode_prepare(P, o, nw, cs, clen, pos + p0, n, &recs[(size_t)p0],
                                           &first[(size_t)j * K], &masks[(size_t)j]);
  });
  for (int e : errs)
    if (e) return e;
  // ---- step 2: present classes, Rice parameters
  uint32_t present = 0;
  for (uint32_t m : masks) present |= m;
  int ks[sshd::kMaxClasses];
  std::vector<uint64_t> bits((size_t)K * 64, 0);
  std::vector<uint64_t> ngaps((size_t)K, 0);
  for (int64_t j = 0; j < nch; ++j) {
    const int64_t p0 = lb[(size_t)j], n = lb[(size_t)j + 1] - p0;
    if (n == 0) continue;
    for (int c = 0; c < K; ++c) sshd::gap_stats_add(&bits[(size_t)c * 64], &ngaps[(size_t)c], first[(size_t)j * K + c]);
    for (int64_t i = 0; i < n; ++i) {
      const Rec& r = recs[(size_t)(p0 + i)];
      sshd::gap_stats_add(&bits[(size_t)r.cls * 64], &ngaps[r.cls], r.after);
    }
  }
  for (int c = 0; c < K; ++c) {
    ks[c] = -1;
    if (!(present >> c & 1)) continue;
    if (!sshd::freq_ok(freqs + (size_t)c * 256, 255)) return SS_ERANS;
    ks[c] = sshd::choose_k(&bits[(size_t)c * 64], ngaps[(size_t)c], log2c);
  }
  for (int c = 0; c < K; ++c) ks_out[c] = ks[c];
  // ---- step 3a: sizes
  std::vector<uint64_t> rl((size_t)nch, 0), bl((size_t)nch, 0);
  ss::parallel_for(nch, nt, [&](int64_t j, int) {
    const int64_t p0 = lb[(size_t)j], n = lb[(size_t)j + 1] - p0;
    if (n == 0) return;
    sshd::encode_write(P, &recs[(size_t)p0], n, &first[(size_t)j * K], present, ks, nullptr, 0, &rl[(size_t)j],
                       &bl[(size_t)j]);
  });
  uint64_t tlen = 0, dlen = 0;
  std::vector<uint64_t> doff((size_t)nch);
  for (int64_t j = 0; j < nch; ++j) {
    const uint64_t n = (uint64_t)(lb[(size_t)j + 1] - lb[(size_t)j]);
    tlen += sshd::table_entry_size(n, rl[(size_t)j], bl[(size_t)j]);
    doff[(size_t)j] = dlen;
    dlen += rl[(size_t)j] + bl[(size_t)j];
  }
  *table_len = (int64_t)tlen;
  *data_len = (int64_t)dlen;
  *nchanged = npos;
  if (tlen > (uint64_t)table_cap || dlen > (uint64_t)data_cap) return SS_ECOUNT;
  // ---- step 3b: table and streams
  uint64_t tp = 0;
  for (int64_t j = 0; j < nch; ++j) {
    const uint64_t n = (uint64_t)(lb[(size_t)j + 1] - lb[(size_t)j]);
    if (!sshd::table_entry_put(table_out, (uint64_t)table_cap, &tp, n, rl[(size_t)j], bl[(size_t)j])) return SS_ECOUNT;
  }
  ss::parallel_for(nch, nt, [&](int64_t j, int) {
    const int64_t p0 = lb[(size_t)j], n = lb[(size_t)j + 1] - p0;
    if (n == 0) return;
    uint64_t r, b;
    errs[(size_t)j] = sshd::encode_write(P, &recs[(size_t)p0], n, &first[(size_t)j * K], present, ks,
                                         data_out + doff[(size_t)j], rl[(size_t)j] + bl[(size_t)j], &r, &b);
    if (!errs[(size_t)j] && (r != rl[(size_t)j] || b != bl[(size_t)j])) errs[(size_t)j] = SS_ECOUNT;
  });
  for (int e : errs)
    if (e) return e;
  // ---- values hash; the snapshot update
  std::vector<uint8_t> vals((size_t)std::max<int64_t>(1, npos * w));
  for (int64_t i = 0; i < npos; ++i) sshd::store_le(&vals[(size_t)(i * w)], Nw(pos[i]), w);
  *values_hash = hd_tree64(vals.data(), (uint64_t)(npos * w), nthreads);
  if (update_old)
    for (int64_t i = 0; i < npos; ++i) sshd::store_le(O.addr(pos[i]), Nw(pos[i]), w);
  return SS_OK;
}

int decode_impl(const uint8_t* seg, int64_t seg_len, int64_t table_len, const uint64_t* old_ptrs, const int64_t* offs,
                int64_t np, int w, int kb, int mode, int64_t start, int64_t end, int log2c, const int64_t* cuts,
                int ncuts, const int32_t* ks, const uint32_t* freqs, int64_t nchanged, uint64_t expected_hash,
                int64_t* idx_out, uint8_t* val_out, int nthreads) {
  if (!width_ok(w) || mode < 0 || mode > 2 || log2c < 12 || log2c > 30) return SS_EARG;
  if (!space_ok(old_ptrs, offs, np)) return SS_EARG;
  const int64_t N = offs[np];
  if (start < 0 || start >= end || end > N) return SS_EARG;
  if (seg_len < 0 || seg_len > (INT64_MAX >> 4) || (seg_len > 0 && !seg) || !freqs || !ks) return SS_EARG;
  sshd::DecParams P;
  if (!sshd::classes_init(P.cl, w, kb, cuts, ncuts)) return SS_EARG;
  const int K = P.cl.K;
  P.w = w;
  P.mode = mode;
  P.log2c = log2c;
  for (int c = 0; c < K; ++c) P.ks[c] = ks[c] < 0 ? -1 : ks[c];
  P.freqs = freqs;
  int rc = sshd::check_classes(P);
  if (rc) return rc;
  std::vector<uint32_t> cums((size_t)K * 256);
  for (int c = 0; c < K; ++c) sshd::build_cum(freqs + (size_t)c * 256, &cums[(size_t)c * 256]);
  P.cums = cums.data();
  if (table_len < 0 || table_len > seg_len) return SS_ETABLE;
  const int64_t C = (int64_t)1 << log2c;
  const int64_t nch = (end - start + C - 1) / C;
  std::vector<ChunkEntry> chunks((size_t)nch);
  int64_t nnz = 0;
  rc = sshd::parse_table(seg, (uint64_t)seg_len, (uint64_t)table_len, start, end, log2c, nchanged, chunks.data(), &nnz);
  if (rc) return rc;
  if (!idx_out || !val_out) return SS_EARG;
  sshd::Pieces O;
  O.init(old_ptrs, offs, np, w);
  std::vector<int> errs((size_t)nnz, 0);
  const int nt = ss::plan_threads(nthreads, nnz, K > 1 ? (end - start) : nchanged * 8, 1 << 17);
  ss::parallel_for(nnz, nt, [&](int64_t t, int) {
    const ChunkEntry& e = chunks[(size_t)t];
    sshd::Pieces o = O;
    const int64_t cs = start + e.j * C, clen = std::min(C, end - cs);
    errs[(size_t)t] = sshd::decode_chunk(P, o, cs, clen, e.n, seg + e.data_off, e.rl, seg + e.data_off + e.rl, e.bl,
                                         idx_out + e.out_off, val_out + (uint64_t)e.out_off * (uint64_t)w);
  });
  for (int e : errs)
    if (e) return e;  // the first failing chunk, as ss2_decode
  if (mode == 2) return SS_OK;
  return hd_tree64(val_out, (uint64_t)nchanged * (uint64_t)w, nthreads) == expected_hash ? SS_OK : SS_EHASH;
}

}  // namespace

SS_EXPORT int ss2_hd_encode(const uint64_t* old_ptrs, const uint64_t* new_ptrs, const int64_t* offs, int64_t npieces,
                            int w, int kb, int mode, int64_t start, int64_t end, int log2c, const int64_t* cuts,
                            int ncuts, const uint32_t* freqs, uint8_t* table_out, int64_t table_cap,
                            int64_t* table_len, uint8_t* data_out, int64_t data_cap, int64_t* data_len,
                            int32_t* ks_out, uint64_t* values_hash, int64_t* nchanged, int update_old,
                            const int64_t* positions, int64_t npositions, int nthreads) {
  try {
    return encode_impl(old_ptrs, new_ptrs, offs, npieces, w, kb, mode, start, end, log2c, cuts, ncuts, freqs,
                       table_out, table_cap, table_len, data_out, data_cap, data_len, ks_out, values_hash, nchanged,
                       update_old, positions, npositions, nthreads);
  } catch (...) {
    return SS_ENOMEM;
  }
}

SS_EXPORT int ss2_hd_decode(const uint8_t* seg, int64_t seg_len, int64_t table_len, const uint64_t* old_ptrs,
                            const int64_t* offs, int64_t npieces, int w, int kb, int mode, int64_t start, int64_t end,
                            int log2c, const int64_t* cuts, int ncuts, const int32_t* ks, const uint32_t* freqs,
                            int64_t nchanged, uint64_t expected_hash, int64_t* idx_out, uint8_t* val_out,
                            int nthreads) {
  try {
    return decode_impl(seg, seg_len, table_len, old_ptrs, offs, npieces, w, kb, mode, start, end, log2c, cuts, ncuts,
                       ks, freqs, nchanged, expected_hash, idx_out, val_out, nthreads);
  } catch (...) {
    return SS_ENOMEM;
  }
}

SS_EXPORT uint64_t ss2_hd_h64(const uint8_t* data, uint64_t len, uint64_t seed) {
  if (!data && len) return 0;
  return sshd::h64(data, len, seed);
}

SS_EXPORT uint64_t ss2_hd_tree64(const uint8_t* data, uint64_t len, int nthreads) {
  if (!data && len) return 0;
  try {
    return hd_tree64(data, len, nthreads);
  } catch (...) {
    return ss::tree64_serial(data, len);  // no memory for the leaf array
  }
}

// The leaf hashes of tree64 over len bytes (tree64_nleaves(len) of them) into out: what the device kernel computes.
SS_EXPORT int ss2_hd_tree64_leaves(const uint8_t* data, uint64_t len, uint64_t* out, uint64_t out_cap) {
  if ((!data && len) || !out) return SS_EARG;
  const uint64_t nl = sshd::tree64_nleaves(len);
  if (out_cap < nl) return SS_ECOUNT;
  for (uint64_t i = 0; i < nl; ++i) out[i] = sshd::tree64_leaf(data, len, i);
  return SS_OK;
}

#ifndef SPARSESYNC_WITH_CUDA
SS_EXPORT int ss2_hd_cuda_compiled(void) { return 0; }
#endif
