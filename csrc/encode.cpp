// ss_encode: pass 2 of encoding, one sparse segment (FORMAT.md 4).
#include <memory>

#include "ss_coder.h"
#include "ss_diff.h"

namespace ss {
namespace {

struct ChunkOut {
  int64_t n = 0;
  int k = 0;
  int err = 0;
  int worker = 0;
  bool updated = false;
  uint64_t rans_off = 0, rans_len = 0;
  uint64_t bits_off = 0, bits_len = 0;
  uint64_t vals_off = 0;  // n*W bytes: new bit patterns
  uint64_t olds_off = 0;  // n*W bytes: previous old bit patterns (only with update_old, for rollback)
  uint64_t pos_off = 0;   // n u32 positions relative to chunk start (only with update_old)
};

// Per-worker growable byte arena (offsets stay valid across growth).
struct Arena {
  std::vector<uint8_t> buf;
  uint64_t alloc(uint64_t nbytes) {
    uint64_t off = buf.size();
    uint64_t need = off + nbytes;
    if (need > buf.capacity()) buf.reserve(std::max<uint64_t>(need, buf.capacity() * 2));
    buf.resize(need);
    return off;
  }
};

template <int W>
struct Scratch {
  typedef typename UInt<W>::T T;
  std::vector<uint32_t> pos, gap;
  std::vector<T> newv, oldv;
  std::vector<uint8_t> sym;
};

template <int W, int MODE>
struct Encoder {
  typedef typename UInt<W>::T T;
  uint8_t* old_bits;
  const uint8_t* new_bits;
  int64_t n;
  int log2c;
  const uint32_t* freq;
  const RansEncSym* enc;
  bool update_old;

  void encode_chunk(int64_t chunk, ChunkOut& out, Scratch<W>& sc, Arena& ar) {
    const int64_t C = (int64_t)1 << log2c;
    const int64_t cs = chunk * C, ce = std::min(n, cs + C);
    sc.pos.clear();
    sc.newv.clear();
    sc.oldv.clear();
    const bool need_old = MODE == 0 || update_old;
    for_each_diff<W>(old_bits, new_bits, cs, ce, [&](int64_t i) {
      sc.pos.push_back((uint32_t)(i - cs));
      sc.newv.push_back(load_elem<W>(new_bits + i * W));
      if (need_old) sc.oldv.push_back(load_elem<W>(old_bits + i * W));
    });
    const int64_t cnt = (int64_t)sc.pos.size();
    out.n = cnt;
    if (cnt == 0) return;

    // Symbols and extra-bit count.
    sc.sym.resize((size_t)cnt);
    uint64_t extra_bits = 0;
    for (int64_t i = 0; i < cnt; ++i) {
      uint64_t ev;
      int eb;
      int s = MODE == 0 ? delta_symbol<W>(sc.oldv[i], sc.newv[i], &ev, &eb) : raw_symbol<W>(sc.newv[i], &ev, &eb);
      sc.sym[i] = (uint8_t)s;
      extra_bits += (uint64_t)eb;
      if (SS_UNLIKELY(enc[s].x_max == 0)) out.err = SS_ERANS;
    }
    if (out.err) return;

    // Gaps and Rice parameter.
    sc.gap.resize((size_t)cnt);
    sc.gap[0] = sc.pos[0];
    for (int64_t i = 1; i < cnt; ++i) sc.gap[i] = sc.pos[i] - sc.pos[i - 1] - 1;
    const uint64_t sum_g = (uint64_t)sc.pos[cnt - 1] + 1 - (uint64_t)cnt;
    const int k = choose_k(sc.gap.data(), cnt, log2c, sum_g);
    out.k = k;
    uint64_t rice_bits = (uint64_t)cnt * (uint64_t)(k + 1);
    for (int64_t i = 0; i < cnt; ++i) rice_bits += sc.gap[i] >> k;
    const uint64_t total_bits = rice_bits + extra_bits;
    out.bits_len = (total_bits + 7) / 8;

    // Arena layout: [bits + 8 slack][rans region 2n+4][vals n*W][olds n*W][pos 4n].
    const uint64_t rans_cap = 2 * (uint64_t)cnt + 4;
    const uint64_t vbytes = (uint64_t)cnt * W;
    uint64_t total = out.bits_len + 8 + rans_cap + vbytes + (update_old ? vbytes + 4 * (uint64_t)cnt : 0);
    uint64_t base = ar.alloc(total);
    uint8_t* A = ar.buf.data();
    out.bits_off = base;
    const uint64_t rans_region = base + out.bits_len + 8;
    out.vals_off = rans_region + rans_cap;

    // Bit stream.
    {
      BitWriter bw(A + out.bits_off);
      for (int64_t i = 0; i < cnt; ++i) {
        bw.rice(sc.gap[i], k);
        uint64_t ev;
        int eb;
        if (MODE == 0) {
          delta_symbol<W>(sc.oldv[i], sc.newv[i], &ev, &eb);
        } else {
          raw_symbol<W>(sc.newv[i], &ev, &eb);
        }
        if (eb) bw.put_long(ev, eb);
      }
    }

    // rANS (symbols in reverse; bytes written downwards so they end up in reverse emission order).
    {
      uint8_t* end = A + rans_region + rans_cap;
      uint8_t* p = end;
      uint32_t x = kRansL;
      for (int64_t i = cnt - 1; i >= 0; --i) x = rans_enc_put(x, &p, enc[sc.sym[i]]);
      p -= 4;
      store_u32(p, x);
      out.rans_off = (uint64_t)(p - A);
      out.rans_len = (uint64_t)(end - p);
    }

    // Values (for values_hash).
    uint8_t* V = A + out.vals_off;
    for (int64_t i = 0; i < cnt; ++i) store_elem<W>(V + (size_t)i * W, sc.newv[i]);

    if (update_old) {
      out.olds_off = out.vals_off + vbytes;
      out.pos_off = out.olds_off + vbytes;
      uint8_t* O = A + out.olds_off;
      for (int64_t i = 0; i < cnt; ++i) store_elem<W>(O + (size_t)i * W, sc.oldv[i]);
      memcpy(A + out.pos_off, sc.pos.data(), 4 * (size_t)cnt);
      for (int64_t i = 0; i < cnt; ++i) store_elem<W>(old_bits + (cs + (int64_t)sc.pos[i]) * W, sc.newv[i]);
      out.updated = true;
    }
  }
};

template <int W, int MODE>
int encode_impl(uint8_t* old_bits, const uint8_t* new_bits, int64_t n, int log2c, int64_t cb, int64_t ce,
                const uint32_t* freq, uint8_t* table_out, int64_t table_cap, int64_t* table_len,
                uint8_t* data_out, int64_t data_cap, int64_t* data_len, uint64_t* values_hash, int64_t* nchanged,
                bool update_old, int nthreads) {
  RansEncSym enc[256];
  rans_enc_init(enc, freq);
  Encoder<W, MODE> E{old_bits, new_bits, n, log2c, freq, enc, update_old};

  const int64_t nch = ce - cb;
  const int64_t C = (int64_t)1 << log2c;
  const int64_t elems = std::min(n, ce * C) - std::min(n, cb * C);
  int nt = plan_threads(nthreads, nch, elems * W, 2 << 20);
  std::vector<ChunkOut> outs((size_t)nch);
  std::vector<Arena> arenas((size_t)nt);
  std::vector<Scratch<W>> scratch((size_t)nt);
  std::atomic<bool> oom(false);
  parallel_for(nch, nt, [&](int64_t t, int wid) {
    ChunkOut& o = outs[(size_t)t];
    o.worker = wid;
    if (oom.load(std::memory_order_relaxed)) {
      o.err = SS_ENOMEM;
      return;
    }
    try {
      E.encode_chunk(cb + t, o, scratch[(size_t)wid], arenas[(size_t)wid]);
    } catch (...) {
      o.err = SS_ENOMEM;
      oom.store(true);
    }
  });
  scratch.clear();
  scratch.shrink_to_fit();

  auto rollback = [&]() {
    if (!update_old) return;
    parallel_for(nch, nt, [&](int64_t t, int) {
      const ChunkOut& o = outs[(size_t)t];
      if (!o.updated) return;
      const uint8_t* A = arenas[(size_t)o.worker].buf.data();
      const int64_t cs = (cb + t) * C;
      for (int64_t i = 0; i < o.n; ++i) {
        uint32_t p;
        memcpy(&p, A + o.pos_off + 4 * (uint64_t)i, 4);
        memcpy(old_bits + (cs + (int64_t)p) * W, A + o.olds_off + (uint64_t)i * W, W);
      }
    });
  };

  int err = 0;
  for (const ChunkOut& o : outs)
    if (o.err) {
      err = o.err;
      if (err != SS_ENOMEM) break;
    }
  if (err) {
    rollback();
    return err;
  }

  // Sizes and offsets.
  uint64_t tlen = 0, dlen = 0, total_n = 0;
  for (const ChunkOut& o : outs) {
    tlen += (uint64_t)varint_size((uint64_t)o.n);
    if (o.n > 0) tlen += 1 + (uint64_t)varint_size(o.rans_len) + (uint64_t)varint_size(o.bits_len);
    dlen += o.rans_len + o.bits_len;
    total_n += (uint64_t)o.n;
  }
  *table_len = (int64_t)tlen;
  *data_len = (int64_t)dlen;
  *nchanged = (int64_t)total_n;
  if (tlen > (uint64_t)table_cap || dlen > (uint64_t)data_cap) {
    rollback();
    return SS_ECOUNT;
  }

  // Values buffer (contiguous over the whole segment) for values_hash.
  std::unique_ptr<uint8_t[]> vals;
  try {
    vals.reset(new uint8_t[(size_t)std::max<uint64_t>(1, total_n * W)]);
  } catch (...) {
    rollback();
    return SS_ENOMEM;
  }

  // Table (serial) and offsets.
  std::vector<uint64_t> doff((size_t)nch), voff((size_t)nch);
  {
    uint8_t* tp = table_out;
    uint64_t d = 0, v = 0;
    for (int64_t t = 0; t < nch; ++t) {
      const ChunkOut& o = outs[(size_t)t];
      tp = varint_put(tp, (uint64_t)o.n);
      if (o.n > 0) {
        *tp++ = (uint8_t)o.k;
        tp = varint_put(tp, o.rans_len);
        tp = varint_put(tp, o.bits_len);
      }
      doff[(size_t)t] = d;
      voff[(size_t)t] = v;
      d += o.rans_len + o.bits_len;
      v += (uint64_t)o.n * W;
    }
  }
  parallel_for(nch, nt, [&](int64_t t, int) {
    const ChunkOut& o = outs[(size_t)t];
    if (o.n == 0) return;
    const uint8_t* A = arenas[(size_t)o.worker].buf.data();
    memcpy(data_out + doff[(size_t)t], A + o.rans_off, (size_t)o.rans_len);
    memcpy(data_out + doff[(size_t)t] + o.rans_len, A + o.bits_off, (size_t)o.bits_len);
    memcpy(vals.get() + voff[(size_t)t], A + o.vals_off, (size_t)o.n * W);
  });
  arenas.clear();
  *values_hash = tree64(vals.get(), total_n * W, nthreads);
  return SS_OK;
}

template <int MODE>
int encode_w(int w, uint8_t* o, const uint8_t* nw, int64_t n, int log2c, int64_t cb, int64_t ce, const uint32_t* f,
             uint8_t* to, int64_t tc, int64_t* tl, uint8_t* dout, int64_t dc, int64_t* dl, uint64_t* vh, int64_t* nc,
             bool upd, int nt) {
  switch (w) {
    case 1: return encode_impl<1, MODE>(o, nw, n, log2c, cb, ce, f, to, tc, tl, dout, dc, dl, vh, nc, upd, nt);
    case 2: return encode_impl<2, MODE>(o, nw, n, log2c, cb, ce, f, to, tc, tl, dout, dc, dl, vh, nc, upd, nt);
    case 4: return encode_impl<4, MODE>(o, nw, n, log2c, cb, ce, f, to, tc, tl, dout, dc, dl, vh, nc, upd, nt);
    case 8: return encode_impl<8, MODE>(o, nw, n, log2c, cb, ce, f, to, tc, tl, dout, dc, dl, vh, nc, upd, nt);
  }
  return SS_EARG;
}

}  // namespace
}  // namespace ss

SS_EXPORT int ss_encode(uint8_t* old_bits, const uint8_t* new_bits, int64_t n, int w, int mode, int log2c,
                        int64_t chunk_begin, int64_t chunk_end, const uint32_t* freq, uint8_t* table_out,
                        int64_t table_cap, int64_t* table_len, uint8_t* data_out, int64_t data_cap,
                        int64_t* data_len, uint64_t* values_hash, int64_t* nchanged, int update_old, int nthreads) {
  if (n < 0 || n > INT64_MAX / 16 || (w != 1 && w != 2 && w != 4 && w != 8) || (mode != 0 && mode != 1) ||
      log2c < 12 || log2c > 30)
    return SS_EARG;
  if (!freq || !table_len || !data_len || !values_hash || !nchanged || table_cap < 0 || data_cap < 0) return SS_EARG;
  if ((table_cap > 0 && !table_out) || (data_cap > 0 && !data_out)) return SS_EARG;
  const int64_t C = (int64_t)1 << log2c;
  const int64_t nchunks = (n + C - 1) / C;
  if (chunk_begin < 0 || chunk_end < chunk_begin || chunk_end > nchunks) return SS_EARG;
  if (chunk_end > chunk_begin && (!old_bits || !new_bits)) return SS_EARG;
  if (!ss::freq_table_ok(freq)) return SS_ERANS;
  try {
    bool upd = update_old != 0;
    return mode == 0 ? ss::encode_w<0>(w, old_bits, new_bits, n, log2c, chunk_begin, chunk_end, freq, table_out,
                                       table_cap, table_len, data_out, data_cap, data_len, values_hash, nchanged,
                                       upd, nthreads)
                     : ss::encode_w<1>(w, old_bits, new_bits, n, log2c, chunk_begin, chunk_end, freq, table_out,
                                       table_cap, table_len, data_out, data_cap, data_len, values_hash, nchanged,
                                       upd, nthreads);
  } catch (...) {
    return SS_ENOMEM;
  }
}
