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

#define SS_ABI_VERSION 1

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

/* SIMD paths (results are bit-identical either way; for tests and benchmarks). max_level >= 0 caps the level used
 * from now on (0 = portable code only, 1 = also AVX-512 where the CPU has it); max_level < 0 only queries.
 * Returns the level now in use. */
int ss_simd(int max_level);

#ifdef __cplusplus
}
#endif

#endif  // SPARSESYNC_H_
