// Format-2 kernels (FORMAT.md §6): spaces (all tensors of one dtype as one flat array, passed as pieces), class
// (context) coding of sparse segments, and the space versions of scatter / gather / put / take, plus tree64 of many
// buffers at once. The hot loops live in ss2_kernels.h, compiled twice (portable and AVX-512BW + BMI2).
//
// A space is (ptrs, offs, npieces): piece t holds space elements [offs[t], offs[t+1]) at address ptrs[t];
// offs[0] = 0, offs non-decreasing, N = offs[npieces]. A virtual element is located by binary search on offs, and
// sequential walks keep a piece cursor, so the cost of a call does not depend on the number of pieces beyond one
// binary search per chunk / thread range.
#include <stdlib.h>

#include <memory>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "ss_coder.h"
#include "ss_diff.h"
#include "ss_hd.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(SS_PORTABLE)
#define SS2_HAVE_LV1 1
#include <immintrin.h>
#endif

namespace ss {
namespace f2 {

constexpr int kMaxClasses = 32;

struct SpaceRef {
  const uint64_t* ptrs;
  const int64_t* offs;
  int64_t np;
  int64_t n;
};

// Piece holding element i (0 <= i < offs[np]): the largest t < np with offs[t] <= i (empty pieces are skipped).
SS_INLINE int64_t locate(const int64_t* offs, int64_t np, int64_t i) { return sshd::locate_piece(offs, 0, np, i); }

// Piece holding element i, trying the cursor t and its successor before a binary search.
SS_INLINE int64_t piece_near(const int64_t* offs, int64_t np, int64_t i, int64_t t) {
  if (i >= offs[t] && i < offs[t + 1]) return t;
  if (t + 2 <= np && i >= offs[t + 1] && i < offs[t + 2]) return t + 1;
  return locate(offs, np, i);
}

SS_INLINE uint8_t* elem_ptr(const uint64_t* ptrs, const int64_t* offs, int64_t t, int64_t i, int w) {
  return (uint8_t*)(uintptr_t)ptrs[t] + (i - offs[t]) * w;
}

// Address of 64 readable elements starting at element v, of which the first cnt (1..64) are the ones wanted: the
// elements in place when the piece holding v has 64 elements from v on, else a zero-padded copy in tmp. The cursor
// t must not be past v's piece; v never decreases between calls.
template <int W>
SS_INLINE const uint8_t* fetch64(const uint64_t* ptrs, const int64_t* offs, int64_t& t, int64_t v, int cnt,
                                 uint8_t* tmp) {
  while (v >= offs[t + 1]) ++t;
  if (v + 64 <= offs[t + 1]) return (const uint8_t*)(uintptr_t)ptrs[t] + (v - offs[t]) * W;
  int done = 0;
  int64_t u = t;
  while (done < cnt) {
    const int64_t vv = v + done;
    while (vv >= offs[u + 1]) ++u;
    const int take = (int)std::min<int64_t>(offs[u + 1] - vv, cnt - done);
    memcpy(tmp + done * W, (const uint8_t*)(uintptr_t)ptrs[u] + (vv - offs[u]) * W, (size_t)take * W);
    done += take;
  }
  memset(tmp + cnt * W, 0, (size_t)(64 - cnt) * W);
  return tmp;
}

// Classes of FORMAT.md §6.3.
struct Classes {
  int K = 1, ncut = 0, kb = 0, shift = 0;
  uint64_t thr[kMaxClasses];  // cuts[j] << shift: key(x) >= cuts[j] iff (x without its sign bit) >= thr[j]
  uint8_t cut8[kMaxClasses];  // cuts[j] (< 2^kb <= 256)
  uint8_t lut[256];           // key -> class
  SS_INLINE int of(uint64_t x) const { return kb ? lut[(x >> shift) & low_mask(kb)] : 0; }
};

// Checks kb, K and cuts (FORMAT.md §6.5) and fills cl.
inline bool classes_init(Classes& cl, int w, int kb, const int64_t* cuts, int ncuts) {
  if (kb < 0 || kb > 8 || kb > 8 * w - 1 || ncuts < 0 || ncuts + 1 > kMaxClasses) return false;
  if (kb == 0 && ncuts != 0) return false;
  if (ncuts > 0 && !cuts) return false;
  int64_t prev = 0;
  for (int j = 0; j < ncuts; ++j) {
    if (cuts[j] <= prev || cuts[j] >= ((int64_t)1 << kb)) return false;
    prev = cuts[j];
  }
  cl.K = ncuts + 1;
  cl.ncut = ncuts;
  cl.kb = kb;
  cl.shift = kb ? 8 * w - 1 - kb : 0;
  for (int j = 0; j < ncuts; ++j) {
    cl.thr[j] = (uint64_t)cuts[j] << cl.shift;
    cl.cut8[j] = (uint8_t)cuts[j];
  }
  for (int key = 0; key < 256; ++key) {
    int c = 0;
    while (c < ncuts && cuts[c] <= key) ++c;
    cl.lut[key] = (uint8_t)c;
  }
  return true;
}

inline bool space_ok(const uint64_t* ptrs, const int64_t* offs, int64_t np) {
  if (np < 0 || !offs || offs[0] != 0) return false;
  if (np > 0 && !ptrs) return false;
  for (int64_t t = 0; t < np; ++t)
    if (offs[t + 1] < offs[t]) return false;
  return offs[np] <= INT64_MAX / 16;
}

// ---------------------------------------------------------------- encoder types
template <int W>
struct Rec {
  uint32_t pos;   // within the chunk
  uint32_t rank;  // among the chunk's elements of its class
  uint32_t gap;   // gap before it in its class (first or later gap)
  uint8_t cls, sym;
  typename UInt<W>::T newv, oldv;
  SS_INLINE void set(uint64_t p, uint64_t rk, uint64_t g, int c, int s, typename UInt<W>::T nv,
                     typename UInt<W>::T ov) {
    pos = (uint32_t)p;
    rank = (uint32_t)rk;
    gap = (uint32_t)g;
    cls = (uint8_t)c;
    sym = (uint8_t)s;
    newv = nv;
    oldv = ov;
  }
};

// Per-worker encoder state. The Rice parameter rule needs sum(g >> k) over a class's gaps for every k: with
// bits[c][j] = number of class-c gaps with bit j set, sum(g >> k) = sum over j >= k of bits[c][j] << (j - k).
template <int W>
struct EncWorker {
  std::vector<Rec<W>> recs;
  uint64_t bits[kMaxClasses * 64];
  uint64_t ngaps[kMaxClasses];
  uint32_t present = 0;
  EncWorker() {
    memset(bits, 0, sizeof(bits));
    memset(ngaps, 0, sizeof(ngaps));
  }
  SS_INLINE void add_gap(int c, uint64_t g) {
    ++ngaps[c];
    uint64_t* b = bits + c * 64;
    for (; g; g &= g - 1) ++b[ctz64(g)];
  }
};

struct EncCtx {
  SpaceRef O;
  const uint64_t* nptrs;
  Classes cl;
  int64_t start, end;
  int log2c;
  const uint32_t* freqs;  // K x 256
  const int64_t* pos = nullptr;  // the changed elements' space indices when the caller knows them (else NULL)
  int64_t npos = 0;
};

// ---------------------------------------------------------------- decoder types
struct DChunk {
  int64_t j, n;
  uint64_t data_off, rl, bl;
  int64_t out_off;
};

struct DecCtx {
  SpaceRef O;
  Classes cl;
  int64_t start, end;
  int log2c;
  const uint8_t* seg;
  int npres;
  int pcls[kMaxClasses];  // present classes, increasing
  int pk[kMaxClasses];    // their Rice parameters
  const uint32_t* info;   // npres x 4096 slot tables (as ss_decode's)
  const uint32_t* cinfo[kMaxClasses];  // by class: its slot table (present classes only)
  int ck[kMaxClasses];                 // by class: its Rice parameter (present classes only)
  int64_t* idx_out;
  uint8_t* val_out;
};

struct RansDec {
  uint32_t x;
  uint64_t rp;
  const uint8_t* p;
  uint64_t rl;
};

SS_INLINE int rans_step(RansDec& r, const uint32_t* info, int* sym) {
  const uint32_t e = info[r.x & (kProbScale - 1)];
  r.x = ((e & 0xfff) + 1) * (r.x >> kProbBits) + ((e >> 12) & 0xfff);
  *sym = (int)(e >> 24);
  while (r.x < kRansL) {
    if (SS_UNLIKELY(r.rp >= r.rl)) return SS_ESTREAM;
    r.x = (r.x << 8) | r.p[r.rp++];
  }
  return SS_OK;
}

// One Rice-coded gap with parameter k; a unary part above `limit` (= chunk length >> k) is SS_EPOS (the gap runs
// past the chunk), a read past the stream (total bits) SS_ESTREAM.
SS_INLINE int read_gap(BitReader& br, uint64_t total, int k, uint64_t limit, uint64_t* g) {
  const uint64_t v = br.peek();
  const int r = ctz64(~v | (1ull << 56));
  if (SS_LIKELY(r < 56 && r + 1 + k <= 56 && (uint64_t)r <= limit && br.bitpos + (uint64_t)(r + 1 + k) <= total)) {
    *g = ((uint64_t)r << k) | ((v >> (r + 1)) & low_mask(k));
    br.skip((uint64_t)(r + 1 + k));
    return SS_OK;
  }
  uint64_t run = 0;
  for (;;) {
    const int rr = ctz64(~br.peek() | (1ull << 56));
    run += (uint64_t)rr;
    if (run > limit) return SS_EPOS;
    br.bitpos += (uint64_t)rr;
    if (rr < 56) break;
  }
  if (br.bitpos >= total) return SS_ESTREAM;  // the terminating zero is missing
  br.bitpos += 1;
  if (br.bitpos + (uint64_t)k > total) return SS_ESTREAM;
  *g = (run << k) | br.get(k);
  return SS_OK;
}

}  // namespace f2
}  // namespace ss

// ---------------------------------------------------------------- the two copies of the hot loops
namespace ss {
namespace f2 {
#define SS2_NS lv0
#define SS2_LV 0
#include "ss2_kernels.h"  // NOLINT: no include guard, included twice on purpose
#undef SS2_NS
#undef SS2_LV

#ifdef SS2_HAVE_LV1
#pragma GCC push_options
#pragma GCC target("avx2,avx512f,avx512bw,avx512vl,avx512dq,bmi,bmi2,popcnt,lzcnt")
// GCC 12 warns about _mm512_undefined_epi32() inside its own intrinsics (false positive, as in hash.cpp)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define SS2_NS lv1
#define SS2_LV 1
#include "ss2_kernels.h"  // NOLINT: no include guard, included twice on purpose
#undef SS2_NS
#undef SS2_LV
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

// 1 when the AVX-512BW + BMI2 copy may run (CPU support and the ss_simd cap), else 0.
static int level() {
#ifdef SS2_HAVE_LV1
  static const int cpu = [] {
    __builtin_cpu_init();
    return (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
            __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt"))
               ? 1
               : 0;
  }();
  return cpu && simd(-1) >= 1 ? 1 : 0;
#else
  return 0;
#endif
}

// ---------------------------------------------------------------- scan
// Asks for transparent huge pages over the 2 MiB-aligned interior of a large buffer that is about to be written for
// the first time (a hint, Linux only): faulting in 4 KiB pages costs more than writing them on virtual machines.
inline void advise_huge(void* p, uint64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = (uintptr_t)2 << 20;
  if (!p || bytes < 2 * kHuge) return;
  const uintptr_t a = ((uintptr_t)p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = ((uintptr_t)p + (uintptr_t)bytes) & ~(kHuge - 1);
  if (e > a) (void)madvise((void*)a, (size_t)(e - a), MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Growable array of positions (one per scan worker). Plain malloc/realloc: the reserved tail is never touched.
struct PosBuf {
  int64_t* p = nullptr;
  uint64_t n = 0, cap = 0;
  PosBuf() = default;
  PosBuf(const PosBuf&) = delete;
  PosBuf& operator=(const PosBuf&) = delete;
  PosBuf(PosBuf&& o) noexcept : p(o.p), n(o.n), cap(o.cap) { o.p = nullptr; }
  ~PosBuf() { free(p); }
  bool reserve_more(uint64_t k) {
    if (n + k <= cap) return true;
    const uint64_t nc = std::max<uint64_t>(n + k, cap * 2);
    void* q = realloc(p, (size_t)(nc * sizeof(int64_t)));
    if (!q) return false;
    p = (int64_t*)q;
    cap = nc;
    return true;
  }
};

template <int W, int MODE>
int64_t scan_impl(const SpaceRef& O, const uint64_t* nptrs, const Classes& cl, uint32_t* counts, uint64_t* hist,
                  uint64_t* keys, int64_t* pieces, int64_t* pos_out, int64_t pos_cap, int64_t* npos, int nthreads) {
  if (pieces)
    for (int64_t t = 0; t < O.np; ++t) pieces[t] = 0;
  const int64_t n = O.n;
  const int64_t nkeys = cl.kb ? ((int64_t)1 << cl.kb) : 1;
  const int64_t nblocks = (n + kFineBlock - 1) / kFineBlock;
  const int64_t per_task = 64;
  const int64_t ntasks = (nblocks + per_task - 1) / per_task;
  const int nt = plan_threads(nthreads, ntasks, n * W, 4 << 20);
  const size_t hsz = (size_t)nkeys * 256;
  std::vector<uint64_t> lh((size_t)nt * hsz, 0), lk((size_t)nt * nkeys, 0);
  const int lv = level();
  // positions: each task writes its changed elements (ascending) to its worker's buffer; a finished task's run is
  // published (copied to pos_out) as soon as every earlier task's run is, by whichever worker completes that prefix,
  // so the copy overlaps the scan and the worker buffers stay small (a worker reuses its buffer once all its runs
  // are published). Collection stops once the runs would pass pos_cap (or on a failed allocation).
  const bool want = pos_out != nullptr;
  if (want) advise_huge(pos_out, (uint64_t)pos_cap * sizeof(int64_t));
  struct TaskPos {
    int wid = -1;
    uint64_t off = 0;
    int64_t cnt = 0;
    bool done = false;
  };
  std::vector<TaskPos> tpos(want ? (size_t)ntasks : 0);
  std::vector<PosBuf> pbufs(want ? (size_t)nt : 0);
  std::vector<int64_t> pending(want ? (size_t)nt : 0);  // runs of each worker not yet published
  std::mutex mu;  // guards tpos, pending, pub_*, and every PosBuf's p / cap (a buffer moves only under mu)
  int64_t pub_task = 0, pub_off = 0;  // tasks [0, pub_task) are published: pub_off positions
  std::atomic<bool> over(false);
  parallel_for(ntasks, nt, [&](int64_t t, int wid) {
    const int64_t b0 = t * per_task, b1 = std::min(nblocks, b0 + per_task);
    uint64_t* h = &lh[(size_t)wid * hsz];
    uint64_t* k = &lk[(size_t)wid * nkeys];
    PosBuf* pb = nullptr;
    int64_t* pout = nullptr;
    if (want && !over.load(std::memory_order_relaxed)) {
      pb = &pbufs[(size_t)wid];
      std::lock_guard<std::mutex> lock(mu);
      if (pending[(size_t)wid] == 0) pb->n = 0;
      if (pb->reserve_more((uint64_t)(b1 - b0) * kFineBlock))
        pout = pb->p + pb->n;
      else
        over.store(true);  // out of memory: positions are not produced
    }
    int64_t got;
#ifdef SS2_HAVE_LV1
    if (lv)
      got = lv1::scan_blocks<W, MODE>(O, nptrs, cl, b0, b1, counts, h, k, pieces, pout);
    else
#endif
      got = lv0::scan_blocks<W, MODE>(O, nptrs, cl, b0, b1, counts, h, k, pieces, pout);
    (void)lv;
    if (pout) {
      std::lock_guard<std::mutex> lock(mu);
      tpos[(size_t)t] = TaskPos{wid, pb->n, got, true};
      pb->n += (uint64_t)got;
      ++pending[(size_t)wid];
      while (pub_task < ntasks && tpos[(size_t)pub_task].done) {
        const TaskPos& r = tpos[(size_t)pub_task];
        if (pub_off + r.cnt > pos_cap) over.store(true);
        if (!over.load(std::memory_order_relaxed) && r.cnt)
          memcpy(pos_out + pub_off, pbufs[(size_t)r.wid].p + r.off, (size_t)r.cnt * sizeof(int64_t));
        pub_off += r.cnt;
        --pending[(size_t)r.wid];
        ++pub_task;
      }
    }
  });
  int64_t total = 0;
  for (size_t i = 0; i < hsz; ++i) {
    uint64_t s = 0;
    for (int w = 0; w < nt; ++w) s += lh[(size_t)w * hsz + i];
    hist[i] = s;
    total += (int64_t)s;
  }
  for (int64_t i = 0; i < nkeys; ++i) {
    uint64_t s = 0;
    for (int w = 0; w < nt; ++w) s += lk[(size_t)w * nkeys + i];
    keys[i] = s;
  }
  if (want) *npos = !over.load() && pub_task == ntasks && pub_off == total && pub_off <= pos_cap ? pub_off : -1;
  return total;
}

// ---------------------------------------------------------------- encode
struct ChunkOut {
  int64_t n = 0;
  int worker = 0;       // pass 1 worker (its recs)
  uint64_t rec_off = 0;  // first record in that worker's recs
  int out_worker = 0;   // pass 2 worker (its arena)
  uint64_t rans_off = 0, rans_len = 0, bits_off = 0, bits_len = 0;
};

// Per-worker output bytes (not zero-filled: every byte that is copied out was written). alloc() may move buf.
struct Arena {
  struct Raw {
    uint8_t* p = nullptr;
    uint64_t size = 0, cap = 0;
    uint8_t* data() const { return p; }
  } buf;
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  Arena(Arena&& o) noexcept : buf(o.buf) { o.buf.p = nullptr; }
  ~Arena() { free(buf.p); }
  uint64_t alloc(uint64_t nbytes) {
    const uint64_t off = buf.size;
    const uint64_t need = off + nbytes;
    if (need > buf.cap) {
      const uint64_t nc = std::max<uint64_t>(need, buf.cap * 2);
      void* q = realloc(buf.p, (size_t)nc);
      if (!q) throw std::bad_alloc();
      buf.p = (uint8_t*)q;
      buf.cap = nc;
    }
    buf.size = need;
    return off;
  }
};

// rans_enc_put without a data-dependent branch (the state leaves at most 2 bytes: x < 2^31 and x_max >= 2^19): a
// byte is stored below p either way, p moves only when it is emitted. Needs one writable byte below the final p.
SS_INLINE uint32_t rans_put_nb(uint32_t x, uint8_t** pp, const RansEncSym& e) {
  uint8_t* p = *pp;
  const uint32_t xm = e.x_max;
  p[-1] = (uint8_t)x;
  const bool e1 = x >= xm;
  p -= e1;
  x = e1 ? x >> 8 : x;
  p[-1] = (uint8_t)x;
  const bool e2 = x >= xm;
  p -= e2;
  x = e2 ? x >> 8 : x;
  *pp = p;
  const uint32_t q = (uint32_t)(((uint64_t)x * e.rcp_freq) >> 32) >> e.rcp_shift;
  return x + e.bias + q * e.cmpl_freq;
}

// One chunk of pass 2.
template <int W>
struct WriteJob {
  const Rec<W>* R;
  int64_t n;
  const uint32_t* totals;
  uint8_t* vals_out;
  ChunkOut* out;
  std::vector<uint32_t>* after;  // (K > 1) the gap coded after each change
  uint64_t base, bits_cap, rans_cap;
  // backward state
  int64_t i;
  uint8_t* p;
  uint32_t x;
  int64_t nextg[kMaxClasses];
};

// Pass 2 for one or two chunks with changes (two: their rANS chains interleave, each step waits on the previous
// one of its own chunk only): the bit stream and the rANS stream into the worker's arena. One backward pass (rANS,
// and the gap coded after each change: the next later gap of its class or its final gap), one forward pass (bits,
// values). The bit region is sized by a bound (class c's gaps in the chunk sum to at most totals[c], so their unary
// parts take at most totals[c] >> k bits), its length is what was written.
template <int W, int MODE>
void enc_write(const EncCtx& E, WriteJob<W>* jobs, int njobs, uint32_t present, const int* ks,
               const RansEncSym* enc, Arena& ar) {
  typedef typename UInt<W>::T T;
  const int K = E.cl.K;
  constexpr uint64_t kMaxExtra = MODE == 1 ? 8 * W - 8 : 8 * W;
  for (int q = 0; q < njobs; ++q) {
    WriteJob<W>& J = jobs[q];
    uint64_t bound = (uint64_t)J.n * kMaxExtra;
    int npres = 0, kmax = 0;
    for (int c = 0; c < K; ++c) {
      if (!(present >> c & 1)) continue;
      ++npres;
      kmax = std::max(kmax, ks[c]);
      bound += (uint64_t)J.totals[c] >> ks[c];
    }
    bound += ((uint64_t)J.n + (uint64_t)npres) * (uint64_t)(1 + kmax);
    J.bits_cap = (bound + 7) / 8 + 8;
    J.rans_cap = 2 * (uint64_t)J.n + 8;
    J.base = ar.alloc(J.bits_cap + J.rans_cap);
    if (K > 1) J.after->resize((size_t)J.n);
  }
  uint8_t* A = ar.buf.data();  // (after the last alloc)
  // ---- backward: rANS, gaps after each change
  for (int q = 0; q < njobs; ++q) {
    WriteJob<W>& J = jobs[q];
    J.i = J.n - 1;
    J.p = A + J.base + J.bits_cap + J.rans_cap;
    J.x = kRansL;
    for (int c = 0; c < K; ++c) J.nextg[c] = -1;
  }
  auto step = [&](WriteJob<W>& J) {
    const Rec<W>& r = J.R[J.i];
    if (K == 1) {
      J.x = rans_put_nb(J.x, &J.p, enc[r.sym]);
    } else {
      const int c = r.cls;
      (*J.after)[(size_t)J.i] = J.nextg[c] >= 0 ? (uint32_t)J.nextg[c] : J.totals[c] - r.rank - 1;
      J.nextg[c] = r.gap;
      J.x = rans_put_nb(J.x, &J.p, enc[(size_t)c * 256 + r.sym]);
    }
    --J.i;
  };
  if (njobs == 2) {
    WriteJob<W>& J0 = jobs[0];
    WriteJob<W>& J1 = jobs[1];
    const int64_t m = std::min(J0.n, J1.n);
    if (K == 1) {  // the common case, with the states in registers
      uint32_t x0 = J0.x, x1 = J1.x;
      uint8_t* p0 = J0.p;
      uint8_t* p1 = J1.p;
      const Rec<W>* R0 = J0.R + J0.n - 1;
      const Rec<W>* R1 = J1.R + J1.n - 1;
      for (int64_t t = 0; t < m; ++t) {
        x0 = rans_put_nb(x0, &p0, enc[R0[-t].sym]);
        x1 = rans_put_nb(x1, &p1, enc[R1[-t].sym]);
      }
      J0.x = x0, J1.x = x1, J0.p = p0, J1.p = p1;
      J0.i -= m;
      J1.i -= m;
    } else {
      for (int64_t t = 0; t < m; ++t) {
        step(J0);
        step(J1);
      }
    }
  }
  for (int q = 0; q < njobs; ++q) {
    WriteJob<W>& J = jobs[q];
    while (J.i >= 0) step(J);
    J.p -= 4;
    store_u32(J.p, J.x);
    J.out->rans_off = (uint64_t)(J.p - A);
    J.out->rans_len = (uint64_t)(A + J.base + J.bits_cap + J.rans_cap - J.p);
  }
  // ---- forward: bits, values
  for (int q = 0; q < njobs; ++q) {
    WriteJob<W>& J = jobs[q];
    const Rec<W>* R = J.R;
    const int64_t n = J.n;
    const uint32_t* totals = J.totals;
    J.out->bits_off = J.base;
    BitWriter bw(A + J.base);
    for (int c = 0; c < K; ++c) {
      if (!(present >> c & 1)) continue;
      const uint64_t fg = K == 1 ? R[0].gap : J.nextg[c] >= 0 ? (uint64_t)J.nextg[c] : totals[c];
      bw.rice(fg, ks[c]);
    }
    const int k0 = ks[0];
    const uint32_t* after = K == 1 ? nullptr : J.after->data();
    for (int64_t i = 0; i < n; ++i) {
      const Rec<W>& r = R[i];
      uint64_t ev;
      int eb;
      if (MODE == 0)
        delta_symbol<W>((T)r.oldv, (T)r.newv, &ev, &eb);
      else
        raw_symbol<W>((T)r.newv, &ev, &eb);
      if (eb) bw.put_long(ev, eb);
      if (K == 1)
        bw.rice(i + 1 < n ? (uint64_t)R[i + 1].gap : (uint64_t)(totals[0] - r.rank - 1), k0);
      else
        bw.rice(after[i], ks[r.cls]);
      store_elem<W>(J.vals_out + (size_t)i * W, r.newv);
    }
    J.out->bits_len = (uint64_t)(bw.p - (A + J.base)) + (bw.fill ? 1 : 0);
  }
}

template <int W, int MODE>
int encode_impl(const EncCtx& E, uint8_t* table_out, int64_t table_cap, int64_t* table_len, uint8_t* data_out,
                int64_t data_cap, int64_t* data_len, int32_t* ks_out, uint64_t* values_hash, int64_t* nchanged,
                bool update_old, int nthreads) {
  const int K = E.cl.K;
  const int64_t C = (int64_t)1 << E.log2c;
  const int64_t nch = (E.end - E.start + C - 1) / C;
  // work: the bytes read (order-0 with positions: a few cache lines per change)
  const int64_t work1 = E.pos && E.cl.ncut == 0 ? E.npos * 128 : (E.end - E.start) * W;
  const int nt = plan_threads(nthreads, nch, work1, 2 << 20);
  std::vector<ChunkOut> outs((size_t)nch);
  std::vector<uint32_t> totals((size_t)nch * K);
  std::vector<EncWorker<W>> wks((size_t)nt);
  std::vector<int> errs((size_t)nch, 0);
  const int lv = level();
  (void)lv;
  // ---- positions given: each chunk's run of them (binary searches), checked below (strictly increasing, inside
  // the chunk, runs in chunk order covering all of them: then they ascend through [start, end))
  const bool havepos = E.pos != nullptr;
  std::vector<int64_t> lb(havepos ? (size_t)nch + 1 : 0);
  std::unique_ptr<Rec<W>[]> grecs;  // records of chunk j at [lb[j], lb[j+1])
  if (havepos) {
    // lb[j] = first i with pos[i] >= start + j*C (for ascending pos; some value in [0, npos] otherwise): branch-free
    // binary searches, 16 in lockstep (independent cache misses)
    lb[0] = 0;
    lb[(size_t)nch] = E.npos;
    if (E.npos > 0) {
      constexpr int kB = 16;
      for (int64_t j0 = 1; j0 < nch; j0 += kB) {
        const int m = (int)std::min<int64_t>(kB, nch - j0);
        int64_t base[kB], x[kB];
        for (int q = 0; q < m; ++q) {
          base[q] = 0;
          x[q] = E.start + (j0 + q) * C;
        }
        int64_t len = E.npos;
        while (len > 1) {
          const int64_t half = len / 2;
          for (int q = 0; q < m; ++q) base[q] = E.pos[base[q] + half] < x[q] ? base[q] + half : base[q];
          len -= half;
        }
        for (int q = 0; q < m; ++q) lb[(size_t)(j0 + q)] = base[q] + (E.pos[base[q]] < x[q] ? 1 : 0);
      }
    } else {
      for (int64_t j = 1; j < nch; ++j) lb[(size_t)j] = 0;
    }
    for (int64_t j = 0; j < nch; ++j)
      if (lb[(size_t)j + 1] < lb[(size_t)j]) return SS_EARG;
    grecs.reset(new Rec<W>[(size_t)std::max<int64_t>(1, E.npos)]);
  }
  // ---- pass 1: changes, classes, ranks, gap costs
  parallel_for(nch, nt, [&](int64_t j, int wid) {
    ChunkOut& o = outs[(size_t)j];
    EncWorker<W>& wk = wks[(size_t)wid];
    o.worker = wid;
    int64_t cnt = 0;
    int rc = SS_OK;
    if (havepos) {
      const int64_t p0 = lb[(size_t)j], np = lb[(size_t)j + 1] - p0;
      o.rec_off = (uint64_t)p0;
      if (np > 0) {
        const int64_t* P = E.pos + p0;
        const int64_t cs = E.start + j * C, ce = std::min(E.end, cs + C);
        bool ok = P[0] >= cs && P[np - 1] < ce;
        for (int64_t i = 1; i < np; ++i) ok &= P[i] > P[i - 1];
        if (!ok) {
          rc = SS_EARG;
        } else {
#ifdef SS2_HAVE_LV1
          if (lv)
            rc = lv1::enc_chunk_pos<W, MODE>(E, j, P, np, &grecs[(size_t)p0], wk, &totals[(size_t)j * K]);
          else
#endif
            rc = lv0::enc_chunk_pos<W, MODE>(E, j, P, np, &grecs[(size_t)p0], wk, &totals[(size_t)j * K]);
          cnt = np;
        }
      }
      o.n = rc ? 0 : cnt;
      errs[(size_t)j] = rc;
      return;
    }
    o.rec_off = wk.recs.size();
    try {
#ifdef SS2_HAVE_LV1
      if (lv)
        rc = lv1::enc_chunk<W, MODE>(E, j, wk, &totals[(size_t)j * K], &cnt);
      else
#endif
        rc = lv0::enc_chunk<W, MODE>(E, j, wk, &totals[(size_t)j * K], &cnt);
    } catch (...) {
      rc = SS_ENOMEM;
    }
    o.n = cnt;
    errs[(size_t)j] = rc;
  });
  auto recs_of = [&](const ChunkOut& o) -> const Rec<W>* {
    return havepos ? &grecs[(size_t)o.rec_off] : &wks[(size_t)o.worker].recs[o.rec_off];
  };
  for (int e : errs)
    if (e) return e;
  uint32_t present = 0;
  uint64_t bits[kMaxClasses * 64];
  uint64_t ngaps[kMaxClasses];
  memset(bits, 0, sizeof(bits));
  memset(ngaps, 0, sizeof(ngaps));
  for (const EncWorker<W>& wk : wks) {
    present |= wk.present;
    for (int i = 0; i < kMaxClasses * 64; ++i) bits[i] += wk.bits[i];
    for (int c = 0; c < kMaxClasses; ++c) ngaps[c] += wk.ngaps[c];
  }
  // ---- Rice parameter per present class: smallest k minimising sum over its gaps of (g >> k) + k + 1
  int ks[kMaxClasses];
  for (int c = 0; c < K; ++c) {
    ks[c] = -1;
    if (!(present >> c & 1)) continue;
    if (!freq_table_ok(E.freqs + (size_t)c * 256)) return SS_ERANS;
    uint64_t best = 0;
    for (int k = 0; k <= E.log2c; ++k) {
      uint64_t sum = 0;  // sum of (g >> k) over the class's gaps
      for (int j = k; j < 64; ++j) sum += bits[c * 64 + j] << (j - k);
      const uint64_t v = sum + ngaps[c] * (uint64_t)(k + 1);
      if (k == 0 || v < best) {
        best = v;
        ks[c] = k;
      }
    }
  }
  for (int c = 0; c < K; ++c) ks_out[c] = ks[c];
  std::vector<RansEncSym> enc((size_t)K * 256);
  for (int c = 0; c < K; ++c)
    if (present >> c & 1) rans_enc_init(&enc[(size_t)c * 256], E.freqs + (size_t)c * 256);
  // ---- pass 2: streams (values straight into the buffer of values_hash)
  std::vector<int64_t> work;
  std::vector<uint64_t> voff((size_t)nch);
  uint64_t total_n = 0;
  for (int64_t j = 0; j < nch; ++j) {
    voff[(size_t)j] = total_n * W;
    total_n += (uint64_t)outs[(size_t)j].n;
    if (outs[(size_t)j].n) work.push_back(j);
  }
  std::unique_ptr<uint8_t[]> vals(new uint8_t[(size_t)std::max<uint64_t>(1, total_n * W)]);
  const int nt2 = plan_threads(nthreads, (int64_t)work.size(), (int64_t)work.size(), 4);
  std::vector<Arena> arenas((size_t)nt2);
  std::vector<std::vector<uint32_t>> afters((size_t)nt2 * 2);
  std::atomic<bool> oom(false);
  const int64_t npairs = ((int64_t)work.size() + 1) / 2;  // chunks in pairs (interleaved rANS chains)
  parallel_for(npairs, nt2, [&](int64_t t, int wid) {
    WriteJob<W> jobs[2];
    const int nj = (int)std::min<int64_t>(2, (int64_t)work.size() - 2 * t);
    for (int q = 0; q < nj; ++q) {
      const int64_t j = work[(size_t)(2 * t + q)];
      ChunkOut& o = outs[(size_t)j];
      o.out_worker = wid;
      WriteJob<W>& J = jobs[q];
      J.R = recs_of(o);
      J.n = o.n;
      J.totals = &totals[(size_t)j * K];
      J.vals_out = vals.get() + voff[(size_t)j];
      J.out = &o;
      J.after = &afters[(size_t)wid * 2 + (size_t)q];
    }
    try {
      enc_write<W, MODE>(E, jobs, nj, present, ks, enc.data(), arenas[(size_t)wid]);
    } catch (...) {
      oom.store(true);
    }
  });
  if (oom.load()) return SS_ENOMEM;
  afters.clear();
  // ---- sizes, table, data, values
  uint64_t tlen = 0, dlen = 0;
  for (const ChunkOut& o : outs) {
    tlen += (uint64_t)varint_size((uint64_t)o.n);
    if (o.n) tlen += (uint64_t)varint_size(o.rans_len) + (uint64_t)varint_size(o.bits_len);
    dlen += o.rans_len + o.bits_len;
  }
  *table_len = (int64_t)tlen;
  *data_len = (int64_t)dlen;
  *nchanged = (int64_t)total_n;
  if (tlen > (uint64_t)table_cap || dlen > (uint64_t)data_cap) return SS_ECOUNT;
  std::vector<uint64_t> doff((size_t)nch);
  {
    uint8_t* tp = table_out;
    uint64_t d = 0;
    for (int64_t j = 0; j < nch; ++j) {
      const ChunkOut& o = outs[(size_t)j];
      tp = varint_put(tp, (uint64_t)o.n);
      if (o.n) {
        tp = varint_put(tp, o.rans_len);
        tp = varint_put(tp, o.bits_len);
      }
      doff[(size_t)j] = d;
      d += o.rans_len + o.bits_len;
    }
  }
  parallel_for((int64_t)work.size(), nt2, [&](int64_t t, int) {
    const int64_t j = work[(size_t)t];
    const ChunkOut& o = outs[(size_t)j];
    const uint8_t* A = arenas[(size_t)o.out_worker].buf.data();
    memcpy(data_out + doff[(size_t)j], A + o.rans_off, (size_t)o.rans_len);
    memcpy(data_out + doff[(size_t)j] + o.rans_len, A + o.bits_off, (size_t)o.bits_len);
  });
  arenas.clear();
  *values_hash = tree64(vals.get(), total_n * W, nthreads);
  vals.reset();
  if (update_old) {
    parallel_for((int64_t)work.size(), nt2, [&](int64_t t, int) {
      const int64_t j = work[(size_t)t];
      const ChunkOut& o = outs[(size_t)j];
      const Rec<W>* R = recs_of(o);
      const int64_t cs = E.start + j * C;
      int64_t cur = locate(E.O.offs, E.O.np, cs);
      for (int64_t i = 0; i < o.n; ++i) {
        const int64_t v = cs + (int64_t)R[i].pos;
        while (v >= E.O.offs[cur + 1]) ++cur;
        store_elem<W>(elem_ptr(E.O.ptrs, E.O.offs, cur, v, W), (typename UInt<W>::T)R[i].newv);
      }
    });
  }
  return SS_OK;
}

// ---------------------------------------------------------------- decode
template <int W, int MODE>
int decode_impl(const DecCtx& D, const std::vector<DChunk>& chunks, int64_t nchanged, int nthreads) {
  const int64_t nc = (int64_t)chunks.size();
  const bool ctx = D.cl.ncut > 0;
  const int64_t work = ctx ? (D.end - D.start) * W : nchanged * 8;
  const int nt = plan_threads(nthreads, nc, work, ctx ? (1 << 20) : (1 << 17));
  std::vector<int> errs((size_t)nc, 0);
  std::atomic<int64_t> first_bad(INT64_MAX);
  const int lv = level();
  (void)lv;
  parallel_for(nc, nt, [&](int64_t t, int) {
    if (t > first_bad.load(std::memory_order_relaxed)) return;  // an earlier chunk already failed
    const DChunk& e = chunks[(size_t)t];
    int rc;
#ifdef SS2_HAVE_LV1
    if (lv) {
      if (!ctx)
        rc = lv1::dec_chunk_plain<W, MODE>(D, e);
      else if (D.cl.K <= 8)
        rc = lv1::dec_chunk_ctx<W, MODE, 1>(D, e);
      else if (D.cl.K <= 16)
        rc = lv1::dec_chunk_ctx<W, MODE, 2>(D, e);
      else if (D.cl.K <= 24)
        rc = lv1::dec_chunk_ctx<W, MODE, 3>(D, e);
      else
        rc = lv1::dec_chunk_ctx<W, MODE, 4>(D, e);
    } else
#endif
      rc = ctx ? lv0::dec_chunk_ctx<W, MODE, 1>(D, e) : lv0::dec_chunk_plain<W, MODE>(D, e);
    if (rc) {
      errs[(size_t)t] = rc;
      int64_t cur = first_bad.load();
      while (t < cur && !first_bad.compare_exchange_weak(cur, t)) {
      }
    }
  });
  const int64_t fb = first_bad.load();
  return fb != INT64_MAX ? errs[(size_t)fb] : SS_OK;
}

template <int MODE>
int decode_w(int w, const DecCtx& D, const std::vector<DChunk>& chunks, int64_t nchanged, int nt) {
  switch (w) {
    case 1: return decode_impl<1, MODE>(D, chunks, nchanged, nt);
    case 2: return decode_impl<2, MODE>(D, chunks, nchanged, nt);
    case 4: return decode_impl<4, MODE>(D, chunks, nchanged, nt);
    case 8: return decode_impl<8, MODE>(D, chunks, nchanged, nt);
  }
  return SS_EARG;
}

inline bool width_ok(int w) { return w == 1 || w == 2 || w == 4 || w == 8; }

int decode_entry(const uint8_t* seg, int64_t seg_len, int64_t table_len, const uint64_t* optrs, const int64_t* offs,
                 int64_t np, int w, int kb, int mode, int64_t start, int64_t end, int log2c, const int64_t* cuts,
                 int ncuts, const int32_t* ks, const uint32_t* freqs, int64_t nchanged, uint64_t expected_hash,
                 int64_t* idx_out, uint8_t* val_out, int nthreads) {
  if (!width_ok(w) || mode < 0 || mode > 2 || log2c < 12 || log2c > 30) return SS_EARG;
  if (!space_ok(optrs, offs, np)) return SS_EARG;
  const int64_t n = offs[np];
  if (start < 0 || start >= end || end > n) return SS_EARG;
  if (seg_len < 0 || seg_len > (INT64_MAX >> 4) || (seg_len > 0 && !seg) || !freqs || !ks) return SS_EARG;
  DecCtx D;
  if (!classes_init(D.cl, w, kb, cuts, ncuts)) return SS_EARG;
  const int K = D.cl.K;
  // ---- classes: at least one present, k <= log2c, valid tables (no symbol above the mode's largest)
  const int maxsym = mode == 1 ? 255 : std::min(255, 16 + 8 * w - 4);
  D.npres = 0;
  for (int c = 0; c < K; ++c) {
    if (ks[c] < 0) continue;
    if (ks[c] > log2c) return SS_ETABLE;
    const uint32_t* f = freqs + (size_t)c * 256;
    if (!freq_table_ok(f)) return SS_ERANS;
    for (int s = maxsym + 1; s < 256; ++s)
      if (f[s]) return SS_ERANS;
    D.pcls[D.npres] = c;
    D.pk[D.npres] = ks[c];
    ++D.npres;
  }
  if (D.npres == 0) return SS_ETABLE;
  if (table_len < 0 || table_len > seg_len) return SS_ETABLE;
  // ---- chunk table (serial, in order)
  const int64_t C = (int64_t)1 << log2c;
  const int64_t nch = (end - start + C - 1) / C;
  const uint64_t tl = (uint64_t)table_len, sl = (uint64_t)seg_len;
  std::vector<DChunk> chunks;
  uint64_t pos = 0, data_pos = tl, total = 0;
  for (int64_t j = 0; j < nch; ++j) {
    uint64_t cnt;
    if (!varint_get(seg, tl, &pos, &cnt)) return SS_ETABLE;
    const int64_t clen = std::min(C, end - (start + j * C));
    if (cnt > (uint64_t)clen) return SS_ETABLE;
    if (cnt == 0) continue;
    uint64_t rl, bl;
    if (!varint_get(seg, tl, &pos, &rl)) return SS_ETABLE;
    if (!varint_get(seg, tl, &pos, &bl)) return SS_ETABLE;
    if (rl > sl || bl > sl || data_pos + rl + bl > sl) return SS_ETABLE;
    chunks.push_back(DChunk{j, (int64_t)cnt, data_pos, rl, bl, (int64_t)total});
    data_pos += rl + bl;
    total += cnt;
  }
  if (pos != tl) return SS_ETABLE;
  if (data_pos != sl) return SS_ETABLE;
  if (nchanged < 1 || total != (uint64_t)nchanged) return SS_ECOUNT;
  if (!idx_out || !val_out) return SS_EARG;
  // ---- symbol tables of the present classes
  std::vector<uint32_t> info((size_t)D.npres * kProbScale);
  for (int q = 0; q < D.npres; ++q) {
    const uint32_t* f = freqs + (size_t)D.pcls[q] * 256;
    uint32_t* tab = &info[(size_t)q * kProbScale];
    uint32_t acc = 0;
    for (int s = 0; s < 256; ++s) {
      for (uint32_t j = 0; j < f[s]; ++j) tab[acc + j] = (f[s] - 1) | (j << 12) | ((uint32_t)s << 24);
      acc += f[s];
    }
  }
  D.O = SpaceRef{optrs, offs, np, n};
  D.start = start;
  D.end = end;
  D.log2c = log2c;
  D.seg = seg;
  D.info = info.data();
  for (int q = 0; q < D.npres; ++q) {
    D.cinfo[D.pcls[q]] = &info[(size_t)q * kProbScale];
    D.ck[D.pcls[q]] = D.pk[q];
  }
  D.idx_out = idx_out;
  D.val_out = val_out;
  const int rc = mode == 0   ? decode_w<0>(w, D, chunks, nchanged, nthreads)
                 : mode == 1 ? decode_w<1>(w, D, chunks, nchanged, nthreads)
                             : decode_w<2>(w, D, chunks, nchanged, nthreads);
  if (rc) return rc;
  if (mode == 2) return SS_OK;  // differences only: the caller checks the hash after ss2_add_scatter
  return check_values_hash(val_out, (uint64_t)nchanged * (uint64_t)w, expected_hash, nthreads);
}

// ---------------------------------------------------------------- scatter / add_scatter / take
SS_INLINE void mark(uint8_t* touched, int64_t t) {
  if (touched) __atomic_store_n(&touched[t], (uint8_t)1, __ATOMIC_RELAXED);
}

// op 0: dst = vals; op 1: dst += d; op 2: dst -= d; op 3: out = src (take). new_out (ops 1, 2) gets the results.
template <int W, int OP>
int indexed_impl(const uint64_t* ptrs, const int64_t* offs, int64_t np, const int64_t* idx, const uint8_t* in,
                 uint8_t* out, int64_t count, uint8_t* touched, int nthreads) {
  typedef typename UInt<W>::T T;
  const int64_t n = offs[np];
  const int64_t per_task = 1 << 16;
  const int64_t ntasks = (count + per_task - 1) / per_task;
  const int nt = plan_threads(nthreads, ntasks, count, 1 << 17);
  if (!indices_in_range(idx, count, n, ntasks, per_task, nt)) return SS_EPOS;
  parallel_for(ntasks, nt, [&](int64_t task, int) {
    const int64_t b = task * per_task, e = std::min(count, b + per_task);
    int64_t t = locate(offs, np, idx[b]), ta = t;
    int64_t marked = -1;
    const int64_t kAhead = 16;
    for (int64_t i = b; i < e; ++i) {
      const int64_t v = idx[i];
      t = piece_near(offs, np, v, t);
      uint8_t* p = elem_ptr(ptrs, offs, t, v, W);
      if (i + kAhead < e) {  // independent loads instead of a chain of misses (a second cursor, ahead)
        const int64_t va = idx[i + kAhead];
        ta = piece_near(offs, np, va, ta);
        if (OP == 3)
          __builtin_prefetch(elem_ptr(ptrs, offs, ta, va, W), 0, 3);
        else
          __builtin_prefetch(elem_ptr(ptrs, offs, ta, va, W), 1, 3);
      }
      if (OP != 3 && t != marked) {
        mark(touched, t);
        marked = t;
      }
      if (OP == 0) {
        memcpy(p, in + i * W, W);
      } else if (OP == 3) {
        memcpy(out + i * W, p, W);
      } else {
        const T dv = load_elem<W>(in + i * W);
        const T nv = OP == 2 ? (T)(load_elem<W>(p) - dv) : (T)(load_elem<W>(p) + dv);
        store_elem<W>(p, nv);
        if (out) store_elem<W>(out + i * W, nv);
      }
    }
  });
  return SS_OK;
}

template <int OP>
int indexed_w(int w, const uint64_t* ptrs, const int64_t* offs, int64_t np, const int64_t* idx, const uint8_t* in,
              uint8_t* out, int64_t count, uint8_t* touched, int nthreads) {
  if (!width_ok(w) || count < 0 || !space_ok(ptrs, offs, np)) return SS_EARG;
  if (count > 0 && (!idx || (OP != 3 && !in) || (OP == 3 && !out))) return SS_EARG;
  if (count == 0) return SS_OK;
  switch (w) {
    case 1: return indexed_impl<1, OP>(ptrs, offs, np, idx, in, out, count, touched, nthreads);
    case 2: return indexed_impl<2, OP>(ptrs, offs, np, idx, in, out, count, touched, nthreads);
    case 4: return indexed_impl<4, OP>(ptrs, offs, np, idx, in, out, count, touched, nthreads);
    case 8: return indexed_impl<8, OP>(ptrs, offs, np, idx, in, out, count, touched, nthreads);
  }
  return SS_EARG;
}

// ---------------------------------------------------------------- gather / put
// Copies space elements [start, end) to (put = false) or from (put = true) buf, in parallel ranges.
int range_copy(const uint64_t* ptrs, const int64_t* offs, int64_t np, int w, int64_t start, int64_t end, uint8_t* buf,
               bool put, uint8_t* touched, int nthreads) {
  if (!width_ok(w) || !space_ok(ptrs, offs, np)) return SS_EARG;
  const int64_t n = offs[np];
  if (start < 0 || end < start || end > n) return SS_EARG;
  if (end == start) return SS_OK;
  if (!buf) return SS_EARG;
  const int64_t cnt = end - start;
  const int64_t per_task = std::max<int64_t>(1, ((int64_t)1 << 20) / w);  // 1 MiB per task
  const int64_t ntasks = (cnt + per_task - 1) / per_task;
  const int nt = plan_threads(nthreads, ntasks, cnt * w, 1 << 21);
  parallel_for(ntasks, nt, [&](int64_t task, int) {
    const int64_t b = start + task * per_task, e = std::min(end, b + per_task);
    int64_t t = locate(offs, np, b);
    int64_t v = b;
    while (v < e) {
      while (v >= offs[t + 1]) ++t;
      const int64_t take = std::min(e, offs[t + 1]) - v;
      uint8_t* p = elem_ptr(ptrs, offs, t, v, w);
      uint8_t* q = buf + (v - start) * w;
      if (put) {
        memcpy(p, q, (size_t)(take * w));
        mark(touched, t);
      } else {
        memcpy(q, p, (size_t)(take * w));
      }
      v += take;
    }
  });
  return SS_OK;
}

// ---------------------------------------------------------------- tree64 of many buffers
// (csrc/hash.cpp: ss::tree64_batch)
int tree64_many(const uint64_t* ptrs, const uint64_t* lens, int64_t count, uint64_t* out, int nthreads) {
  return ::ss::tree64_batch(ptrs, lens, count, out, nthreads);
}

}  // namespace f2
}  // namespace ss

using ss::f2::SpaceRef;

SS_EXPORT int64_t ss2_scan(const uint64_t* old_ptrs, const uint64_t* new_ptrs, const int64_t* offs, int64_t npieces,
                           int w, int kb, int mode, uint32_t* counts, uint64_t* hist, uint64_t* keys, int64_t* pieces,
                           int64_t* pos_out, int64_t pos_cap, int64_t* npos, int nthreads) {
  using namespace ss::f2;
  if (!width_ok(w) || mode < 0 || mode > 2 || !hist || !keys) return SS_EARG;
  if (pos_out && (!npos || pos_cap < 0)) return SS_EARG;
  if (npos) *npos = -1;
  if (mode == 2) mode = 0;  // delta deferred: the same symbols
  if (!space_ok(old_ptrs, offs, npieces) || (npieces > 0 && !new_ptrs)) return SS_EARG;
  Classes cl;
  if (!classes_init(cl, w, kb, nullptr, 0)) return SS_EARG;
  const int64_t n = offs[npieces];
  if (n > 0 && !counts) return SS_EARG;
  SpaceRef O{old_ptrs, offs, npieces, n};
  try {
#define SS2_SCAN(W)                                                                       \
  return mode == 0 ? scan_impl<W, 0>(O, new_ptrs, cl, counts, hist, keys, pieces, pos_out, pos_cap, npos, nthreads) \
                   : scan_impl<W, 1>(O, new_ptrs, cl, counts, hist, keys, pieces, pos_out, pos_cap, npos, nthreads)
    switch (w) {
      case 1: SS2_SCAN(1);
      case 2: SS2_SCAN(2);
      case 4: SS2_SCAN(4);
      case 8: SS2_SCAN(8);
    }
#undef SS2_SCAN
  } catch (...) {
    return SS_ENOMEM;
  }
  return SS_EARG;
}

SS_EXPORT int ss2_encode(const uint64_t* old_ptrs, const uint64_t* new_ptrs, const int64_t* offs, int64_t npieces,
                         int w, int kb, int mode, int64_t start, int64_t end, int log2c, const int64_t* cuts,
                         int ncuts, const uint32_t* freqs, uint8_t* table_out, int64_t table_cap, int64_t* table_len,
                         uint8_t* data_out, int64_t data_cap, int64_t* data_len, int32_t* ks_out,
                         uint64_t* values_hash, int64_t* nchanged, int update_old, const int64_t* positions,
                         int64_t npositions, int nthreads) {
  using namespace ss::f2;
  if (!width_ok(w) || (mode != 0 && mode != 1) || log2c < 12 || log2c > 30) return SS_EARG;
  if (!space_ok(old_ptrs, offs, npieces) || (npieces > 0 && !new_ptrs)) return SS_EARG;
  const int64_t n = offs[npieces];
  if (start < 0 || start >= end || end > n) return SS_EARG;
  if (!freqs || !table_len || !data_len || !ks_out || !values_hash || !nchanged || table_cap < 0 || data_cap < 0)
    return SS_EARG;
  if ((table_cap > 0 && !table_out) || (data_cap > 0 && !data_out)) return SS_EARG;
  EncCtx E;
  if (!classes_init(E.cl, w, kb, cuts, ncuts)) return SS_EARG;
  E.O = SpaceRef{old_ptrs, offs, npieces, n};
  E.nptrs = new_ptrs;
  E.start = start;
  E.end = end;
  E.log2c = log2c;
  E.freqs = freqs;
  if (positions) {
    if (npositions < 0 || npositions > end - start) return SS_EARG;
    E.pos = positions;
    E.npos = npositions;
  } else if (npositions != 0) {
    return SS_EARG;
  }
  const bool upd = update_old != 0;
  try {
#define SS2_ENC(W)                                                                                                 \
  return mode == 0 ? encode_impl<W, 0>(E, table_out, table_cap, table_len, data_out, data_cap, data_len, ks_out, \
                                       values_hash, nchanged, upd, nthreads)                                       \
                   : encode_impl<W, 1>(E, table_out, table_cap, table_len, data_out, data_cap, data_len, ks_out, \
                                       values_hash, nchanged, upd, nthreads)
    switch (w) {
      case 1: SS2_ENC(1);
      case 2: SS2_ENC(2);
      case 4: SS2_ENC(4);
      case 8: SS2_ENC(8);
    }
#undef SS2_ENC
  } catch (...) {
    return SS_ENOMEM;
  }
  return SS_EARG;
}

SS_EXPORT int ss2_decode(const uint8_t* seg, int64_t seg_len, int64_t table_len, const uint64_t* old_ptrs,
                         const int64_t* offs, int64_t npieces, int w, int kb, int mode, int64_t start, int64_t end,
                         int log2c, const int64_t* cuts, int ncuts, const int32_t* ks, const uint32_t* freqs,
                         int64_t nchanged, uint64_t expected_hash, int64_t* idx_out, uint8_t* val_out, int nthreads) {
  try {
    return ss::f2::decode_entry(seg, seg_len, table_len, old_ptrs, offs, npieces, w, kb, mode, start, end, log2c,
                                cuts, ncuts, ks, freqs, nchanged, expected_hash, idx_out, val_out, nthreads);
  } catch (...) {
    return SS_ENOMEM;
  }
}

SS_EXPORT int ss2_scatter(const uint64_t* ptrs, const int64_t* offs, int64_t npieces, int w, const int64_t* idx,
                          const uint8_t* vals, int64_t count, uint8_t* touched, int nthreads) {
  try {
    return ss::f2::indexed_w<0>(w, ptrs, offs, npieces, idx, vals, nullptr, count, touched, nthreads);
  } catch (...) {
    return SS_ENOMEM;
  }
}

SS_EXPORT int ss2_add_scatter(const uint64_t* ptrs, const int64_t* offs, int64_t npieces, int w, const int64_t* idx,
                              const uint8_t* d, uint8_t* new_out, int64_t count, int negate, uint8_t* touched,
                              int nthreads) {
  try {
    return negate ? ss::f2::indexed_w<2>(w, ptrs, offs, npieces, idx, d, new_out, count, touched, nthreads)
                  : ss::f2::indexed_w<1>(w, ptrs, offs, npieces, idx, d, new_out, count, touched, nthreads);
  } catch (...) {
    return SS_ENOMEM;
  }
}

SS_EXPORT int ss2_take(const uint64_t* ptrs, const int64_t* offs, int64_t npieces, int w, const int64_t* idx,
                       uint8_t* out, int64_t count, int nthreads) {
  try {
    return ss::f2::indexed_w<3>(w, ptrs, offs, npieces, idx, nullptr, out, count, nullptr, nthreads);
  } catch (...) {
    return SS_ENOMEM;
  }
}

SS_EXPORT int ss2_gather(const uint64_t* ptrs, const int64_t* offs, int64_t npieces, int w, int64_t start,
                         int64_t end, uint8_t* out, int nthreads) {
  try {
    return ss::f2::range_copy(ptrs, offs, npieces, w, start, end, out, false, nullptr, nthreads);
  } catch (...) {
    return SS_ENOMEM;
  }
}

SS_EXPORT int ss2_put(const uint64_t* ptrs, const int64_t* offs, int64_t npieces, int w, int64_t start, int64_t end,
                      const uint8_t* data, uint8_t* touched, int nthreads) {
  try {
    return ss::f2::range_copy(ptrs, offs, npieces, w, start, end, const_cast<uint8_t*>(data), true, touched,
                              nthreads);
  } catch (...) {
    return SS_ENOMEM;
  }
}

SS_EXPORT int ss2_tree64_many(const uint64_t* ptrs, const uint64_t* lens, int64_t count, uint64_t* out,
                              int nthreads) {
  try {
    return ss::f2::tree64_many(ptrs, lens, count, out, nthreads);
  } catch (...) {
    return SS_ENOMEM;
  }
}
