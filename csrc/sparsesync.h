// sparsesync native kernels: plain C ABI on raw pointers (no PyTorch headers).
// The format these kernels implement is specified in docs/FORMAT.md; the pure-PyTorch reference of every function
// lives in sparsesync/reference.py and the tests compare both bit for bit.
//
// Conventions: element width w in {1,2,4,8} bytes; n = number of elements; value mode 0 = delta, 1 = raw;
// nthreads <= 0 means "use all hardware threads". Functions returning int return 0 on success or a negative
// SS_E* code; they never read or write outside the buffers described by their arguments.
#ifndef SPARSESYNC_H_
#define SPARSESYNC_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SS_ABI_VERSION 2

#define SS_OK 0
#define SS_EARG -1       /* bad argument (width, log2c, ranges, capacity) */
#define SS_ETABLE -2     /* chunk table malformed (varint, k, lengths don't add up) */
#define SS_ESTREAM -3    /* a read past the end of a stream, or stream not consumed exactly */
#define SS_EPOS -4       /* a position outside its chunk */
#define SS_ERANS -5      /* rANS final state mismatch or bad symbol table */
#define SS_ECOUNT -6     /* counts disagree with nchanged / capacity */
#define SS_EHASH -7      /* values_hash mismatch */
#define SS_ENOMEM -8

int ss_abi_version(void);

/* h64 of FORMAT.md 1.1 (single thread). */
uint64_t ss_h64(const uint8_t* data, uint64_t len, uint64_t seed);

/* tree64 of FORMAT.md 1.2 (leaves hashed in parallel). */
uint64_t ss_tree64(const uint8_t* data, uint64_t len, int nthreads);

/* Pass 1 of encoding. Compares old and new bit patterns.
 * counts[b] = number of changed elements in fine block b = elements [b*4096, (b+1)*4096) (nblocks = ceil(n/4096)).
 * hist[s] += number of changed elements whose value symbol (FORMAT.md 4.2) is s (hist has 256 entries; the function
 * zeroes it first). Returns the total number of changed elements (>= 0) or a negative error. */
int64_t ss_scan(const uint8_t* old_bits, const uint8_t* new_bits, int64_t n, int w, int mode,
                uint32_t* counts, uint64_t* hist, int nthreads);

/* Pass 2 of encoding: one sparse segment = chunks [chunk_begin, chunk_end) with chunk size 2^log2c.
 * freq: 256 entries (0 for absent symbols, sum 4096) — the table every chunk is coded with.
 * Writes the chunk table to table_out (capacity table_cap) and the streams to data_out (capacity data_cap), in the
 * layout of FORMAT.md 4.1; *table_len / *data_len receive the sizes, *values_hash the segment's values_hash and
 * *nchanged its changed-element count. If update_old != 0, every changed element of old_bits in the segment is
 * overwritten with its new bit pattern (the encoder keeps its snapshot current for free).
 * Returns 0, SS_EARG, SS_ECOUNT (capacity too small: nothing useful written) or SS_ERANS (a symbol with freq 0). */
int ss_encode(uint8_t* old_bits, const uint8_t* new_bits, int64_t n, int w, int mode, int log2c,
              int64_t chunk_begin, int64_t chunk_end, const uint32_t* freq,
              uint8_t* table_out, int64_t table_cap, int64_t* table_len,
              uint8_t* data_out, int64_t data_cap, int64_t* data_len,
              uint64_t* values_hash, int64_t* nchanged, int update_old, int nthreads);

/* Decodes one sparse segment (FORMAT.md 4) and enforces every rule of FORMAT.md 4.4.
 * seg points to the segment's bytes (table followed by streams), seg_len = table_len + streams.
 * old_bits: the receiver's current tensor (n elements), only read (delta mode needs it).
 * Outputs, nchanged entries each: idx_out (flat element index, int64) and val_out (new bit patterns, w bytes each).
 * The values_hash of val_out is compared with expected_hash; a mismatch returns SS_EHASH.
 * Nothing outside idx_out[0..nchanged) and val_out[0..nchanged*w) is written. */
int ss_decode(const uint8_t* seg, int64_t seg_len, int64_t table_len, const uint8_t* old_bits, int64_t n, int w,
              int mode, int log2c, int64_t chunk_begin, int64_t chunk_end, const uint32_t* freq,
              int64_t nchanged, uint64_t expected_hash, int64_t* idx_out, uint8_t* val_out, int nthreads);

/* mode 2 of ss_decode ("delta, deferred"): like mode 0, but val_out receives the differences d (w bytes each) instead
 * of new values, old_bits is not read and expected_hash is not checked (the caller checks it after ss_add_scatter).
 *
 * dst[idx[i]] += d[i] (or -= when negate != 0), modulo 2^(8w), and new_out[i] (if not NULL) receives the result.
 * Checks every idx < n first; on a bad index returns SS_EPOS and writes nothing. Applying with negate undoes it. */
int ss_add_scatter(uint8_t* dst, int64_t n, int w, const int64_t* idx, const uint8_t* d, uint8_t* new_out,
                   int64_t count, int negate, int nthreads);

/* dst[idx[i]] = vals[i] for i < count (w bytes each). Checks every idx < n first; on a bad index returns SS_EPOS and
 * writes nothing. */
int ss_scatter(uint8_t* dst, int64_t n, int w, const int64_t* idx, const uint8_t* vals, int64_t count, int nthreads);

/* 1 if the library was built with the CUDA sources (CMake option SPARSESYNC_CUDA), else 0. */
int ss_cuda_compiled(void);
/* The GPU architectures compiled in (e.g. 900 for sm_90): up to `cap` written to `out`; returns how many (0 without
 * CUDA, -1 when the compiler did not say). */
int ss_cuda_archs(int* out, int cap);

/* SIMD paths (results are bit-identical either way; for tests and benchmarks). max_level >= 0 caps the level used
 * from now on (0 = portable code only, 1 = also AVX-512 where the CPU has it); max_level < 0 only queries.
 * Returns the level now in use. */
int ss_simd(int max_level);

/* ------------------------------------------------------------------------------------------------------------------
 * Format version 2 (FORMAT.md 6): kernels on spaces.
 *
 * A space (all tensors of one dtype in sorted name order, FORMAT.md 6.1) is passed as pieces: `ptrs[t]` is the address
 * of piece t, which holds space elements [offs[t], offs[t+1]) (offs has npieces + 1 entries, offs[0] = 0,
 * non-decreasing; N = offs[npieces]). Two spaces passed together (old and new) share offs. kb = key bits of the dtype
 * (FORMAT.md 6.3: 8 bfloat16/float32/float64, 5 float16/float8_e5m2, 4 float8_e4m3fn, 0 others); cuts are ncuts
 * int64 values, K = ncuts + 1 classes (K <= 32). A virtual element is located by binary search on offs (one per
 * chunk or thread range; sequential walks keep a cursor), so the number of pieces costs nearly nothing.
 * Mode 0 = delta, 1 = raw, 2 = delta deferred (ss2_decode only, as in ss_decode).
 * ------------------------------------------------------------------------------------------------------------------ */

/* Pass 1 of encoding over a whole space. counts[b] = changed elements in fine block [b*4096, (b+1)*4096) of the space
 * (ceil(N/4096) entries); hist[key*256 + s] = changed elements whose OLD value has key `key` and whose value symbol
 * (FORMAT.md 4.2) is s (2^kb x 256 entries, 1 x 256 when kb = 0); keys[key] = ALL elements with that OLD key, counted
 * only in fine blocks b with b % 16 == 0 (2^kb entries, 1 when kb = 0); pieces[t] (if not NULL, npieces entries)
 * = changed elements in piece t. hist, keys and pieces are overwritten. Mode 2 counts as mode 0.
 * pos_out (optional, pos_cap entries; then npos is required): the space indices of all changed elements, ascending,
 * collected during the same pass. *npos = their number when they fit (<= pos_cap), else -1 and pos_out holds nothing
 * useful (too many changes, or no memory for the per-thread runs); everything else is computed either way. With
 * pos_out NULL, *npos (if npos is not NULL) = -1.
 * Returns the number of changed elements (>= 0) or a negative error. */
int64_t ss2_scan(const uint64_t* old_ptrs, const uint64_t* new_ptrs, const int64_t* offs, int64_t npieces, int w,
                 int kb, int mode, uint32_t* counts, uint64_t* hist, uint64_t* keys, int64_t* pieces,
                 int64_t* pos_out, int64_t pos_cap, int64_t* npos, int nthreads);

/* Pass 2 of encoding: one sparse segment of FORMAT.md 6.2-6.4 over space elements [start, end) (chunks of 2^log2c
 * from start). freqs: K x 256 tables (class c's table at freqs + 256*c; only present classes' tables are used and
 * must sum to 4096). Classes are taken from old. Writes the chunk table / streams (capacities table_cap, data_cap;
 * sizes in *table_len / *data_len, also when the capacity is too small: SS_ECOUNT, nothing else changed),
 * ks_out[c] = class c's Rice parameter (FORMAT.md 6.4 rule) or -1 when no element of class c changes,
 * *values_hash, *nchanged. update_old != 0: afterwards old holds the new bit pattern at every changed element
 * (written only on success).
 * positions (optional, npositions entries; NULL requires npositions = 0): the space indices of exactly the changed
 * elements of [start, end), strictly increasing (e.g. ss2_scan's pos_out, sliced). Then old and new are not diffed
 * over the range: new is read only at the positions, old only at the positions without cuts and over the chunks that
 * hold positions with cuts (for the classes). The output is the same as without positions. Positions not strictly
 * increasing or outside [start, end): SS_EARG; a position whose element is not changed (old == new): SS_ECOUNT.
 * (A changed element missing from positions is not detected: it is coded as unchanged.)
 * Returns 0, SS_EARG, SS_ECOUNT, SS_ERANS (a changed element's symbol has frequency 0 in its class's table, or a
 * present class's table is invalid) or SS_ENOMEM. */
int ss2_encode(const uint64_t* old_ptrs, const uint64_t* new_ptrs, const int64_t* offs, int64_t npieces, int w,
               int kb, int mode, int64_t start, int64_t end, int log2c, const int64_t* cuts, int ncuts,
               const uint32_t* freqs, uint8_t* table_out, int64_t table_cap, int64_t* table_len, uint8_t* data_out,
               int64_t data_cap, int64_t* data_len, int32_t* ks_out, uint64_t* values_hash, int64_t* nchanged,
               int update_old, const int64_t* positions, int64_t npositions, int nthreads);

/* Decodes one sparse segment of FORMAT.md 6 (seg = table_len bytes of chunk table, then the streams) over space
 * elements [start, end) and enforces every rule of FORMAT.md 4.4 and 6.5. ks[c] = class c's Rice parameter or -1
 * (class absent, `nil`); freqs as ss2_encode. Outputs nchanged entries: idx_out (space indices, position order) and
 * val_out (w bytes each: new bit patterns, or the differences in mode 2). old (only read) gives the delta base and,
 * when ncuts > 0, every element's class (all elements of [start, end) in chunks with changes are read).
 * Modes 0 and 1 check values_hash (SS_EHASH). Nothing outside idx_out / val_out is written. Errors: SS_EARG (arguments,
 * cuts), SS_ETABLE (table, k > log2c, no present class), SS_ERANS (a class's table, rANS final state), SS_ESTREAM,
 * SS_EPOS (a gap past the end of its chunk, a final gap not ending at the chunk end), SS_ECOUNT (counts: sum of n,
 * nchanged < 1, changes found in a chunk != n), SS_EHASH. */
int ss2_decode(const uint8_t* seg, int64_t seg_len, int64_t table_len, const uint64_t* old_ptrs, const int64_t* offs,
               int64_t npieces, int w, int kb, int mode, int64_t start, int64_t end, int log2c, const int64_t* cuts,
               int ncuts, const int32_t* ks, const uint32_t* freqs, int64_t nchanged, uint64_t expected_hash,
               int64_t* idx_out, uint8_t* val_out, int nthreads);

/* dst[idx[i]] = vals[i] (space indices in any order). touched (NULL or npieces bytes): set to 1 for every piece
 * written. Checks every idx in [0, N) first; on a bad index returns SS_EPOS and writes nothing. */
int ss2_scatter(const uint64_t* ptrs, const int64_t* offs, int64_t npieces, int w, const int64_t* idx,
                const uint8_t* vals, int64_t count, uint8_t* touched, int nthreads);

/* dst[idx[i]] += d[i] (or -= when negate != 0) modulo 2^(8w); new_out[i] (if not NULL) receives the result.
 * touched and index checks as ss2_scatter. */
int ss2_add_scatter(const uint64_t* ptrs, const int64_t* offs, int64_t npieces, int w, const int64_t* idx,
                    const uint8_t* d, uint8_t* new_out, int64_t count, int negate, uint8_t* touched, int nthreads);

/* out[i] = src[idx[i]] (w bytes each). Checks every idx in [0, N) first (SS_EPOS, nothing written). */
int ss2_take(const uint64_t* ptrs, const int64_t* offs, int64_t npieces, int w, const int64_t* idx, uint8_t* out,
             int64_t count, int nthreads);

/* out = the bytes of space elements [start, end) ((end-start)*w bytes). */
int ss2_gather(const uint64_t* ptrs, const int64_t* offs, int64_t npieces, int w, int64_t start, int64_t end,
               uint8_t* out, int nthreads);

/* Space elements [start, end) = data ((end-start)*w bytes); touched as ss2_scatter. */
int ss2_put(const uint64_t* ptrs, const int64_t* offs, int64_t npieces, int w, int64_t start, int64_t end,
            const uint8_t* data, uint8_t* touched, int nthreads);

/* out[i] = tree64 (FORMAT.md 1.2) of the lens[i] bytes at ptrs[i] (lens[i] = 0 allowed), for count buffers; all
 * leaves of all buffers are hashed in parallel. */
int ss2_tree64_many(const uint64_t* ptrs, const uint64_t* lens, int64_t count, uint64_t* out, int nthreads);

#ifdef __cplusplus
}
#endif

#endif  // SPARSESYNC_H_
