// ss_decode (FORMAT.md 4, enforcing every rule of 4.4) and ss_scatter.
//
// Error precedence follows sparsesync/reference.py exactly: arguments, then the chunk table (in order), then the
// chunks in order (for each: rANS stream completely, then the bit stream element by element), then values_hash.
#include "ss_coder.h"

namespace ss {
namespace {

struct ChunkIn {
  int64_t chunk;  // absolute chunk index
  int64_t cnt;
  int k;
  uint64_t data_off;  // offset of the rANS stream in seg
  uint64_t rans_len, bits_len;
  int64_t out_off;  // first output slot
};

struct DecTables {
  // per slot: bits 0..11 freq-1, bits 12..23 slot-cum, bits 24..31 symbol (one load per rANS step)
  uint32_t slot_info[kProbScale];
};

template <int W, int MODE>
struct Decoder {
  typedef typename UInt<W>::T T;
  const uint8_t* seg;
  const uint8_t* old_bits;
  int64_t n;
  int log2c;
  const DecTables* tab;
  int64_t* idx_out;
  uint8_t* val_out;

  static constexpr int B = 8 * W;
  static constexpr int kMaxSym = MODE == 1 ? 255 : (16 + B - 4 > 255 ? 255 : 16 + B - 4);  // MODE 2: delta, deferred

  int decode_chunk(const ChunkIn& e, std::vector<uint8_t>& syms) const {
    const int64_t C = (int64_t)1 << log2c;
    const int64_t base = e.chunk * C;
    const int64_t clen = std::min(n, base + C) - base;
    const int64_t cnt = e.cnt;
    const int k = e.k;

    // ---- rANS: all symbols of the chunk
    const uint8_t* rans = seg + e.data_off;
    const uint64_t rl = e.rans_len;
    if (rl < 4) return SS_ESTREAM;
    syms.resize((size_t)cnt);
    uint8_t* S = syms.data();
    {
      uint32_t x = load_u32(rans);
      uint64_t rp = 4;
      uint32_t bad = 0;
      const uint32_t* info = tab->slot_info;
      const uint64_t last = rl - 1;
      for (int64_t i = 0; i < cnt; ++i) {
        uint32_t e_ = info[x & (kProbScale - 1)];
        // no overflow: freq <= 4096, x >> 12 < 2^20, slot - cum < freq
        x = ((e_ & 0xfff) + 1) * (x >> kProbBits) + ((e_ >> 12) & 0xfff);
        S[i] = (uint8_t)(e_ >> 24);
        // from a valid state at most two bytes are needed: do those branch-free (reads clamped inside the
        // stream, an overrun is remembered and reported as the reference does), then loop for the rest
        for (int r = 0; r < 2; ++r) {
          uint32_t b = x < kRansL;
          uint32_t byte = rans[rp < last ? rp : last];
          bad |= b & (uint32_t)(rp >= rl);
          x = b ? ((x << 8) | byte) : x;
          rp += b;
        }
        while (SS_UNLIKELY(x < kRansL)) {
          if (rp >= rl) return SS_ESTREAM;
          x = (x << 8) | rans[rp++];
        }
      }
      if (bad) return SS_ESTREAM;
      if (x != kRansL || rp != rl) return SS_ERANS;
    }

    // ---- bit stream: gaps and extra bits
    const uint8_t* bits = rans + rl;
    const uint64_t total = e.bits_len * 8;
    BitReader br(bits, e.bits_len);
    const uint64_t limit = (uint64_t)clen >> k;
    const uint64_t kmask = low_mask(k);
    int64_t p = -1;
    int64_t* I = idx_out + e.out_off;
    uint8_t* V = val_out + (uint64_t)e.out_off * W;
    for (int64_t i = 0; i < cnt; ++i) {
      const int s = S[i];
      if (SS_UNLIKELY(s > kMaxSym)) return SS_ERANS;
      int nextra;
      if (MODE == 1) {
        nextra = B - 8;
      } else {
        nextra = s < 16 ? 0 : s - 12;
      }
      uint64_t q, low, extra;
      uint64_t v = br.peek();
      int r = ctz64(~v | (1ull << 56));
      if (SS_LIKELY(r < 56 && (uint64_t)r <= limit && r + 1 + k + nextra <= 56 &&
                    br.bitpos + (uint64_t)(r + 1 + k + nextra) <= total)) {
        // fast path: the whole element lies inside the stream and inside one 57-bit window
        q = (uint64_t)r;
        uint64_t rest = v >> (r + 1);
        low = rest & kmask;
        extra = (rest >> k) & low_mask(nextra);
        br.skip((uint64_t)(r + 1 + k + nextra));
        uint64_t g = (q << k) | low;
        if ((uint64_t)(p + 1) + g >= (uint64_t)clen) return SS_EPOS;
        p += (int64_t)g + 1;
      } else {
        // slow path, with the reference's checks in the reference's order. Bits past the end read as zero, so a
        // run of ones never extends past the stream.
        uint64_t run = 0;
        for (;;) {
          int rr = ctz64(~br.peek() | (1ull << 56));
          run += (uint64_t)rr;
          if (run > limit) return SS_EPOS;
          br.bitpos += (uint64_t)rr;
          if (rr < 56) break;
        }
        if (br.bitpos >= total) return SS_ESTREAM;  // the terminating zero is missing
        br.bitpos += 1;
        q = run;
        if (br.bitpos + (uint64_t)k > total) return SS_ESTREAM;
        low = br.get(k);
        uint64_t g = (q << k) | low;
        if ((uint64_t)(p + 1) + g >= (uint64_t)clen) return SS_EPOS;
        if (br.bitpos + (uint64_t)nextra > total) return SS_ESTREAM;
        extra = br.get_long(nextra);
        p += (int64_t)g + 1;
      }
      I[i] = base + p;
      if (MODE == 0) __builtin_prefetch(old_bits + (base + p) * W, 0, 3);  // used by the apply pass below
      // MODE 2 stores the difference only: ss_add_scatter adds it to the tensor at commit time
      T nv;
      if (MODE == 1) {
        nv = (T)(((uint64_t)s << (B - 8)) | extra);
      } else {
        // store the difference d; the old values are added in a second pass (independent loads, prefetched)
        uint64_t m;
        unsigned neg;
        if (s < 16) {
          m = (uint64_t)(s >> 1) + 1;
          neg = (unsigned)(s & 1);
        } else {
          int nb = s - 12;
          neg = (unsigned)(extra & 1);
          m = (1ull << (nb - 1)) | (extra >> 1);
        }
        nv = neg ? (T)(T(0) - (T)m) : (T)m;
      }
      store_elem<W>(V + (uint64_t)i * W, nv);
    }
    if (MODE == 0) {
      // second pass: new = old + d. The old values were prefetched while decoding the positions, so these loads
      // are independent cache hits instead of a chain of misses inside the decode loop.
      const uint8_t* ob = old_bits;
      for (int64_t i = 0; i < cnt; ++i) {
        T d = load_elem<W>(V + (uint64_t)i * W);
        store_elem<W>(V + (uint64_t)i * W, (T)(load_elem<W>(ob + I[i] * W) + d));
      }
    }
    // bit stream consumed exactly: fewer than 8 bits left, all zero
    if (total - br.bitpos >= 8) return SS_ESTREAM;
    if (br.bitpos < total && (bits[e.bits_len - 1] >> (br.bitpos & 7)) != 0) return SS_ESTREAM;
    return SS_OK;
  }
};

template <int W, int MODE>
int decode_impl(const uint8_t* seg, const uint8_t* old_bits, int64_t n, int log2c, const DecTables* tab,
                const std::vector<ChunkIn>& chunks, int64_t nchanged, int64_t* idx_out, uint8_t* val_out,
                int nthreads) {
  Decoder<W, MODE> D{seg, old_bits, n, log2c, tab, idx_out, val_out};
  const int64_t nch = (int64_t)chunks.size();
  int nt = plan_threads(nthreads, nch, nchanged, 1 << 15);
  std::vector<int> errs((size_t)nch, 0);
  std::vector<std::vector<uint8_t>> scratch((size_t)nt);
  std::atomic<int64_t> first_bad(INT64_MAX);
  parallel_for(nch, nt, [&](int64_t t, int wid) {
    if (t > first_bad.load(std::memory_order_relaxed)) return;  // an earlier chunk already failed
    int rc;
    try {
      rc = D.decode_chunk(chunks[(size_t)t], scratch[(size_t)wid]);
    } catch (...) {
      rc = SS_ENOMEM;
    }
    if (rc) {
      errs[(size_t)t] = rc;
      int64_t cur = first_bad.load();
      while (t < cur && !first_bad.compare_exchange_weak(cur, t)) {
      }
    }
  });
  int64_t fb = first_bad.load();
  if (fb != INT64_MAX) return errs[(size_t)fb];
  return SS_OK;
}

template <int MODE>
int decode_w(int w, const uint8_t* seg, const uint8_t* old_bits, int64_t n, int log2c, const DecTables* tab,
             const std::vector<ChunkIn>& chunks, int64_t nchanged, int64_t* idx_out, uint8_t* val_out, int nt) {
  switch (w) {
    case 1: return decode_impl<1, MODE>(seg, old_bits, n, log2c, tab, chunks, nchanged, idx_out, val_out, nt);
    case 2: return decode_impl<2, MODE>(seg, old_bits, n, log2c, tab, chunks, nchanged, idx_out, val_out, nt);
    case 4: return decode_impl<4, MODE>(seg, old_bits, n, log2c, tab, chunks, nchanged, idx_out, val_out, nt);
    case 8: return decode_impl<8, MODE>(seg, old_bits, n, log2c, tab, chunks, nchanged, idx_out, val_out, nt);
  }
  return SS_EARG;
}

int decode_entry(const uint8_t* seg, int64_t seg_len, int64_t table_len, const uint8_t* old_bits, int64_t n, int w,
                 int mode, int log2c, int64_t chunk_begin, int64_t chunk_end, const uint32_t* freq,
                 int64_t nchanged, uint64_t expected_hash, int64_t* idx_out, uint8_t* val_out, int nthreads) {
  if (log2c < 12 || log2c > 30 || (w != 1 && w != 2 && w != 4 && w != 8) || mode < 0 || mode > 2) return SS_EARG;
  if (n < 0 || n > INT64_MAX / 16 || seg_len < 0 || seg_len > (INT64_MAX >> 4) || (seg_len > 0 && !seg) || !freq)
    return SS_EARG;
  const int64_t C = (int64_t)1 << log2c;
  if (chunk_begin < 0 || chunk_end < chunk_begin || (chunk_end > chunk_begin && (chunk_end - 1) > (n - 1) / C) ||
      (chunk_end > chunk_begin && n == 0))
    return SS_EARG;
  if (table_len < 0 || table_len > seg_len) return SS_ETABLE;
  if (!freq_table_ok(freq)) return SS_ERANS;

  // ---- chunk table (serial, in order)
  const uint64_t tl = (uint64_t)table_len, sl = (uint64_t)seg_len;
  std::vector<ChunkIn> chunks;
  uint64_t pos = 0, data_pos = tl, total = 0;
  for (int64_t c = chunk_begin; c < chunk_end; ++c) {
    uint64_t cnt;
    if (!varint_get(seg, tl, &pos, &cnt)) return SS_ETABLE;
    const int64_t clen = std::min(n, (c + 1) * C) - c * C;
    if (cnt > (uint64_t)clen) return SS_ETABLE;
    if (cnt == 0) continue;
    if (pos >= tl) return SS_ETABLE;
    int k = seg[pos++];
    if (k > log2c) return SS_ETABLE;
    uint64_t rl, bl;
    if (!varint_get(seg, tl, &pos, &rl)) return SS_ETABLE;
    if (!varint_get(seg, tl, &pos, &bl)) return SS_ETABLE;
    // rl, bl < 2^63; data_pos <= sl < 2^59 here, so the sum cannot overflow
    if (rl > sl || bl > sl || data_pos + rl + bl > sl) return SS_ETABLE;
    chunks.push_back(ChunkIn{c, (int64_t)cnt, k, data_pos, rl, bl, (int64_t)total});
    data_pos += rl + bl;
    total += cnt;
  }
  if (pos != tl) return SS_ETABLE;
  if (data_pos != sl) return SS_ETABLE;
  if (nchanged < 0 || total != (uint64_t)nchanged) return SS_ECOUNT;
  if (nchanged > 0 && (!idx_out || !val_out || (mode == 0 && !old_bits))) return SS_EARG;

  // ---- symbol tables
  DecTables tab;
  uint32_t acc = 0;
  for (int s = 0; s < 256; ++s) {
    for (uint32_t j = 0; j < freq[s]; ++j) tab.slot_info[acc + j] = (freq[s] - 1) | (j << 12) | ((uint32_t)s << 24);
    acc += freq[s];
  }

  int rc = mode == 0   ? decode_w<0>(w, seg, old_bits, n, log2c, &tab, chunks, nchanged, idx_out, val_out, nthreads)
           : mode == 1 ? decode_w<1>(w, seg, old_bits, n, log2c, &tab, chunks, nchanged, idx_out, val_out, nthreads)
                       : decode_w<2>(w, seg, old_bits, n, log2c, &tab, chunks, nchanged, idx_out, val_out, nthreads);
  if (rc) return rc;
  if (mode == 2) return SS_OK;  // differences only: the values hash is checked after ss_add_scatter
  return check_values_hash(val_out, (uint64_t)nchanged * (uint64_t)w, expected_hash, nthreads);
}

template <int W>
int scatter_impl(uint8_t* dst, int64_t n, const int64_t* idx, const uint8_t* vals, int64_t count, int nthreads) {
  const int64_t per_task = 1 << 16;
  const int64_t ntasks = (count + per_task - 1) / per_task;
  int nt = plan_threads(nthreads, ntasks, count, 1 << 17);
  if (!indices_in_range(idx, count, n, ntasks, per_task, nt)) return SS_EPOS;
  parallel_for(ntasks, nt, [&](int64_t t, int) {
    int64_t b = t * per_task, e = std::min(count, b + per_task);
    for (int64_t i = b; i < e; ++i) memcpy(dst + idx[i] * W, vals + i * W, W);
  });
  return SS_OK;
}

template <int W>
int add_scatter_impl(uint8_t* dst, int64_t n, const int64_t* idx, const uint8_t* d, uint8_t* new_out, int64_t count,
                     int negate, int nthreads) {
  using T = typename UInt<W>::T;
  const int64_t per_task = 1 << 16;
  const int64_t ntasks = (count + per_task - 1) / per_task;
  int nt = plan_threads(nthreads, ntasks, count, 1 << 17);
  if (!indices_in_range(idx, count, n, ntasks, per_task, nt)) return SS_EPOS;
  parallel_for(ntasks, nt, [&](int64_t t, int) {
    int64_t b = t * per_task, e = std::min(count, b + per_task);
    const int64_t kAhead = 24;  // the loads of a read-modify-write would stall on misses: prefetch them for writing
    for (int64_t i = b; i < std::min(e, b + kAhead); ++i) __builtin_prefetch(dst + idx[i] * W, 1, 3);
    for (int64_t i = b; i < e; ++i) {
      if (i + kAhead < e) __builtin_prefetch(dst + idx[i + kAhead] * W, 1, 3);
      uint8_t* p = dst + idx[i] * W;
      T dv = load_elem<W>(d + i * W);
      T nv = negate ? (T)(load_elem<W>(p) - dv) : (T)(load_elem<W>(p) + dv);
      store_elem<W>(p, nv);
      if (new_out) store_elem<W>(new_out + i * W, nv);
    }
  });
  return SS_OK;
}

}  // namespace
}  // namespace ss

SS_EXPORT int ss_add_scatter(uint8_t* dst, int64_t n, int w, const int64_t* idx, const uint8_t* d, uint8_t* new_out,
                             int64_t count, int negate, int nthreads) {
  if (n < 0 || count < 0 || (w != 1 && w != 2 && w != 4 && w != 8)) return SS_EARG;
  if (count > 0 && (!idx || !d || !dst)) return SS_EARG;
  try {
    switch (w) {
      case 1: return ss::add_scatter_impl<1>(dst, n, idx, d, new_out, count, negate, nthreads);
      case 2: return ss::add_scatter_impl<2>(dst, n, idx, d, new_out, count, negate, nthreads);
      case 4: return ss::add_scatter_impl<4>(dst, n, idx, d, new_out, count, negate, nthreads);
      case 8: return ss::add_scatter_impl<8>(dst, n, idx, d, new_out, count, negate, nthreads);
    }
  } catch (...) {
    return SS_ENOMEM;
  }
  return SS_EARG;
}

SS_EXPORT int ss_decode(const uint8_t* seg, int64_t seg_len, int64_t table_len, const uint8_t* old_bits, int64_t n,
                        int w, int mode, int log2c, int64_t chunk_begin, int64_t chunk_end, const uint32_t* freq,
                        int64_t nchanged, uint64_t expected_hash, int64_t* idx_out, uint8_t* val_out, int nthreads) {
  try {
    return ss::decode_entry(seg, seg_len, table_len, old_bits, n, w, mode, log2c, chunk_begin, chunk_end, freq,
                            nchanged, expected_hash, idx_out, val_out, nthreads);
  } catch (...) {
    return SS_ENOMEM;
  }
}

SS_EXPORT int ss_scatter(uint8_t* dst, int64_t n, int w, const int64_t* idx, const uint8_t* vals, int64_t count,
                         int nthreads) {
  if (n < 0 || count < 0 || (w != 1 && w != 2 && w != 4 && w != 8)) return SS_EARG;
  if (count > 0 && (!idx || !vals || !dst)) return SS_EARG;
  try {
    switch (w) {
      case 1: return ss::scatter_impl<1>(dst, n, idx, vals, count, nthreads);
      case 2: return ss::scatter_impl<2>(dst, n, idx, vals, count, nthreads);
      case 4: return ss::scatter_impl<4>(dst, n, idx, vals, count, nthreads);
      case 8: return ss::scatter_impl<8>(dst, n, idx, vals, count, nthreads);
    }
  } catch (...) {
    return SS_ENOMEM;
  }
  return SS_EARG;
}
