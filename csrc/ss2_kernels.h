// Hot loops of the format-2 kernels (FORMAT.md §6). No include guard: format2.cpp includes this file twice, once as
// namespace lv0 (portable code, SSE2 where the compiler targets it) and once as namespace lv1 inside
// `#pragma GCC target` for AVX-512BW + BMI2 (dispatched at run time through ss_simd). Both copies run the same
// algorithm; only the 64-element masks, counts and bit selects use different instructions, so results are
// bit-identical.
//
// Expects SS2_NS (namespace name) and SS2_LV (0 or 1) to be defined, and the types of format2.cpp to be declared.

namespace SS2_NS {

#if SS2_LV == 1 || defined(__POPCNT__)
SS_INLINE int popc(uint64_t x) { return __builtin_popcountll(x); }
#else
// without a popcnt instruction __builtin_popcountll is a library call: inline SWAR instead
SS_INLINE int popc(uint64_t x) {
  x = x - ((x >> 1) & 0x5555555555555555ull);
  x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
  x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0full;
  return (int)((x * 0x0101010101010101ull) >> 56);
}
#endif

// Index of the s-th (0-based) set bit of m; requires s < popcount(m).
SS_INLINE int select64(uint64_t m, uint64_t s) {
#if SS2_LV == 1
  return (int)_tzcnt_u64(_pdep_u64(1ull << s, m));
#else
  int base = 0;
  unsigned c = (unsigned)popc(m & 0xffffffffull);
  if (s >= c) {
    s -= c;
    m >>= 32;
    base = 32;
  }
  c = (unsigned)popc(m & 0xffff);
  if (s >= c) {
    s -= c;
    m >>= 16;
    base += 16;
  }
  c = (unsigned)popc(m & 0xff);
  if (s >= c) {
    s -= c;
    m >>= 8;
    base += 8;
  }
  while (s--) m &= m - 1;
  return base + ctz64(m);
#endif
}

// Bit i set iff elements i of a and b (64 elements each) differ.
template <int W>
SS_INLINE uint64_t diff64(const uint8_t* a, const uint8_t* b) {
#if SS2_LV == 1
  if constexpr (W == 1) {
    return _mm512_cmpneq_epu8_mask(_mm512_loadu_si512(a), _mm512_loadu_si512(b));
  } else if constexpr (W == 2) {
    uint64_t m0 = _mm512_cmpneq_epu16_mask(_mm512_loadu_si512(a), _mm512_loadu_si512(b));
    uint64_t m1 = _mm512_cmpneq_epu16_mask(_mm512_loadu_si512(a + 64), _mm512_loadu_si512(b + 64));
    return m0 | (m1 << 32);
  } else if constexpr (W == 4) {
    uint64_t m = 0;
    for (int i = 0; i < 4; ++i)
      m |= (uint64_t)_mm512_cmpneq_epu32_mask(_mm512_loadu_si512(a + 64 * i), _mm512_loadu_si512(b + 64 * i))
           << (16 * i);
    return m;
  } else {
    uint64_t m = 0;
    for (int i = 0; i < 8; ++i)
      m |= (uint64_t)_mm512_cmpneq_epu64_mask(_mm512_loadu_si512(a + 64 * i), _mm512_loadu_si512(b + 64 * i))
           << (8 * i);
    return m;
  }
#else
  return diff_mask64<W>(a, b);
#endif
}

#if SS2_LV == 1
// The keys of 64 elements as bytes: (x without its sign bit) >> shift < 2^kb <= 256, narrowed by truncation.
template <int W>
SS_INLINE __m512i key_bytes(const uint8_t* p, const Classes& cl) {
  const __m128i sh = _mm_cvtsi32_si128(cl.shift);
  if constexpr (W == 1) {
    // a byte shift through 16-bit lanes: the mask drops the bits shifted in from the neighbouring byte
    return _mm512_and_si512(_mm512_srl_epi16(_mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi8(0x7f)), sh),
                            _mm512_set1_epi8((char)(0xff >> cl.shift)));
  } else if constexpr (W == 2) {
    const __m512i sm = _mm512_set1_epi16(0x7fff);
    const __m256i a = _mm512_cvtepi16_epi8(_mm512_srl_epi16(_mm512_and_si512(_mm512_loadu_si512(p), sm), sh));
    const __m256i b = _mm512_cvtepi16_epi8(_mm512_srl_epi16(_mm512_and_si512(_mm512_loadu_si512(p + 64), sm), sh));
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
  } else if constexpr (W == 4) {
    const __m512i sm = _mm512_set1_epi32(0x7fffffff);
    __m128i q[4];
    for (int i = 0; i < 4; ++i)
      q[i] = _mm512_cvtepi32_epi8(_mm512_srl_epi32(_mm512_and_si512(_mm512_loadu_si512(p + 64 * i), sm), sh));
    const __m512i lo = _mm512_inserti32x4(_mm512_castsi128_si512(q[0]), q[1], 1);
    return _mm512_inserti32x4(_mm512_inserti32x4(lo, q[2], 2), q[3], 3);
  } else {
    const __m512i sm = _mm512_set1_epi64(0x7fffffffffffffffll);
    __m128i q[8];
    for (int i = 0; i < 8; ++i)
      q[i] = _mm512_cvtepi64_epi8(_mm512_srl_epi64(_mm512_and_si512(_mm512_loadu_si512(p + 64 * i), sm), sh));
    __m512i r = _mm512_castsi128_si512(_mm_unpacklo_epi64(q[0], q[1]));
    r = _mm512_inserti32x4(r, _mm_unpacklo_epi64(q[2], q[3]), 1);
    r = _mm512_inserti32x4(r, _mm_unpacklo_epi64(q[4], q[5]), 2);
    return _mm512_inserti32x4(r, _mm_unpacklo_epi64(q[6], q[7]), 3);
  }
}
#endif

// ge[j] bit i set iff key(element i) >= cuts[j], i.e. (x with the sign bit cleared) >= cuts[j] << shift, for the
// 64 elements at p, masked with `valid`.
template <int W>
SS_INLINE void ge_masks(const uint8_t* p, const Classes& cl, uint64_t valid, uint64_t* ge) {
  const int nc = cl.ncut;
#if SS2_LV == 1
  const __m512i keys = key_bytes<W>(p, cl);
  for (int j = 0; j < nc; ++j) ge[j] = _mm512_cmpge_epu8_mask(keys, _mm512_set1_epi8((char)cl.cut8[j])) & valid;
#else
#if defined(__SSE2__) && !defined(SS_BIG_ENDIAN) && !defined(SS_PORTABLE)
  // the sign bit is cleared, so signed compares are unsigned ones; thr >= 1 so thr - 1 >= 0
  if constexpr (W == 1) {
    const __m128i sm = _mm_set1_epi8(0x7f);
    __m128i v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm_and_si128(_mm_loadu_si128((const __m128i*)(p + 16 * i)), sm);
    for (int j = 0; j < nc; ++j) {
      const __m128i t = _mm_set1_epi8((char)(cl.thr[j] - 1));
      uint64_t m = 0;
      for (int i = 0; i < 4; ++i) m |= (uint64_t)(uint32_t)_mm_movemask_epi8(_mm_cmpgt_epi8(v[i], t)) << (16 * i);
      ge[j] = m & valid;
    }
    return;
  } else if constexpr (W == 2) {
    const __m128i sm = _mm_set1_epi16(0x7fff);
    __m128i v[8];
    for (int i = 0; i < 8; ++i) v[i] = _mm_and_si128(_mm_loadu_si128((const __m128i*)(p + 16 * i)), sm);
    for (int j = 0; j < nc; ++j) {
      const __m128i t = _mm_set1_epi16((short)(cl.thr[j] - 1));
      uint64_t m = 0;
      for (int i = 0; i < 4; ++i) {
        __m128i e = _mm_packs_epi16(_mm_cmpgt_epi16(v[2 * i], t), _mm_cmpgt_epi16(v[2 * i + 1], t));
        m |= (uint64_t)(uint32_t)_mm_movemask_epi8(e) << (16 * i);
      }
      ge[j] = m & valid;
    }
    return;
  } else if constexpr (W == 4) {
    const __m128i sm = _mm_set1_epi32(0x7fffffff);
    __m128i v[16];
    for (int i = 0; i < 16; ++i) v[i] = _mm_and_si128(_mm_loadu_si128((const __m128i*)(p + 16 * i)), sm);
    for (int j = 0; j < nc; ++j) {
      const __m128i t = _mm_set1_epi32((int)(cl.thr[j] - 1));
      uint64_t m = 0;
      for (int i = 0; i < 4; ++i) {
        __m128i a = _mm_packs_epi32(_mm_cmpgt_epi32(v[4 * i], t), _mm_cmpgt_epi32(v[4 * i + 1], t));
        __m128i b = _mm_packs_epi32(_mm_cmpgt_epi32(v[4 * i + 2], t), _mm_cmpgt_epi32(v[4 * i + 3], t));
        m |= (uint64_t)(uint32_t)_mm_movemask_epi8(_mm_packs_epi16(a, b)) << (16 * i);
      }
      ge[j] = m & valid;
    }
    return;
  }
#endif
  typedef typename UInt<W>::T T;
  constexpr T sm = (T)((T)~(T)0 >> 1);  // sign bit cleared (cast first: ~ promotes to int)
  T v[64];
  for (int i = 0; i < 64; ++i) v[i] = (T)(load_elem<W>(p + i * W) & sm);
  for (int j = 0; j < nc; ++j) {
    const T t = (T)cl.thr[j];
    uint64_t m = 0;
    for (int i = 0; i < 64; ++i) m |= (uint64_t)(v[i] >= t) << i;
    ge[j] = m & valid;
  }
#endif
}

// ---------------------------------------------------------------- scan (fine blocks [b0, b1))
// pieces (if not NULL): changed elements per piece, added atomically (tasks share pieces at their borders).
// pout (if not NULL, room for every element of the blocks): the space indices of the changed elements, ascending.
// Returns the number of indices written to pout (0 without pout).
template <int W, int MODE>
int64_t scan_blocks(const SpaceRef& O, const uint64_t* nptrs, const Classes& cl, int64_t b0, int64_t b1,
                    uint32_t* counts, uint64_t* hist, uint64_t* keys, int64_t* pieces, int64_t* pout) {
  int64_t* const pout0 = pout;
  typedef typename UInt<W>::T T;
  alignas(64) uint8_t to[64 * W];
  alignas(64) uint8_t tn[64 * W];
  const int64_t n = O.n;
  int64_t c0 = locate(O.offs, O.np, b0 * kFineBlock), c1 = c0;
  const int kb = cl.kb, sh = cl.shift;
  const uint64_t km = low_mask(kb);
  int64_t pc_t = c0, pc_n = 0;  // changed elements counted for piece pc_t, not yet added to pieces[]
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t s = blk * kFineBlock, e = std::min(n, s + kFineBlock);
    uint32_t c = 0;
    const bool sample = (blk & 15) == 0;
    for (int64_t v = s; v < e; v += 64) {
      const int cnt = (int)std::min<int64_t>(64, e - v);
      const uint8_t* po = fetch64<W>(O.ptrs, O.offs, c0, v, cnt, to);
      const uint8_t* pn = fetch64<W>(nptrs, O.offs, c1, v, cnt, tn);
      uint64_t dm = diff64<W>(po, pn);
      if (cnt < 64) dm &= low_mask(cnt);
      const int nd = popc(dm);
      c += (uint32_t)nd;
      if (pieces && dm) {
        if (v + cnt <= O.offs[c0 + 1]) {  // the whole block lies in piece c0
          if (c0 != pc_t) {
            if (pc_n) __atomic_fetch_add(&pieces[pc_t], pc_n, __ATOMIC_RELAXED);
            pc_t = c0;
            pc_n = 0;
          }
          pc_n += nd;
        } else {
          for (uint64_t m = dm; m; m &= m - 1) {
            const int64_t x = v + ctz64(m);
            if (x >= O.offs[pc_t + 1] || x < O.offs[pc_t]) {
              if (pc_n) __atomic_fetch_add(&pieces[pc_t], pc_n, __ATOMIC_RELAXED);
              pc_t = piece_near(O.offs, O.np, x, pc_t);
              pc_n = 0;
            }
            ++pc_n;
          }
        }
      }
      if (pout) {
        for (uint64_t m = dm; m; m &= m - 1) *pout++ = v + ctz64(m);
      }
      while (dm) {
        const int i = ctz64(dm);
        dm &= dm - 1;
        const T ov = load_elem<W>(po + i * W), nv = load_elem<W>(pn + i * W);
        const int sym = MODE == 0 ? delta_symbol_only<W>(ov, nv) : (int)((uint64_t)nv >> (8 * W - 8));
        const uint64_t key = kb ? (((uint64_t)ov >> sh) & km) : 0;
        ++hist[key * 256 + (uint64_t)sym];
      }
      if (sample) {
        if (kb) {
          for (int i = 0; i < cnt; ++i) ++keys[((uint64_t)load_elem<W>(po + i * W) >> sh) & km];
        } else {
          keys[0] += (uint64_t)cnt;
        }
      }
    }
    counts[blk] = c;
  }
  if (pieces && pc_n) __atomic_fetch_add(&pieces[pc_t], pc_n, __ATOMIC_RELAXED);
  return pout ? (int64_t)(pout - pout0) : 0;
}

// ---------------------------------------------------------------- encode pass 1 (one chunk)
// Finds the chunk's changed elements with their classes and class ranks, appends them to wk.recs, adds every coded
// gap's cost to wk.cost (first and later gaps of the changed elements; final gaps of every class when the chunk has
// changes: only present classes' costs are used later), writes the chunk's class totals. Returns 0 or SS_ERANS.
template <int W, int MODE>
int enc_chunk(const EncCtx& E, int64_t j, EncWorker<W>& wk, uint32_t* totals, int64_t* nout) {
  typedef typename UInt<W>::T T;
  const int64_t C = (int64_t)1 << E.log2c;
  const int64_t cs = E.start + j * C, clen = std::min(C, E.end - cs);
  const Classes& cl = E.cl;
  const int K = cl.K, nc = cl.ncut;
  alignas(64) uint8_t to[64 * W];
  alignas(64) uint8_t tn[64 * W];
  int64_t c0 = locate(E.O.offs, E.O.np, cs), c1 = c0;
  uint64_t G[kMaxClasses];
  int64_t last[kMaxClasses];
  uint64_t ge[kMaxClasses];
  for (int c = 0; c < K; ++c) {
    G[c] = 0;
    last[c] = -1;
  }
  int64_t nch = 0;
  for (int64_t b = 0; b < clen; b += 64) {
    const int cnt = (int)std::min<int64_t>(64, clen - b);
    const uint64_t valid = low_mask(cnt);
    const uint8_t* po = fetch64<W>(E.O.ptrs, E.O.offs, c0, cs + b, cnt, to);
    const uint8_t* pn = fetch64<W>(E.nptrs, E.O.offs, c1, cs + b, cnt, tn);
    uint64_t dm = diff64<W>(po, pn) & valid;
    if (nc) ge_masks<W>(po, cl, valid, ge);
    while (dm) {
      const int i = ctz64(dm);
      dm &= dm - 1;
      const T ov = load_elem<W>(po + i * W), nv = load_elem<W>(pn + i * W);
      const int c = cl.of((uint64_t)ov);
      uint64_t rank;
      if (nc == 0) {
        rank = (uint64_t)(b + i);
      } else {
        const uint64_t below = low_mask(i);
        const uint64_t lo = c == 0 ? (uint64_t)(b + i) : G[c - 1] + (uint64_t)popc(ge[c - 1] & below);
        const uint64_t hi = c == nc ? 0 : G[c] + (uint64_t)popc(ge[c] & below);
        rank = lo - hi;
      }
      const int sym = MODE == 0 ? delta_symbol_only<W>(ov, nv) : (int)((uint64_t)nv >> (8 * W - 8));
      if (SS_UNLIKELY(E.freqs[c * 256 + sym] == 0)) return SS_ERANS;
      const uint64_t gap = last[c] < 0 ? rank : rank - (uint64_t)last[c] - 1;
      last[c] = (int64_t)rank;
      wk.add_gap(c, gap);
      wk.present |= 1u << c;
      Rec<W> r;
      r.set(b + i, rank, gap, c, sym, nv, ov);
      wk.recs.push_back(r);
      ++nch;
    }
    for (int q = 0; q < nc; ++q) G[q] += (uint64_t)popc(ge[q]);
  }
  for (int c = 0; c < K; ++c) {
    const uint64_t a0 = c == 0 ? (uint64_t)clen : G[c - 1];
    const uint64_t a1 = c == nc ? 0 : G[c];
    totals[c] = (uint32_t)(a0 - a1);
  }
  if (nch)
    for (int c = 0; c < K; ++c) wk.add_gap(c, last[c] < 0 ? totals[c] : totals[c] - (uint64_t)last[c] - 1);
  *nout = nch;
  return SS_OK;
}

// ---------------------------------------------------------------- encode pass 1 from known positions (one chunk)
// Gap costs of one chunk (the Rice rule needs, per class, how many gaps have bit j set, EncWorker::bits): with
// AVX-512 as 32 u32 counters per class, one masked add per 16 bits and no branch per set bit (gaps < 2^30, and a
// chunk has fewer than 2^32 gaps), folded into the worker's counters at the end of the chunk.
struct ChunkGaps {
#if SS2_LV == 1
  alignas(64) uint32_t cnt[kMaxClasses][32];
#endif
  uint64_t ngaps[kMaxClasses];
  int K;
  explicit ChunkGaps(int k) : K(k) {
    for (int c = 0; c < K; ++c) {
#if SS2_LV == 1
      _mm512_store_si512(cnt[c], _mm512_setzero_si512());
      _mm512_store_si512(cnt[c] + 16, _mm512_setzero_si512());
#endif
      ngaps[c] = 0;
    }
  }
  template <int W>
  SS_INLINE void add(EncWorker<W>& wk, int c, uint64_t g) {
    ++ngaps[c];
#if SS2_LV == 1
    (void)wk;
    const __m512i one = _mm512_set1_epi32(1);
    const __m512i a = _mm512_load_si512(cnt[c]), b = _mm512_load_si512(cnt[c] + 16);
    _mm512_store_si512(cnt[c], _mm512_mask_add_epi32(a, (__mmask16)g, a, one));
    _mm512_store_si512(cnt[c] + 16, _mm512_mask_add_epi32(b, (__mmask16)(g >> 16), b, one));
#else
    uint64_t* bb = wk.bits + c * 64;
    for (; g; g &= g - 1) ++bb[ctz64(g)];
#endif
  }
  template <int W>
  void flush(EncWorker<W>& wk) {
    for (int c = 0; c < K; ++c) {
      if (!ngaps[c]) continue;
      wk.ngaps[c] += ngaps[c];
#if SS2_LV == 1
      for (int j = 0; j < 32; ++j) wk.bits[c * 64 + j] += cnt[c][j];
#endif
    }
  }
};

// The context part of enc_chunk_pos (cuts given): walks every 64-element block of the chunk for the class counts;
// blocks without a change only add to them. NCMAX >= ncut bounds the unrolled loops over cuts, so that the running
// counts live in registers.
template <int W, int MODE, int NCMAX>
SS_INLINE int enc_ctx_pos(const EncCtx& E, int64_t cs, int64_t clen, const int64_t* P, int64_t np, Rec<W>* R,
                          EncWorker<W>& wk, uint32_t* totals, ChunkGaps& cg) {
  typedef typename UInt<W>::T T;
  const Classes& cl = E.cl;
  const int K = cl.K, nc = cl.ncut;
  const int64_t* offs = E.O.offs;
  const uint64_t* optr = E.O.ptrs;
  const uint64_t* nptr = E.nptrs;
  constexpr int64_t kAhead = 64;
  alignas(64) uint8_t to[64 * W];
  uint64_t G[NCMAX];  // elements with key >= cuts[q] in the blocks so far (this block included)
  uint64_t Gm[NCMAX + 1], ge[NCMAX + 1];  // copies for the changes' dynamic class indices
  int64_t last[kMaxClasses];
#pragma GCC unroll 32
  for (int q = 0; q < NCMAX; ++q) G[q] = 0;
  for (int c = 0; c < K; ++c) last[c] = -1;
#if SS2_LV == 1
  __m512i cv[NCMAX];
#pragma GCC unroll 32
  for (int q = 0; q < NCMAX; ++q) cv[q] = _mm512_set1_epi8((char)(q < nc ? cl.cut8[q] : 0));
#endif
  uint32_t present = 0;
  int64_t c0 = locate(offs, E.O.np, cs), tn = c0, ta = c0;
  for (int64_t i = 0; i < std::min(np, kAhead); ++i) {
    const int64_t va = P[i];
    while (va >= offs[ta + 1]) ++ta;
    __builtin_prefetch((const uint8_t*)(uintptr_t)nptr[ta] + (va - offs[ta]) * W, 0, 3);
  }
  int64_t q = 0;
  int64_t next = P[0];  // the next change
  for (int64_t b = 0; b < clen; b += 64) {
    const int cnt = (int)std::min<int64_t>(64, clen - b);
    const uint64_t valid = low_mask(cnt);
    const uint8_t* po = fetch64<W>(optr, offs, c0, cs + b, cnt, to);
    const int64_t bend = cs + b + cnt;
#if SS2_LV == 1
    const __m512i keys = key_bytes<W>(po, cl);
    if (next >= bend) {  // no change in the block: class counts only
#pragma GCC unroll 32
      for (int qq = 0; qq < NCMAX; ++qq)
        if (qq < nc) G[qq] += (uint64_t)popc(_mm512_mask_cmpge_epu8_mask((__mmask64)valid, keys, cv[qq]));
      continue;
    }
#pragma GCC unroll 32
    for (int qq = 0; qq < NCMAX; ++qq)
      if (qq < nc) {
        ge[qq] = _mm512_mask_cmpge_epu8_mask((__mmask64)valid, keys, cv[qq]);
        G[qq] += (uint64_t)popc(ge[qq]);
        Gm[qq] = G[qq];
      }
#else
    ge_masks<W>(po, cl, valid, ge);
#pragma GCC unroll 32
    for (int qq = 0; qq < NCMAX; ++qq)
      if (qq < nc) {
        G[qq] += (uint64_t)popc(ge[qq]);
        Gm[qq] = G[qq];
      }
    if (next >= bend) continue;
#endif
    for (; q < np && P[q] < bend; ++q) {
      if (q + kAhead < np) {
        const int64_t va = P[q + kAhead];
        while (va >= offs[ta + 1]) ++ta;
        __builtin_prefetch((const uint8_t*)(uintptr_t)nptr[ta] + (va - offs[ta]) * W, 0, 3);
      }
      const int64_t v = P[q];
      const int i = (int)(v - cs - b);
      while (v >= offs[tn + 1]) ++tn;
      const T ov = load_elem<W>(po + i * W);
      const T nv = load_elem<W>((const uint8_t*)(uintptr_t)nptr[tn] + (v - offs[tn]) * W);
      if (SS_UNLIKELY(ov == nv)) return SS_ECOUNT;
      const int c = cl.of((uint64_t)ov);
      // rank among the chunk's class-c elements: (elements with key >= cuts[c-1]) - (key >= cuts[c]) before i,
      // from the counts including this block minus the block's elements at or after i
      const uint64_t after = ~low_mask(i);
      const uint64_t lo = c == 0 ? (uint64_t)(b + i) : Gm[c - 1] - (uint64_t)popc(ge[c - 1] & after);
      const uint64_t hi = c == nc ? 0 : Gm[c] - (uint64_t)popc(ge[c] & after);
      const uint64_t rank = lo - hi;
      const int sym = MODE == 0 ? delta_symbol_only<W>(ov, nv) : (int)((uint64_t)nv >> (8 * W - 8));
      if (SS_UNLIKELY(E.freqs[c * 256 + sym] == 0)) return SS_ERANS;
      const uint64_t gap = last[c] < 0 ? rank : rank - (uint64_t)last[c] - 1;
      last[c] = (int64_t)rank;
      cg.add(wk, c, gap);
      present |= 1u << c;
      R[q].set(b + i, rank, gap, c, sym, nv, ov);
    }
    next = q < np ? P[q] : INT64_MAX;
  }
#pragma GCC unroll 32
  for (int qq = 0; qq < NCMAX; ++qq)
    if (qq < nc) Gm[qq] = G[qq];
  for (int c = 0; c < K; ++c) {
    const uint64_t a0 = c == 0 ? (uint64_t)clen : Gm[c - 1];
    const uint64_t a1 = c == nc ? 0 : Gm[c];
    totals[c] = (uint32_t)(a0 - a1);
    cg.add(wk, c, last[c] < 0 ? totals[c] : totals[c] - (uint64_t)last[c] - 1);
  }
  cg.flush(wk);
  wk.present |= present;
  return SS_OK;
}

// P[0..np) (np >= 1): the space indices of the chunk's changed elements, strictly increasing and inside the chunk
// (checked by the caller). Fills R[0..np) and adds the same gap costs as enc_chunk; writes the chunk's class totals.
// Reads new only at P; old only at P without cuts, and over the whole chunk with cuts (ranks within a class need the
// class of every element before the change). Returns 0, SS_ECOUNT (an element of P is not changed) or SS_ERANS.
template <int W, int MODE>
int enc_chunk_pos(const EncCtx& E, int64_t j, const int64_t* P, int64_t np, Rec<W>* R, EncWorker<W>& wk,
                  uint32_t* totals) {
  typedef typename UInt<W>::T T;
  const int64_t C = (int64_t)1 << E.log2c;
  const int64_t cs = E.start + j * C, clen = std::min(C, E.end - cs);
  const Classes& cl = E.cl;
  const int K = cl.K, nc = cl.ncut;
  const int64_t* offs = E.O.offs;
  const uint64_t* optr = E.O.ptrs;
  const uint64_t* nptr = E.nptrs;
  constexpr int64_t kAhead = 64;  // software prefetch distance (independent misses instead of a chain)
  ChunkGaps cg(K);
  if (nc == 0) {
    int64_t t = locate(offs, E.O.np, P[0]), ta = t;
    for (int64_t i = 0; i < std::min(np, kAhead); ++i) {
      const int64_t va = P[i];
      while (va >= offs[ta + 1]) ++ta;
      const int64_t o = (va - offs[ta]) * W;
      __builtin_prefetch((const uint8_t*)(uintptr_t)optr[ta] + o, 0, 3);
      __builtin_prefetch((const uint8_t*)(uintptr_t)nptr[ta] + o, 0, 3);
    }
    const uint32_t* freqs = E.freqs;
    int64_t last = -1;
#if SS2_LV == 1
    // class 0's gap bit counters in registers (no store-to-load chain through cg.cnt)
    const __m512i one = _mm512_set1_epi32(1);
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
#endif
    for (int64_t i = 0; i < np; ++i) {
      if (i + kAhead < np) {
        const int64_t va = P[i + kAhead];
        while (va >= offs[ta + 1]) ++ta;
        const int64_t o = (va - offs[ta]) * W;
        __builtin_prefetch((const uint8_t*)(uintptr_t)optr[ta] + o, 0, 3);
        __builtin_prefetch((const uint8_t*)(uintptr_t)nptr[ta] + o, 0, 3);
      }
      const int64_t v = P[i];
      while (v >= offs[t + 1]) ++t;
      const int64_t o = (v - offs[t]) * W;
      const T ov = load_elem<W>((const uint8_t*)(uintptr_t)optr[t] + o);
      const T nv = load_elem<W>((const uint8_t*)(uintptr_t)nptr[t] + o);
      if (SS_UNLIKELY(ov == nv)) return SS_ECOUNT;
      const int sym = MODE == 0 ? delta_symbol_only<W>(ov, nv) : (int)((uint64_t)nv >> (8 * W - 8));
      if (SS_UNLIKELY(freqs[sym] == 0)) return SS_ERANS;
      const int64_t p = v - cs;
      const uint64_t gap = (uint64_t)(p - last - 1);
      last = p;
#if SS2_LV == 1
      acc0 = _mm512_mask_add_epi32(acc0, (__mmask16)gap, acc0, one);
      acc1 = _mm512_mask_add_epi32(acc1, (__mmask16)(gap >> 16), acc1, one);
#else
      cg.add(wk, 0, gap);
#endif
      Rec<W>& r = R[i];
      r.pos = (uint32_t)p;
      r.rank = (uint32_t)p;
      r.gap = (uint32_t)gap;
      r.cls = 0;
      r.sym = (uint8_t)sym;
      r.newv = nv;
      r.oldv = ov;
    }
    totals[0] = (uint32_t)clen;
#if SS2_LV == 1
    _mm512_store_si512(cg.cnt[0], acc0);
    _mm512_store_si512(cg.cnt[0] + 16, acc1);
    cg.ngaps[0] = (uint64_t)np;
#endif
    cg.add(wk, 0, (uint64_t)(clen - last - 1));
    cg.flush(wk);
    wk.present |= 1u;
    return SS_OK;
  }
#if SS2_LV == 1
  if (nc <= 8) return enc_ctx_pos<W, MODE, 8>(E, cs, clen, P, np, R, wk, totals, cg);
  if (nc <= 16) return enc_ctx_pos<W, MODE, 16>(E, cs, clen, P, np, R, wk, totals, cg);
#endif
  return enc_ctx_pos<W, MODE, kMaxClasses - 1>(E, cs, clen, P, np, R, wk, totals, cg);
}

// ---------------------------------------------------------------- decode (one chunk with n > 0)
template <int W, int MODE>
SS_INLINE typename UInt<W>::T dec_value(int s, uint64_t extra, typename UInt<W>::T oldv) {
  typedef typename UInt<W>::T T;
  constexpr int B = 8 * W;
  if (MODE == 1) return (T)(((uint64_t)s << (B - 8)) | extra);
  uint64_t m;
  unsigned neg;
  if (s < 16) {
    m = (uint64_t)(s >> 1) + 1;
    neg = (unsigned)(s & 1);
  } else {
    const int nb = s - 12;
    neg = (unsigned)(extra & 1);
    m = (1ull << (nb - 1)) | (extra >> 1);
  }
  const T d = neg ? (T)(T(0) - (T)m) : (T)m;
  return MODE == 0 ? (T)(oldv + d) : d;
}

template <int W, int MODE>
SS_INLINE int dec_nextra(int s) {
  return MODE == 1 ? 8 * W - 8 : (s < 16 ? 0 : s - 12);
}

#if SS2_LV == 1
// ge masks of ge_masks() as u64 lanes: H[v] lane i = mask of cut 8v+i (0 for lanes >= ncut), not yet masked with
// the valid elements. Built in registers (masked broadcasts), so the vector class counts below do not wait for
// scalar stores.
template <int W, int NV>
SS_INLINE void ge_vec(const uint8_t* p, const Classes& cl, __m512i* H) {
  const int nc = cl.ncut;
  const __m512i keys = key_bytes<W>(p, cl);
  for (int vv = 0; vv < NV; ++vv) {
    const int jend = std::min(nc, 8 * vv + 8);
    for (int j = 8 * vv; j < jend; ++j) {
      const uint64_t m = _mm512_cmpge_epu8_mask(keys, _mm512_set1_epi8((char)cl.cut8[j]));
      H[vv] = _mm512_mask_set1_epi64(H[vv], (__mmask8)(1u << (j & 7)), (long long)m);
    }
  }
}

// Population count of each u64 lane (AVX-512BW only: nibble table + sum of absolute differences).
SS_INLINE __m512i popcnt_epi64(__m512i x) {
  const __m512i lut = _mm512_set_epi8(4, 3, 3, 2, 3, 2, 2, 1, 3, 2, 2, 1, 2, 1, 1, 0, 4, 3, 3, 2, 3, 2, 2, 1, 3, 2, 2, 1,
                                      2, 1, 1, 0, 4, 3, 3, 2, 3, 2, 2, 1, 3, 2, 2, 1, 2, 1, 1, 0, 4, 3, 3, 2, 3, 2, 2, 1,
                                      3, 2, 2, 1, 2, 1, 1, 0);
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  const __m512i lo = _mm512_and_si512(x, low4);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), low4);
  const __m512i cnt = _mm512_add_epi8(_mm512_shuffle_epi8(lut, lo), _mm512_shuffle_epi8(lut, hi));
  return _mm512_sad_epu8(cnt, _mm512_setzero_si512());
}
#endif

// Context path (cuts given): walks every element of the chunk in blocks of 64 (FORMAT.md §6.4). Per class c:
// s[c] = class-c elements still to skip before its next change (absent classes: a huge value, never reached).
// Block masks: A[0] = valid elements, A[1 + j] = elements with key >= cuts[j], A[K] = 0, so class c's elements are
// A[c] & ~A[c + 1].
template <int W, int MODE, int NV>
int dec_chunk_ctx(const DecCtx& D, const DChunk& e) {
  typedef typename UInt<W>::T T;
  const int64_t C = (int64_t)1 << D.log2c;
  const int64_t cs = D.start + e.j * C, clen = std::min(C, D.end - cs);
  const Classes& cl = D.cl;
  const int K = cl.K, np = D.npres;
  (void)K;
  if (e.rl < 4) return SS_ESTREAM;
  RansDec r{load_u32(D.seg + e.data_off), 4, D.seg + e.data_off, e.rl};
  const uint8_t* bits = D.seg + e.data_off + e.rl;
  BitReader br(bits, e.bl);
  const uint64_t total = e.bl * 8;
  constexpr uint64_t kAbsent = (uint64_t)1 << 62;
  alignas(64) uint64_t s[kMaxClasses + 8];
  alignas(64) uint64_t A[kMaxClasses + 16];
  uint64_t cm[kMaxClasses];
  int cand[kMaxClasses];
  for (int c = 0; c < kMaxClasses + 8; ++c) s[c] = kAbsent;
  for (int c = 0; c < kMaxClasses + 16; ++c) A[c] = 0;
  for (int q = 0; q < np; ++q) {
    const int c = D.pcls[q];
    int rc = read_gap(br, total, D.ck[c], (uint64_t)clen >> D.ck[c], &s[c]);
    if (rc) return rc;
  }
#if SS2_LV == 1
  constexpr int nv = NV;  // (K + 7) / 8
  __m512i S[NV];  // s[] in registers (scalar s[] is written back only around blocks with changes)
  for (int v = 0; v < nv; ++v) S[v] = _mm512_load_si512(s + 8 * v);
#endif
  const int64_t n = e.n;
  int64_t found = 0;
  int64_t* I = D.idx_out + e.out_off;
  uint8_t* V = D.val_out + (uint64_t)e.out_off * W;
  alignas(64) uint8_t tmp[64 * W];
  int64_t cur = locate(D.O.offs, D.O.np, cs);
  for (int64_t b = 0; b < clen; b += 64) {
    const int cnt = (int)std::min<int64_t>(64, clen - b);
    const uint64_t valid = low_mask(cnt);
    const uint8_t* po = fetch64<W>(D.O.ptrs, D.O.offs, cur, cs + b, cnt, tmp);
    uint32_t act = 0;
#if SS2_LV == 1
    __m512i H[NV];
    for (int v = 0; v < nv; ++v) H[v] = _mm512_setzero_si512();
    ge_vec<W, NV>(po, cl, H);
    const __m512i vvalid = _mm512_set1_epi64((long long)valid);
    __m512i prev = vvalid;
    for (int v = 0; v < nv; ++v) {
      const __m512i hi = _mm512_and_si512(H[v], vvalid);
      const __m512i lo = _mm512_alignr_epi64(hi, prev, 7);
      prev = hi;
      H[v] = hi;
      const __m512i pc = popcnt_epi64(_mm512_andnot_si512(hi, lo));
      const __mmask8 h = _mm512_cmplt_epu64_mask(S[v], pc);
      S[v] = _mm512_mask_sub_epi64(S[v], (__mmask8)~h, S[v], pc);
      act |= (uint32_t)h << (8 * v);
    }
    const uint32_t hits = act;
    if (act) {
      A[0] = valid;
      for (int v = 0; v < nv; ++v) {
        _mm512_storeu_si512(A + 1 + 8 * v, H[v]);
        _mm512_store_si512(s + 8 * v, S[v]);
      }
    }
    for (uint32_t a = act; a; a &= a - 1) {
      const int c = ctz64(a);
      cm[c] = A[c] & ~A[c + 1];
      cand[c] = select64(cm[c], s[c]);
    }
#else
    ge_masks<W>(po, cl, valid, A + 1);
    A[0] = valid;
    for (int q = 0; q < np; ++q) {
      const int c = D.pcls[q];
      const uint64_t m = A[c] & ~A[c + 1];
      const uint64_t pc = (uint64_t)popc(m);
      if (s[c] >= pc) {
        s[c] -= pc;
      } else {
        cm[c] = m;
        cand[c] = select64(m, s[c]);
        act |= 1u << c;
      }
    }
#endif
    while (act) {
      int bc = ctz64(act), best = cand[bc];
      for (uint32_t a = act & (act - 1); a; a &= a - 1) {
        const int c = ctz64(a);
        if (cand[c] < best) {
          best = cand[c];
          bc = c;
        }
      }
      if (SS_UNLIKELY(found == n)) return SS_ECOUNT;
      int sym;
      int rc = rans_step(r, D.cinfo[bc], &sym);
      if (rc) return rc;
      const int ne = dec_nextra<W, MODE>(sym);
      if (br.bitpos + (uint64_t)ne > total) return SS_ESTREAM;
      const uint64_t extra = br.get_long(ne);
      const T ov = load_elem<W>(po + best * W);
      I[found] = cs + b + best;
      store_elem<W>(V + (uint64_t)found * W, dec_value<W, MODE>(sym, extra, ov));
      ++found;
      uint64_t g;
      const int k = D.ck[bc];
      rc = read_gap(br, total, k, (uint64_t)clen >> k, &g);
      if (rc) return rc;
      const uint64_t m = cm[bc] & ~((2ull << best) - 1);
      const uint64_t pc = (uint64_t)popc(m);
      if (g >= pc) {
        s[bc] = g - pc;
        act &= ~(1u << bc);
      } else {
        s[bc] = g;
        cm[bc] = m;
        cand[bc] = select64(m, g);
      }
    }
#if SS2_LV == 1
    for (int v = 0; v < nv; ++v)
      for (uint32_t a = (hits >> (8 * v)) & 0xff; a; a &= a - 1) {
        const int l = ctz64(a);
        S[v] = _mm512_mask_set1_epi64(S[v], (__mmask8)(1u << l), (long long)s[8 * v + l]);
      }
#endif
  }
#if SS2_LV == 1
  for (int v = 0; v < nv; ++v) _mm512_store_si512(s + 8 * v, S[v]);
#endif
  for (int q = 0; q < np; ++q)
    if (s[D.pcls[q]] != 0) return SS_EPOS;
  if (found != n) return SS_ECOUNT;
  if (total - br.bitpos >= 8) return SS_ESTREAM;
  if (br.bitpos < total && (bits[e.bl - 1] >> (br.bitpos & 7)) != 0) return SS_ESTREAM;
  if (r.x != kRansL || r.rp != r.rl) return SS_ERANS;
  return SS_OK;
}

// Order-0 path (no cuts: one class, every element): positions follow from the gaps; base values are read only for
// the changed elements in delta mode.
template <int W, int MODE>
int dec_chunk_plain(const DecCtx& D, const DChunk& e) {
  typedef typename UInt<W>::T T;
  const int64_t C = (int64_t)1 << D.log2c;
  const int64_t cs = D.start + e.j * C, clen = std::min(C, D.end - cs);
  if (e.rl < 4) return SS_ESTREAM;
  RansDec r{load_u32(D.seg + e.data_off), 4, D.seg + e.data_off, e.rl};
  const uint8_t* bits = D.seg + e.data_off + e.rl;
  BitReader br(bits, e.bl);
  const uint64_t total = e.bl * 8;
  const int k = D.pk[0];
  const uint64_t limit = (uint64_t)clen >> k;
  const uint32_t* info = D.info;
  uint64_t p;
  int rc = read_gap(br, total, k, limit, &p);
  if (rc) return rc;
  const int64_t n = e.n;
  int64_t* I = D.idx_out + e.out_off;
  uint8_t* V = D.val_out + (uint64_t)e.out_off * W;
  const int64_t* offs = D.O.offs;
  int64_t tp = MODE == 0 ? locate(offs, D.O.np, cs) : 0;
  for (int64_t i = 0; i < n; ++i) {
    if (p >= (uint64_t)clen) return p == (uint64_t)clen ? SS_ECOUNT : SS_EPOS;
    if (MODE == 0) {  // the base value is added in a second pass: fetch it now
      const int64_t v = cs + (int64_t)p;
      while (v >= offs[tp + 1]) ++tp;
      __builtin_prefetch((const uint8_t*)(uintptr_t)D.O.ptrs[tp] + (v - offs[tp]) * W, 0, 3);
    }
    int sym;
    rc = rans_step(r, info, &sym);
    if (rc) return rc;
    const int ne = dec_nextra<W, MODE>(sym);
    if (br.bitpos + (uint64_t)ne > total) return SS_ESTREAM;
    const uint64_t extra = br.get_long(ne);
    I[i] = cs + (int64_t)p;
    // delta: the difference for now, the base values are added below (independent loads instead of a chain)
    store_elem<W>(V + (uint64_t)i * W, dec_value<W, MODE == 1 ? 1 : 2>(sym, extra, 0));
    uint64_t g;
    rc = read_gap(br, total, k, limit, &g);
    if (rc) return rc;
    p += g + 1;
  }
  if (p != (uint64_t)clen) return p > (uint64_t)clen ? SS_EPOS : SS_ECOUNT;
  if (total - br.bitpos >= 8) return SS_ESTREAM;
  if (br.bitpos < total && (bits[e.bl - 1] >> (br.bitpos & 7)) != 0) return SS_ESTREAM;
  if (r.x != kRansL || r.rp != r.rl) return SS_ERANS;
  if (MODE == 0) {
    int64_t t = locate(offs, D.O.np, cs);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = I[i];
      while (v >= offs[t + 1]) ++t;
      const uint8_t* src = (const uint8_t*)(uintptr_t)D.O.ptrs[t] + (v - offs[t]) * W;
      store_elem<W>(V + (uint64_t)i * W, (T)(load_elem<W>(src) + load_elem<W>(V + (uint64_t)i * W)));
    }
  }
  return SS_OK;
}

}  // namespace SS2_NS
